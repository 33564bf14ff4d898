"""A lean Redis client for the Redis backend's two hot transactions (append, take).

redis-py moves every payload through extra copies on the way to and from Redis: on
Python 3.11 asyncio's `writelines` joins a command, payload included, into one bytes
object; replies go through a StreamReader buffer, then hiredis, then a bytes object per
bulk string. `RespClient` runs a MULTI ... EXEC on connections of its own, with
`sendmsg` of the commands' headers and the payloads' own memory (the kernel's copy is
the only one), and reads a large bulk string's body with `recv_into` straight into an
uninitialised buffer of its size (`ReplyReader`; a bytearray would be zeroed first),
which the array handed to the reader then wraps.

Errors are redis-py's: error replies become the exceptions redis-py makes of them (in
place, in EXEC's replies; an aborted EXEC raises the first queued command's error), a
lost connection raises `redis.exceptions.ConnectionError`, and a transaction is retried
on a new connection by the redis-py client's own `Retry` policy, as its pipelines are.
Everything else (scripts loading, notifications, the rest of the commands) stays on
redis-py. Speaks RESP2 over TCP or a Unix socket; `RespClient.of` answers None for
anything else (TLS), where the backend keeps redis-py's pipelines.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError, ExecAbortError

from .._vectored import IOV_MAX, drop_sent

__all__ = ["ReplyReader", "RespClient", "encode"]

#: bulk strings at least this long are read straight into a buffer of their own
DIRECT_MIN = 256 * 1024
#: arguments at least this long are sent from their own memory, not copied into a header
BIG_ARG = 16 * 1024
#: idle connections kept for the next transaction
_IDLE = 8
_CRLF = b"\r\n"


def _arg(value: Any) -> bytes | memoryview:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    return memoryview(value).cast("B")  # any other buffer (a numpy array's memory)


def encode(commands: Iterable[Sequence[Any]]) -> list[bytes | memoryview]:
    """`commands` as RESP arrays of bulk strings: a list of buffers where every argument
    of `BIG_ARG` bytes or more is its own (not copied) and the rest is joined."""
    out: list[bytes | memoryview] = []
    head = bytearray()
    for command in commands:
        head += b"*%d\r\n" % len(command)
        for value in command:
            arg = _arg(value)
            n = len(arg)
            head += b"$%d\r\n" % n
            if n >= BIG_ARG:
                out.append(bytes(head))
                out.append(arg)
                head = bytearray(_CRLF)
            else:
                head += arg
                head += _CRLF
    if head:
        out.append(bytes(head))
    return out


class ReplyReader:
    """RESP2 replies parsed from bytes written into the buffers it hands out.

    `get_buffer()` answers where the next bytes go: a large bulk string's own buffer
    while its body arrives, else the tail of a scratch buffer; after writing `n` bytes
    there, `buffer_updated(n)`. Complete replies collect in `replies`: bytes (simple and
    small bulk strings), a uint8 numpy array (bulk strings of `direct_min` bytes or
    more), int, None (nil), lists, and redis-py's exception for each error reply (not
    raised).
    """

    def __init__(self, scratch: int = DIRECT_MIN, direct_min: int = DIRECT_MIN) -> None:
        self.replies: collections.deque[Any] = collections.deque()
        self._buf = bytearray(max(16, scratch))
        self._start = 0  # first byte not parsed yet
        self._end = 0  # end of the bytes received into the scratch buffer
        self._direct_min = direct_min
        self._bulk: np.ndarray[Any, np.dtype[np.uint8]] | None = None  # a large bulk
        self._got = 0  # bytes of `_bulk` received
        self._skip = 0  # bytes to drop before parsing on (a large bulk's CRLF)
        self._open: list[tuple[list[Any], int]] = []  # arrays being filled, and sizes

    def get_buffer(self) -> memoryview:
        if self._bulk is not None:
            return self._bulk.data[self._got :]
        if self._end == len(self._buf):
            if self._start:  # move what is left to the front
                rest = self._end - self._start
                self._buf[:rest] = self._buf[self._start : self._end]
                self._start, self._end = 0, rest
            else:  # one line or small bulk longer than the buffer
                grown = bytearray(2 * len(self._buf))  # (the old one may be in use)
                grown[: self._end] = self._buf
                self._buf = grown
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, n: int) -> None:
        if self._bulk is not None:
            self._got += n
            if self._got == len(self._bulk):
                value, self._bulk = self._bulk, None
                self._skip = 2
                self._add(value)
            return
        self._end += n
        self._parse()

    def _add(self, value: Any) -> None:
        while self._open:
            items, size = self._open[-1]
            items.append(value)
            if len(items) < size:
                return
            self._open.pop()
            value = items
        self.replies.append(value)

    def _parse(self) -> None:
        buf = self._buf
        while True:
            if self._skip:
                k = min(self._skip, self._end - self._start)
                self._start += k
                self._skip -= k
                if self._skip:
                    return
            start = self._start
            nl = buf.find(_CRLF, start, self._end)
            if nl < 0:
                if start == self._end:
                    self._start = self._end = 0
                return
            kind = buf[start]
            line = bytes(buf[start + 1 : nl])
            value: Any
            if kind == 0x24:  # $ bulk string
                n = int(line)
                if n < 0:
                    value = None
                    self._start = nl + 2
                else:
                    body = nl + 2
                    have = self._end - body
                    if have >= n + 2:
                        value = bytes(buf[body : body + n])
                        self._start = body + n + 2
                    elif n >= self._direct_min:
                        bulk = np.empty(n, dtype=np.uint8)
                        k = min(have, n)
                        bulk[:k] = buf[body : body + k]
                        self._start = body + k
                        if k < n:
                            self._bulk, self._got = bulk, k
                            self._start = self._end = 0
                            return
                        self._skip = 2
                        value = bulk
                    else:
                        return  # the rest of a small one: in the scratch buffer
            elif kind == 0x2A:  # * array
                n = int(line)
                self._start = nl + 2
                if n > 0:
                    self._open.append(([], n))
                    continue
                value = None if n < 0 else []
            elif kind == 0x3A:  # : integer
                value = int(line)
                self._start = nl + 2
            elif kind == 0x2B:  # + simple string
                value = line
                self._start = nl + 2
            elif kind == 0x2D:  # - error
                value = BaseParser.parse_error(line.decode("utf-8", "replace"))  # type: ignore[no-untyped-call]
                self._start = nl + 2
            else:
                raise RedisConnectionError(f"Redis sent a reply of unknown type {bytes([kind])!r}")
            self._add(value)


class _Connection:
    """One socket to Redis and the replies read from it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = ReplyReader()

    async def send(self, buffers: list[bytes | memoryview]) -> None:
        loop = asyncio.get_running_loop()
        views = [memoryview(b) for b in buffers]
        sock = self.sock
        while views:
            try:
                sent = sock.sendmsg(views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise RedisConnectionError(f"Error writing to Redis: {exc}") from exc
            drop_sent(views, sent)
            if views:
                waiter: asyncio.Future[None] = loop.create_future()

                def ready(waiter: asyncio.Future[None] = waiter) -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                loop.add_writer(sock, ready)
                try:
                    await waiter
                finally:
                    loop.remove_writer(sock)

    async def read(self, count: int) -> list[Any]:
        """The next `count` replies."""
        loop = asyncio.get_running_loop()
        reader = self.reader
        while len(reader.replies) < count:
            try:
                n = await loop.sock_recv_into(self.sock, reader.get_buffer())
            except OSError as exc:
                raise RedisConnectionError(f"Error reading from Redis: {exc}") from exc
            if not n:
                raise RedisConnectionError("Connection closed by server.")
            reader.buffer_updated(n)
        return [reader.replies.popleft() for _ in range(count)]

    def alive(self) -> bool:
        """Nothing to read on the idle connection: not closed by Redis, no stray bytes
        (as redis-py checks a pooled connection before using it)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # end of file, or bytes no command asked for

    def close(self) -> None:
        self.sock.close()


class RespClient:
    """MULTI ... EXEC transactions on connections of its own (see the module docstring).

    Args:
        address: `(host, port)`, or a Unix socket's path.
        db: the database to SELECT.
        username, password: for AUTH, if set.
        retry: redis-py's asyncio `Retry` (its `call_with_retry`), or None for no retry
            (what redis-py's own connections of a client made from a URL do).
    """

    def __init__(
        self,
        address: tuple[str, int] | str,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        retry: Any = None,
    ) -> None:
        self.address = address
        self.db = db
        self.username = username
        self.password = password
        self.retry = retry
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False

    @classmethod
    def of(cls, client: Any) -> RespClient | None:
        """A `RespClient` to the Redis that a redis-py asyncio client talks to, with its
        credentials and retry policy; None when it connects otherwise than over plain TCP
        or a Unix socket (TLS)."""
        pool = client.connection_pool
        kw = pool.connection_kwargs
        address: tuple[str, int] | str
        if pool.connection_class is UnixDomainSocketConnection:
            address = kw["path"]
        elif pool.connection_class is Connection:
            address = (kw.get("host", "localhost"), int(kw.get("port", 6379)))
        else:
            return None
        return cls(
            address,
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            retry=kw.get("retry"),
        )

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            infos = await loop.getaddrinfo(*self.address, type=socket.SOCK_STREAM)
            family, kind, proto, _, where = infos[0]
            sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if not isinstance(self.address, str):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            try:
                await loop.sock_connect(
                    sock, self.address if isinstance(self.address, str) else where
                )
            except OSError as exc:
                raise RedisConnectionError(f"Error connecting to Redis: {exc}") from exc
            conn = _Connection(sock)
            hello: list[list[Any]] = []
            if self.password is not None:
                auth = [self.username, self.password] if self.username else [self.password]
                hello.append(["AUTH", *auth])
            if self.db:
                hello.append(["SELECT", self.db])
            if hello:
                await conn.send(encode(hello))
                for reply in await conn.read(len(hello)):
                    if isinstance(reply, Exception):
                        raise reply
            return conn
        except BaseException:
            sock.close()
            raise

    async def transaction(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run `commands` in one MULTI ... EXEC; their replies, error replies in place as
        exceptions (not raised). Raises the first command's error when Redis refused to
        queue one (EXECABORT), and ConnectionError when Redis stays unreachable."""
        if self.retry is None:
            return await self._transaction(commands)

        async def fail(error: Exception) -> None:
            pass  # the connection was closed where it failed

        result: list[Any] = await self.retry.call_with_retry(
            lambda: self._transaction(commands), fail
        )
        return result

    async def _transaction(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if self._closed:
            raise RedisConnectionError("the Redis connection is closed")
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            if not conn.alive():  # Redis closed it meanwhile (restarted, say)
                conn.close()
                conn = None
        if conn is None:
            conn = await self._connect()
        self._busy.add(conn)
        ok = False
        try:
            await conn.send(encode([["MULTI"], *commands, ["EXEC"]]))
            replies = await conn.read(len(commands) + 2)
            ok = True
        finally:
            self._busy.discard(conn)
            if ok and not self._closed and len(self._idle) < _IDLE:
                self._idle.append(conn)
            else:  # its state unknown (cancelled, broken): never reused
                conn.close()
        multi, *queued, result = replies
        if isinstance(multi, Exception):
            raise multi
        if isinstance(result, ExecAbortError):
            for reply in queued:
                if isinstance(reply, Exception):
                    raise reply from result
            raise result
        if isinstance(result, Exception):
            raise result
        if not isinstance(result, list):
            raise RedisConnectionError(f"Redis answered EXEC with {result!r}")
        return result

    async def aclose(self) -> None:
        """Close the idle connections; those of transactions still running are shut down
        (their transactions fail with ConnectionError) and closed as these end."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for conn in self._busy:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
