"""`RelayClient` and `AsyncRelayClient`: the same API over one event loop or none.

Both share `_BaseClient` (URLs, headers, error mapping) and `StreamState` (frames to
items and batches). The sync client reads and uploads stream bodies through the lean
`_http` connection (zero-copy both ways); everything else goes through httpx.
"""

from __future__ import annotations

import asyncio
import queue as queue_module
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

import httpx
import numpy as np

from ._buffers import Buffer, ExceptionSentinel, Prefetch
from ._codec import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    encode_data_parts,
    encode_frame,
    encode_items,
)
from ._exceptions import (
    AuthError,
    ConnectError,
    FrameTooLarge,
    LocalProtocolError,
    NDRelayError,
    RegistryError,
    RelayHTTPError,
    RelayTimeout,
    SchemaMismatch,
    StreamClosed,
    StreamConflict,
    StreamInterrupted,
    StreamNotFound,
    TransportError,
    UploadRefused,
)
from ._frames import EndFrame, ErrorFrame
from ._http import Endpoint, HTTPResponse, open_request, read_response
from ._stream import StreamState

__all__ = [
    "AsyncRelayClient",
    "AsyncRemoteStream",
    "RelayClient",
    "RemoteStream",
    "relay_url",
]

#: Upload chunks gather small frames up to about this many bytes.
_UPLOAD_CHUNK = 256 * 1024
_ERRORS_BY_NAME: dict[str, type[NDRelayError]] = {
    cls.__name__: cls
    for cls in (
        AuthError,
        FrameTooLarge,
        RegistryError,
        SchemaMismatch,
        StreamClosed,
        StreamConflict,
        StreamNotFound,
    )
}


