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

Uploads: uvicorn gathers request body pieces with `body += piece` and hands the app
`bytes(body)`, two copies of every payload. The second extension, `ndrelay.receive_chunks`,
is an ASGI `receive` whose `http.request` messages carry `chunks` (the pieces as the
parser produced them, not joined) instead of `body`. Reading pauses while more than
`UPLOAD_READ_AHEAD` bytes wait (uvicorn's own high-water mark is 64 KiB: an upload whose
stream takes a round trip to store each message, as on Redis, then read about one recv
per round trip, and never had a second frame to store in the same round trip).

Reads: asyncio's transport allocates a fresh bytes object of up to 256 KiB for each
`recv` (and the allocator's fresh pages fault in), and the HTTP parser copies the body
pieces out of it anyway; `VectoredHttpProtocol` is an `asyncio.BufferedProtocol` whose
`recv_into` fills one reused buffer per thread (the parser is done with it when
`data_received` returns), so an upload's bytes land in warm memory.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .._vectored import IOV_MAX, drop_sent

__all__ = [
    "EXTENSION",
    "RECEIVE_EXTENSION",
    "VectoredHttpProtocol",
    "uvicorn_config",
    "vectored_bytes",
]

#: The scope extensions' keys.
EXTENSION = "ndrelay.vectored_send"
RECEIVE_EXTENSION = "ndrelay.receive_chunks"
#: body bytes an upload may have waiting before the server stops reading its socket
UPLOAD_READ_AHEAD = max(HIGH_WATER_LIMIT, 4 << 20)
#: Writes with no buffer this large go through uvicorn's send: joining small payloads
#: costs less than waiting on a full socket, and a rest this small is copied into the
#: transport's buffer rather than waited for.
_DIRECT_MIN = 64 * 1024
#: bytes one socket read takes (asyncio's own reads take up to 256 KiB)
_READ_SIZE = 256 * 1024
_counted = [0]
_reads = threading.local()  # this thread's read buffer (every read is parsed at once)


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


class _Chunks:
    """The receive extension for one request (see the module docstring)."""

    __slots__ = ("_cycle", "_protocol", "chunks", "size", "started")

    def __init__(self, protocol: VectoredHttpProtocol, cycle: RequestResponseCycle) -> None:
        self._protocol = protocol
        self._cycle = cycle
        self.chunks: list[bytes] = []
        self.size = 0
        self.started = False

    def take(self) -> list[bytes]:
        chunks, self.chunks, self.size = self.chunks, [], 0
        return chunks

    async def __call__(self) -> dict[str, Any]:
        cycle = self._cycle
        if not self.started:
            # uvicorn's own receive the first time: it answers `Expect: 100-continue` and
            # gives what it has gathered; from here on, pieces are kept apart
            self.started = True
            message: dict[str, Any] = dict(await cycle.receive())
            if message["type"] != "http.request":
                return message
            body = message.pop("body", b"")
            message["chunks"] = ([body] if body else []) + self.take()
            message["more_body"] = message.get("more_body", False) and cycle.more_body
            return message
        while (
            not self.chunks
            and cycle.more_body
            and not cycle.disconnected
            and not cycle.response_complete
        ):
            self._protocol.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "chunks": self.take(), "more_body": cycle.more_body}


class VectoredHttpProtocol(HttpToolsProtocol, asyncio.BufferedProtocol):
    """uvicorn's httptools protocol, offering `ndrelay.vectored_send` and
    `ndrelay.receive_chunks` to each request, reading into a reused buffer."""

    _direct: socket.socket | None = None
    _writable: asyncio.Future[None] | None = None
    _chunks: _Chunks | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        view: memoryview | None = getattr(_reads, "view", None)
        if view is None:
            view = _reads.view = memoryview(bytearray(_READ_SIZE))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_reads.view[:nbytes])

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[EXTENSION] = _Vectored(self, cycle)
            self._chunks = extensions[RECEIVE_EXTENSION] = _Chunks(self, cycle)

    def on_body(self, body: bytes) -> None:
        chunks, cycle = self._chunks, self.cycle
        if (
            chunks is None
            or not chunks.started
            or chunks._cycle is not cycle
            or cycle.response_complete
            or (self.parser.should_upgrade() and self._should_upgrade())
        ):
            super().on_body(body)
            return
        chunks.chunks.append(body)
        chunks.size += len(body)
        if chunks.size > UPLOAD_READ_AHEAD:
            self.flow.pause_reading()
        cycle.message_event.set()

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
                sent = sock.sendmsg(views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.transport.close()
                return
            drop_sent(views, sent)
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
