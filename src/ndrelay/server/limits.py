"""Connection limits: how many connections may be open, how long and how large a request
head may be; the open-files limit they live under. Added to the server's HTTP protocol
class (`protocol.VectoredHttpProtocol`) where it reads bytes."""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import VectoredHttpProtocol

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "accept_backlog",
    "connection_limit",
    "guarded_protocol",
    "raise_open_files",
]

log = logging.getLogger("ndrelay.server")

#: Default most connections, if the open-files limit allows it.
DEFAULT_MAX_CONNECTIONS = 1024
#: File descriptors kept for the relay's own use (listening sockets, logs, imports).
_FD_RESERVE = 64
#: uvicorn's listen backlog, where the open-files limit allows it.
_MAX_BACKLOG = 2048
#: Accept bursts that can land before the connections closed to make room for the first
#: one give their files back: asyncio accepts up to the backlog in one loop iteration,
#: and a connection is made, and one closed, two and three iterations later.
_BURSTS = 3

_PHRASES = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def raise_open_files() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (old, new) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def accept_backlog() -> int:
    """The listen backlog to give uvicorn (`Config(backlog=...)`): its default of 2048,
    less under a low open-files limit, where a burst of that many accepts would run out
    of files (accepting then fails and pauses for a second, /healthz included)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_BACKLOG
    return max(16, min(_MAX_BACKLOG, (soft - _FD_RESERVE) // 8))


def connection_limit(configured: int | None) -> int:
    """The most connections to keep open: `configured`, or the default, always leaving
    room under the open-files limit for the relay's own files and for the accept bursts
    of `accept_backlog()` (past the limit, accepting fails and nothing answers)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        room = DEFAULT_MAX_CONNECTIONS
    else:
        room = soft - _FD_RESERVE - _BURSTS * (accept_backlog() + 1)
    wanted = configured if configured is not None else DEFAULT_MAX_CONNECTIONS
    return max(1, min(wanted, room))


def guarded_protocol(
    max_connections: int,
    max_header_bytes: int,
    header_timeout: float,
    base: type[HttpToolsProtocol] = VectoredHttpProtocol,
) -> type[asyncio.Protocol]:
    """The `base` protocol class with these limits (for uvicorn's `Config(http=...)`)."""
    return type(
        "GuardedHttpProtocol",
        (_Guarded, base),
        {
            "max_connections": max_connections,
            "max_header_bytes": max_header_bytes,
            "header_timeout": header_timeout,
        },
    )


class _Guarded(HttpToolsProtocol):
    """Limits, per connection: its request head within `max_header_bytes` and
    `header_timeout` (431, 408); per server: at most `max_connections` open. A connection
    past the limit closes the oldest one still waiting for a request head (an idle or
    slow client), or, if every connection is busy with a request, is answered 503."""

    max_connections: ClassVar[int]
    max_header_bytes: ClassVar[int]
    header_timeout: ClassVar[float]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # reading a request head (or waiting for one)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._head_timed_out
        )
        waiting = self._waiting()
        waiting[self] = None
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _waiting(self) -> dict[_Guarded, None]:
        """This server's connections waiting for a request head, oldest first."""
        state: Any = self.server_state
        waiting: dict[_Guarded, None] | None = getattr(state, "ndrelay_waiting", None)
        if waiting is None:
            waiting = state.ndrelay_waiting = {}
        return waiting

    def _make_room(self) -> None:
        oldest = next((c for c in self._waiting() if c is not self), None)
        if oldest is not None:
            log.warning(
                "connection limit (%d) reached: closing the oldest connection waiting "
                "for a request",
                self.max_connections,
            )
            oldest._waiting().pop(oldest, None)
            oldest.transport.close()
        else:
            log.warning(
                "connection limit (%d) reached, every connection busy: answering 503",
                self.max_connections,
            )
            self._refuse(503, f"too many connections (at most {self.max_connections})")

    def _refuse(self, status: int, reason: str) -> None:
        self._cancel_head_timer()
        self._waiting().pop(self, None)
        if self.transport.is_closing():
            return
        body = f"{reason}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _PHRASES[status].encode(), len(body), body)
        )
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            log.info(
                "closing a connection that sent no complete request head within %g s",
                self.header_timeout,
            )
            self._refuse(408, f"no complete request head within {self.header_timeout:g} s")

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._in_head
            and self._head_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            log.info("refusing a request head over %d bytes", self.max_header_bytes)
            self._refuse(431, f"request head over {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a keep-alive connection's next request
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        self._waiting().pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next is the head of another request
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._waiting()[self] = None  # idle until its next request: may make room

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._waiting().pop(self, None)
        super().connection_lost(exc)
