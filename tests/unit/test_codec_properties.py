"""Codec properties: random arrays round-trip under any chunking; bad input only ever raises
a `ProtocolError`, and never yields a frame over the limit."""

from __future__ import annotations

import time
from itertools import cycle
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
from hypothesis import HealthCheck, event, given, settings, strategies as st

from ndrelay._codec import SPILL_THRESHOLD, FrameDecoder, encode_frame, encode_frame_parts
from ndrelay._exceptions import FrameTooLarge, ProtocolError, RemoteProtocolError
from ndrelay._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

SMALL_LIMIT = 4096


def bounded(max_examples: int) -> settings:
    """Few enough examples that the whole file runs in well under 30 s."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- strategies ---------------------------------------------------------------------------------

NUMERIC_DTYPES = st.one_of(
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.boolean_dtypes(),
)
ALL_DTYPES = st.one_of(
    NUMERIC_DTYPES,
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(endianness="?", min_len=1, max_len=6),
    hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=3),
)


def non_contiguous(draw: Any, arr: np.ndarray) -> np.ndarray:
    """`arr`, or a strided view of it: a step slice, a transpose, a reversal."""
    how = draw(st.sampled_from(["plain", "plain", "transpose", "step", "reverse"]))
    if arr.ndim == 0 or how == "plain":
        return arr
    if how == "transpose":
        return arr.T
    axis = draw(st.integers(0, arr.ndim - 1))
    index: list[slice] = [slice(None)] * arr.ndim
    index[axis] = (
        slice(None, None, draw(st.integers(2, 3))) if how == "step" else slice(None, None, -1)
    )
    return arr[tuple(index)]


@st.composite
def small_arrays(draw: Any) -> np.ndarray:
    dtype = draw(ALL_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    return non_contiguous(draw, draw(hnp.arrays(dtype, shape)))


@st.composite
def large_arrays(draw: Any, max_bytes: int = 200 * 1024) -> np.ndarray:
    """Random bits of a numeric dtype, some past SPILL_THRESHOLD, in a 1-D to 3-D layout."""
    dtype = draw(NUMERIC_DTYPES)
    nbytes = draw(st.integers(SPILL_THRESHOLD + 1024, max_bytes))
    seed = draw(st.integers(0, 2**32 - 1))
    n = nbytes // dtype.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    arr = raw.view(dtype)
    cols = draw(st.sampled_from([1, 2, 3, 16]))
    arr = arr[: n - n % cols].reshape(-1, cols)
    if draw(st.booleans()):
        arr = arr.reshape(2, -1, cols) if arr.shape[0] % 2 == 0 else arr
    return non_contiguous(draw, arr)


@st.composite
def large_bytes(draw: Any) -> bytes:
    n = draw(st.integers(SPILL_THRESHOLD - 100, 150_000))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def items(large: bool = True) -> st.SearchStrategy[Any]:
    options = [small_arrays(), st.binary(max_size=300)]
    if large:
        options += [large_arrays(), large_bytes()]
    return st.one_of(*options)


TEXT = st.text(max_size=50)


@st.composite
def streams(draw: Any, large: bool = True, max_items: int = 6) -> list[Frame]:
    """Data frames (some batched), heartbeats in between, and maybe a terminal frame.

    With `large`, at least one item is large (most of them past SPILL_THRESHOLD).
    """
    frames: list[Frame] = []
    seq = draw(st.integers(0, 2**40))
    chosen = draw(st.lists(items(large), max_size=max_items))
    if large:
        big = draw(st.one_of(large_arrays(), large_bytes()))
        chosen.insert(draw(st.integers(0, len(chosen))), big)
    for item in chosen:
        if draw(st.integers(0, 4)) == 0:
            frames.append(HeartbeatFrame())
        count = None
        if isinstance(item, np.ndarray) and item.ndim >= 1 and draw(st.booleans()):
            count = item.shape[0]
        frames.append(DataFrame(seq, item, count))
        seq += count if count is not None else 1
    end = draw(st.sampled_from(["end", "error", "none"]))
    if end == "end":
        frames.append(EndFrame(seq))
    elif end == "error":
        frames.append(
            ErrorFrame(
                seq=seq,
                origin=draw(st.sampled_from(["producer", "relay"])),
                type=draw(TEXT),
                message=draw(TEXT),
                traceback=draw(TEXT),
            )
        )
    return frames


def encode_stream(frames: list[Frame], draw: Any) -> bytes:
    parts: list[bytes] = []
    for frame in frames:  # both encoders, at random: they must agree
        if draw(st.booleans()):
            parts.append(encode_frame(frame))
        else:
            parts.append(b"".join(encode_frame_parts(frame)))
    return b"".join(parts)


# -- drivers ------------------------------------------------------------------------------------


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(raw), *(min(c, len(raw)) for c in cuts)})
    return [raw[a:b] for a, b in zip(points, points[1:], strict=False)]


class Outcome:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.error: ProtocolError | None = None
        self.clean_eof = False
        self.zero_copy_bytes = 0


def check_limit(decoder: FrameDecoder, limit: int) -> None:
    buf = decoder.get_buffer()
    assert buf is None or len(buf) <= limit


def run_feed(chunks: list[bytes], limit: int | None = None) -> Outcome:
    """Feed `chunks`, collect frames; only a ProtocolError may come out."""
    decoder = FrameDecoder() if limit is None else FrameDecoder(max_frame_size=limit)
    out = Outcome()
    started = time.monotonic()
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            if limit is not None:
                check_limit(decoder, limit)
            for frame in decoder.frames():
                out.frames.append(frame)
        decoder.feed_eof()
        out.clean_eof = True
    except ProtocolError as exc:  # anything else fails the test
        out.error = exc
    assert time.monotonic() - started < 20, "decoder too slow: pathological input handling?"
    check_outcome(out, limit)
    return out


def run_get_buffer(raw: bytes, recv_sizes: list[int], limit: int | None = None) -> Outcome:
    """Read like `recv_into`: into `get_buffer()` when offered, else through `feed`."""
    decoder = FrameDecoder() if limit is None else FrameDecoder(max_frame_size=limit)
    out = Outcome()
    pos = 0
    sizes = cycle(recv_sizes)
    try:
        while pos < len(raw):
            size = next(sizes)
            buf = decoder.get_buffer()
            if buf is not None:
                n = min(len(buf), size, len(raw) - pos)
                assert n > 0  # always progress: never a zero-length buffer
                buf[:n] = raw[pos : pos + n]
                decoder.buffer_updated(n)
                out.zero_copy_bytes += n
            else:
                n = min(size, len(raw) - pos)
                decoder.feed(raw[pos : pos + n])
            pos += n
            if limit is not None:
                check_limit(decoder, limit)
            for frame in decoder.frames():
                out.frames.append(frame)
        decoder.feed_eof()
        out.clean_eof = True
    except ProtocolError as exc:
        out.error = exc
    check_outcome(out, limit)
    return out


def check_outcome(out: Outcome, limit: int | None) -> None:
    for frame in out.frames:
        assert isinstance(frame, DataFrame | EndFrame | ErrorFrame | HeartbeatFrame)
        if isinstance(frame, DataFrame):
            assert type(frame.data) is bytes or isinstance(frame.data, np.ndarray)
            if limit is not None:
                size = frame.data.nbytes if isinstance(frame.data, np.ndarray) else len(frame.data)
                assert size <= limit
            if isinstance(frame.data, np.ndarray):
                assert frame.data.flags.writeable
                if frame.count is not None:
                    assert frame.data.shape[0] == frame.count
    if out.error is not None:
        assert isinstance(out.error, RemoteProtocolError)
        # every good frame before the failure came out first; the index says which failed
        assert out.error.frame_index == len(out.frames)


def assert_same(got: Frame, want: Frame) -> None:
    assert type(got) is type(want)
    if not isinstance(want, DataFrame):
        assert got == want
        return
    assert isinstance(got, DataFrame)
    assert (got.seq, got.count) == (want.seq, want.count)
    if isinstance(want.data, np.ndarray):
        arr = got.data
        assert isinstance(arr, np.ndarray)
        assert arr.dtype.str == want.data.dtype.str
        assert arr.shape == want.data.shape
        assert arr.flags.writeable and arr.flags.c_contiguous
        # bit-exact, so NaN payloads, -0.0 and complex parts are all checked
        assert arr.tobytes() == np.ascontiguousarray(want.data).tobytes()
        if want.data.dtype.kind in "fc":
            assert np.array_equal(arr, want.data, equal_nan=True)
        elif want.data.dtype.kind in "biuSU":
            assert np.array_equal(arr, want.data)
        if want.count is not None:
            rows = got.items()
            assert len(rows) == want.count
    else:
        assert type(got.data) is bytes
        assert got.data == want.data


def assert_stream(got: list[Frame], want: list[Frame]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


# -- round trips --------------------------------------------------------------------------------


@bounded(120)
@given(frames=streams(large=False, max_items=8), data=st.data())
def test_round_trip_small_items_any_split(frames: list[Frame], data: st.DataObject) -> None:
    raw = encode_stream(frames, data.draw)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30), label="cuts")
    out = run_feed(split(raw, cuts))
    assert out.error is None and out.clean_eof
    assert_stream(out.frames, frames)


@bounded(40)
@given(frames=streams(large=True, max_items=4), data=st.data())
def test_round_trip_large_items_any_split(frames: list[Frame], data: st.DataObject) -> None:
    raw = encode_stream(frames, data.draw)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    out = run_feed(split(raw, cuts))
    assert out.error is None and out.clean_eof
    assert_stream(out.frames, frames)
    big = sum(len(encode_frame(f)) > SPILL_THRESHOLD for f in frames)
    event(f"frames past SPILL_THRESHOLD: {min(big, 2)}")


@bounded(40)
@given(
    frames=streams(large=True, max_items=4),
    recv_sizes=st.lists(
        st.one_of(st.integers(1, 64), st.integers(512, 70_000), st.integers(1, 300_000)),
        min_size=1,
        max_size=8,
    ),
    data=st.data(),
)
def test_round_trip_through_get_buffer(
    frames: list[Frame], recv_sizes: list[int], data: st.DataObject
) -> None:
    raw = encode_stream(frames, data.draw)
    if len(raw) > 50_000 and min(recv_sizes) < 64:  # keep byte-sized reads to small streams
        recv_sizes = [max(s, 997) for s in recv_sizes]
    out = run_get_buffer(raw, recv_sizes)
    assert out.error is None and out.clean_eof
    assert_stream(out.frames, frames)
    event(f"zero-copy path used: {out.zero_copy_bytes > 0}")


@bounded(60)
@given(arr=st.one_of(small_arrays(), large_arrays(max_bytes=100_000)), seq=st.integers(0, 2**63))
def test_single_array_frame_matches_the_documented_map(arr: np.ndarray, seq: int) -> None:
    obj = msgpack.unpackb(encode_frame(DataFrame(seq, arr)))
    assert set(obj) == {"kind", "seq", "dtype", "shape", "data"}
    assert list(obj)[-1] == "data"
    assert obj["kind"] == "data" and obj["seq"] == seq
    assert obj["dtype"] == arr.dtype.str
    assert obj["shape"] == list(arr.shape)
    assert obj["data"] == np.ascontiguousarray(arr).tobytes()


# -- robustness ---------------------------------------------------------------------------------


@bounded(300)
@given(
    garbage=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
    limit=st.sampled_from([None, SMALL_LIMIT, 64]),
)
def test_garbage_only_raises_protocol_errors(
    garbage: bytes, cuts: list[int], limit: int | None
) -> None:
    run_feed(split(garbage, cuts), limit)


@bounded(150)
@given(
    prefix=st.sampled_from([b"", b"\x85", b"\x86\xa4kind\xa4data", b"\xdf\xff\xff\xff\xff"]),
    garbage=st.binary(max_size=2000),
    recv_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
    limit=st.sampled_from([None, SMALL_LIMIT]),
)
def test_garbage_through_get_buffer(
    prefix: bytes, garbage: bytes, recv_sizes: list[int], limit: int | None
) -> None:
    run_get_buffer(prefix + garbage, recv_sizes, limit)


def frame_ends(parts: list[bytes]) -> list[int]:
    """End offset of each encoded frame in their concatenation."""
    ends, pos = [], 0
    for part in parts:
        pos += len(part)
        ends.append(pos)
    return ends


mutation_streams = streams(large=False, max_items=6).filter(lambda f: len(f) > 0)


@st.composite
def big_item_streams(draw: Any) -> list[Frame]:
    """Streams that also hold items over SMALL_LIMIT (and some past SPILL_THRESHOLD)."""
    frames = draw(mutation_streams)
    extra = draw(st.sampled_from([5000, 20_000, SPILL_THRESHOLD + 500]))
    at = draw(st.integers(0, len(frames)))
    big = DataFrame(0, np.arange(extra // 4, dtype="<i4"))
    return frames[:at] + [big] + frames[at:]


@bounded(120)
@given(frames=mutation_streams, data=st.data())
def test_truncated_stream_yields_the_whole_frames_then_reports_truncation(
    frames: list[Frame], data: st.DataObject
) -> None:
    parts = [encode_frame(f) for f in frames]
    raw = b"".join(parts)
    ends = frame_ends(parts)
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=8), label="cuts")
    out = run_feed(split(raw[:cut], cuts))
    whole = sum(1 for e in ends if e <= cut)
    assert_stream(out.frames, frames[:whole])
    if cut in ends or cut == 0:
        assert out.error is None and out.clean_eof
    else:
        assert out.error is not None
        assert not isinstance(out.error, FrameTooLarge)
        assert "truncated" in str(out.error)
        assert out.error.frame_index == whole


@bounded(200)
@given(
    frames=st.one_of(mutation_streams, big_item_streams()),
    limit=st.sampled_from([None, SMALL_LIMIT]),
    data=st.data(),
)
def test_corrupted_stream_only_raises_protocol_errors(
    frames: list[Frame], limit: int | None, data: st.DataObject
) -> None:
    parts = [encode_frame(f) for f in frames]
    raw = bytearray(b"".join(parts))
    ends = frame_ends(parts)
    edits = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "flip", "delete", "insert", "truncate"]),
                st.integers(0, len(raw) - 1),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=4,
        ),
        label="edits",
    )
    first = len(raw)
    for op, pos, value in edits:
        pos = min(pos, len(raw) - 1) if raw else 0
        first = min(first, pos)
        if not raw:
            break
        if op == "flip":
            raw[pos] ^= 1 << (value % 8)
        elif op == "delete":
            del raw[pos]
        elif op == "insert":
            raw.insert(pos, value)
        else:
            del raw[pos:]
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    out = run_feed(split(bytes(raw), cuts), limit)
    # Frames wholly before the first edit are untouched and must come out as they were,
    # up to the first one over the limit (which is refused).
    intact = [f for f, end in zip(frames, ends, strict=True) if end <= first]
    if limit is not None:
        for i, part in enumerate(parts[: len(intact)]):
            if len(part) > limit:
                intact = intact[:i]
                break
    assert len(out.frames) >= len(intact)
    assert_stream(out.frames[: len(intact)], intact)


@bounded(60)
@given(frames=big_item_streams(), data=st.data())
def test_small_limit_refuses_exactly_the_big_frames(
    frames: list[Frame], data: st.DataObject
) -> None:
    parts = [encode_frame(f) for f in frames]
    raw = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10), label="cuts")
    out = run_feed(split(raw, cuts), SMALL_LIMIT)
    first_big = next(i for i, p in enumerate(parts) if len(p) > SMALL_LIMIT)
    assert isinstance(out.error, FrameTooLarge)
    assert out.error.frame_index == first_big
    assert_stream(out.frames, frames[:first_big])


@st.composite
def mutated_large_frames(draw: Any) -> bytes:
    """A large data frame whose header (only) has random bit flips, then an `end` frame.

    The payload is past SPILL_THRESHOLD, so the decoder parses the header on its own and
    then writes the payload straight into memory: that header parser meets the garbage.
    """
    nbytes = draw(st.integers(SPILL_THRESHOLD, 150_000))
    if draw(st.booleans()):
        item: Any = bytes(nbytes)
    else:
        item = np.zeros(nbytes // 8, dtype=draw(st.sampled_from(["<f8", ">i8", "<c8"])))
    header, payload = encode_frame_parts(DataFrame(draw(st.integers(0, 2**40)), item))
    header = bytearray(header)
    for pos, bit in draw(
        st.lists(st.tuples(st.integers(0, len(header) - 1), st.integers(0, 7)), max_size=3)
    ):
        header[pos] ^= 1 << bit
    return bytes(header) + bytes(payload) + encode_frame(EndFrame(1))


@bounded(150)
@given(
    raw=mutated_large_frames(),
    recv_sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=5),
    limit=st.sampled_from([None, 100_000]),
    zero_copy=st.booleans(),
)
def test_mutated_large_headers_only_raise_protocol_errors(
    raw: bytes, recv_sizes: list[int], limit: int | None, zero_copy: bool
) -> None:
    recv_sizes = [max(s, 512) for s in recv_sizes]  # bounded work per example
    if zero_copy:
        run_get_buffer(raw, recv_sizes, limit)
    else:
        run_feed(split(raw, list(np.cumsum(recv_sizes * 20))), limit)
