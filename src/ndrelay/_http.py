"""A lean HTTP/1.1 connection for the client's data path (stream reads and uploads).

httpx serves every JSON call; this module carries only the two long-lived requests
whose bytes dominate: a consumer's response body and a producer's upload body. It
speaks plain HTTP/1.1 with chunked transfer coding, over TCP, TLS or a Unix socket
(`unix:///path`), and is lean where it matters:

- reading, it asks the `FrameDecoder` where a large payload goes and `recv_into`s it
  there: the kernel's copy is the only one;
- writing, it hands each frame's header and the array's own memory to one `sendmsg`
  (chunk framing included), so nothing is joined or copied in user space.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ._codec import FrameDecoder
from ._exceptions import ConnectError, NDRelayError, RelayTimeout, StreamInterrupted, TransportError
from ._frames import Frame
from ._vectored import drop_sent
from ._version import __version__

__all__ = ["Endpoint", "HTTPResponse", "open_request"]

_RECV_SIZE = 256 * 1024
_SMALL_RECV = 4096
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: parsed from the client's base URL."""

    scheme: str
    host: str
    port: int
    base_path: str
    connect_timeout: float | None
    read_timeout: float | None
    ssl_context: ssl.SSLContext | None = None
    #: the socket path of a `unix:///path` URL (then `host` is "localhost", `port` 0)
    uds: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        connect_timeout: float | None,
        read_timeout: float | None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            if not parts.path or parts.netloc:
                raise ValueError(
                    f"a Unix socket URL is unix:///absolute/path/to/socket, got {url!r}"
                )
            return cls("unix", "localhost", 0, "", connect_timeout, read_timeout, None, parts.path)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"relay URL must be http:// or https:// with a host, or unix:///path, got {url!r}"
            )
        context = None
        if parts.scheme == "https":
            if isinstance(verify, ssl.SSLContext):
                context = verify
            elif isinstance(verify, str):
                context = ssl.create_default_context(cafile=verify)
            else:
                context = ssl.create_default_context()
                if not verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(
            parts.scheme,
            parts.hostname,
            port,
            parts.path.rstrip("/"),
            connect_timeout,
            read_timeout,
            context,
        )

    @property
    def origin(self) -> str:
        if self.uds is not None:
            return f"unix://{self.uds}"
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def host_header(self) -> str:
        return self.host if self.uds is not None else f"{self.host}:{self.port}"

    def connect(self, url: str) -> socket.socket:
        """A connected socket (TCP with TCP_NODELAY, or Unix); `ConnectError` or
        `RelayTimeout` if it cannot be had."""
        try:
            if self.uds is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(self.uds)
                except BaseException:
                    sock.close()
                    raise
                return sock
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise RelayTimeout("timed out connecting", url=url) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect: {exc.strerror or exc}", url=url) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise ConnectError("cannot set TCP_NODELAY", url=url) from None
        return sock


class HTTPResponse:
    """An open response: status, headers, and a body read frame by frame."""

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str], url: str) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self.url = url
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length")
        self._remaining: int | None = (
            int(length) if length is not None and not self._chunked else None
        )
        self._chunk_left = 0  # bytes left in the current chunk
        self._done = False

    @property
    def received(self) -> int:
        """Bytes received on this response's connection so far."""
        return self._conn.received

    def read_all(self, limit: int = 1024 * 1024) -> bytes:
        """The whole (small) body, e.g. a JSON error."""
        out = bytearray()
        for piece in self._pieces():
            out += piece
            if len(out) > limit:
                break
        return bytes(out)

    def iter_frames(self, decoder: FrameDecoder) -> Iterator[list[Frame]]:
        """Frames of the body until it ends, as lists: those each read completed. The
        caller checks for a terminal frame. Before an error, the good frames decoded
        ahead of it are yielded.

        Raises:
            StreamInterrupted: the connection closed inside the body or inside a frame.
            RelayTimeout: no byte arrived within the read timeout.
            RemoteProtocolError: the body is not a valid frame stream.
        """
        conn = self._conn
        while True:
            target = decoder.get_buffer()
            if (
                target is not None
                and not conn.pending()
                and (self._chunk_left or not self._chunked)
            ):
                # Zero-copy: the payload goes straight from the socket into its array.
                limit = len(target)
                if self._chunked:
                    limit = min(limit, self._chunk_left)
                elif self._remaining is not None:
                    limit = min(limit, self._remaining)
                n = conn.recv_into(target, limit)
                if n == 0:
                    raise StreamInterrupted("connection closed inside a frame", url=self.url)
                if self._chunked:
                    self._chunk_left -= n
                    if self._chunk_left == 0:
                        conn.expect_crlf(self.url)
                elif self._remaining is not None:
                    self._remaining -= n
                decoder.buffer_updated(n)
                if decoder.get_buffer() is None:
                    # A large payload is complete: read the next header in a small
                    # read, so the next payload lands in its array, not in a buffer.
                    conn.recv_size = _SMALL_RECV
            else:
                piece = self._next_piece()
                if piece is None:
                    decoder.feed_eof()
                    return
                decoder.feed(piece)
                if decoder.get_buffer() is None:
                    conn.recv_size = _RECV_SIZE
            frames: list[Frame] = []
            try:
                frames.extend(decoder.frames())
            finally:
                if frames:
                    yield frames

    def _pieces(self) -> Iterator[memoryview]:
        while (piece := self._next_piece()) is not None:
            yield piece

    def _next_piece(self) -> memoryview | None:
        """The next run of body bytes (de-chunked), or None at the end of the body."""
        conn = self._conn
        if self._done:
            return None
        if not self._chunked:
            if self._remaining == 0:
                self._done = True
                return None
            data = conn.read_some(self._remaining)
            if not data:
                if self._remaining is None:  # body delimited by the connection's end
                    self._done = True
                    return None
                raise StreamInterrupted("connection closed inside the response body", url=self.url)
            if self._remaining is not None:
                self._remaining -= len(data)
            return data
        while True:
            if self._chunk_left:
                data = conn.read_some(self._chunk_left)
                if not data:
                    raise StreamInterrupted("connection closed inside a chunk", url=self.url)
                self._chunk_left -= len(data)
                if self._chunk_left == 0:
                    conn.expect_crlf(self.url)
                return data
            line = conn.read_line(self.url)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise StreamInterrupted(
                    f"bad chunk size line {line[:40]!r}", url=self.url
                ) from None
            if size == 0:
                while conn.read_line(self.url):  # trailers, then the empty line
                    pass
                self._done = True
                return None
            self._chunk_left = size

    def close(self) -> None:
        self._conn.close()


