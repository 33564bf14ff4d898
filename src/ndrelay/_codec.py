"""The sans-I/O frame codec: frames to msgpack bytes and back; no sockets, no HTTP, no asyncio.

Encoding never copies an array's payload: `encode_frame_parts` returns the frame's header
bytes and the array's own memory as separate buffers, for a vectored write.

Decoding is incremental (`FrameDecoder.feed`, then `frames()`). Small frames go through
`msgpack.Unpacker`, which is fastest for them. An incomplete frame has its header parsed
on its own; if its payload is over `SPILL_THRESHOLD`, the payload is written straight
into the array that will be returned, either by `feed` (one copy) or by a reader that
asks `get_buffer()` for the memory to `recv_into` (no copy at all; a large *bytes*
item is copied once more, into the immutable `bytes` it is returned as).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import numpy as np

from ._exceptions import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MEDIA_TYPE",
    "FrameDecoder",
    "check_dtype",
    "encode_batch",
    "encode_data_parts",
    "encode_frame",
    "encode_items",
    "encode_frame_parts",
]

#: Media type of a stream body.
MEDIA_TYPE = "application/x-msgpack"
#: Default limit on one frame's size in bytes (256 MiB: a 10 MB camera frame is far below it).
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024
#: A frame with a payload this large gets it written directly into its array.
SPILL_THRESHOLD = 64 * 1024
#: An incomplete frame this long has its header looked at, to see if it is large.
_SPILL_PROBE = 32
#: `feed` hands msgpack at most this much at once, so its buffer stays bounded.
_FEED_SLICE = 1024 * 1024
#: Bytes a frame may have besides its payload (keys, dtype, shape, error text).
_MAX_HEADER = 64 * 1024

# dtype kinds that survive `dtype.str` exactly: bool, ints, floats, complex,
# datetimes and timedeltas, fixed-width byte and unicode strings.
_DTYPE_KINDS = frozenset("biufcmMSU")
_DTYPE_RE = re.compile(r"[<>|=]?[biufcmMSU]\d{1,5}(\[\d*[A-Za-z]{1,2}\])?")
_dtype_cache: dict[str, np.dtype[Any]] = {}
# (dtype string, *shape) -> (dtype, shape, payload bytes) of array frames already checked
_layouts: dict[tuple[Any, ...], tuple[np.dtype[Any], tuple[int, ...], int]] = {}


def check_dtype(dtype: Any) -> np.dtype[Any]:
    """The numpy dtype named by `dtype` if the wire format can carry it, else `ValueError`.

    Object, structured (void) and zero-size dtypes are refused: their `dtype.str` does
    not describe them, and nothing is ever pickled.
    """
    if isinstance(dtype, str):
        cached = _dtype_cache.get(dtype)
        if cached is not None:
            return cached
        if not _DTYPE_RE.fullmatch(dtype):
            raise ValueError(f"unsupported dtype {dtype!r}")
        try:
            dt = np.dtype(dtype)
        except Exception as exc:
            raise ValueError(f"unsupported dtype {dtype!r}: {exc}") from None
    else:
        dt = np.dtype(dtype)
    if dt.kind not in _DTYPE_KINDS or dt.itemsize == 0 or dt.fields is not None:
        raise ValueError(f"unsupported dtype {dt.str!r} (kind {dt.kind!r})")
    if isinstance(dtype, str) and len(_dtype_cache) < 1024:
        _dtype_cache[dtype] = dt
    return dt


# -- encoding ---------------------------------------------------------------------------

_pack = msgpack.Packer(use_bin_type=True).pack
_K_SEQ = _pack("seq")
_K_DATA = _pack("data")
_header_cache: dict[tuple[np.dtype[Any], tuple[int, ...], int | None], tuple[bytes, bytes]] = {}


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xc6" + n.to_bytes(4, "big")
    raise LocalProtocolError(f"payload of {n} bytes is over msgpack's 4 GiB bin limit")


def _array_headers(
    dt: np.dtype[Any], shape: tuple[int, ...], count: int | None
) -> tuple[bytes, bytes]:
    """(map header up to the `seq` value, `data` key and bin header) for this layout; cached."""
    key = (dt, shape, count)
    cached = _header_cache.get(key)
    if cached is not None:
        return cached
    entries = 5 if count is None else 6
    prefix = bytes([0x80 | entries]) + _pack("kind") + _pack("data")
    prefix += _pack("dtype") + _pack(dt.str) + _pack("shape") + _pack(list(shape))
    if count is not None:
        prefix += _pack("count") + _pack(count)
    nbytes = dt.itemsize
    for n in shape:
        nbytes *= n
    headers = (prefix + _K_SEQ, _K_DATA + _bin_header(nbytes))
    if len(_header_cache) < 4096:
        _header_cache[key] = headers
    return headers


_BYTES_PREFIX = b"\x83" + _pack("kind") + _pack("data") + _K_SEQ


def _uint(value: Any, key: str) -> int:
    """`value` as a wire integer (numpy integers accepted), else `LocalProtocolError`."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise LocalProtocolError(
                f"{key} must be a non-negative integer, got {value!r}", key=key
            )
        value = int(value)
    if not 0 <= value < 1 << 64:
        raise LocalProtocolError(f"{key} must be a non-negative integer, got {value!r}", key=key)
    return value


def encode_data_parts(seq: int, data: Any, count: int | None = None) -> list[bytes | memoryview]:
    """The buffers of one data frame: `[header, payload]`, the payload not copied.

    Args:
        seq: stream position of the (first) item.
        data: an `np.ndarray` (made C-contiguous if it is not: one copy), or bytes-like.
        count: for a batched frame, the number of items stacked on axis 0 of `data`.

    Raises:
        LocalProtocolError: an unsupported dtype, a bad `seq` or `count`, or not an
            array/bytes.
    """
    seq = _uint(seq, "seq")
    if count is not None:
        count = _uint(count, "count")
    if isinstance(data, np.generic):  # a numpy scalar travels as a 0-d array
        data = np.asarray(data)
    if isinstance(data, np.ndarray):
        try:
            dt = check_dtype(data.dtype)
        except ValueError as exc:
            raise LocalProtocolError(str(exc), key="dtype") from None
        if count is not None and (data.ndim == 0 or data.shape[0] != count):
            raise LocalProtocolError(
                f"batched frame of count {count} needs shape ({count}, ...), got {data.shape}",
                key="count",
            )
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        prefix, bin_header = _array_headers(dt, data.shape, count)
        return [prefix + _pack(seq) + bin_header, _byte_view(data)]
    if count is not None:
        raise LocalProtocolError("only arrays can be batched", key="count")
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        return [_BYTES_PREFIX + _pack(seq) + _K_DATA + _bin_header(view.nbytes), view]
    raise LocalProtocolError(
        f"a data item must be an np.ndarray, bytes or bytearray, not {type(data).__name__}",
        key="data",
    )


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    try:
        return memoryview(array).cast("B")
    except (TypeError, ValueError):  # empty arrays, datetimes: not plain buffers
        return memoryview(array.reshape(-1).view(np.uint8))


def encode_items(pairs: Iterable[tuple[int, Any]], inline: int = 1024) -> list[bytes | memoryview]:
    """The buffers of many data frames, for one vectored write.

    Runs of small frames come joined into one `bytes` (their payloads up to `inline`
    bytes copied: cheaper than a view each); larger payloads are views of the items.

    Raises:
        LocalProtocolError: as `encode_data_parts`.
    """
    out: list[bytes | memoryview] = []
    run: list[bytes] = []
    cache = _header_cache
    for seq, item in pairs:
        if type(item) is np.ndarray and type(seq) is int and seq >= 0:
            headers = cache.get((item.dtype, item.shape, None))
            if headers is not None and item.flags.c_contiguous:
                if item.nbytes <= inline:
                    run += (headers[0], _pack(seq), headers[1], item.tobytes())
                    continue
                run += (headers[0], _pack(seq), headers[1])
                out += (b"".join(run), _byte_view(item))
                run = []
                continue
        head, payload = encode_data_parts(seq, item)
        if len(payload) <= inline:
            run += (head, bytes(payload))
        else:
            run.append(head)
            out += (b"".join(run), payload)
            run = []
    if run:
        out.append(b"".join(run))
    return out


def encode_batch(seq: int, arrays: list[np.ndarray]) -> list[bytes | memoryview]:
    """The buffers of one batched frame holding `arrays` (one dtype and shape) stacked.

    The payload is gathered straight from the arrays (`b"".join`), not through
    `np.stack`: one copy, about ten times faster for many small arrays.

    Raises:
        LocalProtocolError: the arrays differ in dtype or shape, or one is unsupported.
    """
    first = arrays[0]
    dt, shape = first.dtype, first.shape
    for i, a in enumerate(arrays):
        if type(a) is not np.ndarray or a.dtype != dt or a.shape != shape:
            raise LocalProtocolError(
                f"cannot batch item {i}: {getattr(a, 'dtype', type(a).__name__)} "
                f"{getattr(a, 'shape', '')} differs from item 0: {dt} {shape}",
                key="data",
            )
    try:
        payload: bytes | memoryview = b"".join(arrays)  # type: ignore[arg-type]
    except (BufferError, TypeError, ValueError):  # non-contiguous or not a plain buffer
        return encode_data_parts(seq, np.stack(arrays), len(arrays))
    try:
        check_dtype(dt)
    except ValueError as exc:
        raise LocalProtocolError(str(exc), key="dtype") from None
    prefix, bin_header = _array_headers(dt, (len(arrays), *shape), len(arrays))
    return [prefix + _pack(_uint(seq, "seq")) + bin_header, payload]


def encode_frame_parts(frame: Frame) -> list[bytes | memoryview]:
    """The buffers of one frame, payload not copied; `b"".join(...)` them to get its bytes."""
    if isinstance(frame, DataFrame):
        return encode_data_parts(frame.seq, frame.data, frame.count)
    return [encode_frame(frame)]


def encode_frame(frame: Frame) -> bytes:
    """The msgpack bytes of one frame (a map that plain `msgpack.unpackb` reads)."""
    if isinstance(frame, DataFrame):
        return b"".join(encode_data_parts(frame.seq, frame.data, frame.count))
    if isinstance(frame, EndFrame):
        return _pack({"kind": "end", "seq": _uint(frame.seq, "seq")})
    if isinstance(frame, ErrorFrame):
        return _pack(
            {
                "kind": "error",
                "seq": _uint(frame.seq, "seq"),
                "origin": _utf8_safe(frame.origin, "origin"),
                "type": _utf8_safe(frame.type, "type"),
                "message": _utf8_safe(frame.message, "message"),
                "traceback": _utf8_safe(frame.traceback, "traceback"),
            }
        )
    if isinstance(frame, HeartbeatFrame):
        return _HEARTBEAT
    raise LocalProtocolError(f"not a frame: {type(frame).__name__}")


_HEARTBEAT = _pack({"kind": "heartbeat"})


def _utf8_safe(text: str, key: str) -> str:
    """`text`, with lone surrogates escaped (`\\udcff`), since msgpack strings are UTF-8.

    Exception text picks them up from undecodable file names (`surrogateescape`); a
    failure must still be reported, not turned into a `UnicodeEncodeError` here.
    """
    if not isinstance(text, str):
        raise LocalProtocolError(f"{key} must be a str, got {type(text).__name__}", key=key)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# -- decoding ---------------------------------------------------------------------------


def _field(d: dict[str, Any], key: str, types: type | tuple[type, ...], index: int) -> Any:
    try:
        value = d[key]
    except KeyError:
        raise RemoteProtocolError("missing key", frame_index=index, key=key) from None
    if not isinstance(value, types) or isinstance(value, bool) and types is int:
        raise RemoteProtocolError(
            f"ill-typed value {type(value).__name__}", frame_index=index, key=key
        )
    return value


def _seq(d: dict[str, Any], index: int) -> int:
    seq = d.get("seq")
    if type(seq) is not int or seq < 0:
        if seq is None and "seq" not in d:
            raise RemoteProtocolError("missing key", frame_index=index, key="seq")
        raise RemoteProtocolError(
            f"seq must be a non-negative integer, got {seq!r}", frame_index=index, key="seq"
        )
    return seq


def _array_layout(
    d: dict[str, Any], nbytes: int, index: int
) -> tuple[np.dtype[Any], tuple[int, ...], int | None]:
    """Check a data frame's dtype/shape/count against its payload length."""
    dtype = d["dtype"]
    if not isinstance(dtype, str):
        raise RemoteProtocolError(
            f"ill-typed value {type(dtype).__name__}", frame_index=index, key="dtype"
        )
    try:
        dt = check_dtype(dtype)
    except ValueError as exc:
        raise RemoteProtocolError(str(exc), frame_index=index, key="dtype") from None
    shape = _field(d, "shape", list, index)
    if len(shape) > 32 or not all(type(n) is int and n >= 0 for n in shape):
        raise RemoteProtocolError(
            f"shape must be a list of at most 32 non-negative integers, got {shape!r}"[:200],
            frame_index=index,
            key="shape",
        )
    count = d.get("count")
    if count is not None and (type(count) is not int or not shape or shape[0] != count):
        raise RemoteProtocolError(
            f"count {count!r} does not match the leading axis of shape {shape}",
            frame_index=index,
            key="count",
        )
    expected = dt.itemsize
    for n in shape:
        expected *= n
    if expected != nbytes:
        raise RemoteProtocolError(
            f"{nbytes} data bytes, but dtype {dt.str} and shape {shape} need {expected}",
            frame_index=index,
            key="data",
        )
    return dt, tuple(shape), count


class _Payload:
    """A large data frame whose payload is being written into its final buffer."""

    __slots__ = ("buffer", "count", "dtype", "filled", "seq", "shape", "view")

    def __init__(self, header: dict[str, Any], nbytes: int, index: int) -> None:
        self.seq = _seq(header, index)
        if "dtype" in header:
            self.dtype, self.shape, self.count = _array_layout(header, nbytes, index)
            self.buffer: Any = np.empty(nbytes, dtype=np.uint8)
        else:
            if "shape" in header or "count" in header:  # as `_to_frame` refuses them
                raise RemoteProtocolError(
                    "shape/count without dtype", frame_index=index, key="dtype"
                )
            self.dtype = None
            self.buffer = bytearray(nbytes)
        self.view = memoryview(self.buffer)
        self.filled = 0

    def frame(self) -> DataFrame:
        if self.dtype is None:
            return DataFrame(self.seq, bytes(self.buffer))
        array = self.buffer.view(self.dtype).reshape(self.shape)
        return DataFrame(self.seq, array, self.count)


class FrameDecoder:
    """Incremental decoder: bytes in (any chunking), frames out.

    ```python
    decoder = FrameDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
        for frame in decoder.frames():
            ...
    decoder.feed_eof()       # raises if the body stopped inside a frame
    ```

    A reader that can write into memory (`socket.recv_into`) asks `get_buffer()` first:
    while a large payload is pending it returns the memory where the next bytes go, and
    `buffer_updated(n)` records them, without any copy.

    Frames that break the format raise a `RemoteProtocolError` naming the frame index and
    key, from `frames()`, after every good frame before them; the decoder then refuses
    further input with the same error.

    Args:
        max_frame_size: largest accepted frame in bytes; a frame announcing more is
            refused (`FrameTooLarge`) before its payload is buffered.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        #: frames completed so far (heartbeats included): the index of the next frame
        self.frame_index = 0
        self._ready: deque[Frame] = deque()
        self._error: ProtocolError | None = None
        self._payload: _Payload | None = None
        self._new_unpacker()

    def _new_unpacker(self) -> None:
        limit = self.max_frame_size
        self._unpacker = msgpack.Unpacker(
            raw=False,
            max_buffer_size=limit + _FEED_SLICE,
            max_bin_len=self.max_frame_size,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
        self._fed = 0  # bytes fed to this unpacker
        self._boundary = 0  # offset where its current (incomplete) frame starts
        self._partial = bytearray()  # that frame's bytes so far, for a spill
        self._spill = True  # whether that frame may still spill
        self._probe_at = _SPILL_PROBE  # its length at which to look at its header next

    # -- state ---------------------------------------------------------------------------

    @property
    def has_partial(self) -> bool:
        """Whether bytes of an incomplete frame are held (a cut-off stream, if it ends now)."""
        return self._payload is not None or self._fed > self._boundary

    def feed_eof(self) -> None:
        """Declare the end of input.

        Raises:
            RemoteProtocolError: the input stopped inside a frame (it was cut off).
        """
        if self._error is not None:
            raise self._error
        if self.has_partial:
            self._fail(
                RemoteProtocolError(
                    "input ended inside a frame (truncated)", frame_index=self.frame_index
                )
            )
            assert self._error is not None
            raise self._error

    def _fail(self, error: ProtocolError) -> None:
        if self._error is None:
            self._error = error
        self._payload = None
        self._partial = bytearray()

    # -- input ---------------------------------------------------------------------------

    def get_buffer(self) -> memoryview | None:
        """Memory to write the next input bytes into, while a large payload is pending."""
        payload = self._payload
        if payload is None or self._error is not None:
            return None
        return payload.view[payload.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that `nbytes` bytes were written at the start of `get_buffer()`."""
        payload = self._payload
        if payload is None:
            raise RuntimeError("buffer_updated() without a pending payload")
        if not 0 <= nbytes <= len(payload.view) - payload.filled:
            raise ValueError(f"buffer_updated({nbytes}) outside the buffer given")
        payload.filled += nbytes
        if payload.filled == len(payload.view):
            self._finish_payload()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input bytes; complete frames become available from `frames()`.

        Raises:
            RemoteProtocolError: the decoder already failed (the same error again).
        """
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        pos, end = 0, len(view)
        while pos < end and self._error is None:
            payload = self._payload
            if payload is not None:
                n = min(end - pos, len(payload.view) - payload.filled)
                payload.view[payload.filled : payload.filled + n] = view[pos : pos + n]
                pos += n
                payload.filled += n
                if payload.filled == len(payload.view):
                    self._finish_payload()
                continue
            piece = view[pos : pos + _FEED_SLICE]
            pos += len(piece)
            self._feed_unpacker(piece)

    def _finish_payload(self) -> None:
        assert self._payload is not None
        self._ready.append(self._payload.frame())
        self._payload = None
        self.frame_index += 1
        self._new_unpacker()

    def _feed_unpacker(self, piece: memoryview) -> None:
        try:
            self._unpacker.feed(piece)
        except Exception:  # BufferFull: a frame over the limit
            self._fail(self._too_large())
            return
        start = self._fed
        self._fed += len(piece)
        unpacker = self._unpacker
        ready, to_frame = self._ready, self._to_frame
        boundary, limit = self._boundary, self.max_frame_size
        completed = False
        try:
            for obj in unpacker:  # stops at the first incomplete frame
                end = unpacker.tell()
                if end - boundary > limit:
                    self._fail(self._too_large(end - boundary))
                    return
                boundary = end
                ready.append(to_frame(obj))
                self.frame_index += 1
                completed = True
        except ProtocolError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # msgpack raises several types for bad input
            if "exceeds max_" in str(exc):  # a length over the limits set above
                self._fail(self._too_large())
            else:
                self._fail(
                    RemoteProtocolError(
                        f"malformed msgpack: {exc or type(exc).__name__}",
                        frame_index=self.frame_index,
                    )
                )
            return
        finally:
            self._boundary = boundary
        if completed:  # a new frame (if any) is pending now
            self._partial = bytearray()
            self._spill = True
            self._probe_at = _SPILL_PROBE
        if self._fed - self._boundary > self.max_frame_size:
            self._fail(self._too_large())
            return
        if self._fed > self._boundary and self._spill:
            # Keep a copy of the incomplete frame's bytes, in case it is a large one.
            self._partial += piece[max(0, self._boundary - start) :]
            if len(self._partial) >= self._probe_at:
                self._try_spill()

    def _too_large(self, size: int | None = None) -> FrameTooLarge:
        what = "frame" if size is None else f"frame of {size} bytes"
        return FrameTooLarge(
            f"{what} exceeds the {self.max_frame_size}-byte frame size limit",
            frame_index=self.frame_index,
        )

    def _try_spill(self) -> None:
        """Parse the pending frame's header; if a large bin payload ends it, go direct."""
        raw = bytes(self._partial)
        status, header, payload_at, nbytes = _parse_header(raw)
        if status == "incomplete" and len(raw) < _MAX_HEADER:
            self._probe_at = 2 * len(raw)  # try again with twice the bytes: O(n log n)
            return
        if status != "ok" or nbytes < SPILL_THRESHOLD:
            # Small, or not a frame whose payload comes last: msgpack buffers it whole
            # (bounded by the limit).
            self._spill = False
            self._partial = bytearray()
            return
        if payload_at + nbytes > self.max_frame_size:
            self._fail(self._too_large(payload_at + nbytes))
            return
        kind = header.get("kind")
        if kind != "data":
            # Only data frames carry big payloads; let the normal path name the fault.
            self._spill = False
            self._partial = bytearray()
            return
        try:
            payload = _Payload(header, nbytes, self.frame_index)
        except ProtocolError as exc:
            self._fail(exc)
            return
        have = raw[payload_at : payload_at + nbytes]
        payload.view[: len(have)] = have
        payload.filled = len(have)
        rest = raw[payload_at + nbytes :]
        self._payload = payload
        self._new_unpacker()
        if payload.filled == nbytes:
            self._finish_payload()
        if rest:
            self.feed(rest)

    # -- output --------------------------------------------------------------------------

    def frames(self) -> Iterator[Frame]:
        """Yield the complete frames decoded so far; then raise the error, if any."""
        ready = self._ready
        while ready:
            yield ready.popleft()
        if self._error is not None:
            raise self._error

    def next_frame(self) -> Frame | None:
        """The next complete frame, or `None` if none is ready (raises on error)."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def _to_frame(self, obj: Any) -> Frame:
        index = self.frame_index
        if type(obj) is not dict:
            raise RemoteProtocolError(
                f"a frame must be a msgpack map, got {type(obj).__name__}", frame_index=index
            )
        kind = obj.get("kind")
        if kind == "data":
            # Fast path: an array frame of a layout seen before (checked then).
            data, seq, shape = obj.get("data"), obj.get("seq"), obj.get("shape")
            if type(data) is bytes and type(seq) is int and seq >= 0 and type(shape) is list:
                for n in shape:
                    if type(n) is not int:  # (True == 1: bools must not hit the cache)
                        break
                else:
                    layout = _layouts.get((obj.get("dtype"), *shape))
                    if layout is not None and layout[2] == len(data) and "count" not in obj:
                        # bytearray makes the array writable, in one copy of a small payload
                        return DataFrame(seq, np.ndarray(layout[1], layout[0], bytearray(data)))
            data = obj.get("data")
            if type(data) is not bytes:
                if "data" not in obj:
                    raise RemoteProtocolError("missing key", frame_index=index, key="data")
                raise RemoteProtocolError(
                    f"data must be msgpack bin, got {type(data).__name__}",
                    frame_index=index,
                    key="data",
                )
            seq = _seq(obj, index)
            if "dtype" not in obj:
                if "shape" in obj or "count" in obj:
                    raise RemoteProtocolError(
                        "shape/count without dtype", frame_index=index, key="dtype"
                    )
                return DataFrame(seq, data)
            dt, shape, count = _array_layout(obj, len(data), index)
            if count is None and len(_layouts) < 4096:
                _layouts[(obj["dtype"], *shape)] = (dt, shape, len(data))
            return DataFrame(seq, np.ndarray(shape, dt, bytearray(data)), count)
        if kind == "heartbeat":
            return HeartbeatFrame()
        if kind == "end":
            return EndFrame(_seq(obj, index))
        if kind == "error":
            return ErrorFrame(
                seq=_seq(obj, index),
                origin=_field(obj, "origin", str, index),
                type=_field(obj, "type", str, index),
                message=_field(obj, "message", str, index),
                traceback=_field(obj, "traceback", str, index) if "traceback" in obj else "",
            )
        if "kind" not in obj:
            raise RemoteProtocolError("missing key", frame_index=index, key="kind")
        raise RemoteProtocolError(f"unknown kind {kind!r}"[:200], frame_index=index, key="kind")


_BIN_LEN = {0xC4: (1, ">B"), 0xC5: (2, ">H"), 0xC6: (4, ">I")}


def _parse_header(raw: bytes) -> tuple[str, dict[str, Any], int, int]:
    """Header of a frame whose last key is `data` with a bin value.

    Returns `(status, header, payload offset, payload length)`; status is `"ok"`,
    `"incomplete"` (`raw` ends inside the header) or `"no"` (not a map ending with a
    bin `data`, or malformed: the normal path will say what is wrong).
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1))
    unpacker.feed(raw[:_MAX_HEADER])
    header: dict[str, Any] = {}
    try:
        n = unpacker.read_map_header()
        for i in range(n):
            key = unpacker.unpack()
            if key == "data":
                if i != n - 1:
                    return "no", header, 0, 0
                at = unpacker.tell()
                if at >= len(raw):
                    return "incomplete", header, 0, 0
                size = _BIN_LEN.get(raw[at])
                if size is None:
                    return "no", header, 0, 0
                if at + 1 + size[0] > len(raw):
                    return "incomplete", header, 0, 0
                (nbytes,) = struct.unpack_from(size[1], raw, at + 1)
                return "ok", header, at + 1 + size[0], nbytes
            if type(key) is not str:
                return "no", header, 0, 0
            header[key] = unpacker.unpack()
    except msgpack.OutOfData:
        return "incomplete", header, 0, 0
    except Exception:
        return "no", header, 0, 0
    return "no", header, 0, 0