class _BaseClient:
    """URLs, headers, timeouts and error mapping; no I/O."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        read_timeout: float | None = 60.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        verify: Any = True,
    ) -> None:
        self.url = relay_url(url)
        self.token = token
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.max_frame_size = max_frame_size
        if isinstance(verify, str):  # a CA bundle: one context for httpx and the data path
            verify = ssl.create_default_context(cafile=verify)
        self.verify: bool | ssl.SSLContext = verify
        self._endpoint = Endpoint.from_url(self.url, timeout, read_timeout, verify)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # httpx (the JSON calls): over a Unix socket, a transport bound to its path
        self._httpx_url = self.url if self._endpoint.uds is None else "http://localhost"

    def _httpx_transport(self, cls: Any) -> Any:
        """The httpx transport for a `unix://` URL, else None (httpx's default)."""
        if self._endpoint.uds is None:
            return None
        return cls(uds=self._endpoint.uds)

    @staticmethod
    def _path(name: str, suffix: str = "") -> str:
        return f"/streams/{quote(name, safe='')}{suffix}"

    @staticmethod
    def _stream_query(batch: int | None, policy: str | None) -> str:
        params: dict[str, Any] = {}
        if batch is not None and batch > 1:
            params["batch"] = batch
        if policy is not None:
            params["policy"] = policy
        return "?" + urlencode(params) if params else ""

    def _error(self, status: int, body: Any, url: str, name: str | None = None) -> NDRelayError:
        """The exception for an error answer of the relay."""
        if not isinstance(body, dict):
            body = {"message": str(body)[:500]}
        message = str(body.get("message") or body.get("detail") or body)
        if body.get("error") in ("UploadRefused", "upload refused"):
            return UploadRefused(
                f"{message} (accepted {body.get('accepted')} frames before it)",
                status=status,
                frame_index=body.get("frame_index"),
                accepted=body.get("accepted"),
                next_seq=body.get("next_seq"),
                stream_name=name,
            )
        cls = _ERRORS_BY_NAME.get(str(body.get("error")))
        if cls is None:
            cls = {401: AuthError, 404: StreamNotFound}.get(status)
        if cls is AuthError or cls is RegistryError:
            return cls(f"{message} ({url})")
        if cls is FrameTooLarge:
            return FrameTooLarge(message)
        if cls is not None:
            return cls(message, stream_name=name)  # type: ignore[call-arg]
        return RelayHTTPError(f"{message} ({url})", status=status, body=body)

    def _open_stream(
        self, name: str, batch: int | None, stack: bool, policy: str | None
    ) -> tuple[HTTPResponse, StreamState]:
        """Send a stream request and read the answer's head (blocking): the open response
        and a fresh `StreamState`, or the relay's error raised."""
        if stack and batch is None:
            raise ValueError("stack=True needs batch=N")
        state = StreamState(name, batch, stack)
        path = self._path(name) + self._stream_query(batch, policy)
        conn, url = open_request(
            self._endpoint, "GET", path, {"Accept": "application/x-msgpack", **self._headers}
        )
        response = read_response(conn, url)
        if response.status != 200:
            body = _json_or_text(response.read_all())
            response.close()
            raise self._error(response.status, body, url, name)
        return response, state

    def _upload(
        self,
        name: str,
        items: Iterable[Any],
        end: bool,
        prefetch: int,
        timeout: float | None,
        batched: bool,
    ) -> dict[str, Any]:
        """The data path of `publish` (blocking; the async client runs it in a thread)."""
        endpoint = self._endpoint
        headers = {"Content-Type": "application/x-msgpack", **self._headers}
        conn, url = open_request(endpoint, "POST", self._path(name), headers, chunked_body=True)
        conn.sock.settimeout(timeout)
        failure: BaseException | None = None
        seq = 0
        try:
            with Prefetch(_refuse_none(items), size=prefetch) as source:
                finished = False
                while not finished:
                    ready, terminal = _gather(source.queue, _UPLOAD_CHUNK)
                    parts, seq, error = _encode_ready(ready, seq, batched)
                    if error is not None:
                        terminal = ExceptionSentinel(error)
                    if terminal is None:
                        finished = True
                        if end:
                            parts.append(encode_frame(EndFrame(seq)))
                    elif isinstance(terminal, ExceptionSentinel):
                        finished = True
                        failure = terminal.exception
                        parts.append(encode_frame(ErrorFrame.from_exception(failure, seq=seq)))
                    total = sum(len(p) for p in parts)
                    buffers = [b"%x\r\n" % total, *parts, b"\r\n"] if total else []
                    if finished:
                        buffers.append(b"0\r\n\r\n")
                    if conn.readable_now():
                        # The relay answered early: it refused something. End the body
                        # (without an end frame) so that it answers now instead of
                        # draining the rest until its timeout.
                        try:
                            conn.send_buffers([b"0\r\n\r\n"])
                        except OSError:
                            pass
                        break
                    try:
                        conn.send_buffers(buffers)
                    except TimeoutError:
                        raise RelayTimeout(
                            f"the relay took no data for {timeout} s", url=url
                        ) from None
                    except OSError:
                        break  # the relay closed: its answer says why
            conn.sock.settimeout(self.read_timeout)
            response = read_response(conn, url)
            body = _json_or_text(response.read_all())
        finally:
            conn.close()
        if response.status != 200:
            raise self._error(response.status, body, url, name)
        if failure is not None:
            raise failure
        return body  # type: ignore[no-any-return]

    def _check(self, response: httpx.Response, name: str | None = None) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise self._error(response.status_code, body, str(response.url), name)
        return response


def relay_url(url: str) -> str:
    """`url` without a trailing `/`; `http://` is assumed when it names no scheme
    (`localhost:8000`, `rig:8000`), as curl does.

    Raises:
        ValueError: not an http://, https:// or unix:// URL with a host (or path).
    """
    if not isinstance(url, str):
        raise TypeError(f"the relay URL must be a str, got {type(url).__name__}")
    given = url
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "unix") or not (parts.hostname or parts.path):
        raise ValueError(
            f"relay URL must be http:// or https:// with a host, or unix:///path, got {given!r}"
        )
    return url


def _translate(exc: httpx.HTTPError, url: str) -> NDRelayError:
    if isinstance(exc, httpx.TimeoutException):
        return RelayTimeout(f"timed out: {exc}", url=url)
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"cannot connect: {exc}", url=url)
    return TransportError(f"{type(exc).__name__}: {exc}", url=url)


def _spec(size: int, mode: str, max_bytes: int | None, dtype: Any, shape: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"size": size, "mode": mode}
    if max_bytes is not None:
        body["max_bytes"] = max_bytes
    if dtype is not None:
        import numpy as np

        body["dtype"] = np.dtype(dtype).str
    if shape is not None:
        body["shape"] = list(shape)
    return body


# -- sync ------------------------------------------------------------------------------


