"""A producer's upload that survives a cut connection (DESIGN.md §5, idempotent uploads).

`Upload` is the data path of `RelayClient.publish` (and `AsyncRelayClient.publish`, in a
worker thread). It names itself to the relay (`?producer=<id>`) and numbers its items
0, 1, 2, ... in its own sequence, so the relay skips what it already has. An HTTP upload
is confirmed only by its answer, so a long publish goes out as several uploads
("segments") of at most `window` bytes each: what was sent but is not confirmed yet is
all a retry may have to send again, and that is all it keeps in memory.

When the connection fails (a reset, a relay restart, a proxy cutting it, a 5xx from a
proxy), it asks the relay where the producer stands (an upload with an empty body), and
sends again from there: nothing lost, nothing twice. It keeps trying for `reconnect`
seconds (bounded exponential backoff), the time counted again whenever the relay's
position moves on.
"""

from __future__ import annotations

import queue as queue_module
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import numpy as np

from ._buffers import ExceptionSentinel, Prefetch
from ._codec import encode_data_parts, encode_frame, encode_items
from ._exceptions import (
    LocalProtocolError,
    NDRelayError,
    RelayHTTPError,
    RelayTimeout,
    StreamClosed,
    StreamInterrupted,
    StreamNotFound,
    TransportError,
)
from ._frames import EndFrame, ErrorFrame
from ._http import HTTPResponse, _Connection, open_request, read_response

if TYPE_CHECKING:
    from ._client import _BaseClient

__all__ = ["DEFAULT_WINDOW", "Upload", "new_producer_id"]

#: Upload chunks gather small frames up to about this many bytes.
_UPLOAD_CHUNK = 256 * 1024
#: Most bytes of one upload request, i.e. sent but not yet confirmed by the relay.
DEFAULT_WINDOW = 64 << 20
#: Most chunks (vectored writes) in one upload request: a slow producer's items each
#: go out alone, and each costs a little memory while it waits for confirmation.
_WINDOW_CHUNKS = 4096
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OPEN = object()


def new_producer_id() -> str:
    return f"py-{uuid.uuid4().hex[:16]}"


@dataclass(slots=True)
class _Chunk:
    """Frames sent together: items `seq .. seq+items-1` of the producer, and maybe the
    terminal frame last."""

    seq: int
    items: int
    parts: list[Any]
    nbytes: int
    terminal: bool


