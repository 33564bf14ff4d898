"""pyzmq PUSH/PULL peer.

Served: the producer binds a PUSH socket, the consumer connects a PULL socket. Relayed: a
middle process binds PULL (producer connects) and PUSH (consumer connects) and runs
`zmq.proxy` between them (libzmq's own forwarding loop, no Python per message).

One item per message (W2b: 256 items packed into one message, as the raw peer does).
Zero-copy: `send(arr, copy=False)` and `recv(copy=False)` (np.frombuffer on the frame's
buffer) for messages >= 64 KiB; smaller messages are copied, as pyzmq itself advises
(its zero-copy path costs more than the copy for small messages). An empty message ends the
stream. High-water marks are set to ~32 MiB worth of messages so a fast producer cannot
queue gigabytes. TCP over 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _common import (
    POOL,
    Checker,
    LatencyRecorder,
    Meter,
    Paced,
    Workload,
    item_pool,
    paced_items,
    self_vm,
)

__all__ = ["consumer", "lat_consumer", "lat_producer", "middle", "producer"]

TIMEOUT_MS = 60_000
ZERO_COPY_MIN = 65536


def _hwm(frame_bytes: int) -> int:
    return max(4, min(1000, (32 << 20) // max(frame_bytes, 1)))


def _socket(kind: int, frame_bytes: int) -> Any:
    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, _hwm(frame_bytes))
    s.setsockopt(zmq.RCVHWM, _hwm(frame_bytes))
    s.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    s.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    return s


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    port: int | None = None,
    limit: int | None = None,
    role: str = "producer",
) -> None:
    import zmq

    w = Workload.from_dict(wl)
    pool = item_pool(w)
    frame = w.itemsize * (w.batch or 1)
    s = _socket(zmq.PUSH, frame)
    if port is None:
        port = s.bind_to_random_port("tcp://127.0.0.1")
        q.put({"role": role, "ready": True, "port": port})
    else:
        s.connect(f"tcp://127.0.0.1:{port}")
        q.put({"role": role, "ready": True})
    paced = Paced(go, duration, limit)
    copy = frame < ZERO_COPY_MIN
    send = s.send
    n = 0
    k = 0
    if w.batch:
        while not paced.done(n):
            parts = []
            for _ in range(w.batch):
                parts.append(pool[k])
                k = k + 1 if k + 1 < POOL else 0
            send(b"".join(parts), copy=copy)
            n += w.batch
    else:
        every = 64 if w.small else 1
        while not paced.done(n):
            for _ in range(every):
                send(pool[k], copy=copy)
                k = k + 1 if k + 1 < POOL else 0
            n += every
    send(b"")
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    # Zero-copy sends: libzmq reads the pool's memory after send() returned. Returning now
    # would free the pool under it (seen: items arriving with their first bytes overwritten
    # by malloc's free-list pointers). term() blocks (bounded by linger) until delivered.
    s.close(linger=TIMEOUT_MS)
    zmq.Context.instance().term()
    del pool


def consumer(q: Any, go: Any, wl: dict[str, Any], port: int, role: str = "consumer") -> None:
    import zmq

    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    frame = w.itemsize * (w.batch or 1)
    s = _socket(zmq.PULL, frame)
    s.connect(f"tcp://127.0.0.1:{port}")
    dt = np.dtype(w.dtype)
    shape = tuple(w.shape)
    zero_copy = frame >= ZERO_COPY_MIN
    recv = s.recv
    n = 0
    go.set()
    if w.batch:
        nb = 0
        last = None
        while True:
            m = recv()
            if not m:
                break
            arr = np.frombuffer(m, dtype=dt).reshape(-1, *shape)
            if nb % 16 == 0:
                check.batch(n, arr)
            last = (n, arr)
            nb += 1
            n += arr.shape[0]
            meter.tick(n)
        if last is not None:
            check.batch(*last)
    elif zero_copy:
        while True:
            f = recv(copy=False)
            if len(f) == 0:
                break
            arr = np.frombuffer(f.buffer, dtype=dt).reshape(shape)
            check.item(n, arr)
            n += 1
            meter.tick(n)
    else:
        nd = len(shape) > 1
        last = None
        while True:
            m = recv()
            if not m:
                break
            arr = np.frombuffer(m, dtype=dt)
            if nd:
                arr = arr.reshape(shape)
            if n & 1023 == 0:
                check.item(n, arr)
                meter.tick(n)
            last = arr
            n += 1
        if last is not None:
            check.item(n - 1, last)
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )
    s.close(linger=0)


def middle(q: Any, frame_bytes: int, role: str = "middle", **_: Any) -> None:
    import zmq

    pin = _socket(zmq.PULL, frame_bytes)
    pout = _socket(zmq.PUSH, frame_bytes)
    pin.setsockopt(zmq.RCVTIMEO, -1)
    pout.setsockopt(zmq.SNDTIMEO, -1)
    a = pin.bind_to_random_port("tcp://127.0.0.1")
    b = pout.bind_to_random_port("tcp://127.0.0.1")
    q.put({"role": role, "ready": True, "port_in": a, "port_out": b})
    zmq.proxy(pin, pout)  # runs until the harness kills this process


def lat_producer(
    q: Any, go: Any, duration: float, rate: float, port: int, role: str = "producer"
) -> None:
    import zmq

    s = _socket(zmq.PUSH, 1024)
    s.connect(f"tcp://127.0.0.1:{port}")
    q.put({"role": role, "ready": True})
    n = 0
    for item in paced_items(go, duration, rate):
        s.send(item)
        n += 1
    s.send(b"")
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    s.close(linger=TIMEOUT_MS)


def lat_consumer(q: Any, go: Any, port: int, warmup: float, role: str = "consumer") -> None:
    import zmq

    s = _socket(zmq.PULL, 1024)
    s.connect(f"tcp://127.0.0.1:{port}")
    rec = LatencyRecorder(warmup)
    go.set()
    while True:
        m = s.recv()
        if not m:
            break
        rec.add(m)
    q.put({"role": role, "result": {**rec.result(), "vm": self_vm()}})
    s.close(linger=0)