class _UnitQueue:
    """Bounded hand-over from a reader thread: units, then a sticky terminal.

    A `ReadableQueue`: `get()` gives units, then `None` at the end, again on every later
    call, so any number of readers all see the end. On an error, `get()` raises it
    (every later call too) rather than returning an `ExceptionSentinel`: a `Buffer` of
    any library, which knows only its own sentinel class, still raises it
    (roverd's `Channel.consume` wraps queues in roverd's own `Buffer`). `sentinels`
    is a view that gives ndrelay's `ExceptionSentinel` instead, for code that wants it.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._units: deque[Any] = deque()
        self._terminal: list[Any] = []  # [None] or [ExceptionSentinel(...)] once finished
        self._cond = threading.Condition()
        self._closed = False
        #: called (in the reader thread) when units or the terminal arrive in an empty
        #: queue: how an asyncio reader learns there is something to take
        self.on_ready: Any = None

    def put_many(self, units: list[Any]) -> bool:
        """Add units in order, waiting while full; False if the queue was closed meanwhile."""
        with self._cond:
            while units:
                while len(self._units) >= self.maxsize and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return False
                room = self.maxsize - len(self._units)
                was_empty = not self._units
                self._units.extend(units[:room])
                units = units[room:]
                if was_empty:
                    self._cond.notify_all()
                    if self.on_ready is not None:
                        self.on_ready()
            return True

    def finish(self, terminal: None | ExceptionSentinel) -> None:
        with self._cond:
            if not self._terminal:
                self._terminal.append(terminal)
            self._cond.notify_all()
        if self.on_ready is not None:
            self.on_ready()

    def close(self) -> None:
        """Stop accepting units (the reader stops); readers get the end after what is held."""
        with self._cond:
            self._closed = True
            if not self._terminal:
                self._terminal.append(None)
            self._cond.notify_all()
        if self.on_ready is not None:
            self.on_ready()

    def take_ready(self) -> tuple[list[Any], Any]:
        """Without waiting: every unit held, and the terminal (`None` or an
        `ExceptionSentinel`) if the stream has finished, else `_OPEN`."""
        with self._cond:
            units = list(self._units)
            self._units.clear()
            if units:
                self._cond.notify()  # the reader may wait for room
            return units, (self._terminal[0] if self._terminal else _OPEN)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next unit; `None` at the end; raises the stream's error (the producer's
        exception as a `RemoteError`, or `StreamInterrupted`) after the units before it."""
        unit = self._get(block, timeout)
        if isinstance(unit, ExceptionSentinel):
            raise unit.exception
        return unit

    @property
    def sentinels(self) -> _SentinelView:
        """This queue with an error given as an `ExceptionSentinel`, not raised."""
        return _SentinelView(self)

    def _get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._units:
                    unit = self._units.popleft()
                    if len(self._units) == self.maxsize - 1:
                        self._cond.notify()  # the reader may wait for room
                    return unit
                if self._terminal:
                    return self._terminal[0]
                if not block:
                    raise queue_module.Empty
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise queue_module.Empty
                self._cond.wait(wait)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def take_all(self) -> list[Any]:
        """Every unit held (waiting for one); `[]` once only the terminal is left."""
        with self._cond:
            while not self._units and not self._terminal:
                self._cond.wait()
            units = list(self._units)
            self._units.clear()
            self._cond.notify()
            return units

    def empty(self) -> bool:
        with self._cond:
            return not self._units and not self._terminal

    def qsize(self) -> int:
        return len(self._units)