class _Connection:
    """A socket plus a small read buffer, for one request/response."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, read_timeout: float | None) -> None:
        self.sock = sock
        self.sock.settimeout(read_timeout)
        self._buf = b""  # the last bytes received; _pos: how far they were read
        self._pos = 0
        self.recv_size = _RECV_SIZE
        self._zero_copy_send = not isinstance(sock, ssl.SSLSocket)
        #: bytes received so far (what a consumer's acknowledgements weigh)
        self.received = 0

    # -- reading -------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(self.recv_size)
        except TimeoutError:
            raise RelayTimeout("no data within the read timeout") from None
        if not data:
            return False
        self.received += len(data)
        self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._pos = 0
        return True

    def read_some(self, limit: int | None) -> memoryview | None:
        if self._pos == len(self._buf) and not self._fill():
            return None
        end = len(self._buf) if limit is None else min(len(self._buf), self._pos + limit)
        out = memoryview(self._buf)[self._pos : end]
        self._pos = end
        return out

    def recv_into(self, target: memoryview, limit: int) -> int:
        try:
            n = self.sock.recv_into(target, limit)
            self.received += n
            return n
        except TimeoutError:
            raise RelayTimeout("no data within the read timeout") from None

    def read_line(self, url: str) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = self._buf[self._pos : end]
                self._pos = end + 2
                return line
            if len(self._buf) - self._pos > _MAX_HEAD:
                raise TransportError("response line too long", url=url)
            if not self._fill():
                raise StreamInterrupted("connection closed inside the response", url=url)

    def expect_crlf(self, url: str) -> None:
        if self.read_line(url) != b"":
            raise StreamInterrupted("malformed chunk terminator", url=url)

    def readable_now(self) -> bool:
        """Whether the server already sent something (an early answer to an upload)."""
        if self.pending():
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready:
            return False
        if not isinstance(self.sock, ssl.SSLSocket):
            return True
        # TLS: a readable socket may hold only protocol records (a TLS 1.3 session
        # ticket), no answer: read what there is without waiting.
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(self.recv_size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        finally:
            self.sock.settimeout(timeout)
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True  # an answer, or the end of the connection

    # -- writing -------------------------------------------------------------------------

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        """Write every buffer, in order, without joining them."""
        if not self._zero_copy_send:
            for buf in buffers:
                self.sock.sendall(buf)
            return
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            sent = self.sock.sendmsg(views[:512])  # type: ignore[arg-type]  # never SSL here
            drop_sent(views, sent)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def open_request(
    endpoint: Endpoint,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    chunked_body: bool = False,
) -> tuple[_Connection, str]:
    """Connect and send a request head; returns the connection and the request URL."""
    url = f"{endpoint.origin}{endpoint.base_path}{path}"
    sock: socket.socket = endpoint.connect(url)
    if endpoint.ssl_context is not None:
        try:
            sock = endpoint.ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectError(f"TLS handshake failed: {exc}", url=url) from None
    conn = _Connection(sock, endpoint.read_timeout)
    lines = [
        f"{method} {endpoint.base_path}{path} HTTP/1.1",
        f"Host: {endpoint.host_header}",
        f"User-Agent: ndrelay/{__version__}",
        "Connection: close",
    ]
    if chunked_body:
        lines.append("Transfer-Encoding: chunked")
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        conn.send_buffers([head])
    except OSError as exc:
        conn.close()
        raise ConnectError(f"cannot send request: {exc}", url=url) from None
    return conn, url


def read_response(conn: _Connection, url: str) -> HTTPResponse:
    """Read the status line and headers of the response."""
    try:
        status_line = conn.read_line(url)
        while status_line == b"":  # tolerate a stray CRLF
            status_line = conn.read_line(url)
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise TransportError(f"not an HTTP/1.1 response: {status_line[:60]!r}", url=url)
        status = int(parts[1])
        headers: dict[str, str] = {}
        while line := conn.read_line(url):
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    except NDRelayError:
        conn.close()
        raise
    except (OSError, ValueError) as exc:
        conn.close()
        raise TransportError(f"bad response: {exc}", url=url) from None
    if status == 100:  # 100 Continue: the real response follows
        return read_response(conn, url)
    return HTTPResponse(conn, status, headers, url)
