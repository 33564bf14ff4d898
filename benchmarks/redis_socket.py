"""ndrelay on Redis over TCP against over Redis' Unix socket, alternated, on one machine.

Each round starts a redis-server listening on both a 127.0.0.1 port and a Unix socket,
`ndrelay serve --backend redis://127.0.0.1:PORT/0` or `--backend unix:///PATH?db=0` on
it, an uploading `RelayClient.publish` process of 1 MiB float32 arrays into a queue
stream and a `RelayClient.stream` reader here; over a window of `--seconds` it prints the
items/s the reader got and the relay's and redis-server's CPU seconds per GB (from
/proc). Every process it starts is killed by its PID at the end of the round.

    python benchmarks/redis_socket.py --rounds 3 --seconds 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from ndrelay import RelayClient

ITEM = 1 << 20

PRODUCER = """
import sys, time
import numpy as np
from ndrelay import RelayClient
url, end = sys.argv[1], float(sys.argv[2])
item = np.random.default_rng(0).random(262144, dtype=np.float32)
RelayClient(url).publish("w1", (item for _ in iter(lambda: time.time() < end, False)))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            RelayClient(url).create("w1", size=64, mode="queue")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def one_round(kind: str, seconds: float) -> str:
    tmp = tempfile.mkdtemp(prefix="ndrelay-redis-socket-")
    path, port, http = os.path.join(tmp, "redis.sock"), free_port(), free_port()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (Debian: apt install redis-server)")
    procs = [
        subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", path]
            + ["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
    ]
    try:
        for _ in range(100):  # bounded: up to 10 s
            if os.path.exists(path):
                break
            time.sleep(0.1)
        backend = f"redis://127.0.0.1:{port}/0" if kind == "tcp" else f"unix://{path}?db=0"
        relay = subprocess.Popen(
            [sys.executable, "-m", "ndrelay", "serve", "--port", str(http)]
            + ["--backend", backend, "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
        )
        procs.append(relay)
        url = f"http://127.0.0.1:{http}"
        wait_http(url)
        end = time.time() + seconds + 2
        procs.append(subprocess.Popen([sys.executable, "-c", PRODUCER, url, str(end)]))
        n = 0
        start: tuple[float, int, float, float] | None = None
        with RelayClient(url) as client:
            for _ in client.stream("w1"):
                n += 1
                now = time.time()
                if start is None and now > end - seconds:  # after a 2 s warm-up
                    start = (time.monotonic(), n, cpu_s(relay.pid), cpu_s(procs[0].pid))
                if now > end - 0.3:
                    break
        assert start is not None, "no item arrived after the warm-up"
        t0, n0, relay0, redis0 = start
        gb = (n - n0) * ITEM / 1e9
        return (
            f"{kind:4}: {(n - n0) / (time.monotonic() - t0):4.0f} items/s, relay "
            f"{(cpu_s(relay.pid) - relay0) / gb:.2f} s/GB, redis-server "
            f"{(cpu_s(procs[0].pid) - redis0) / gb:.2f} s/GB"
        )
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    ap.add_argument("--seconds", type=float, default=6.0, help="window per round (default 6)")
    args = ap.parse_args()
    for _ in range(args.rounds):
        for kind in ("tcp", "unix"):
            print(one_round(kind, args.seconds), flush=True)


if __name__ == "__main__":
    main()