class _SentinelView:
    """A `_UnitQueue` read the seed's way: its error as an `ExceptionSentinel`."""

    def __init__(self, units: _UnitQueue) -> None:
        self._units = units

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next unit; `None` at the end; an `ExceptionSentinel` on an error."""
        return self._units._get(block, timeout)

    def get_nowait(self) -> Any:
        return self._units._get(block=False)

    def empty(self) -> bool:
        return self._units.empty()

    def qsize(self) -> int:
        return self._units.qsize()


class RemoteStream(Buffer[Any]):
    """A remote stream as a local `Buffer`: iterate it, or read `.queue`.

    A background thread reads the response into a bounded queue (`prefetch` units).
    Iteration ends where the producer ended and raises where it raised (`RemoteError`,
    also an instance of the producer's builtin exception type); a response cut off
    before its `end`/`error` frame raises `StreamInterrupted`. `close()` (or leaving a
    `with` block) stops the thread and the HTTP request.

    Attributes:
        name: the stream's name.
        state: the `StreamState` (`last_seq`, `gaps` skipped by fanout drop policies).
    """

    queue: _UnitQueue

    def __init__(
        self,
        response: HTTPResponse,
        name: str,
        state: StreamState,
        prefetch: int,
        max_frame_size: int,
        on_ready: Any = None,
    ) -> None:
        super().__init__(_UnitQueue(prefetch))
        self.queue.on_ready = on_ready
        self.name = name
        self.state = state
        self._response = response
        self._decoder = FrameDecoder(max_frame_size)
        self._closing = threading.Event()
        self._local: deque[Any] = deque()
        self._thread = threading.Thread(
            target=self._read, name=f"ndrelay-stream-{name}", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        state, queue = self.state, self.queue
        try:
            for frames in self._response.iter_frames(self._decoder):
                units = state.handle_all(frames)
                if units and not queue.put_many(units):
                    return  # closed by the reader
                if state.finished:
                    queue.finish(None if state.error is None else ExceptionSentinel(state.error))
                    return
            raise StreamInterrupted(
                f"stream {self.name!r} was cut off after seq {state.last_seq} "
                "(no end or error frame)",
                url=self._response.url,
            )
        except Exception as exc:
            if self._closing.is_set():
                return
            if isinstance(exc, OSError):
                exc = StreamInterrupted(
                    f"stream {self.name!r} broke: {exc}", url=self._response.url
                )
            elif isinstance(exc, RelayTimeout) and exc.url is None:
                exc = RelayTimeout(
                    f"stream {self.name!r}: no data within the read timeout",
                    url=self._response.url,
                )
            queue.put_many(state.flush())
            queue.finish(ExceptionSentinel(exc))
        finally:
            self._response.close()

    def __next__(self) -> Any:
        # Take every ready unit in one go: one lock round trip per batch, not per item.
        local = self._local
        if local:
            return local.popleft()
        units = self.queue.take_all()
        if units:
            local.extend(units)
            return local.popleft()
        return super().__next__()  # the end or the error

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the reader thread and the HTTP request; iteration then ends."""
        self._closing.set()
        self.queue.close()
        self._response.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._closing.set()
            self.queue.close()
            self._response.close()


class RelayClient(_BaseClient):
    """Client of an ndrelay server.

    ```python
    with RelayClient("http://rig:8000", token=...) as relay:
        relay.publish("radar", frames)                # end on exhaustion, error if it raises
        for batch in relay.stream("radar", batch=8):  # lists of 8, the last partial
            ...
    ```

    Args:
        url: the relay's base URL: `http://host:port`, `https://...`, or
            `unix:///path/to/socket` for a relay serving on a Unix socket (`--uds`).
        token: bearer token, if the relay wants one.
        timeout: seconds for connecting and for each JSON call.
        read_timeout: seconds a stream may stay silent before `RelayTimeout`
            (the relay sends heartbeats every 15 s by default).
        max_frame_size: largest frame this client accepts.
        verify: TLS verification for https (bool, CA bundle path or `ssl.SSLContext`).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.Client(
            base_url=self._httpx_url,
            headers=self._headers,
            timeout=self.timeout,
            verify=self.verify,
            transport=self._httpx_transport(httpx.HTTPTransport),
        )
        self._streams: list[RemoteStream] = []

    # -- JSON calls ----------------------------------------------------------------------

    def _call(
        self, method: str, path: str, name: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _translate(exc, self.url + path) from None
        return self._check(response, name)

    def streams(self) -> list[dict[str, Any]]:
        """Info of every stream on the relay."""
        return self._call("GET", "/streams").json()  # type: ignore[no-any-return]

    def info(self, name: str) -> dict[str, Any]:
        """Definition, state and counters of one stream (`StreamNotFound` if none)."""
        return self._call("GET", self._path(name, "/info"), name).json()  # type: ignore[no-any-return]

    def create(
        self,
        name: str,
        size: int = 64,
        *,
        mode: str = "queue",
        max_bytes: int | None = None,
        dtype: Any = None,
        shape: Any = None,
    ) -> dict[str, Any]:
        """Create a stream (idempotent if identical; `StreamConflict` if different)."""
        body = _spec(size, mode, max_bytes, dtype, shape)
        return self._call("PUT", self._path(name), name, json=body).json()  # type: ignore[no-any-return]

    def delete(self, name: str) -> None:
        """Delete a stream; its consumers get a `relay` error."""
        self._call("DELETE", self._path(name), name)

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/healthz").json()  # type: ignore[no-any-return]

    # -- data path -----------------------------------------------------------------------

    def stream(
        self,
        name: str,
        batch: int | None = None,
        stack: bool = False,
        prefetch: int = 64,
        *,
        policy: str | None = None,
    ) -> RemoteStream:
        """Read a stream: a `Buffer` of items, or of batches with `batch=N`.

        Args:
            name: the stream.
            batch: yield lists of `batch` items (the last one partial), like `batch_iterator`.
            stack: with `batch`, yield one array of shape `(n, *item_shape)` per batch.
            prefetch: units (items or batches) read ahead by the background thread.
            policy: fanout streams: `block`, `drop_oldest` or `latest`.

        Raises:
            StreamNotFound, AuthError, ConnectError: at once, before any item.
        """
        response, state = self._open_stream(name, batch, stack, policy)
        remote = RemoteStream(response, name, state, prefetch, self.max_frame_size)
        self._streams = [s for s in self._streams if s._thread.is_alive()]
        self._streams.append(remote)
        return remote

    def publish(
        self,
        name: str,
        items: Iterable[Any],
        *,
        end: bool = True,
        prefetch: int = 64,
        timeout: float | None = None,
        batched: bool = False,
    ) -> dict[str, Any]:
        """Upload `items` (arrays or bytes) to stream `name`, creating it if needed.

        The iterable runs in a background thread (`prefetch` items ahead); items that
        are ready together travel in one write. When it is exhausted, an `end` frame
        finishes the stream (unless `end=False`: later uploads may append). If it
        raises, an `error` frame carries the exception to the consumers, and it is
        re-raised here once the relay has it.

        Args:
            batched: each element of `items` is an array of several items stacked on
                its leading axis; it travels as one batched frame (one header for all),
                and its rows are numbered and counted as items.
            timeout: longest wait for the relay to take more data (it holds the upload
                while the stream's buffer is full); `None` waits as long as it takes.

        Returns:
            The relay's answer: `{"accepted": frames, "items": n, "next_seq": n}`.

        Raises:
            UploadRefused: the relay refused a frame (the ones before it were kept).
        """
        return self._upload(name, items, end, prefetch, timeout, batched)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close open streams and the HTTP client."""
        for remote in self._streams:
            remote.close()
        self._streams = []
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_OPEN = object()


def _encode_ready(
    ready: list[Any], seq: int, batched: bool
) -> tuple[list[Any], int, LocalProtocolError | None]:
    """The buffers of the data frames for `ready`, the next seq, and the error of the
    first item that cannot be encoded (the items before it are encoded)."""
    if not batched:
        try:
            return encode_items(enumerate(ready, seq)), seq + len(ready), None
        except LocalProtocolError:
            pass  # find the bad item below
    parts: list[Any] = []
    for item in ready:
        try:
            if batched:
                if not isinstance(item, np.ndarray) or item.ndim == 0:
                    raise LocalProtocolError(
                        "batched=True needs arrays with a leading axis of items, "
                        f"got {type(item).__name__}",
                        key="count",
                    )
                parts += encode_data_parts(seq, item, len(item))
                seq += len(item)
            else:
                parts += encode_data_parts(seq, item)
                seq += 1
        except LocalProtocolError as exc:
            return parts, seq, exc
    return parts, seq, None


def _gather(queue: Any, limit: int) -> tuple[list[Any], Any]:
    """Items ready now (waiting for the first), up to about `limit` bytes, and the
    terminal that followed them: `None` (end), an `ExceptionSentinel`, or `_OPEN`."""
    ready: list[Any] = []
    size = 0
    unit = queue.get()
    while True:
        if unit is None or isinstance(unit, ExceptionSentinel):
            return ready, unit
        ready.append(unit)
        size += unit.nbytes if hasattr(unit, "nbytes") else len(unit)
        if size >= limit:
            return ready, _OPEN
        try:
            unit = queue.get_nowait()
        except queue_module.Empty:
            return ready, _OPEN


def _refuse_none(items: Iterable[Any]) -> Iterable[Any]:
    """`items`, raising at a `None`: to `Prefetch` it would mean the end, and the
    upload would end the stream there quietly, the items after it lost."""
    it = iter(items)  # not iterable: a TypeError at once, not an error frame

    def checked() -> Iterable[Any]:
        try:
            for item in it:
                if item is None:
                    raise LocalProtocolError(
                        "a data item must be an np.ndarray, bytes or bytearray, not None",
                        key="data",
                    )
                yield item
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    return checked()


def _json_or_text(data: bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


# -- async -----------------------------------------------------------------------------


def _from_async(items: Any, loop: asyncio.AbstractEventLoop) -> Iterable[Any]:
    """A blocking iterator over an async iterable, for a worker thread: each item is
    awaited on `loop` (which stays free while the thread works)."""
    iterator = items.__aiter__()
    while True:
        future = asyncio.run_coroutine_threadsafe(iterator.__anext__(), loop)
        try:
            item = future.result()
        except StopAsyncIteration:
            return
        yield item


class AsyncRemoteStream:
    """`async for` over a remote stream (see `RemoteStream`); `aclose()` stops it.

    The same data path as the sync client: a reader thread `recv_into`s payloads straight
    into their arrays and hands units over in batches; the event loop is woken (once per
    batch, `call_soon_threadsafe`) only when the queue was empty.
    """

    def __init__(
        self,
        response: HTTPResponse,
        name: str,
        state: StreamState,
        prefetch: int,
        max_frame_size: int,
    ) -> None:
        self.name = name
        self.state = state
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._local: deque[Any] = deque()
        self._terminal: Any = _OPEN
        self._remote = RemoteStream(
            response, name, state, prefetch, max_frame_size, on_ready=self._wake
        )

    def _wake(self) -> None:  # in the reader thread
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        local = self._local
        if local:
            return local.popleft()
        while self._terminal is _OPEN:  # (aclose sets it: nothing more after that)
            self._ready.clear()
            units, terminal = self._remote.queue.take_ready()
            if units:
                local.extend(units)
                return local.popleft()
            if terminal is not _OPEN:
                self._terminal = terminal
                break
            await self._ready.wait()
        if isinstance(self._terminal, ExceptionSentinel):
            raise self._terminal.exception
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the reader thread and the HTTP request."""
        if self._terminal is _OPEN:
            self._terminal = None
        self._local.clear()
        await asyncio.to_thread(self._remote.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRelayClient(_BaseClient):
    """The asyncio twin of `RelayClient` (same arguments and methods, awaited)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self._httpx_url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout, read=self.read_timeout),
            verify=self.verify,
            transport=self._httpx_transport(httpx.AsyncHTTPTransport),
        )
        self._streams: list[AsyncRemoteStream] = []

    async def _call(
        self, method: str, path: str, name: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _translate(exc, self.url + path) from None
        return self._check(response, name)

    async def streams(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/streams")).json()  # type: ignore[no-any-return]

    async def info(self, name: str) -> dict[str, Any]:
        return (await self._call("GET", self._path(name, "/info"), name)).json()  # type: ignore[no-any-return]

    async def create(
        self,
        name: str,
        size: int = 64,
        *,
        mode: str = "queue",
        max_bytes: int | None = None,
        dtype: Any = None,
        shape: Any = None,
    ) -> dict[str, Any]:
        body = _spec(size, mode, max_bytes, dtype, shape)
        return (await self._call("PUT", self._path(name), name, json=body)).json()  # type: ignore[no-any-return]

    async def delete(self, name: str) -> None:
        await self._call("DELETE", self._path(name), name)

    async def healthz(self) -> dict[str, Any]:
        return (await self._call("GET", "/healthz")).json()  # type: ignore[no-any-return]

    async def stream(
        self,
        name: str,
        batch: int | None = None,
        stack: bool = False,
        prefetch: int = 64,
        *,
        policy: str | None = None,
    ) -> AsyncRemoteStream:
        """Read a stream: `async for item in await client.stream(name)`."""
        response, state = await asyncio.to_thread(self._open_stream, name, batch, stack, policy)
        remote = AsyncRemoteStream(response, name, state, prefetch, self.max_frame_size)
        self._streams = [s for s in self._streams if s._remote._thread.is_alive()]
        self._streams.append(remote)
        return remote

    async def publish(
        self,
        name: str,
        items: Any,
        *,
        end: bool = True,
        prefetch: int = 64,
        timeout: float | None = None,  # noqa: ASYNC109 (a stall limit, as in the sync client)
        batched: bool = False,
    ) -> dict[str, Any]:
        """Upload `items` (iterable or async iterable); see `RelayClient.publish`.

        The upload runs the sync client's zero-copy writer in a worker thread; an async
        iterable is pulled from this event loop.
        """
        if hasattr(items, "__aiter__"):
            items = _from_async(items, asyncio.get_running_loop())

        def run() -> tuple[Any, BaseException | None]:
            # the exception itself, not asyncio's copy (it rebuilds a TimeoutError)
            try:
                return self._upload(name, items, end, prefetch, timeout, batched), None
            except Exception as exc:
                return None, exc

        answer, failure = await asyncio.to_thread(run)
        if failure is not None:
            raise failure
        return answer  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for remote in self._streams:
            await remote.aclose()
        self._streams = []
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
