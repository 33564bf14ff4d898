"""Raw TCP peer: the baseline every figure is divided by.

Framing: an 8-byte little-endian signed length, then the payload bytes; length -1 ends the
stream. dtype and shape are not sent (both sides know the workload), which is as lean as a
hand-rolled protocol gets. TCP_NODELAY on every socket.

Producer send modes:
  item      one `sendmsg([header, item])` per item (one syscall per item, no copy into a
            staging buffer).
  coalesce  every item keeps its own header, but 256 framed items are packed into one
            buffer and sent with one `sendall` (the per-item loop with coalesced sends).
  batch     one header per `batch` items (W2b): the producer packs 256 individual items
            into one buffer behind one header (`b"".join`), one `sendall`.

Consumer: items >= 64 KiB (and W2b batches): read the header, then `recv_into` a fresh
`np.empty` of that size. Small items: `recv_into` a 1 MiB staging buffer, walk the
headers, and copy each payload into a fresh buffer (`np.frombuffer(buf[a:b])`, a new
bytearray per item): the per-item loop a user would write, handing out one array per item.

Middle (relayed topology): accepts the producer and the consumer, and forwards frames.
Frames <= 256 KiB: `recv_into` a staging buffer, walk the headers, `sendall` every complete
frame in it at once (frames are never split; nothing is re-encoded). Larger frames:
store-and-forward, each into a fresh buffer (`recv_into`, then `sendmsg`).
"""

from __future__ import annotations

import socket
import struct
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

HDR = struct.Struct("<q")
END = HDR.pack(-1)
TIMEOUT = 60.0
COALESCE = 256
SMALL_FRAME = 256 * 1024


def _nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(TIMEOUT)
    return s


def _listen() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(TIMEOUT)
    return s


def _connect(port: int) -> socket.socket:
    return _nodelay(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))


def send_frame(sock: socket.socket, hdr: bytes, payload: Any) -> None:
    """Header and payload in one sendmsg; finish with sendall if the kernel took less."""
    mv = memoryview(payload).cast("B")
    sent = sock.sendmsg([hdr, mv])
    if sent < 8 + mv.nbytes:
        if sent < 8:
            sock.sendall(hdr[sent:])
            sent = 8
        sock.sendall(mv[sent - 8 :])


def recv_exact(sock: socket.socket, mv: memoryview) -> None:
    got, n = 0, mv.nbytes
    while got < n:
        r = sock.recv_into(mv[got:])
        if r == 0:
            raise ConnectionError("peer closed mid-frame")
        got += r


