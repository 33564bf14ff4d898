"""`RelayClient` and `AsyncRelayClient`: the same API over one event loop or none.

Both share `_BaseClient` (URLs, headers, error mapping) and `StreamState` (frames to
items and batches). The sync client reads and uploads stream bodies through the lean
`_http` connection (zero-copy both ways); everything else goes through httpx.
"""

from __future__ import annotations

import asyncio
import atexit
import queue as queue_module
import ssl
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

import httpx

from ._acks import AckChannel
from ._buffers import _END, Buffer, ExceptionSentinel
from ._codec import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
)
from ._exceptions import (
    AuthError,
    ConnectError,
    FrameTooLarge,
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
from ._http import Endpoint, HTTPResponse, open_request, read_response
from ._publish import DEFAULT_WINDOW, Upload
from ._stream import StreamState

__all__ = [
    "AsyncRelayClient",
    "AsyncRemoteStream",
    "RelayClient",
    "RemoteStream",
    "relay_url",
]

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
    def _stream_query(
        batch: int | None,
        policy: str | None,
        consumer: str | None = None,
        after: int | None = None,
        lease: float | None = None,
    ) -> str:
        params: dict[str, Any] = {}
        if batch is not None and batch > 1:
            params["batch"] = batch
        if policy is not None:
            params["policy"] = policy
        if consumer is not None:
            params["consumer"] = consumer
        if after is not None:
            params["after"] = after
        if lease is not None:
            params["lease"] = lease
        return "?" + urlencode(params) if params else ""

    def _error(
        self, status: int, body: Any, url: str, name: str | None = None, what: str = "request"
    ) -> NDRelayError:
        """The exception for an error answer of the relay (`what`: the kind of request,
        for the message when something in front of the relay answered instead)."""
        if isinstance(body, str):  # the relay answers JSON: this came from a proxy
            return RelayHTTPError(_foreign_answer(status, body, what), status=status, body=body)
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

    def _request_stream(
        self,
        name: str,
        batch: int | None,
        policy: str | None,
        consumer: str | None,
        after: int | None,
        lease: float | None,
    ) -> HTTPResponse:
        """Send a stream request and read the answer's head (blocking): the open
        response, or the relay's error raised."""
        path = self._path(name) + self._stream_query(batch, policy, consumer, after, lease)
        conn, url = open_request(
            self._endpoint, "GET", path, {"Accept": "application/x-msgpack", **self._headers}
        )
        response = read_response(conn, url)
        if response.status != 200:
            body = _json_or_text(response.read_all())
            response.close()
            raise self._error(response.status, body, url, name)
        return response

    def _open_stream(
        self,
        name: str,
        batch: int | None,
        stack: bool,
        policy: str | None,
        consumer: str | None = None,
        lease: float | None = None,
        reconnect: float = 30.0,
    ) -> tuple[HTTPResponse, StreamState, dict[str, Any]]:
        """Open a stream (blocking): the response, a fresh `StreamState`, and the rest of
        what a `RemoteStream` needs (how to reopen it, its acknowledgements)."""
        if stack and batch is None:
            raise ValueError("stack=True needs batch=N")
        if reconnect < 0:
            raise ValueError(f"reconnect must be a number of seconds >= 0, got {reconnect!r}")
        if consumer is None:  # named, so that it can resume and acknowledge
            consumer = f"py-{uuid.uuid4().hex[:16]}"
        response = self._request_stream(name, batch, policy, consumer, None, lease)
        headers = response.headers
        mode = headers.get("ndrelay-mode")
        state = StreamState(name, batch, stack, mode)
        consumer = headers.get("ndrelay-consumer", consumer)

        def reopen(after: int | None) -> HTTPResponse:
            response = self._request_stream(name, batch, policy, consumer, after, lease)
            if acks is not None:
                acks.resumed()
            return response

        acks: AckChannel | None = None
        if mode == "queue":
            size = _int_header(headers, "ndrelay-size", 64)
            if batch is not None and batch > size:
                response.close()
                raise ValueError(
                    f"batch={batch} is larger than stream {name!r} (size={size}): a "
                    "consumer holds at most size unacknowledged items, so such a batch "
                    "could never fill; use batch <= size, or a larger stream"
                )
            acks = AckChannel(
                self._endpoint,
                self._path(name, "/ack"),
                self._headers,
                consumer,
                _int_header(headers, "ndrelay-size", 64),
                _int_header(headers, "ndrelay-max-bytes", 1 << 28),
            )
            acks.every_units = max(1, acks.every_items // (batch or 1))
        return response, state, {"reopen": reopen, "reconnect": reconnect, "acks": acks}

    def _upload(
        self,
        name: str,
        items: Iterable[Any],
        end: bool,
        prefetch: int,
        timeout: float | None,
        batched: bool,
        producer: str | None = None,
        reconnect: float = 30.0,
        window: int = DEFAULT_WINDOW,
    ) -> dict[str, Any]:
        """The data path of `publish` (blocking; the async client runs it in a thread)."""
        upload = Upload(
            self,
            name,
            items,
            end=end,
            prefetch=prefetch,
            timeout=timeout,
            batched=batched,
            producer=producer,
            reconnect=reconnect,
            window=window,
        )
        return upload.run()

    def _check(self, response: httpx.Response, name: str | None = None) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise self._error(response.status_code, body, str(response.url), name)
        return response


def _int_header(headers: dict[str, str], name: str, default: int) -> int:
    try:
        return max(1, int(headers.get(name, default)))
    except ValueError:
        return default


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

    Next to each unit it keeps the seq of the unit's last item: a unit that `get()`
    hands out counts as taken by the application, and is acknowledged (queue mode).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._units: deque[Any] = deque()
        self._seqs: deque[int] = deque()
        self._terminal: list[Any] = []  # [None] or [ExceptionSentinel(...)] once finished
        self._cond = threading.Condition()
        self._closed = False
        #: called (in the reader thread) when units or the terminal arrive in an empty
        #: queue: how an asyncio reader learns there is something to take
        self.on_ready: Any = None
        #: the stream this queue belongs to, once `.queue` was handed out (keeps it alive)
        self._owner: Any = None
        #: the `RemoteStream` that reports units taken with `get()` (queue mode)
        self._taker: Any = None

    def put_many(self, units: list[Any], seqs: list[int]) -> bool:
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
                self._seqs.extend(seqs[:room])
                units, seqs = units[room:], seqs[room:]
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

    def take_ready(self) -> tuple[list[Any], list[int], Any]:
        """Without waiting: every unit held (and their seqs), and the terminal (`None` or
        an `ExceptionSentinel`) if the stream has finished, else `_OPEN`."""
        with self._cond:
            units, seqs = list(self._units), list(self._seqs)
            self._units.clear()
            self._seqs.clear()
            if units:
                self._cond.notify()  # the reader may wait for room
            return units, seqs, (self._terminal[0] if self._terminal else _OPEN)

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
                    seq = self._seqs.popleft()
                    if len(self._units) == self.maxsize - 1:
                        self._cond.notify()  # the reader may wait for room
                    break
                if self._terminal:
                    return self._terminal[0]
                if not block:
                    raise queue_module.Empty
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise queue_module.Empty
                self._cond.wait(wait)
        if self._taker is not None:
            self._taker._took_one(unit, seq)
        return unit

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def take_all(self, block: bool = True, limit: int = 0) -> tuple[list[Any], list[int]]:
        """Every unit held (at most `limit`, if set) and their seqs (waiting for one,
        unless `block` is false); `[]` once only the terminal is left."""
        with self._cond:
            while block and not self._units and not self._terminal:
                self._cond.wait()
            held = self._units
            if limit and len(held) > limit:
                units = [held.popleft() for _ in range(limit)]
                seqs = [self._seqs.popleft() for _ in range(limit)]
            else:
                units, seqs = list(held), list(self._seqs)
                held.clear()
                self._seqs.clear()
            self._cond.notify()
            return units, seqs

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


class _Closing(Exception):
    """The stream was closed while its reader waited to reconnect."""


class _Reader:
    """The background half of a `RemoteStream`: reads its response into the queue, and
    when the response is cut off, reconnects (same consumer id, `after=` the last seq
    received) with bounded exponential backoff. Holds no reference to the stream, so a
    stream nobody holds any more is closed by the garbage collector."""

    def __init__(
        self,
        response: HTTPResponse,
        state: StreamState,
        queue: _UnitQueue,
        max_frame_size: int,
        reopen: Any,
        reconnect: float,
    ) -> None:
        self.response = response
        self.state = state
        self.queue = queue
        self.max_frame_size = max_frame_size
        self.reopen = reopen
        self.reconnect = reconnect
        self.reconnects = 0
        self.closing = threading.Event()
        self.items = 0  # items received, and their bytes (roughly): for acknowledgements
        self.bytes = 0
        self.thread = threading.Thread(
            target=self.run, name=f"ndrelay-stream-{state.name}", daemon=True
        )
        self.thread.start()

    def weigh(self, items: int) -> int:
        """About how many bytes `items` items weigh (the average so far)."""
        return items * self.bytes // self.items if self.items else 0

    def run(self) -> None:
        state, queue = self.state, self.queue
        try:
            while True:
                try:
                    self._read()
                    return
                except Exception as exc:
                    if self.closing.is_set():
                        return
                    exc = self._translate(exc)
                    if (
                        not isinstance(exc, StreamInterrupted)
                        or self.reopen is None
                        or self.reconnect <= 0
                    ):
                        raise exc from None
                    self._reconnect(exc)
        except _Closing:
            return
        except Exception as exc:
            if self.closing.is_set():
                return
            units = state.flush()
            queue.put_many(units, state.unit_seqs)
            queue.finish(ExceptionSentinel(exc))
        finally:
            self.response.close()

    def _read(self) -> None:
        state, queue, response = self.state, self.queue, self.response
        decoder = FrameDecoder(self.max_frame_size, runs=True)
        batch = state.batch
        received = response.received
        for frames in response.iter_frames(decoder):
            units = state.handle_all(frames)
            if units:
                self.items += len(units) if batch is None else sum(len(u) for u in units)
                self.bytes += response.received - received
                received = response.received
                if not queue.put_many(units, state.unit_seqs):
                    return  # closed by the reader
            if state.finished:
                queue.finish(None if state.error is None else ExceptionSentinel(state.error))
                return
        raise StreamInterrupted(
            f"stream {state.name!r} was cut off after seq {state.last_seq} (no end or error frame)",
            url=response.url,
        )

    def _translate(self, exc: Exception) -> Exception:
        url = self.response.url
        if isinstance(exc, OSError):
            return StreamInterrupted(f"stream {self.state.name!r} broke: {exc}", url=url)
        if isinstance(exc, RelayTimeout) and exc.url is None:
            return RelayTimeout(
                f"stream {self.state.name!r}: no data within the read timeout", url=url
            )
        return exc

    def _reconnect(self, cause: Exception) -> None:
        """Open the stream again, resuming after the last seq received; raises
        `StreamInterrupted` (from the last failure) when `reconnect` seconds pass."""
        state = self.state
        deadline = time.monotonic() + self.reconnect
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamInterrupted(
                    f"stream {state.name!r} was cut off after seq {state.last_seq} and "
                    f"could not be resumed within {self.reconnect:g} s (last: {cause})",
                    url=self.response.url,
                ) from cause
            if self.closing.wait(min(delay, remaining)):
                raise _Closing
            delay = min(delay * 2, 1.0)
            after = state.last_seq if state.last_seq >= 0 else None
            try:
                response = self.reopen(after)
            except StreamNotFound as exc:
                raise StreamNotFound(
                    f"stream {state.name!r} is gone from the relay after the connection "
                    "was cut: a relay on the in-memory backend loses its streams when it "
                    "restarts",
                    stream_name=state.name,
                ) from exc
            except (TransportError, RegistryError, RelayHTTPError) as exc:
                cause = exc  # not there yet: try again
                continue
            self.response.close()
            self.response = response
            self.reconnects += 1
            return


#: Streams not closed yet: closed (acknowledged and released) at interpreter exit.
_LIVE: weakref.WeakSet[RemoteStream] = weakref.WeakSet()


@atexit.register
def _close_live_streams() -> None:
    for remote in list(_LIVE):
        try:
            remote.close(timeout=2.0)
        except Exception:  # exiting: best effort
            pass


class RemoteStream(Buffer[Any]):
    """A remote stream as a local `Buffer`: iterate it, or read `.queue`.

    A background thread reads the response into a bounded queue (`prefetch` units).
    Iteration ends where the producer ended and raises where it raised (`RemoteError`,
    also an instance of the producer's builtin exception type). A response cut off
    before its `end`/`error` frame is resumed: the reader reconnects with the same
    consumer id and `after=` the last seq it received, for up to `reconnect` seconds,
    then raises `StreamInterrupted` (its `__cause__` says why).

    Queue mode: what the application takes out of this `Buffer` (by iterating or with
    `.queue.get()`) is acknowledged to the relay in the background; `close()` (or
    leaving a `with` block) acknowledges the last item taken and gives every item read
    ahead but not taken back to the relay, which hands them to other consumers.

    Attributes:
        name: the stream's name.
        consumer: the consumer id (the relay's `ndrelay-consumer` header).
        state: the `StreamState` (`last_seq`, `gaps` skipped by fanout drop policies).
    """

    def __init__(
        self,
        response: HTTPResponse,
        name: str,
        state: StreamState,
        prefetch: int,
        max_frame_size: int,
        on_ready: Any = None,
        *,
        reopen: Any = None,
        reconnect: float = 0.0,
        acks: AckChannel | None = None,
    ) -> None:
        super().__init__(_UnitQueue(prefetch))
        queue = self._queue
        queue.on_ready = on_ready
        self.name = name
        self.state = state
        self.consumer = response.headers.get("ndrelay-consumer")
        self._acks = acks
        if acks is not None:
            queue._taker = weakref.proxy(self)
        self._local: deque[Any] = deque()
        self._group: list[int] = []  # seqs of the units of the last batch taken
        self._group_items = 0
        self._closed = False
        self._reader = _Reader(response, state, queue, max_frame_size, reopen, reconnect)
        self._thread = self._reader.thread
        _LIVE.add(self)

    @property
    def queue(self) -> _UnitQueue:
        """The `ReadableQueue` of units (it keeps this stream open while it is used)."""
        queue = self._queue
        queue._owner = self
        return queue

    @queue.setter
    def queue(self, queue: _UnitQueue) -> None:
        self._queue = queue

    def __next__(self) -> Any:
        # Take every ready unit in one go: one lock round trip per batch, not per item.
        local = self._local
        if local:
            return local.popleft()
        units = self._next_units()
        if units:
            local.extend(units)
            return local.popleft()
        return self._at_terminal()

    def _at_terminal(self) -> Any:
        """The end (StopIteration) or the error, for good; the stream closes itself
        (its last acknowledgement goes out now)."""
        if self._terminal is None:
            unit = self._queue._get()
            if isinstance(unit, ExceptionSentinel):
                self._terminal = unit
                self._traceback = unit.exception.__traceback__
            else:
                self._terminal = _END
            self.close()
        self._raise_terminal(self._terminal)

    def _next_units(self) -> list[Any]:
        """The next batch of units (waiting for one); `[]` at the end."""
        self._report_group()
        queue = self._queue
        # queue mode: a batch of at most what an acknowledgement covers, so that the
        # relay hears of progress while the application works through what it holds
        limit = self._acks.every_units if self._acks is not None else 0
        units, seqs = queue.take_all(True, limit)
        self._adopt(units, seqs)
        return units

    def _adopt(self, units: list[Any], seqs: list[int]) -> None:
        self._group = seqs
        batch = self.state.batch
        self._group_items = len(units) if batch is None else sum(len(u) for u in units)

    def _report_group(self) -> None:
        """The last batch was taken whole: tell the acknowledgements."""
        if self._group and self._acks is not None:
            n = self._group_items
            self._acks.took(n, self._group[-1], self._reader.weigh(n))
        self._group = []

    def _took_one(self, unit: Any, seq: int) -> None:  # `.queue.get()`
        acks = self._acks
        if acks is not None:
            n = 1 if self.state.batch is None else len(unit)
            acks.took(n, seq, self._reader.weigh(n))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the reader thread and the HTTP request; iteration then ends.

        Queue mode: acknowledges what the application took and gives the rest back.
        """
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        reader = self._reader
        reader.closing.set()
        self._queue.close()
        acks = self._acks
        if acks is not None:
            taken = len(self._group) - len(self._local)  # of the current batch
            if taken > 0:
                acks.took(taken, self._group[taken - 1], 0)
            self._group = []
            self._local.clear()
            acks.finish(release=True, timeout=5.0 if timeout is None else min(timeout, 5.0))
        reader.response.close()
        if reader.thread is not threading.current_thread():
            reader.thread.join(timeout)

    @property
    def reconnects(self) -> int:
        """How many times the reader resumed the stream after a cut."""
        return self._reader.reconnects

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # a plain `for x in client.stream(...)` left with `break`: CPython collects the
        # stream at once, and this acknowledges and releases what it did not take
        if not getattr(self, "_closed", True):
            try:
                self.close(timeout=1.0)
            except Exception:
                pass


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
        # weak: a stream nobody holds any more closes (acknowledges, releases) by itself
        self._streams: weakref.WeakSet[RemoteStream] = weakref.WeakSet()

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
        consumer: str | None = None,
        lease: float | None = None,
        reconnect: float = 30.0,
    ) -> RemoteStream:
        """Read a stream: a `Buffer` of items, or of batches with `batch=N`.

        Queue mode: the items it reads ahead are pending for this consumer at the relay;
        what the application takes is acknowledged in the background, and `close()` (or
        the end of a `with` block) acknowledges the last item taken and gives the rest
        back, so other consumers get them: nothing lost, nothing twice. A consumer
        killed outright loses nothing either: after `lease` seconds the relay hands its
        unacknowledged items to others (they may then be seen twice, once each).

        Args:
            name: the stream.
            batch: yield lists of `batch` items (the last one partial), like `batch_iterator`.
            stack: with `batch`, yield one array of shape `(n, *item_shape)` per batch.
            prefetch: units (items or batches) read ahead by the background thread.
            policy: fanout streams: `block`, `drop_oldest` or `latest`.
            consumer: the consumer id (default: a new random one). A worker that restarts
                with the same id gets its unacknowledged items back first.
            lease: seconds the relay keeps this consumer's unacknowledged items for it
                after its connection ends (default: the relay's `--lease`).
            reconnect: seconds to keep trying to resume a cut-off response (bounded
                exponential backoff; `0`: raise `StreamInterrupted` at once).

        Raises:
            StreamNotFound, AuthError, ConnectError: at once, before any item.
        """
        response, state, extra = self._open_stream(
            name, batch, stack, policy, consumer, lease, reconnect
        )
        remote = RemoteStream(response, name, state, prefetch, self.max_frame_size, **extra)
        self._streams.add(remote)
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
        producer: str | None = None,
        reconnect: float = 30.0,
        window: int = DEFAULT_WINDOW,
    ) -> dict[str, Any]:
        """Upload `items` (arrays or bytes) to stream `name`, creating it if needed.

        The iterable runs in a background thread (`prefetch` items ahead); items that
        are ready together travel in one write. When it is exhausted, an `end` frame
        finishes the stream (unless `end=False`: later uploads may append). If it
        raises, an `error` frame carries the exception to the consumers, and it is
        re-raised here once the relay has it.

        Retries are safe: the upload names itself to the relay (`producer`) and numbers
        its items 0, 1, 2, ... When the connection fails mid-upload (a reset, a relay
        restart, a proxy cutting it), it asks the relay where it stands and sends again
        from there, for up to `reconnect` seconds: the relay gets every item once. A
        producer that restarts with the same `producer` id and the same items skips
        what the relay already has.

        Args:
            batched: each element of `items` is an array of several items stacked on
                its leading axis; it travels as one batched frame (one header for all),
                and its rows are numbered and counted as items.
            timeout: longest wait for the relay to take more data or to answer (it holds
                the upload while the stream's buffer is full); `None` waits as long as
                it takes. On expiry, `RelayTimeout` (`.accepted_items`: how many items
                the relay took).
            producer: the producer id (1-64 of `A-Za-z0-9._-`; default: a new random
                one, so that only this call's retries are deduplicated).
            reconnect: seconds to keep trying to resume after the connection fails
                (bounded exponential backoff, counted again whenever the relay's position
                moves on); `0`: raise at once.
            window: most bytes sent but not yet confirmed by the relay, kept in memory
                for a retry: a longer upload goes out as several requests of about this
                size.

        Returns:
            The relay's answer: `{"accepted": frames, "items": n, "next_seq": n,
            "duplicates": n, "producer": id, "expected_seq": n, "reconnects": n}`
            (`items`: items the relay took from this call; `duplicates`: items it
            already had).

        Raises:
            UploadRefused: the relay refused a frame (the ones before it were kept).
            StreamInterrupted: the connection failed and could not be resumed in time
                (`.accepted_items`, and `__cause__` says why).
            StreamNotFound: the relay lost items it had confirmed (the stream was
                deleted, or a relay on the in-memory backend restarted).
        """
        return self._upload(
            name, items, end, prefetch, timeout, batched, producer, reconnect, window
        )

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close open streams and the HTTP client."""
        for remote in list(self._streams):
            remote.close()
        self._streams = weakref.WeakSet()
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


def _foreign_answer(status: int, text: str, what: str) -> str:
    """One line for an error page that a proxy sent in the relay's place (nginx's HTML
    413, say): its status and title, and where the README says what to set up."""
    import html
    import http
    import re

    match = re.search(r"<title>(.*?)</title>|<h1>(.*?)</h1>", text, re.I | re.S)
    title = html.unescape(next(g for g in match.groups() if g is not None)) if match else ""
    if not title.strip():
        try:
            title = f"{status} {http.HTTPStatus(status).phrase}"
        except ValueError:
            title = str(status)
    title = " ".join(title.split())[:200]
    if not title.startswith(str(status)):
        title = f"{status} {title}"
    return (
        f"the proxy in front of the relay refused the {what}: {title}; see README: behind a proxy"
    )


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
        **extra: Any,
    ) -> None:
        self.name = name
        self.state = state
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._terminal: Any = _OPEN
        self._remote = RemoteStream(
            response, name, state, prefetch, max_frame_size, on_ready=self._wake, **extra
        )
        self.consumer = self._remote.consumer

    def _wake(self) -> None:  # in the reader thread
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        remote = self._remote
        local = remote._local
        if local:
            return local.popleft()
        remote._report_group()
        while self._terminal is _OPEN:  # (aclose sets it: nothing more after that)
            self._ready.clear()
            units, seqs, terminal = remote._queue.take_ready()
            if units:
                remote._adopt(units, seqs)
                local.extend(units)
                return local.popleft()
            if terminal is not _OPEN:
                self._terminal = terminal
                await asyncio.to_thread(remote.close)  # its last acknowledgement goes out
                break
            await self._ready.wait()
        if isinstance(self._terminal, ExceptionSentinel):
            raise self._terminal.exception
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the reader thread and the HTTP request; queue mode: acknowledge what was
        taken and give the rest back (see `RemoteStream.close`)."""
        if self._terminal is _OPEN:
            self._terminal = None
        await asyncio.to_thread(self._remote.close)

    @property
    def reconnects(self) -> int:
        """How many times the reader resumed the stream after a cut."""
        return self._remote.reconnects

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
        consumer: str | None = None,
        lease: float | None = None,
        reconnect: float = 30.0,
    ) -> AsyncRemoteStream:
        """Read a stream: `async for item in await client.stream(name)`; the same
        arguments and guarantees as `RelayClient.stream` (use `async with` or `aclose()`
        to acknowledge and give back what was read ahead)."""
        response, state, extra = await asyncio.to_thread(
            self._open_stream, name, batch, stack, policy, consumer, lease, reconnect
        )
        remote = AsyncRemoteStream(response, name, state, prefetch, self.max_frame_size, **extra)
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
        producer: str | None = None,
        reconnect: float = 30.0,
        window: int = DEFAULT_WINDOW,
    ) -> dict[str, Any]:
        """Upload `items` (iterable or async iterable); see `RelayClient.publish`.

        The upload runs the sync client's zero-copy writer in a worker thread (with the
        same producer id, retries and window); an async iterable is pulled from this
        event loop.
        """
        if hasattr(items, "__aiter__"):
            items = _from_async(items, asyncio.get_running_loop())

        def run() -> tuple[Any, BaseException | None]:
            # the exception itself, not asyncio's copy (it rebuilds a TimeoutError)
            try:
                answer = self._upload(
                    name, items, end, prefetch, timeout, batched, producer, reconnect, window
                )
                return answer, None
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
