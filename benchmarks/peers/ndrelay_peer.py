"""ndrelay peer: the thing under test, used exactly as a user would.

Served: the server process builds `Relay()`, calls `relay.publish(name, generator,
size=64)` and runs `create_app(relay)` under uvicorn (defaults: whatever loop and HTTP
implementation uvicorn picks from what is installed); the consumer iterates
`RelayClient(url).stream(name)` over HTTP.
Relayed: a bare server (`create_app(Relay())`), a producer process uploading with
`RelayClient.publish(name, generator)`, a consumer process iterating `stream(name)`.

Variants (`mode`): "" sync clients over TCP; "uds" the server on a Unix socket and
`unix:///path` clients; "async" `AsyncRelayClient` for the consumer (and, relayed, the
producer); "base" the sync clients and server of another source tree (the benchmark's
`--baseline-src`: today's figures next to the new ones, in one run).

The generator yields the same pool items as the other peers (read-only numpy arrays, one
per item). W2c: single items from the producer, read in stacked batches. W2b, like the
peers: the producer gathers 256 individual items into one block
(`b"".join`, as the raw and pyzmq producers do) and publishes blocks with
`batched=True` (one header per 256 items); the consumer asks for
`stream(name, batch=256, stack=True)`. Queue mode (the default).
"""

from __future__ import annotations

import socket
import time
from typing import Any

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

__all__ = [
    "bare_server",
    "consumer",
    "lat_consumer",
    "lat_producer",
    "producer",
    "served_server",
]

OPEN_TIMEOUT = 20.0


def _items(q: Any, go: Any, w: Workload, duration: float, limit: int | None, role: str) -> Any:
    """Pool items, cyclically, until `duration` after go (or `limit` items); reports the
    count on the queue when exhausted."""
    pool = item_pool(w)
    paced = Paced(go, duration, limit)
    every = 64 if w.small else 1
    n = 0
    k = 0
    if w.batch and not w.single:  # blocks of `batch` items, gathered like the peers do
        import numpy as np

        while not paced.done(n):
            parts = []
            for _ in range(w.batch):
                parts.append(pool[k])
                k = k + 1 if k + 1 < POOL else 0
            block = np.frombuffer(b"".join(parts), dtype=w.dtype)
            yield block.reshape(w.batch, *w.shape)
            n += w.batch
        q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
        return
    while not paced.done(n):
        for _ in range(every):
            yield pool[k]
            k = k + 1 if k + 1 < POOL else 0
        n += every
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})


def _url(port: int | None, uds: str | None) -> str:
    return f"unix://{uds}" if uds else f"http://127.0.0.1:{port}"


def _serve(q: Any, role: str, app: Any, uds: str | None = None) -> None:
    import uvicorn

    try:
        from ndrelay.server import uvicorn_config
    except ImportError:  # a baseline tree from before it: uvicorn's defaults
        uvicorn_config = uvicorn.Config

    if uds:
        server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on", uds=uds))
        q.put({"role": role, "ready": True, "port": None})
        server.run()
        return
    # proto=IPPROTO_TCP, as asyncio's create_server(host, port) makes it (what `ndrelay
    # serve` does): asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says IPPROTO_TCP. A plain socket.socket() (proto 0) leaves Nagle on
    # and costs 20-45 ms per small item at 1 kHz (measured).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # uvicorn as `ndrelay serve` configures it (its vectored-write protocol class)
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
    q.put({"role": role, "ready": True, "port": port})
    server.run(sockets=[sock])


def served_server(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    name: str,
    size: int = 64,
    limit: int | None = None,
    role: str = "server",
    producer_role: str = "producer",
    uds: str | None = None,
) -> None:
    from ndrelay import Relay, create_app

    w = Workload.from_dict(wl)
    relay = Relay()
    items = _items(q, go, w, duration, limit, producer_role)
    relay.publish(name, items, size=size, batched=bool(w.batch and not w.single))
    _serve(q, role, create_app(relay), uds)


def served_lat_server(
    q: Any,
    go: Any,
    duration: float,
    rate: float,
    name: str,
    size: int = 64,
    role: str = "server",
    producer_role: str = "producer",
) -> None:
    from ndrelay import Relay, create_app

    def gen() -> Any:
        n = yield from paced_items(go, duration, rate)
        q.put({"role": producer_role, "result": {"sent": n, "vm": self_vm()}})

    relay = Relay()
    relay.publish(name, gen(), size=size)
    _serve(q, role, create_app(relay))


