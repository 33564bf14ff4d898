"""How fast a producer waiting on a full stream wakes when a consumer makes room, per backend.

    python benchmarks/wake.py                       # memory, and Redis on a redis-server it starts
    python benchmarks/wake.py --redis redis://127.0.0.1:6379/0 --rounds 200

A queue stream of size 1 holds one item; a producer coroutine offers the next one and waits
for room. The consumer takes the held item, waits 20 ms (so the producer is asleep), then
acknowledges it: the figure is the time from just before the acknowledgement is sent to
the producer's item being placed. On Redis that spans the ack script, the notification
(pub/sub) reaching the replica, and the producer's own offer script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import numpy as np

from ndrelay.registry import MemoryRegistry, StreamSpec


async def measure(registry, rounds: int) -> list[float]:
    await registry.start()
    stream, _ = await registry.create_stream("wake", StreamSpec(size=1))
    item = np.zeros(16, np.uint8)
    placed = asyncio.Event()
    woke_at: list[float] = []

    async def produce() -> None:
        for _ in range(rounds + 1):
            rest, fut = await stream.aoffer([item])
            while fut is not None:
                await fut
                stream.forget(fut)
                rest, fut = await stream.aoffer(rest)
            woke_at.append(time.perf_counter())
            placed.set()

    producer = asyncio.create_task(produce())
    consumer = await stream.aopen_consumer(consumer="reader")
    out = []
    await placed.wait()
    for _ in range(rounds):
        placed.clear()
        got = None
        while not got:
            got = await consumer.atake(1)
        await asyncio.sleep(0.02)  # the producer is waiting for room by now
        start = time.perf_counter()
        await stream.ack("reader", got[-1][0])
        await placed.wait()
        out.append(woke_at[-1] - start)
    producer.cancel()
    await consumer.aclose()
    await registry.delete_stream("wake")
    return out


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    program = shutil.which("redis-server")
    if program is None:
        raise SystemExit("redis-server is not installed")
    proc = subprocess.Popen(
        [
            program,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tempfile.mkdtemp(),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def report(name: str, figures: list[float]) -> None:
    figures = sorted(figures)
    p99 = figures[min(len(figures) - 1, int(len(figures) * 0.99))]
    print(
        f"{name:8s} producer wake after ack: median {statistics.median(figures) * 1e6:7.0f} µs, "
        f"p99 {p99 * 1e6:7.0f} µs, max {figures[-1] * 1e6:7.0f} µs ({len(figures)} rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--redis", help="a Redis URL (default: start a redis-server)")
    args = parser.parse_args()
    report("memory", asyncio.run(measure(MemoryRegistry(), args.rounds)))
    from ndrelay.registry.redis import RedisRegistry

    proc = None
    url = args.redis
    if url is None:
        proc, url = start_redis()
    try:
        report("redis", asyncio.run(measure(RedisRegistry(url), args.rounds)))
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)


if __name__ == "__main__":
    main()