def _finish(sock: socket.socket) -> None:
    """Half-close, then wait (bounded) for the peer to close, so queued bytes are delivered."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    mode: str,
    duration: float,
    port: int | None = None,
    limit: int | None = None,
    role: str = "producer",
) -> None:
    w = Workload.from_dict(wl)
    pool = item_pool(w)
    if port is None:  # served topology: the producer is the server
        ls = _listen()
        q.put({"role": role, "ready": True, "port": ls.getsockname()[1]})
        sock, _ = ls.accept()
        _nodelay(sock)
    else:
        sock = _connect(port)
        q.put({"role": role, "ready": True})
    paced = Paced(go, duration, limit)
    n = 0
    if mode == "batch":
        # Same input as every other transport: individual items, packed `batch` at a time
        # behind one header (a gather-copy of 256 x 64 bytes).
        hdr = HDR.pack(w.itemsize * w.batch)
        k = 0
        while not paced.done(n):
            parts = [hdr]
            for _ in range(w.batch):
                parts.append(pool[k])
                k = k + 1 if k + 1 < POOL else 0
            sock.sendall(b"".join(parts))
            n += w.batch
    elif mode == "coalesce":
        hdr = HDR.pack(w.itemsize)
        k = 0
        while not paced.done(n):
            parts = []
            for _ in range(COALESCE):
                parts.append(hdr)
                parts.append(pool[k])
                k = k + 1 if k + 1 < POOL else 0
            sock.sendall(b"".join(parts))
            n += COALESCE
    elif mode == "item":
        hdr = HDR.pack(w.itemsize)
        every = 64 if w.small else 1
        k = 0
        sendmsg = sock.sendmsg
        while not paced.done(n):
            if w.small:
                fl = 8 + w.itemsize
                for _ in range(every):
                    sent = sendmsg([hdr, pool[k]])
                    if sent != fl:  # partial send (socket buffer nearly full): finish it
                        sock.sendall((hdr + pool[k].tobytes())[sent:])
                    k = k + 1 if k + 1 < POOL else 0
                n += every
            else:
                send_frame(sock, hdr, pool[k])
                k = k + 1 if k + 1 < POOL else 0
                n += 1
    else:
        raise ValueError(f"unknown mode {mode!r}")
    sock.sendall(END)
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    _finish(sock)


def consumer(
    q: Any, go: Any, wl: dict[str, Any], mode: str, port: int, role: str = "consumer"
) -> None:
    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    sock = _connect(port)
    dt = np.dtype(w.dtype)
    shape = tuple(w.shape)
    n = 0
    hdr = bytearray(8)
    hmv = memoryview(hdr)
    go.set()
    if mode == "batch" or not w.small:
        batched = mode == "batch"
        nb = 0
        last: tuple[int, np.ndarray] | None = None
        while True:
            recv_exact(sock, hmv)
            (length,) = HDR.unpack(hdr)
            if length < 0:
                break
            if batched:
                k = length // w.itemsize
                arr = np.empty((k, *shape), dtype=dt)
                recv_exact(sock, memoryview(arr).cast("B"))
                if nb % 16 == 0:
                    check.batch(n, arr)
                last = (n, arr)
                nb += 1
                n += k
            else:
                if length != w.itemsize:
                    raise AssertionError(f"frame of {length} bytes, want {w.itemsize}")
                arr = np.empty(shape, dtype=dt)
                recv_exact(sock, memoryview(arr).cast("B"))
                check.item(n, arr)
                n += 1
            meter.tick(n)
        if last is not None:
            check.batch(*last)
    else:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        unpack = HDR.unpack_from
        start = end = 0
        done = False
        nd = len(shape) > 1
        last = None
        while not done:
            r = sock.recv_into(mv[end:])
            if r == 0:
                raise ConnectionError("peer closed before the end frame")
            end += r
            while end - start >= 8:
                (length,) = unpack(buf, start)
                if length < 0:
                    done = True
                    break
                stop = start + 8 + length
                if stop > end:
                    break
                arr = np.frombuffer(buf[start + 8 : stop], dtype=dt)  # fresh buffer per item
                if nd:
                    arr = arr.reshape(shape)
                if n & 1023 == 0:
                    check.item(n, arr)
                    meter.tick(n)
                last = arr
                n += 1
                start = stop
            if start == end:
                start = end = 0
            elif start > len(buf) // 2:
                buf[: end - start] = buf[start:end]
                end -= start
                start = 0
        if last is not None:
            check.item(n - 1, last)
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )
    sock.close()


def middle(q: Any, frame_bytes: int, role: str = "middle", **_: Any) -> None:
    lin, lout = _listen(), _listen()
    q.put(
        {
            "role": role,
            "ready": True,
            "port_in": lin.getsockname()[1],
            "port_out": lout.getsockname()[1],
        }
    )
    a, _a = lin.accept()
    b, _b = lout.accept()
    _nodelay(a)
    _nodelay(b)
    frames = 0
    if frame_bytes <= SMALL_FRAME:
        buf = bytearray(4 << 20)
        mv = memoryview(buf)
        unpack = HDR.unpack_from
        start = end = pos = 0
        ended = False
        while not ended:
            r = a.recv_into(mv[end:])
            if r == 0:
                raise ConnectionError("producer closed before the end frame")
            end += r
            while end - pos >= 8:
                (length,) = unpack(buf, pos)
                if length < 0:
                    pos += 8
                    ended = True
                    break
                if pos + 8 + length > end:
                    break
                pos += 8 + length
                frames += 1
            if pos > start:
                b.sendall(mv[start:pos])
                start = pos
            if start == end:
                start = end = pos = 0
            elif start > len(buf) // 2:
                buf[: end - start] = buf[start:end]
                end -= start
                pos -= start
                start = 0
    else:
        hdr = bytearray(8)
        hmv = memoryview(hdr)
        while True:
            recv_exact(a, hmv)
            (length,) = HDR.unpack(hdr)
            if length < 0:
                b.sendall(END)
                break
            payload = np.empty(length, dtype=np.uint8)
            recv_exact(a, memoryview(payload))
            send_frame(b, bytes(hdr), payload)
            frames += 1
    q.put({"role": role, "result": {"frames": frames, "vm": self_vm()}})
    _finish(b)
    a.close()


# --- latency (1 KiB items, paced) -------------------------------------------------------


def lat_producer(
    q: Any, go: Any, duration: float, rate: float, port: int, role: str = "producer"
) -> None:
    sock = _connect(port)
    q.put({"role": role, "ready": True})
    hdr = HDR.pack(1024)
    gen = paced_items(go, duration, rate)
    n = 0
    for item in gen:
        sock.sendmsg([hdr, item])
        n += 1
    sock.sendall(END)
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    _finish(sock)


def lat_consumer(q: Any, go: Any, port: int, warmup: float, role: str = "consumer") -> None:
    sock = _connect(port)
    rec = LatencyRecorder(warmup)
    hdr = bytearray(8)
    hmv = memoryview(hdr)
    go.set()
    while True:
        recv_exact(sock, hmv)
        (length,) = HDR.unpack(hdr)
        if length < 0:
            break
        item = np.empty(length, dtype=np.uint8)
        recv_exact(sock, memoryview(item))
        rec.add(item)
    q.put({"role": role, "result": {**rec.result(), "vm": self_vm()}})
    sock.close()