class _Cut(Exception):
    """The upload's connection failed before its answer (`cause` says how)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Upload:
    """One `publish` call: see the module docstring. `run()` returns the relay's answer."""

    def __init__(
        self,
        client: _BaseClient,
        name: str,
        items: Iterable[Any],
        *,
        end: bool,
        prefetch: int,
        timeout: float | None,
        batched: bool,
        producer: str | None,
        reconnect: float,
        window: int,
    ) -> None:
        if producer is not None and not (isinstance(producer, str) and _ID.fullmatch(producer)):
            raise ValueError(f"producer must be 1-64 of A-Z a-z 0-9 . _ -, got {producer!r}")
        if reconnect < 0:
            raise ValueError(f"reconnect must be a number of seconds >= 0, got {reconnect!r}")
        if window < 1:
            raise ValueError(f"window must be a number of bytes >= 1, got {window!r}")
        self.client = client
        self.name = name
        self.items = _refuse_none(items)
        self.end = end
        self.prefetch = prefetch
        self.timeout = timeout
        self.batched = batched
        self.named = producer is not None
        self.producer = producer if producer is not None else new_producer_id()
        self.reconnect = reconnect
        self.window_bytes = window
        self.path = client._path(name) + "?" + urlencode({"producer": self.producer})
        self.url = client._endpoint.origin + client._endpoint.base_path + self.path
        self._window: deque[_Chunk] = deque()  # sent, not confirmed (in seq order)
        self._seq = 0  # the producer seq of the next item taken from the source
        self._start = 0  # where the relay stood for this producer when publish began
        self._confirmed = 0  # the relay's position as last heard
        self._terminal_sent = False  # the terminal frame went out at least once
        self._failure: BaseException | None = None  # the producer's own exception
        self._frames = 0  # frames the relay's answers counted
        self._answer: dict[str, Any] = {}
        self._connected = False  # a connection to the relay was made at least once
        self._exhausted = False  # the source gave its end (or error)
        self._held = 0  # bytes in the window
        self._closed = ""  # the relay's message when it says the stream is finished
        self.reconnects = 0

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.named:  # perhaps a restart: the relay may have some of it already
            position, finished = self._probe()
            self._confirmed = self._start = position
            if finished:
                return self._finished_before()
        with Prefetch(self.items, size=self.prefetch) as source:
            self._source = source
            deadline: float | None = None
            best = self._confirmed
            while True:
                try:
                    if self._segment():
                        return self._result()
                    deadline = None
                except _Cut as cut:
                    if not self._connected:
                        raise cut.cause from None  # never reached the relay: as before
                    now = time.monotonic()
                    if deadline is None or self._confirmed > best:
                        best = self._confirmed
                        deadline = now + self.reconnect
                    if self._resume(cut.cause, deadline):
                        return self._result()

    def _result(self) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        items = self._confirmed - self._start
        return {
            **self._answer,
            "accepted": self._frames,
            "items": items,
            "duplicates": max(0, self._seq - items),
            "producer": self.producer,
            "expected_seq": self._confirmed,
            "reconnects": self.reconnects,
        }

    # -- one upload request --------------------------------------------------------------

    def _segment(self) -> bool:
        """One upload: what is unconfirmed, then new items until the window is full or
        the source ends; True when the stream's terminal frame is confirmed (or
        `end=False` and the source is exhausted)."""
        headers = {"Content-Type": "application/x-msgpack", **self.client._headers}
        try:
            conn, url = open_request(
                self.client._endpoint, "POST", self.path, headers, chunked_body=True
            )
        except TransportError as exc:
            raise _Cut(exc) from None
        self._connected = True
        try:
            conn.sock.settimeout(self.timeout)  # waiting for room is not a read timeout
            done = self._send(conn, url)
            try:
                response = read_response(conn, url)
                body = _json_or_text(response.read_all())
            except RelayTimeout:
                raise self._timed_out() from None
            except (TransportError, OSError) as exc:
                raise _Cut(exc) from None
        finally:
            conn.close()
        return self._answered(response, body, url, done)

    def _send(self, conn: _Connection, url: str) -> bool:
        """Send the window again, then new chunks while it has room; True if the source
        is done (its terminal frame, if any, sent)."""
        resend = deque(self._window)
        done = False
        while True:
            if resend:
                chunk = resend.popleft()
            elif self._held >= self.window_bytes or len(self._window) >= _WINDOW_CHUNKS:
                break
            else:
                next_chunk = self._next_chunk()
                if next_chunk is None:  # exhausted (end=False): nothing more to send
                    done = True
                    break
                chunk = next_chunk
                self._window.append(chunk)
                self._held += chunk.nbytes
            if conn.readable_now():
                return False  # the relay answered early (a refusal): read it
            if chunk.nbytes:
                if not self._write(conn, [b"%x\r\n" % chunk.nbytes, *chunk.parts, b"\r\n"]):
                    return False
            if chunk.terminal:
                self._terminal_sent = True
                done = True
                break
        self._write(conn, [b"0\r\n\r\n"])
        return done

    def _write(self, conn: _Connection, buffers: list[Any]) -> bool:
        """Send `buffers`; False if the connection broke (the relay may have answered
        early, saying why: the caller reads the answer next)."""
        try:
            conn.send_buffers(buffers)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError:
            return False
        return True

    def _next_chunk(self) -> _Chunk | None:
        """The next items ready (waiting for the first), encoded; the terminal frame
        with the last ones. `None` once the source is exhausted and `end=False`."""
        while not self._exhausted:
            ready, terminal = _gather(self._source.queue, _UPLOAD_CHUNK)
            first = self._seq
            # items the relay has already (a restarted producer) are not sent again
            while ready and first + _count(ready[0], self.batched) <= self._confirmed:
                first += _count(ready.pop(0), self.batched)
            parts, seq, error = _encode_ready(ready, first, self.batched)
            self._seq = seq
            if error is not None:
                terminal = ExceptionSentinel(error)
            if terminal is _OPEN:
                if parts:
                    return self._chunk(first, seq, parts, False)
                continue
            self._exhausted = True
            if isinstance(terminal, ExceptionSentinel):
                self._failure = terminal.exception
                parts.append(encode_frame(ErrorFrame.from_exception(self._failure, seq=seq)))
            elif self.end:
                parts.append(encode_frame(EndFrame(seq)))
            elif not parts:
                return None
            return self._chunk(first, seq, parts, self.end or self._failure is not None)
        return None

    @staticmethod
    def _chunk(first: int, seq: int, parts: list[Any], terminal: bool) -> _Chunk:
        return _Chunk(first, seq - first, parts, sum(len(p) for p in parts), terminal)

    # -- answers -------------------------------------------------------------------------

    def _answered(self, response: HTTPResponse, body: Any, url: str, done: bool) -> bool:
        status = response.status
        if status == 200 and isinstance(body, dict):
            self._frames += int(body.get("accepted") or 0)
            self._answer = body
            self._confirm(int(body.get("expected_seq", self._seq)))
            if done:
                self._window.clear()
                self._held = 0
            return done
        if isinstance(body, dict) and isinstance(body.get("expected_seq"), int):
            expected = body["expected_seq"]
            if status == 409 and body.get("error") == "StreamClosed":
                if self._finished_by_us(expected):
                    return True
            elif status == 408:
                # the source was idle past the relay's upload idle timeout: what the relay
                # has is kept, go on from there
                self._frames += int(body.get("accepted") or 0)
                self._confirm(expected)
                return False
            if expected >= self._confirmed:  # for the error's account of what was taken
                self._confirmed = expected
        if status >= 500:  # a proxy or a relay going down: try again
            raise _Cut(RelayHTTPError(f"the relay answered {status} ({url})", status=status))
        raise self._refused(status, body, url)

    def _refused(self, status: int, body: Any, url: str) -> NDRelayError:
        exc = self.client._error(status, body, url, self.name, what="upload")
        if self._confirmed > self._start:
            exc.args = (f"{exc.args[0]}; {self._accepted_text()}",)
        return exc

    def _finished_by_us(self, expected: int) -> bool:
        """The stream is finished: by this publish's own terminal frame, whose answer was
        lost? (It was sent, and the relay has every item before it.)"""
        window = self._window
        if self._terminal_sent and window and window[-1].terminal and expected == self._seq:
            self._confirm(expected)
            window.clear()
            self._held = 0
            return True
        return False

    def _confirm(self, position: int) -> None:
        """The relay expects `position` next from this producer: drop what it has
        (a terminal frame stays until the stream is seen finished)."""
        window = self._window
        if position < self._confirmed:
            raise StreamNotFound(
                f"stream {self.name!r}: the relay expects seq {position} from producer "
                f"{self.producer!r}, but it had confirmed items up to seq {self._confirmed}; "
                "it lost them (the stream was deleted, or the relay restarted: a relay on "
                "the in-memory backend loses its streams when it restarts)",
                stream_name=self.name,
            )
        while window and window[0].seq + window[0].items <= position and not window[0].terminal:
            self._held -= window.popleft().nbytes
        self._confirmed = position

    def _accepted_text(self) -> str:
        return (
            f"the relay accepted {self._confirmed - self._start} items of this upload "
            f"(producer {self.producer!r} resumes at seq {self._confirmed})"
        )

    # -- asking the relay where it stands --------------------------------------------------

    def _probe(self) -> tuple[int, bool]:
        """`(next seq the relay expects from this producer, stream finished)`, from an
        upload with an empty body (it also supersedes an upload of ours still open)."""
        headers = {"Content-Length": "0", **self.client._headers}
        conn, url = open_request(self.client._endpoint, "POST", self.path, headers)
        try:
            response = read_response(conn, url)
            body = _json_or_text(response.read_all())
        finally:
            conn.close()
        if isinstance(body, dict) and isinstance(body.get("expected_seq"), int):
            if response.status == 200:
                return body["expected_seq"], False
            if response.status == 409 and body.get("error") == "StreamClosed":
                self._closed = str(body.get("message") or "")
                return body["expected_seq"], True
        if response.status >= 500:
            raise RelayHTTPError(
                f"the relay answered {response.status} ({url})", status=response.status
            )
        raise self.client._error(response.status, body, url, self.name, what="upload")

    def _finished_before(self) -> dict[str, Any]:
        """The stream had already ended, with `_start` items from this producer: a
        producer restarted after its earlier run finished? If `items` are exactly those
        (and `end`), there is nothing to do; else `StreamClosed`."""
        with Prefetch(self.items, size=self.prefetch) as source:
            while self._seq <= self._start:
                unit = source.queue.get()
                if unit is None:
                    break
                if isinstance(unit, ExceptionSentinel):
                    raise unit.exception
                self._seq += _count(unit, self.batched)
        if self._seq == self._start and self.end:
            return self._result()
        raise StreamClosed(
            f"{self._closed} (it holds {self._start} items of producer {self.producer!r}, "
            "this upload has more)",
            stream_name=self.name,
        )

    def _resume(self, cause: BaseException, deadline: float) -> bool:
        """After a cut: wait, ask the relay where it stands, and drop what it has; True if
        the stream turns out finished by this publish. Raises `StreamInterrupted` (from
        the last failure) when `deadline` passes."""
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamInterrupted(
                    f"upload to stream {self.name!r} was cut and could not be resumed "
                    f"within {self.reconnect:g} s (last: {cause}); {self._accepted_text()}",
                    url=self.url,
                    accepted_items=self._confirmed - self._start,
                ) from cause
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)
            try:
                position, finished = self._probe()
            except (TransportError, RelayHTTPError) as exc:
                cause = exc
                continue
            self.reconnects += 1
            if finished:
                if self._finished_by_us(position):
                    return True
                raise StreamClosed(self._closed, stream_name=self.name)
            self._confirm(position)
            return False

    def _timed_out(self) -> RelayTimeout:
        """The relay took no data (or gave no answer) for `timeout` seconds: it is
        holding the upload (a full stream). Stop it; the error says how much it took."""
        try:
            position, _ = self._probe()  # also stops the upload at the relay
            if position >= self._confirmed:
                self._confirmed = position
        except NDRelayError:
            pass
        return RelayTimeout(
            f"the relay took no data for {self.timeout} s; {self._accepted_text()}",
            url=self.url,
            accepted_items=self._confirmed - self._start,
        )


def _count(item: Any, batched: bool) -> int:
    return len(item) if batched and isinstance(item, np.ndarray) and item.ndim else 1


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
