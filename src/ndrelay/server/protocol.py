"""uvicorn's HTTP/1.1 protocol (httptools) plus vectored body writes for streaming responses.

uvicorn writes each response body message as `b"".join([chunk header, body, CRLF])`, one
user-space copy of every payload, and asyncio's transport copies whatever the kernel does
not take at once into its own buffer. `VectoredHttpProtocol` is uvicorn's own protocol
class, given to uvicorn through its documented `http=` setting (`uvicorn_config` does it),
that offers the application one more ASGI scope extension, `ndrelay.vectored_send`:
`await scope["extensions"]["ndrelay.vectored_send"](buffers)` sends one chunk of the body
made of `buffers` (the frame headers and the arrays' own memory) with `sendmsg`, waiting
for the socket to take the rest when it is full: the kernel's copy is the only one. The
wire is unchanged standard HTTP/1.1 chunked coding; anything else (TLS, HEAD, a response
uvicorn does not chunk, bytes still in the transport's buffer) goes through uvicorn's own
`send`. `vectored_bytes()` counts what went the direct way (in `/metrics`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["EXTENSION", "VectoredHttpProtocol", "uvicorn_config", "vectored_bytes"]

#: The scope extension's key.
EXTENSION = "ndrelay.vectored_send"
#: Most buffers one sendmsg takes (Linux IOV_MAX is 1024).
_IOV_MAX = 1024
#: Writes with no buffer this large go through uvicorn's send: joining small payloads
#: costs less than waiting on a full socket, and a rest this small is copied into the
#: transport's buffer rather than waited for.
_DIRECT_MIN = 64 * 1024
_counted = [0]


def vectored_bytes() -> int:
    """Body bytes this process has sent by vectored writes (not through uvicorn's joins)."""
    return _counted[0]


class _Vectored:
    """The extension for one request: writes body chunks to the connection's socket."""

    __slots__ = ("_cycle", "_protocol")

    def __init__(self, protocol: VectoredHttpProtocol, cycle: RequestResponseCycle) -> None:
        self._protocol = protocol
        self._cycle = cycle

    async def __call__(self, buffers: Sequence[Any]) -> None:
        cycle = self._cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        total = sum(len(b) for b in buffers)
        if not total:
            return
        sock = self._protocol.direct_socket()
        if (
            sock is None
            or max(len(b) for b in buffers) < _DIRECT_MIN
            or not cycle.response_started
            or cycle.response_complete
            or not cycle.chunked_encoding
            or cycle.scope["method"] == "HEAD"
        ):
            body = buffers[0] if len(buffers) == 1 else b"".join(buffers)
            await cycle.send({"type": "http.response.body", "body": body, "more_body": True})
            return
        if not await self._protocol.drain_transport():
            return
        views = [memoryview(b"%x\r\n" % total)]
        views += [memoryview(b).cast("B") for b in buffers if len(b)]
        views.append(memoryview(b"\r\n"))
        await self._protocol.send_all(views)
        _counted[0] += total


class VectoredHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering `ndrelay.vectored_send` to each request."""

    _direct: socket.socket | None = None
    _writable: asyncio.Future[None] | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            extensions[EXTENSION] = _Vectored(self, cycle)

    def direct_socket(self) -> socket.socket | None:
        """A duplicate of the connection's socket (same file description), made on first
        use; None over TLS. A duplicate, because asyncio lets nobody else watch the
        transport's own file descriptor for writability."""
        if self._direct is None and self.scheme == "http" and not self.transport.is_closing():
            own = self.transport.get_extra_info("socket")
            if own is None:
                return None
            self._direct = own.dup()
            self._direct.setblocking(False)
        return self._direct

    async def drain_transport(self) -> bool:
        """Wait until the transport's own buffer is empty (what uvicorn wrote must go
        first); False if the connection ended meanwhile."""
        transport = self.transport
        while transport.get_write_buffer_size():
            if self.cycle.disconnected or transport.is_closing() or self._direct is None:
                return False
            await self._wait_writable(self._direct)
            await asyncio.sleep(0)  # the transport's own writer runs on the same event
        return not (self.cycle.disconnected or transport.is_closing())

    async def send_all(self, views: list[memoryview]) -> None:
        """Send every view, in order, with sendmsg; wait for room when the socket is full
        (a small rest goes to the transport's buffer instead). A broken connection closes
        the transport (the cycle then sees the disconnect)."""
        sock = self._direct
        assert sock is not None
        while views:
            try:
                sent = sock.sendmsg(views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.transport.close()
                return
            while sent:
                n = len(views[0])
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            if views:
                if self.cycle.disconnected or self.transport.is_closing():
                    return
                if sum(len(v) for v in views) < _DIRECT_MIN:
                    self.transport.write(b"".join(views))
                    return
                await self._wait_writable(sock)

    async def _wait_writable(self, sock: socket.socket) -> None:
        loop = self.loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._writable = waiter
        fd = sock.fileno()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await waiter
        finally:
            if self._direct is sock:  # not closed (and its number reused) meanwhile
                loop.remove_writer(fd)
            self._writable = None

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the sender sees the disconnect and stops
        if self._direct is not None:
            if waiter is not None:
                self.loop.remove_writer(self._direct.fileno())
            self._direct.close()
            self._direct = None
        super().connection_lost(exc)


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """`uvicorn.Config(app, http=VectoredHttpProtocol, **kwargs)`: how `ndrelay serve`
    runs the app; use it (or pass `http=VectoredHttpProtocol`) when embedding."""
    kwargs.setdefault("http", VectoredHttpProtocol)
    return uvicorn.Config(app, **kwargs)