def bare_server(q: Any, role: str = "server", uds: str | None = None, **_: Any) -> None:
    from ndrelay import Relay, create_app

    _serve(q, role, create_app(Relay()), uds)


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    port: int,
    name: str,
    limit: int | None = None,
    size: int | None = None,
    role: str = "producer",
    uds: str | None = None,
    client: str = "sync",
) -> None:
    from ndrelay import AsyncRelayClient, RelayClient

    w = Workload.from_dict(wl)
    q.put({"role": role, "ready": True})
    items = _items(q, go, w, duration, limit, role)
    batched = bool(w.batch and not w.single)
    if client == "async":
        import asyncio

        async def run() -> None:
            async with AsyncRelayClient(_url(port, uds)) as c:
                if size is not None:
                    await c.create(name, size=size)
                kw = {"batched": True} if batched else {}
                await c.publish(name, items, **kw)

        asyncio.run(run())
        return
    with RelayClient(_url(port, uds)) as c:
        if size is not None:  # else the upload creates the stream with the server's default
            c.create(name, size=size)
        c.publish(name, items, batched=batched)


def _open(c: Any, name: str, go: Any, **kw: Any) -> tuple[Any, Any]:
    """Open the stream and get its first item. In the relayed topology the stream exists
    only once the producer's upload reached the server, so retry (bounded) until then."""
    deadline = time.monotonic() + OPEN_TIMEOUT
    go.set()
    while True:
        it = None
        try:
            it = c.stream(name, **kw)
            return it, next(iter(it))
        except StopIteration:
            raise AssertionError("stream ended before its first item") from None
        except Exception:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def consumer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    port: int | None,
    name: str,
    role: str = "consumer",
    uds: str | None = None,
    client: str = "sync",
) -> None:
    from ndrelay import RelayClient

    if client == "async":
        return _async_consumer(q, go, wl, _url(port, uds), name, role)
    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    with RelayClient(_url(port, uds)) as c:
        n = 0
        if w.batch:
            it, first = _open(c, name, go, batch=w.batch, stack=True)
            check.batch(0, first)
            n = first.shape[0]
            meter.tick(n)
            nb = 1
            last = (0, first)
            for arr in it:
                if nb % 16 == 0:
                    check.batch(n, arr)
                last = (n, arr)
                nb += 1
                n += arr.shape[0]
                meter.tick(n)
            check.batch(*last)
        elif w.small:
            it, first = _open(c, name, go)
            check.item(0, first)
            meter.tick(0)
            n = 1
            last = first
            for arr in it:
                if n & 1023 == 0:
                    check.item(n, arr)
                    meter.tick(n)
                last = arr
                n += 1
            check.item(n - 1, last)
        else:
            it, first = _open(c, name, go)
            check.item(0, first)
            n = 1
            meter.tick(n)
            for arr in it:
                check.item(n, arr)
                n += 1
                meter.tick(n)
        meter.finish(n)
        close = getattr(it, "close", None)
        if close is not None:
            close()
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )


def _async_consumer(q: Any, go: Any, wl: dict[str, Any], url: str, name: str, role: str) -> None:
    import asyncio

    from ndrelay import AsyncRelayClient

    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)

    async def run() -> int:
        async with AsyncRelayClient(url) as c:
            deadline = time.monotonic() + OPEN_TIMEOUT
            go.set()
            kw = {"batch": w.batch, "stack": True} if w.batch else {}
            while True:
                try:
                    it = await c.stream(name, **kw)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            n = 0
            last: Any = None
            async for arr in it:
                if w.batch:
                    if n == 0 or (n // w.batch) % 16 == 0:
                        check.batch(n, arr)
                    last = (n, arr)
                    n += arr.shape[0]
                    meter.tick(n)
                elif w.small:
                    if n & 1023 == 0:
                        check.item(n, arr)
                        meter.tick(n)
                    last = (n, arr)
                    n += 1
                else:
                    check.item(n, arr)
                    n += 1
                    meter.tick(n)
            if last is not None:
                (check.batch if w.batch else check.item)(*last)
            await it.aclose()
            return n

    n = asyncio.run(run())
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )


def lat_producer(
    q: Any, go: Any, duration: float, rate: float, port: int, name: str, role: str = "producer"
) -> None:
    from ndrelay import RelayClient

    q.put({"role": role, "ready": True})
    box: dict[str, int] = {}

    def gen() -> Any:
        box["n"] = yield from paced_items(go, duration, rate)

    with RelayClient(f"http://127.0.0.1:{port}") as c:
        c.publish(name, gen())
    q.put({"role": role, "result": {"sent": box.get("n", 0), "vm": self_vm()}})


def lat_consumer(
    q: Any, go: Any, port: int, name: str, warmup: float, role: str = "consumer"
) -> None:
    from ndrelay import RelayClient

    rec = LatencyRecorder(warmup)
    with RelayClient(f"http://127.0.0.1:{port}") as c:
        it, first = _open(c, name, go)
        rec.add(first)
        for arr in it:
            rec.add(arr)
    q.put({"role": role, "result": {**rec.result(), "vm": self_vm()}})
