"""Zenoh (eclipse-zenoh 1.x) publisher/subscriber peer, served topology only.

The producer opens a peer-mode session listening on tcp/127.0.0.1:<port> (multicast
scouting off) and declares a publisher with congestion control BLOCK and reliable
delivery, so a slow subscriber slows it down rather than losing samples; the consumer
connects a peer session to that endpoint and subscribes through a FIFO channel. One item
per `put` (W2b: 256 items packed into one payload, as the raw peer does); an empty
payload ends the stream. Pub/sub keeps nothing for late subscribers, so the producer
waits until its publisher matches the subscriber before the first `put`.

Modes: `tcp` (shared memory off: every byte through the loopback socket) and `shm`
(Zenoh's defaults with shared memory on: on one host, large payloads go through a shared
memory segment and only a descriptor crosses the socket).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from _common import POOL, Checker, Meter, Paced, Workload, free_port, item_pool, self_vm

__all__ = ["consumer", "producer"]

KEY = "bench/stream"
MATCH_TIMEOUT = 20.0


def _config(mode: str, listen: int | None = None, connect: int | None = None) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", json.dumps("peer"))
    conf.insert_json5("scouting/multicast/enabled", "false")
    if listen is not None:
        conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{listen}"]))
    if connect is not None:
        conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{connect}"]))
    conf.insert_json5("transport/shared_memory/enabled", "true" if mode == "shm" else "false")
    return conf


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    limit: int | None = None,
    mode: str = "tcp",
    role: str = "producer",
    **_: Any,
) -> None:
    import zenoh

    w = Workload.from_dict(wl)
    pool = item_pool(w)
    port = free_port()
    session = zenoh.open(_config(mode, listen=port))
    try:
        pub = session.declare_publisher(
            KEY,
            congestion_control=zenoh.CongestionControl.BLOCK,
            reliability=zenoh.Reliability.RELIABLE,
        )
        q.put({"role": role, "ready": True, "port": port})
        deadline = time.monotonic() + MATCH_TIMEOUT
        while not (go.is_set() and pub.matching_status.matching):
            if time.monotonic() > deadline:
                raise TimeoutError("no subscriber matched the publisher")
            time.sleep(0.01)
        paced = Paced(go, duration, limit)
        put = pub.put
        n = k = 0
        if w.batch:
            while not paced.done(n):
                parts = []
                for _ in range(w.batch):
                    parts.append(pool[k])
                    k = k + 1 if k + 1 < POOL else 0
                put(b"".join(parts))
                n += w.batch
        else:
            # zenoh-python's put takes bytes (not arrays or memoryviews): the pool as
            # bytes, made before the timed loop
            every = 64 if w.small else 1
            payloads = [p.tobytes() for p in pool]
            while not paced.done(n):
                for _ in range(every):
                    put(payloads[k])
                    k = k + 1 if k + 1 < POOL else 0
                n += every
        put(b"")
        q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
        time.sleep(0.5)  # let the last samples leave before the session closes
    finally:
        session.close()


def consumer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    port: int,
    mode: str = "tcp",
    role: str = "consumer",
    **_: Any,
) -> None:
    import zenoh

    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    session = zenoh.open(_config(mode, connect=port))
    try:
        sub = session.declare_subscriber(KEY, zenoh.handlers.FifoChannel(1024))
        go.set()
        n = 0
        dt, shape = np.dtype(w.dtype), w.shape
        last: Any = None
        while True:
            sample = sub.recv()
            data = sample.payload.to_bytes()
            if not data:
                break
            if w.batch:
                arr = np.frombuffer(data, dtype=dt).reshape(-1, *shape)
                if n == 0 or (n // w.batch) % 16 == 0:
                    check.batch(n, arr)
                last = (n, arr)
                n += arr.shape[0]
                meter.tick(n)
            elif w.small:
                arr = np.frombuffer(data, dtype=dt).reshape(shape)
                if n & 1023 == 0:
                    check.item(n, arr)
                    meter.tick(n)
                last = (n, arr)
                n += 1
            else:
                arr = np.frombuffer(data, dtype=dt).reshape(shape)
                check.item(n, arr)
                last = (n, arr)
                n += 1
                meter.tick(n)
        if last is not None:
            (check.batch if w.batch else check.item)(*last)
        meter.finish(n)
    finally:
        session.close()
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )
