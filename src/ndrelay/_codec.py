"""The sans-I/O frame codec: frames to msgpack bytes and back; no sockets, no HTTP, no asyncio.

Encoding never copies an array's payload: `encode_frame_parts` returns the frame's header
bytes and the array's own memory as separate buffers, for a vectored write.

Decoding is incremental (`FrameDecoder.feed`, then `frames()`). Small frames go through
`msgpack.Unpacker`, which is fastest for them. An incomplete frame has its header parsed
on its own; if its payload is over `SPILL_THRESHOLD`, the payload is written straight
into the array that will be returned, either by `feed` (one copy) or by a reader that
asks `get_buffer()` for the memory to `recv_into` (no copy at all; a large *bytes*
item is copied once more, into the immutable `bytes` it is returned as).

Decoding is bounded by the bytes that arrived, not by what a frame declares: a frame is a
map of at most `MAX_FRAME_ENTRIES` string keys whose values are scalars (only `shape`, and
an error's `bases`, are lists: of at most `MAX_SHAPE_DIMS` scalars), strings are at most
`max_text_size` bytes, and a payload's buffer grows with the bytes received (in doubling
steps beyond `_DIRECT_ALLOC`), so a peer cannot make the decoder build millions of objects
or reserve memory it never fills.
"""

from __future__ import annotations

import copy
import re
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

import msgpack
import numpy as np

from ._exceptions import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_TEXT_SIZE",
    "MAX_FRAME_ENTRIES",
    "MAX_SHAPE_DIMS",
    "MEDIA_TYPE",
    "FrameDecoder",
    "check_dtype",
    "parse_dtype",
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
#: Runs (`FrameDecoder(runs=True)`): the largest payload read as part of a run, and the
#: most bytes handed to msgpack at once for a frame that is not of the run's layout.
_RUN_MAX_PAYLOAD = 4096
_RUN_SLOW_SLICE = 64 * 1024
#: ... and the most bytes of one batched frame of a run: its rows are views of one
#: array, so an item kept alive keeps at most this much memory alive with it
_RUN_BLOCK = 16 * 1024
#: msgpack's unsigned integer markers: how many bytes follow each (a fixint has none)
_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_UINT_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(">u2"),
    4: np.dtype(">u4"),
    8: np.dtype(">u8"),
}
#: Default limit on one string of a frame (an error's message or traceback, say): 1 MiB.
DEFAULT_MAX_TEXT_SIZE = 1024 * 1024
#: Most entries a frame's map may have (the format uses at most 7; unknown keys are ignored).
MAX_FRAME_ENTRIES = 16
#: Most dimensions of a `shape` (numpy's own limit is 64; the format's is 32).
MAX_SHAPE_DIMS = 32
#: A payload up to this size gets its whole buffer at once; a larger one gets a buffer
#: that grows (doubling) as its bytes arrive, so a frame that declares much and sends
#: little holds little.
_DIRECT_ALLOC = 16 * 1024 * 1024

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
            raise ValueError(f"unsupported dtype {dtype!r}{_canonical_hint(dtype)}")
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


def _canonical_hint(name: str) -> str:
    """For a frame's dtype written as a name numpy knows: how the wire writes it."""
    try:
        dt = np.dtype(name)
    except Exception:
        return ""
    if dt.kind not in _DTYPE_KINDS or dt.fields is not None:
        return ""
    return f" (a frame's dtype is numpy's dtype.str: {dt.str!r})"


def parse_dtype(dtype: Any) -> np.dtype[Any]:
    """The dtype named by any name numpy accepts (`"float32"`, `"f4"`, `"<f4"`,
    `np.float32`), if the wire format can carry it, else a `ValueError` saying why.

    Where people name dtypes (stream definitions, the CLI); frames on the wire carry
    the canonical `dtype.str` and go through the stricter `check_dtype`.
    """
    if isinstance(dtype, str):
        try:
            dt = np.dtype(dtype)
        except Exception as exc:
            raise ValueError(f"unknown dtype {dtype!r}: {exc}") from None
    else:
        dt = np.dtype(dtype)
    if dt.kind not in _DTYPE_KINDS or dt.itemsize == 0 or dt.fields is not None:
        raise ValueError(
            f"unsupported dtype {dtype!r} ({dt.str}): only numbers, booleans, datetimes "
            "and fixed-size strings travel (never objects or structured records)"
        )
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
    return int(value)


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
        return array.data.cast("B")
    except (TypeError, ValueError):  # empty arrays, datetimes: not plain buffers
        return array.reshape(-1).view(np.uint8).data


def encode_items(pairs: Iterable[tuple[int, Any]], inline: int = 1024) -> list[bytes | memoryview]:
    """The buffers of many data frames, for one vectored write.

    Runs of small frames come joined into one `bytes` (their payloads up to `inline`
    bytes copied: cheaper than a view each); larger payloads are views of the items.

    Raises:
        LocalProtocolError: as `encode_data_parts`.
    """
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
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
                **({"bases": [_utf8_safe(b, "bases") for b in frame.bases]} if frame.bases else {}),
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
        raise RemoteProtocolError(f"missing key {key!r}", frame_index=index, key=key) from None
    if not isinstance(value, types) or isinstance(value, bool) and types is int:
        raise RemoteProtocolError(
            f"ill-typed value {type(value).__name__}", frame_index=index, key=key
        )
    return value


def _bases(d: dict[str, Any], index: int) -> tuple[str, ...]:
    bases = _field(d, "bases", list, index)
    if not all(type(b) is str and len(b) <= 64 for b in bases):
        raise RemoteProtocolError(
            "bases must be a list of exception class names (strings of at most 64 characters)",
            frame_index=index,
            key="bases",
        )
    return tuple(bases)


def _seq(d: dict[str, Any], index: int, optional: bool = False) -> int:
    seq = d.get("seq")
    if type(seq) is not int or seq < 0:
        if seq is None and "seq" not in d:
            if optional:
                return -1
            raise RemoteProtocolError("missing key 'seq'", frame_index=index, key="seq")
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
    if len(shape) > MAX_SHAPE_DIMS or not all(type(n) is int and n >= 0 for n in shape):
        raise RemoteProtocolError(
            f"shape must be a list of at most {MAX_SHAPE_DIMS} non-negative integers, "
            f"got {shape!r}"[:200],
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
    """A large data frame whose payload is being written into its final buffer.

    The buffer holds `len(view)` bytes of the `nbytes` the frame declared: all of them
    up to `_DIRECT_ALLOC`, else a first step that `grow()` doubles as it fills, so
    holding a half-sent frame costs about what was sent. `np.empty` does not touch its
    pages, so even the first step costs memory only as bytes land in it.
    """

    __slots__ = ("buffer", "count", "dtype", "filled", "nbytes", "seq", "shape", "view")

    def __init__(
        self, header: dict[str, Any], nbytes: int, index: int, seq_optional: bool = False
    ) -> None:
        self.seq = _seq(header, index, seq_optional)
        self.dtype: np.dtype[Any] | None
        if "dtype" in header:
            self.dtype, self.shape, self.count = _array_layout(header, nbytes, index)
        else:
            if "shape" in header or "count" in header:  # as `_to_frame` refuses them
                raise RemoteProtocolError(
                    "shape/count without dtype", frame_index=index, key="dtype"
                )
            self.dtype = None
        self.nbytes = nbytes
        self.buffer: Any = np.empty(min(nbytes, _DIRECT_ALLOC), dtype=np.uint8)
        self.view: memoryview = self.buffer.data
        self.filled = 0

    def room(self) -> memoryview:
        """Memory for the next bytes of the payload (growing the buffer if it is full)."""
        if self.filled == len(self.view):
            self.grow()
        return self.view[self.filled :]

    def grow(self) -> None:
        """Double the buffer (at most to `nbytes`), keeping the bytes received."""
        size = min(self.nbytes, 2 * len(self.view))
        buffer = np.empty(size, dtype=np.uint8)
        buffer[: self.filled] = self.buffer[: self.filled]
        self.buffer, self.view = buffer, buffer.data

    def frame(self) -> DataFrame:
        if self.dtype is None:
            return DataFrame(self.seq, self.buffer.tobytes())
        array = self.buffer.view(self.dtype).reshape(self.shape)
        return DataFrame(self.seq, array, self.count)


class _RunLayout:
    """The bytes of an array frame of one layout as ndrelay's encoder writes them:
    `prefix`, the seq (a msgpack unsigned integer), `suffix` (ending in the bin header),
    then `nbytes` of payload."""

    __slots__ = (
        "dtype",
        "nbytes",
        "per_block",
        "prefix",
        "prefix_row",
        "shape",
        "suffix",
        "suffix_row",
    )

    def __init__(self, dt: np.dtype[Any], shape: tuple[int, ...], nbytes: int) -> None:
        self.dtype, self.shape, self.nbytes = dt, shape, nbytes
        self.per_block = max(1, _RUN_BLOCK // max(1, nbytes))  # rows per batched frame
        self.prefix, self.suffix = _array_headers(dt, shape, None)
        self.prefix_row = np.frombuffer(self.prefix, np.uint8)
        self.suffix_row = np.frombuffer(self.suffix, np.uint8)

    def longest(self) -> int:
        """The most bytes one such frame takes (with an 8-byte seq)."""
        return len(self.prefix) + 9 + len(self.suffix) + self.nbytes


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
    further input with the same error. What a frame may create is bounded before it is
    created: a map of more than `MAX_FRAME_ENTRIES` entries, a key that is not a string,
    a map or list nested where the format has none, a list of more than `MAX_SHAPE_DIMS`
    entries or a string over `max_text_size` is refused (400) naming the key, so decoding
    a frame never costs more than a small multiple of its bytes.

    Args:
        max_frame_size: largest accepted frame in bytes; a frame announcing more is
            refused (`FrameTooLarge`) before its payload is buffered.
        max_text_size: longest accepted string (an error's message or traceback, say).
        seq_optional: a frame may leave out `seq` (upload bodies, DESIGN.md §5); it
            decodes with `seq == -1`.
        runs: a run of small array frames of one layout with consecutive seqs, each
            byte for byte as ndrelay's encoder writes it (what a relay sends), comes
            out as one batched `DataFrame` (`count` items, the same seqs, dtype, shape
            and bytes), read without a msgpack round per frame: for readers that take
            the rows as items anyway (the client). The layout is learnt from the last
            array frame decoded the ordinary way; anything else decodes as before.
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_text_size: int = DEFAULT_MAX_TEXT_SIZE,
        *,
        seq_optional: bool = False,
        runs: bool = False,
    ) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be positive")
        if max_text_size < 1:
            raise ValueError("max_text_size must be positive")
        self.max_frame_size = max_frame_size
        self.max_text_size = max_text_size
        self.seq_optional = seq_optional
        #: frames completed so far (heartbeats included): the index of the next frame
        self.frame_index = 0
        self._ready: deque[Frame] = deque()
        self._error: ProtocolError | None = None
        self._payload: _Payload | None = None
        self.runs = runs
        #: runs: the layout of the last array frame (see `_learn_run`), or None
        self._run: _RunLayout | None = None
        self._run_key: Any = None
        self._carry = b""  # runs: the start of a frame of that layout, awaiting its rest
        self._new_unpacker()

    def _new_unpacker(self) -> None:
        limit = self.max_frame_size
        self._unpacker = msgpack.Unpacker(
            raw=False,
            max_buffer_size=limit + _FEED_SLICE,
            max_bin_len=limit,
            max_str_len=min(limit, self.max_text_size),
            max_array_len=MAX_SHAPE_DIMS,
            max_map_len=MAX_FRAME_ENTRIES,
            max_ext_len=0,
            object_hook=self._on_map,
            list_hook=self._on_list,
        )
        # Containers the frame being decoded may still complete: its own map and one
        # list (`shape`). One more means nesting, refused before it can multiply.
        self._maps = self._lists = 1
        self._fed = 0  # bytes fed to this unpacker
        self._boundary = 0  # offset where its current (incomplete) frame starts
        self._partial = bytearray()  # that frame's bytes so far, for a spill
        self._spill = True  # whether that frame may still spill
        self._probe_at = _SPILL_PROBE  # its length at which to look at its header next

    def _on_map(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        self._maps -= 1
        if self._maps < 0:
            raise _Nested
        return obj

    def _on_list(self, obj: list[Any]) -> list[Any]:
        self._lists -= 1
        if self._lists < 0:
            raise _Nested
        return obj

    # -- state ---------------------------------------------------------------------------

    @property
    def has_partial(self) -> bool:
        """Whether bytes of an incomplete frame are held (a cut-off stream, if it ends now)."""
        return self._payload is not None or self._fed > self._boundary or bool(self._carry)

    def feed_eof(self) -> None:
        """Declare the end of input.

        Raises:
            RemoteProtocolError: the input stopped inside a frame (it was cut off).
        """
        if self._error is not None:
            self._raise()
        if self._carry:  # not a frame of the run's layout after all: decode it as usual
            carry, self._carry, self._run = self._carry, b"", None
            self.feed(carry)
            if self._error is not None:
                self._raise()
        if self.has_partial:
            self._fail(
                RemoteProtocolError(
                    "input ended inside a frame (truncated)", frame_index=self.frame_index
                )
            )
            self._raise()

    def _fail(self, error: ProtocolError) -> None:
        if self._error is None:
            # kept without a traceback or context: their frames hold the input buffers
            error.__context__ = error.__cause__ = None
            self._error = error.with_traceback(None)
        self._payload = None
        self._partial = bytearray()
        # the unpacker's buffer holds what was fed: swapped for one of a byte (never fed)
        self._unpacker = msgpack.Unpacker(max_buffer_size=1)

    def _raise(self) -> NoReturn:
        """Raise the error the decoder failed with, as a copy: the traceback the raise
        gathers (frames holding input) goes with the copy, not into the decoder."""
        assert self._error is not None
        raise copy.copy(self._error)

    # -- input ---------------------------------------------------------------------------

    def get_buffer(self) -> memoryview | None:
        """Memory to write the next input bytes into, while a large payload is pending."""
        payload = self._payload
        if payload is None or self._error is not None:
            return None
        return payload.room()

    def buffer_updated(self, nbytes: int) -> None:
        """Record that `nbytes` bytes were written at the start of `get_buffer()`."""
        payload = self._payload
        if payload is None:
            raise RuntimeError("buffer_updated() without a pending payload")
        if not 0 <= nbytes <= len(payload.view) - payload.filled:
            raise ValueError(f"buffer_updated({nbytes}) outside the buffer given")
        payload.filled += nbytes
        if payload.filled == payload.nbytes:
            self._finish_payload()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input bytes; complete frames become available from `frames()`.

        Raises:
            RemoteProtocolError: the decoder already failed (the same error again).
        """
        if self._error is not None:
            self._raise()
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if self._carry:
            view = memoryview(self._carry + view)
            self._carry = b""
        pos, end = 0, len(view)
        while pos < end and self._error is None:
            if self._carry:  # kept back by a nested `feed` (a spill's rest): it comes first
                view = memoryview(self._carry + view[pos:end])
                self._carry = b""
                pos, end = 0, len(view)
            payload = self._payload
            if payload is not None:
                room = payload.room()
                n = min(end - pos, len(room))
                room[:n] = view[pos : pos + n]
                pos += n
                payload.filled += n
                if payload.filled == payload.nbytes:
                    self._finish_payload()
                continue
            if self._run is not None and self._fed == self._boundary:
                pos = self._take_runs(view, pos, end)
                if pos == end or self._carry:
                    return
                # a frame of another kind: msgpack reads it, then the runs go on
                piece = view[pos : pos + _RUN_SLOW_SLICE]
                pos += self._feed_unpacker(piece)
                continue
            piece = view[pos : pos + _FEED_SLICE]
            pos += self._feed_unpacker(piece)

    def _finish_payload(self) -> None:
        assert self._payload is not None
        self._ready.append(self._payload.frame())
        self._payload = None
        self.frame_index += 1
        self._new_unpacker()

    def _feed_unpacker(self, piece: memoryview) -> int:
        """Hand `piece` to msgpack; returns how many of its bytes were used: all of them,
        except with a run layout known, where msgpack stops after the first frame it
        completes (the rest goes back to `feed`, to be read as a run if it is one)."""
        try:
            self._unpacker.feed(piece)
        except Exception:  # BufferFull: a frame over the limit
            self._fail(self._too_large())
            return len(piece)
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
                    return len(piece)
                boundary = end
                self._maps = self._lists = 1
                ready.append(to_frame(obj))
                self.frame_index += 1
                completed = True
                if self._run is not None:  # back to runs after this frame
                    used = boundary - start
                    self._new_unpacker()
                    return used
        except ProtocolError as exc:
            self._fail(exc)
            return len(piece)
        except Exception as exc:  # msgpack raises several types for bad input
            if boundary >= start:  # the bad frame started in this piece
                raw = bytes(piece[boundary - start :])
            elif self._spill:  # ... or earlier, and its first bytes were kept
                raw = bytes(self._partial) + bytes(piece)
            else:
                raw = b""
            self._fail(self._refusal(exc, raw))
            return len(piece)
        finally:
            if self._unpacker is unpacker:  # (not replaced by a new one above)
                self._boundary = boundary
        if completed:  # a new frame (if any) is pending now
            self._partial = bytearray()
            self._spill = True
            self._probe_at = _SPILL_PROBE
        if self._fed - self._boundary > self.max_frame_size:
            self._fail(self._too_large())
            return len(piece)
        if self._fed > self._boundary and self._spill:
            # Keep a copy of the incomplete frame's bytes, in case it is a large one.
            self._partial += piece[max(0, self._boundary - start) :]
            if len(self._partial) >= self._probe_at:
                self._try_spill()
        return len(piece)

    def _refusal(self, exc: Exception, raw: bytes) -> RemoteProtocolError:
        """The error for a frame msgpack (or a hook above) stopped on; `raw`: its bytes."""
        text = str(exc)
        if "exceeds max_bin_len" in text:
            return self._too_large()
        walk = _walk_header(raw, self.max_text_size)
        if walk[0] == "bad":
            return RemoteProtocolError(walk[4], frame_index=self.frame_index, key=walk[5])
        if not isinstance(exc, _Nested) and "exceeds max_" not in text:
            fault = _fault(raw)
            if fault is None:
                fault = _FAULTS.get(type(exc).__name__) or text or type(exc).__name__
            return RemoteProtocolError(f"malformed msgpack: {fault}", frame_index=self.frame_index)
        for limit, reason in (
            ("max_str_len", f"a string over the {self.max_text_size}-byte limit"),
            ("max_map_len", f"a map of more than {MAX_FRAME_ENTRIES} entries"),
            ("max_array_len", f"a list of more than {MAX_SHAPE_DIMS} entries"),
            ("max_ext_len", "a msgpack ext value (the format has none)"),
        ):
            if limit in text:
                return RemoteProtocolError(reason, frame_index=self.frame_index)
        return RemoteProtocolError(
            "nested maps or lists (a frame's values are scalars; only shape is a list)",
            frame_index=self.frame_index,
        )

    def _too_large(self, size: int | None = None) -> FrameTooLarge:
        what = "frame" if size is None else f"frame of {size} bytes"
        return FrameTooLarge(
            f"{what} exceeds the {self.max_frame_size}-byte frame size limit",
            frame_index=self.frame_index,
        )

    def _try_spill(self) -> None:
        """Parse the pending frame's header; if a large bin payload ends it, go direct."""
        raw = bytes(self._partial)
        status, header, payload_at, nbytes, reason, key = _walk_header(raw, self.max_text_size)
        if status == "bad":
            self._fail(RemoteProtocolError(reason, frame_index=self.frame_index, key=key))
            return
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
            payload = _Payload(header, nbytes, self.frame_index, self.seq_optional)
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

    # -- runs ----------------------------------------------------------------------------

    def _learn_run(
        self, dtype_str: Any, layout: tuple[np.dtype[Any], tuple[int, ...], int]
    ) -> None:
        """An array frame of `layout` was decoded the ordinary way: later frames of it
        may be read as runs (`runs=True`, small payloads, the canonical dtype string)."""
        if layout is self._run_key:
            return
        self._run_key = layout
        dt, shape, nbytes = layout
        run = None
        if shape and nbytes <= _RUN_MAX_PAYLOAD and dtype_str == dt.str:
            run = _RunLayout(dt, shape, nbytes)
            if run.longest() > self.max_frame_size:
                run = None
        self._run = run

    def _take_runs(self, view: memoryview, pos: int, end: int) -> int:
        """Read the frames of the run layout from `view[pos:end]`, as batched frames of
        consecutive seqs (a lone one as a plain frame); returns where they stop: at a
        frame of another kind, or at the end, where the start of a frame that may be of
        the layout is kept for the next `feed`."""
        run = self._run
        assert run is not None
        prefix, lp, ls = run.prefix, len(run.prefix), len(run.suffix)
        while pos < end:
            left = end - pos
            if left <= lp:
                if view[pos:end] == prefix[:left]:
                    self._carry = bytes(view[pos:end])
                    return end
                return pos
            if view[pos : pos + lp] != prefix:
                return pos
            marker = view[pos + lp]
            width = 0 if marker < 0x80 else _UINT_WIDTHS.get(marker, -1)
            if width < 0:
                return pos
            stride = lp + 1 + width + ls + run.nbytes
            n = left // stride
            if n == 0:
                self._carry = bytes(view[pos:end])  # the rest comes with the next bytes
                return end
            at = lp + 1 + width  # where the suffix starts
            if n == 1:  # one frame (a slow stream): no numpy round for it
                if view[pos + at : pos + at + ls] != run.suffix:
                    return pos
                seq = marker if width == 0 else int.from_bytes(view[pos + lp + 1 : pos + at], "big")
                payload = bytearray(view[pos + at + ls : pos + stride])
                self._ready.append(DataFrame(seq, np.ndarray(run.shape, run.dtype, payload)))
                self.frame_index += 1
                pos += stride
                continue
            rows = np.frombuffer(view, np.uint8, n * stride, pos).reshape(n, stride)
            ok = (rows[:, :lp] == run.prefix_row).all(axis=1)
            ok &= (rows[:, at : at + ls] == run.suffix_row).all(axis=1)
            ok &= rows[:, lp] < 0x80 if width == 0 else rows[:, lp] == marker
            k = n if ok.all() else int(ok.argmin())
            if k == 0:
                return pos
            if width == 0:
                seqs = rows[:k, lp].astype(np.uint64)
            else:
                raw = np.ascontiguousarray(rows[:k, lp + 1 : at])
                seqs = raw.view(_UINT_DTYPES[width]).reshape(k).astype(np.uint64)
            payloads = rows[:k, at + ls :]
            breaks = (np.flatnonzero(np.diff(seqs) != 1) + 1).tolist() if k > 1 else []
            ready, per, layout = self._ready, run.per_block, (-1, *run.shape)
            first = 0
            for stop in [*breaks, k]:  # runs of consecutive seqs, in blocks of `per`
                for a in range(first, stop, per):
                    b = min(stop, a + per)
                    block = payloads[a:b].copy().view(run.dtype).reshape(layout)
                    if b - a == 1:
                        ready.append(DataFrame(int(seqs[a]), block[0]))
                    else:
                        ready.append(DataFrame(int(seqs[a]), block, b - a))
                first = stop
            self.frame_index += k
            pos += k * stride  # then the next frame: of the layout (another seq width) or not
        return pos

    # -- output --------------------------------------------------------------------------

    def frames(self) -> Iterator[Frame]:
        """Yield the complete frames decoded so far; then raise the error, if any."""
        ready = self._ready
        while ready:
            yield ready.popleft()
        if self._error is not None:
            self._raise()

    def next_frame(self) -> Frame | None:
        """The next complete frame, or `None` if none is ready (raises on error)."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            self._raise()
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
                        if len(obj) > 5:
                            _check_extras(obj, index)
                        elif self.runs:
                            self._learn_run(obj["dtype"], layout)
                        # bytearray makes the array writable, in one copy of a small payload
                        return DataFrame(seq, np.ndarray(layout[1], layout[0], bytearray(data)))
            data = obj.get("data")
            if type(data) is not bytes:
                if "data" not in obj:
                    raise RemoteProtocolError("missing key 'data'", frame_index=index, key="data")
                raise RemoteProtocolError(
                    f"data must be msgpack bin, got {type(data).__name__}",
                    frame_index=index,
                    key="data",
                )
            seq = _seq(obj, index, self.seq_optional)
            if len(obj) > 3 + 2 * ("dtype" in obj) + ("count" in obj):
                _check_extras(obj, index)
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
        if len(obj) > 1:
            _check_extras(obj, index)
        if kind == "heartbeat":
            return HeartbeatFrame()
        if kind == "end":
            return EndFrame(_seq(obj, index, self.seq_optional))
        if kind == "error":
            return ErrorFrame(
                seq=_seq(obj, index, self.seq_optional),
                origin=_field(obj, "origin", str, index),
                type=_field(obj, "type", str, index),
                message=_field(obj, "message", str, index),
                traceback=_field(obj, "traceback", str, index) if "traceback" in obj else "",
                bases=_bases(obj, index) if "bases" in obj else None,
            )
        if "kind" not in obj:
            raise RemoteProtocolError("missing key 'kind'", frame_index=index, key="kind")
        raise RemoteProtocolError(f"unknown kind {kind!r}"[:200], frame_index=index, key="kind")


#: What msgpack's own exceptions (raised without a message) mean.
_FAULTS = {
    "FormatError": "a byte that is not a msgpack type (0xc1 is reserved)",
    "StackError": "nesting deeper than msgpack decodes",
}
#: Bytes that follow a msgpack scalar's type byte, by type byte (not str/bin/ext).
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4}
_FIXED[0xD3] = 8
#: Length-prefixed types: type byte -> (bytes of the length, extra bytes before the data).
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}
_SIZED.update({0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)})


def _fault(raw: bytes) -> str | None:
    """What is wrong in the msgpack bytes `raw` (one frame, from its start) and at which
    byte: a reserved type byte or a str that is not UTF-8; None if neither is found."""
    pos, pending, end = 0, 1, len(raw)
    while pending and pos < end:
        t = raw[pos]
        pending -= 1
        if t == 0xC1:
            return f"byte 0xc1 (reserved, not a msgpack type) at offset {pos} of the frame"
        if t <= 0x7F or t >= 0xE0 or t in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif t <= 0x8F:
            pending, pos = pending + 2 * (t & 0x0F), pos + 1
        elif t <= 0x9F:
            pending, pos = pending + (t & 0x0F), pos + 1
        elif t in (0xDC, 0xDD, 0xDE, 0xDF):
            size = 2 if t in (0xDC, 0xDE) else 4
            if pos + 1 + size > end:
                return None
            n = int.from_bytes(raw[pos + 1 : pos + 1 + size], "big")
            pending, pos = pending + (2 * n if t >= 0xDE else n), pos + 1 + size
        elif t in _FIXED:
            pos += 1 + _FIXED[t]
        elif 0xD4 <= t <= 0xD8:
            pos += 2 + (1 << (t - 0xD4))
        else:  # str (fixstr or 0xd9-0xdb), bin, ext
            if t <= 0xBF:
                size, extra, n = 0, 0, t & 0x1F
            else:
                size, extra = _SIZED[t]
                if pos + 1 + size > end:
                    return None
                n = int.from_bytes(raw[pos + 1 : pos + 1 + size], "big")
            start = pos + 1 + size + extra
            if (t <= 0xBF or t >= 0xD9) and start + n <= end:
                try:
                    raw[start : start + n].decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (
                        f"a str that is not UTF-8 ({exc.reason}) at offset "
                        f"{start + exc.start} of the frame"
                    )
            pos = start + n
    return None


class _Nested(Exception):
    """Raised inside msgpack by `FrameDecoder`'s hooks: a second map or list in a frame."""


_BIN_LEN = {0xC4: (1, ">B"), 0xC5: (2, ">H"), 0xC6: (4, ">I")}
_STR_LEN = {0xD9: (1, ">B"), 0xDA: (2, ">H"), 0xDB: (4, ">I")}
#: Keys of the format; values under other keys are skipped (but must be scalars).
_KEYS = frozenset(
    ("kind", "seq", "dtype", "shape", "count", "data", "origin", "type", "message")
    + ("traceback", "bases")
)
#: The keys whose value is a list (of scalars).
_LIST_KEYS = frozenset(("shape", "bases"))


def _container(t: int) -> str | None:
    """What the msgpack type byte `t` opens, if it is not a scalar: map, list or ext."""
    if 0x80 <= t <= 0x8F or t in (0xDE, 0xDF):
        return "map"
    if 0x90 <= t <= 0x9F or t in (0xDC, 0xDD):
        return "list"
    if 0xC7 <= t <= 0xC9 or 0xD4 <= t <= 0xD8:
        return "msgpack ext value"
    return None


def _str_len(raw: bytes, at: int) -> int | None:
    """The length of the str starting at `raw[at]` (-1: not a str; None: incomplete)."""
    t = raw[at]
    if 0xA0 <= t <= 0xBF:
        return t & 0x1F
    size = _STR_LEN.get(t)
    if size is None:
        return -1
    if at + 1 + size[0] > len(raw):
        return None
    n: int = struct.unpack_from(size[1], raw, at + 1)[0]
    return n


def _walk_header(
    raw: bytes, max_text: int
) -> tuple[str, dict[str, Any], int, int, str, str | None]:
    """Walk a frame's leading bytes without building any container.

    Returns `(status, header, payload offset, payload length, reason, key)`; status is
    `"ok"` (a map whose last key is `data`, a bin: its payload can go straight into an
    array), `"incomplete"` (`raw` ends first), `"no"` (a frame of another shape: the
    normal path decodes it and says what is wrong, if anything) or `"bad"`: it breaks the
    format's bounds (`reason`, and the `key` it happened under).
    """

    def bad(
        reason: str, key: str | None = None
    ) -> tuple[str, dict[str, Any], int, int, str, str | None]:
        return "bad", header, 0, 0, reason[:300], None if key is None else key[:64]

    header: dict[str, Any] = {}
    if not raw:
        return "incomplete", header, 0, 0, "", None
    top = _container(raw[0])
    if top is not None and top != "map":
        kind = "list" if top == "list" else "ExtType"
        return bad(f"a frame must be a msgpack map, got {kind}")
    if top is None:
        return "no", header, 0, 0, "", None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(raw))
    unpacker.feed(raw)
    try:
        n = unpacker.read_map_header()
        if n > MAX_FRAME_ENTRIES:
            return bad(f"a frame map of {n} entries (at most {MAX_FRAME_ENTRIES})")
        for i in range(n):
            at = unpacker.tell()
            if at >= len(raw):
                return "incomplete", header, 0, 0, "", None
            length = _str_len(raw, at)
            if length is None:
                return "incomplete", header, 0, 0, "", None
            if length < 0:
                return bad(f"a key that is not a string (msgpack type 0x{raw[at]:02x})")
            if length > max_text:
                return bad(f"a key of {length} bytes (strings: at most {max_text})")
            key = unpacker.unpack()
            at = unpacker.tell()
            if at >= len(raw):
                return "incomplete", header, 0, 0, "", None
            what = _container(raw[at])
            if what is not None and key == "data":
                return bad(f"data must be msgpack bin, got a {what}", key)
            if what is not None and what != "list":
                return bad(
                    f"ill-typed value: a {what} under key {key!r} (frame values are scalars)", key
                )
            if what == "list":
                if key not in _LIST_KEYS:
                    return bad(
                        f"ill-typed value: a list under key {key!r} (only shape is a list)", key
                    )
                must = f"{key} must be a list of at most {MAX_SHAPE_DIMS} scalars"
                if key == "shape":
                    must = f"shape must be a list of at most {MAX_SHAPE_DIMS} non-negative integers"
                m = unpacker.read_array_header()
                if m > MAX_SHAPE_DIMS:
                    return bad(f"{must}, got {m} entries", key)
                values = []
                for _ in range(m):
                    at = unpacker.tell()
                    if at >= len(raw):
                        return "incomplete", header, 0, 0, "", None
                    if _container(raw[at]) is not None:
                        return bad(f"{must}, got a {_container(raw[at])} in it", key)
                    length = _str_len(raw, at)
                    if length is not None and length > max_text:
                        return bad(f"a string of {length} bytes in {key} (at most {max_text})", key)
                    values.append(unpacker.unpack())
                header[key] = values
                continue
            length = _str_len(raw, at)
            if length is not None and length > max_text:
                return bad(
                    f"a string of {length} bytes under key {key!r} (at most {max_text})", key
                )
            if key == "data" and i == n - 1:
                size = _BIN_LEN.get(raw[at])
                if size is None:
                    return "no", header, 0, 0, "", None
                if at + 1 + size[0] > len(raw):
                    return "incomplete", header, 0, 0, "", None
                (nbytes,) = struct.unpack_from(size[1], raw, at + 1)
                return "ok", header, at + 1 + size[0], nbytes, "", None
            if key in _KEYS and key != "data":
                header[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except msgpack.OutOfData:
        return "incomplete", header, 0, 0, "", None
    except Exception:
        return "no", header, 0, 0, "", None
    return "no", header, 0, 0, "", None


def _check_extras(obj: dict[Any, Any], index: int) -> None:
    """Refuse keys that are not strings, and maps or lists under keys the format lacks."""
    for key, value in obj.items():
        if type(key) is not str:
            raise RemoteProtocolError(
                f"a key that is not a string: {key!r}"[:200], frame_index=index
            )
        if key not in _KEYS and type(value) in (dict, list):
            what = "map" if type(value) is dict else "list"
            raise RemoteProtocolError(
                f"ill-typed value: a {what} under key {key!r} (frame values are scalars)"[:300],
                frame_index=index,
                key=key[:64],
            )
