"""The sans-I/O frame codec (DESIGN.md §2): wire maps, zero-copy encoding, incremental decoding."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import numpy as np
import pytest

from ndrelay._codec import (
    DEFAULT_MAX_FRAME_SIZE,
    SPILL_THRESHOLD,
    FrameDecoder,
    check_dtype,
    encode_data_parts,
    encode_frame,
    encode_frame_parts,
)
from ndrelay._exceptions import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from ndrelay._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

MiB = 1024 * 1024

# -- helpers ------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def feed_chunks(decoder: FrameDecoder, raw: bytes, size: int) -> list[Frame]:
    out: list[Frame] = []
    view = memoryview(raw)
    for i in range(0, len(raw), size):
        decoder.feed(view[i : i + size])
        out.extend(decoder.frames())
    return out


def decode(raw: bytes, chunk: int | None = None, **kwargs: Any) -> list[Frame]:
    """Decode a whole body fed in chunks of `chunk` bytes (all at once if None)."""
    decoder = FrameDecoder(**kwargs)
    frames = feed_chunks(decoder, raw, chunk or max(len(raw), 1))
    assert not decoder.has_partial
    decoder.feed_eof()
    return frames


def decode_zero_copy(
    raw: bytes, recv_size: int, *, every: int = 1, **kwargs: Any
) -> tuple[list[Frame], list[memoryview], int]:
    """Decode like a `recv_into` reader: into `get_buffer()` when offered, else `feed`.

    With `every=2`, only every other offered buffer is used (the reader feeds the other
    times), so chunks that end a payload and start the next frame go through `feed` too.
    Returns the frames, every buffer that was written into, and the bytes written so.
    """
    decoder = FrameDecoder(**kwargs)
    frames: list[Frame] = []
    used: list[memoryview] = []
    pos = offered = written = 0
    while pos < len(raw):
        buf = decoder.get_buffer()
        if buf is not None:
            offered += 1
        if buf is not None and offered % every == 0:
            n = min(len(buf), recv_size, len(raw) - pos)
            assert n > 0
            buf[:n] = raw[pos : pos + n]
            used.append(buf)
            written += n
            decoder.buffer_updated(n)
        else:
            n = min(recv_size, len(raw) - pos)
            decoder.feed(raw[pos : pos + n])
        pos += n
        frames.extend(decoder.frames())
    assert decoder.get_buffer() is None
    decoder.feed_eof()
    return frames, used, written


def assert_same_frame(got: Frame, want: Frame) -> None:
    assert type(got) is type(want)
    if isinstance(want, DataFrame):
        assert isinstance(got, DataFrame)
        assert got.seq == want.seq
        assert got.count == want.count
        if isinstance(want.data, np.ndarray):
            expected = np.asarray(want.data)
            assert isinstance(got.data, np.ndarray)
            assert got.data.dtype == expected.dtype
            assert got.data.dtype.str == expected.dtype.str  # byte order included
            assert got.data.shape == expected.shape
            assert got.data.tobytes() == expected.tobytes()
            assert got.data.flags.writeable
            assert got.data.flags.c_contiguous
        else:
            assert type(got.data) is bytes
            assert got.data == bytes(want.data)
    else:
        assert got == want


def assert_same_frames(got: list[Frame], want: list[Frame]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_same_frame(g, w)


def rng_array(nbytes: int, dtype: str = "<f4", seed: int = 0) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, nbytes - nbytes % dt.itemsize, np.uint8)
    return raw.view(dt)


# -- frames used throughout ------------------------------------------------------------------

SAMPLES: dict[str, Frame] = {
    "array-f4": DataFrame(0, np.arange(12, dtype="<f4").reshape(3, 4)),
    "array-big-endian": DataFrame(1, np.arange(6, dtype=">i8").reshape(2, 3)),
    "array-0d": DataFrame(2, np.array(3.5, dtype="<f8")),
    "array-empty": DataFrame(3, np.zeros((0, 5), dtype="<u2")),
    "array-bool": DataFrame(4, np.array([True, False, True])),
    "array-complex": DataFrame(5, np.array([1 + 2j, -0.0 - 1j], dtype=">c16")),
    "array-datetime": DataFrame(6, np.array(["2024-01-01T00:00", "NaT"], dtype="<M8[us]")),
    "array-bytes-str": DataFrame(7, np.array([b"ab", b"c"], dtype="|S2")),
    "array-unicode": DataFrame(8, np.array(["héllo", "w"], dtype="<U5")),
    "bytes": DataFrame(9, b"hello\x00world"),
    "bytes-empty": DataFrame(10, b""),
    "batched": DataFrame(11, np.arange(24, dtype="<i2").reshape(3, 2, 4), count=3),
    "batched-empty": DataFrame(12, np.zeros((0, 3), dtype="<f4"), count=0),
    "end": EndFrame(13),
    "error": ErrorFrame(
        seq=14, origin="producer", type="ValueError", message="boom", traceback="tb\n"
    ),
    "error-relay": ErrorFrame(seq=0, origin="relay", type="StreamDeleted", message=""),
    "heartbeat": HeartbeatFrame(),
}
SAMPLE_IDS = list(SAMPLES)


def expected_map(frame: Frame) -> dict[str, Any]:
    """The documented map of DESIGN.md §2, written out by hand."""
    if isinstance(frame, DataFrame):
        if isinstance(frame.data, bytes):
            return {"kind": "data", "seq": frame.seq, "data": frame.data}
        arr = frame.data
        d: dict[str, Any] = {
            "kind": "data",
            "seq": frame.seq,
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
        }
        if frame.count is not None:
            d["count"] = frame.count
        d["data"] = np.ascontiguousarray(arr).tobytes()
        return d
    if isinstance(frame, EndFrame):
        return {"kind": "end", "seq": frame.seq}
    if isinstance(frame, ErrorFrame):
        return {
            "kind": "error",
            "seq": frame.seq,
            "origin": frame.origin,
            "type": frame.type,
            "message": frame.message,
            "traceback": frame.traceback,
        }
    assert isinstance(frame, HeartbeatFrame)
    return {"kind": "heartbeat"}


# -- encoding: the wire map -------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_encoded_frame_is_the_documented_map(name: str) -> None:
    frame = SAMPLES[name]
    obj = msgpack.unpackb(encode_frame(frame))
    want = expected_map(frame)
    assert obj == want
    assert set(obj) == set(want)
    if isinstance(frame, DataFrame):
        assert list(obj)[-1] == "data"
        assert type(obj["data"]) is bytes  # a msgpack bin, not a str


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_encode_frame_parts_join_to_encode_frame(name: str) -> None:
    frame = SAMPLES[name]
    assert b"".join(encode_frame_parts(frame)) == encode_frame(frame)


def test_stream_body_is_read_by_a_plain_streaming_unpacker() -> None:
    frames = list(SAMPLES.values())
    body = b"".join(encode_frame(f) for f in frames)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    assert list(unpacker) == [expected_map(f) for f in frames]


@pytest.mark.parametrize(
    ("seq", "size"),
    [(0, 0), (127, 1), (128, 255), (2**16, 256), (2**32, 65535), (2**63, 65536)],
)
def test_bytes_frame_integer_and_bin_widths(seq: int, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = DataFrame(seq, payload)
    assert msgpack.unpackb(encode_frame(frame)) == {"kind": "data", "seq": seq, "data": payload}
    assert_same_frames(decode(encode_frame(frame)), [frame])


# -- encoding: zero copy, contiguity, dtypes ---------------------------------------------------


def test_contiguous_array_payload_is_the_array_memory() -> None:
    arr = np.arange(1000, dtype="<f8").reshape(10, 100)
    parts = encode_frame_parts(DataFrame(0, arr))
    assert len(parts) == 2
    assert isinstance(parts[0], bytes)
    payload = np.frombuffer(parts[-1], np.uint8)
    assert np.shares_memory(payload, arr)
    assert payload.ctypes.data == arr.ctypes.data
    assert payload.nbytes == arr.nbytes
    arr[0, 0] = 42.0  # the part is a view: it sees later writes
    assert np.frombuffer(parts[-1], "<f8")[0] == 42.0


def test_batched_and_big_endian_payloads_are_not_copied() -> None:
    arr = np.arange(60, dtype=">i4").reshape(5, 12)
    parts = encode_data_parts(7, arr, count=5)
    assert np.shares_memory(np.frombuffer(parts[-1], np.uint8), arr)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_payload_is_not_copied(kind: type) -> None:
    backing = bytearray(b"abcdef" * 100)
    data = {bytes: bytes(backing), bytearray: backing, memoryview: memoryview(backing)}[kind]
    parts = encode_frame_parts(DataFrame(0, data))
    assert len(parts) == 2
    payload = parts[-1]
    assert isinstance(payload, memoryview)
    assert bytes(payload) == bytes(data)
    if kind is not bytes:
        backing[0] = ord("Z")
        assert bytes(payload)[0] == ord("Z")
    assert_same_frames(decode(b"".join(parts)), [DataFrame(0, bytes(data))])


def test_read_only_array_encodes_without_copy() -> None:
    arr = np.arange(10, dtype="<i4")
    arr.flags.writeable = False
    parts = encode_frame_parts(DataFrame(0, arr))
    assert np.shares_memory(np.frombuffer(parts[-1], np.uint8), arr)


def _base() -> np.ndarray:
    return np.arange(4 * 6 * 5, dtype="<i4").reshape(4, 6, 5)


NON_CONTIGUOUS = {
    "column-step": lambda: np.arange(40, dtype="<f4").reshape(4, 10)[:, ::2],
    "transposed": lambda: np.arange(12, dtype="<f8").reshape(3, 4).T,
    "reversed": lambda: np.arange(10, dtype=">u2")[::-1],
    "3d-transposed": lambda: _base().transpose(2, 0, 1),
    "fortran": lambda: np.asfortranarray(np.arange(12, dtype="<c8").reshape(3, 4)),
    "row-step-big-endian": lambda: np.arange(30, dtype=">f8").reshape(10, 3)[::3],
    "bool-step": lambda: (np.arange(20) % 3 == 0)[1::2],
}


@pytest.mark.parametrize("name", list(NON_CONTIGUOUS))
@pytest.mark.parametrize("batched", [False, True])
def test_non_contiguous_arrays_encode_correctly(name: str, batched: bool) -> None:
    arr = NON_CONTIGUOUS[name]()
    assert not arr.flags.c_contiguous
    count = arr.shape[0] if batched else None
    raw = encode_frame(DataFrame(3, arr, count))
    obj = msgpack.unpackb(raw)
    assert obj["dtype"] == arr.dtype.str
    assert obj["shape"] == list(arr.shape)
    assert obj["data"] == np.ascontiguousarray(arr).tobytes()
    (got,) = decode(raw)
    assert isinstance(got, DataFrame)
    assert got.count == count
    assert np.array_equal(got.data, arr)
    assert got.data.dtype.str == arr.dtype.str
    # made contiguous once: the payload part is a fresh contiguous copy, not the input
    parts = encode_frame_parts(DataFrame(3, arr, count))
    assert not np.shares_memory(np.frombuffer(parts[-1], np.uint8), arr)


@pytest.mark.parametrize(
    "scalar",
    [np.float32(1.5), np.int64(-7), np.bool_(True), np.complex128(1 - 2j), np.uint8(255)],
    ids=lambda s: type(s).__name__,
)
def test_numpy_scalar_encodes_as_0d_array(scalar: np.generic) -> None:
    raw = encode_frame(DataFrame(0, scalar))  # type: ignore[arg-type]
    obj = msgpack.unpackb(raw)
    assert obj["shape"] == []
    assert obj["dtype"] == scalar.dtype.str
    (got,) = decode(raw)
    assert isinstance(got, DataFrame)
    assert isinstance(got.data, np.ndarray)
    assert got.data.shape == ()
    assert got.data.dtype == scalar.dtype
    assert got.data[()] == scalar


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.array([1, "a", None], dtype=object),
        lambda: np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]),
        lambda: np.zeros(3, dtype="V4"),
        lambda: np.zeros(2, dtype=np.dtype(("<f4", (2,)), align=False)).view("V8"),
        lambda: np.rec.array([(1, 2.0)], dtype=[("x", "<i4"), ("y", "<f8")]),
        lambda: np.empty(3, dtype=[]),
    ],
    ids=["object", "structured", "void", "void-view", "recarray", "empty-struct"],
)
def test_unsupported_dtypes_refused_locally(make: Any) -> None:
    arr = make()
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(DataFrame(0, arr))
    assert info.value.key == "dtype"
    assert "dtype" in str(info.value)
    with pytest.raises(LocalProtocolError):
        encode_frame_parts(DataFrame(0, arr))
    with pytest.raises(LocalProtocolError):
        encode_frame(DataFrame(0, arr, count=len(arr)))


def test_object_numpy_scalar_refused() -> None:
    with pytest.raises(LocalProtocolError):
        encode_data_parts(0, np.void(b"abcd"))


@pytest.mark.parametrize("dtype", ["O", "V4", "S0", "U0", [("a", "<f4")]], ids=str)
def test_check_dtype_refuses(dtype: Any) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        check_dtype(np.dtype(dtype))


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "|b1", "<M8[ns]", ">m8[10ms]", "|S3", ">U2"])
def test_check_dtype_accepts(dtype: str) -> None:
    assert check_dtype(dtype) == np.dtype(dtype)
    assert check_dtype(np.dtype(dtype)).str == np.dtype(dtype).str


@pytest.mark.parametrize(
    ("data", "count"),
    [
        (np.zeros((3, 2)), 2),
        (np.zeros((3, 2)), 4),
        (np.zeros((3, 2)), -1),
        (np.zeros(()), 1),
        (np.zeros((0, 2)), 1),
        (b"abc", 1),
        (bytearray(b"abc"), 3),
    ],
    ids=["fewer", "more", "negative", "0d", "empty-vs-1", "bytes", "bytearray"],
)
def test_batched_count_must_match_leading_axis(data: Any, count: int) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(DataFrame(0, data, count=count))
    assert info.value.key == "count"
    assert isinstance(info.value, ProtocolError)
    assert not isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize("data", [[1, 2, 3], 5, "text", None, 1.5, {"a": 1}])
def test_non_array_data_refused(data: Any) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(DataFrame(0, data))
    assert info.value.key == "data"
    assert type(data).__name__ in str(info.value)


@pytest.mark.parametrize(
    "frame",
    [
        DataFrame(-1, b"x"),
        DataFrame(True, b"x"),  # type: ignore[arg-type]
        DataFrame("3", np.zeros(2)),  # type: ignore[arg-type]
        DataFrame(1.0, np.zeros(2)),  # type: ignore[arg-type]
        DataFrame(2**64, b"x"),
        EndFrame(-1),
        EndFrame(None),  # type: ignore[arg-type]
        ErrorFrame(seq=-2, origin="relay", type="E", message="m"),
    ],
    ids=repr,
)
def test_encode_refuses_a_bad_seq(frame: Frame) -> None:
    """The encoder never emits a frame that readers refuse."""
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(frame)
    assert info.value.key == "seq"
    with pytest.raises(LocalProtocolError):
        encode_frame_parts(frame)


@pytest.mark.parametrize("count", [True, 3.0, "3", np.float64(3)], ids=repr)
def test_encode_refuses_a_non_integer_count(count: Any) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(DataFrame(0, np.zeros((3, 2)), count=count))
    assert info.value.key == "count"


@pytest.mark.parametrize("key", ["origin", "type", "message", "traceback"])
def test_encode_refuses_non_text_error_fields(key: str) -> None:
    fields: dict[str, Any] = {"seq": 1, "origin": "producer", "type": "E", "message": "m"}
    fields[key] = None
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(ErrorFrame(**fields))
    assert info.value.key == key


def test_numpy_integers_are_accepted_as_seq_and_count() -> None:
    arr = np.arange(6, dtype="<i4").reshape(3, 2)
    raw = encode_frame(DataFrame(np.int64(7), arr, count=np.intp(3)))  # type: ignore[arg-type]
    obj = msgpack.unpackb(raw)
    assert (obj["seq"], obj["count"]) == (7, 3)
    assert msgpack.unpackb(encode_frame(EndFrame(np.uint32(9)))) == {"kind": "end", "seq": 9}  # type: ignore[arg-type]
    assert_same_frames(decode(raw), [DataFrame(7, arr, count=3)])


@pytest.mark.parametrize("obj", [Frame(), object(), b"raw", None], ids=repr)
def test_encode_refuses_non_frames(obj: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(obj)


# -- decoding: every frame, every chunking ------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_decode_whole(name: str) -> None:
    frame = SAMPLES[name]
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame))
    assert not decoder.has_partial
    got = list(decoder.frames())
    assert_same_frames(got, [frame])
    assert decoder.frame_index == 1
    assert decoder.next_frame() is None
    decoder.feed_eof()


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_decode_one_byte_at_a_time(name: str) -> None:
    frame = SAMPLES[name]
    raw = encode_frame(frame)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(raw)):
        assert not got
        decoder.feed(raw[i : i + 1])
        got.extend(decoder.frames())
        if i < len(raw) - 1:
            assert decoder.has_partial
    assert not decoder.has_partial
    assert_same_frames(got, [frame])
    decoder.feed_eof()


@pytest.mark.parametrize("name", SAMPLE_IDS)
@pytest.mark.parametrize("extra", [1, 2, 5])
def test_decode_with_trailing_bytes_of_next_frame(name: str, extra: int) -> None:
    frame = SAMPLES[name]
    following = EndFrame(99)
    nxt = encode_frame(following)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame) + nxt[:extra])
    assert_same_frames(list(decoder.frames()), [frame])
    assert decoder.has_partial
    decoder.feed(nxt[extra:])
    assert_same_frames(list(decoder.frames()), [following])
    assert not decoder.has_partial
    decoder.feed_eof()


def test_decode_all_samples_in_one_stream() -> None:
    frames = list(SAMPLES.values())
    body = b"".join(encode_frame(f) for f in frames)
    for chunk in (None, 1, 3, 7, 64):
        assert_same_frames(decode(body, chunk), frames)


@pytest.mark.parametrize("data_type", [bytes, bytearray, memoryview])
def test_feed_accepts_bytes_like(data_type: type) -> None:
    raw = encode_frame(SAMPLES["array-f4"])
    decoder = FrameDecoder()
    decoder.feed(data_type(raw))
    assert_same_frames(list(decoder.frames()), [SAMPLES["array-f4"]])


def test_feed_accepts_multi_byte_memoryviews() -> None:
    end = encode_frame(EndFrame(1))
    item = next(
        DataFrame(0, b"x" * k)
        for k in range(4)
        if (len(encode_frame(DataFrame(0, b"x" * k))) + len(end)) % 4 == 0
    )
    raw = encode_frame(item) + end
    decoder = FrameDecoder()
    view = memoryview(np.frombuffer(raw, dtype="<u4"))
    assert view.itemsize == 4
    decoder.feed(view)
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append(frame)
    assert_same_frames(got, [item, EndFrame(1)])


def test_feeding_empty_input_is_harmless() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    assert not decoder.has_partial
    assert list(decoder.frames()) == []
    decoder.feed_eof()


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i8", ">i8", "<u2", ">u2", "|b1", "<c8", ">c16"])
def test_arrays_come_back_with_declared_dtype_and_writeable(dtype: str) -> None:
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    (got,) = decode(encode_frame(DataFrame(0, arr)))
    assert isinstance(got, DataFrame) and isinstance(got.data, np.ndarray)
    assert got.data.dtype.str == np.dtype(dtype).str
    assert got.data.shape == (2, 3, 4)
    assert np.array_equal(got.data, arr)
    assert got.data.flags.writeable
    got.data[0, 0, 0] = 1  # and really writable


def test_decoded_small_array_does_not_alias_the_input_buffer() -> None:
    raw = bytearray(encode_frame(DataFrame(0, np.arange(4, dtype="<i4"))))
    decoder = FrameDecoder()
    decoder.feed(raw)
    (got,) = decoder.frames()
    raw[-4:] = b"\xff\xff\xff\xff"
    assert isinstance(got, DataFrame)
    assert list(got.data) == [0, 1, 2, 3]


def test_data_frame_items() -> None:
    arr = np.arange(24, dtype="<i2").reshape(3, 2, 4)
    (batched,) = decode(encode_frame(DataFrame(10, arr, count=3)))
    assert isinstance(batched, DataFrame)
    items = batched.items()
    assert len(items) == 3
    for i, item in enumerate(items):
        assert isinstance(item, np.ndarray)
        assert item.shape == (2, 4)
        assert np.array_equal(item, arr[i])
    (single,) = decode(encode_frame(DataFrame(10, arr)))
    assert isinstance(single, DataFrame)
    assert len(single.items()) == 1 and single.items()[0] is single.data
    (raw,) = decode(encode_frame(DataFrame(1, b"xy")))
    assert isinstance(raw, DataFrame)
    assert raw.items() == [b"xy"]
    (empty,) = decode(encode_frame(DataFrame(0, np.zeros((0, 3)), count=0)))
    assert isinstance(empty, DataFrame)
    assert empty.items() == []


def test_keys_in_another_order_decode() -> None:
    """Another writer (e.g. JavaScript) may order keys differently; readers don't care."""
    arr = np.arange(5, dtype="<f4")
    raw = pack({"data": arr.tobytes(), "shape": [5], "seq": 3, "dtype": "<f4", "kind": "data"})
    raw += pack({"seq": 4, "kind": "end"})
    (data, end) = decode(raw, 1)
    assert_same_frame(data, DataFrame(3, arr))
    assert end == EndFrame(4)


def test_unknown_extra_keys_are_ignored() -> None:
    raw = pack({"kind": "end", "seq": 2, "x-note": "hi"}) + pack({"kind": "heartbeat", "n": 1})
    assert decode(raw) == [EndFrame(2), HeartbeatFrame()]


def test_error_frame_traceback_is_optional() -> None:
    raw = pack({"kind": "error", "seq": 1, "origin": "relay", "type": "X", "message": "m"})
    assert decode(raw) == [ErrorFrame(seq=1, origin="relay", type="X", message="m")]


class _SensorError(ValueError):
    pass


def test_error_frame_carries_the_builtin_bases_of_a_users_exception_class() -> None:
    frame = ErrorFrame.from_exception(_SensorError("lidar"), seq=3)
    assert frame.type == "_SensorError"
    assert frame.bases == ("ValueError", "Exception", "BaseException")
    raw = encode_frame(frame)
    assert msgpack.unpackb(raw)["bases"] == ["ValueError", "Exception", "BaseException"]
    (back,) = decode(raw)
    assert back == frame
    exc = back.to_exception("s")
    assert isinstance(exc, ValueError) and exc.remote_type == "_SensorError"
    # a builtin's own name says it all: no bases
    assert ErrorFrame.from_exception(KeyError("k"), seq=0).bases is None
    assert "bases" not in msgpack.unpackb(
        encode_frame(ErrorFrame.from_exception(KeyError(), seq=0))
    )


def test_unknown_bases_are_ignored_and_bad_bases_refused() -> None:
    raw = pack(
        {
            "kind": "error",
            "seq": 0,
            "origin": "producer",
            "type": "X",
            "message": "m",
            "bases": ["NoSuchBase", "LookupError"],
        }
    )
    (frame,) = decode(raw)
    exc = frame.to_exception()
    assert isinstance(exc, LookupError) and not isinstance(exc, KeyError)
    bad = pack(
        {"kind": "error", "seq": 0, "origin": "producer", "type": "X", "message": "m", "bases": [1]}
    )
    with pytest.raises(RemoteProtocolError, match="bases") as info:
        decode(bad)
    assert info.value.key == "bases"


# -- decoding: large frames, spill and zero-copy paths ----------------------------------------

LARGE_SIZES = [SPILL_THRESHOLD - 1, SPILL_THRESHOLD, SPILL_THRESHOLD + 1, MiB, 10_000_000]
CHUNKS = [997, 4096, 65536, 65537, MiB, 3_000_001, None]


def large_stream() -> tuple[bytes, list[Frame]]:
    """Small and large frames mixed, so that large frames end mid-chunk."""
    frames: list[Frame] = [
        DataFrame(0, np.arange(3, dtype="<f4")),
        DataFrame(1, rng_array(MiB, "<f4", seed=1).reshape(-1, 256)),
        HeartbeatFrame(),
        DataFrame(2, rng_array(10_000_000, ">f8", seed=2).reshape(1250, 1000)),
        DataFrame(3, b"tiny"),
        DataFrame(4, rng_array(200_000, "<u1", seed=3).tobytes()),
        DataFrame(5, rng_array(3 * 80_000, "<i2", seed=4).reshape(3, 40_000), count=3),
        DataFrame(8, rng_array(SPILL_THRESHOLD + 3, "|u1", seed=5)),
        EndFrame(9),
    ]
    return b"".join(encode_frame(f) for f in frames), frames


@pytest.fixture(scope="module")
def big_stream() -> tuple[bytes, list[Frame]]:
    return large_stream()


@pytest.mark.parametrize("nbytes", LARGE_SIZES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_large_array_through_feed(nbytes: int, chunk: int | None) -> None:
    arr = rng_array(nbytes, "<f4" if nbytes % 4 == 0 else "|u1", seed=nbytes)
    frame = DataFrame(5, arr)
    raw = encode_frame(frame) + encode_frame(EndFrame(6))
    assert_same_frames(decode(raw, chunk), [frame, EndFrame(6)])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_large_mixed_stream_through_feed(
    big_stream: tuple[bytes, list[Frame]], chunk: int | None
) -> None:
    raw, frames = big_stream
    assert_same_frames(decode(raw, chunk), frames)


def test_large_frame_one_byte_at_a_time() -> None:
    frame = DataFrame(0, rng_array(SPILL_THRESHOLD + 100, "<u2", seed=7))
    raw = encode_frame(frame) + encode_frame(EndFrame(1))
    assert_same_frames(decode(raw, 1), [frame, EndFrame(1)])


@pytest.mark.parametrize("recv_size", [1000, 4096, 65536, 100_003, MiB, 16 * MiB])
@pytest.mark.parametrize("every", [1, 2])
def test_large_mixed_stream_through_get_buffer(
    big_stream: tuple[bytes, list[Frame]], recv_size: int, every: int
) -> None:
    raw, frames = big_stream
    got, used, written = decode_zero_copy(raw, recv_size, every=every)
    assert_same_frames(got, frames)
    if recv_size < len(raw) // 2:
        assert used, "the zero-copy path was never offered"
    if every == 1 and recv_size <= MiB:
        assert written > 5_000_000


@pytest.mark.parametrize("nbytes", [MiB, 10_000_000])
def test_get_buffer_writes_straight_into_the_returned_array(nbytes: int) -> None:
    arr = rng_array(nbytes, ">f4", seed=11).reshape(-1, 16)
    frame = DataFrame(0, arr)
    raw = encode_frame(frame) + encode_frame(EndFrame(1))
    got, used, written = decode_zero_copy(raw, 65536)
    assert_same_frames(got, [frame, EndFrame(1)])
    assert isinstance(got[0], DataFrame)
    out = got[0].data
    assert isinstance(out, np.ndarray)
    assert written > nbytes - 2 * 65536  # most of the payload went through get_buffer
    for buf in used:
        assert np.shares_memory(np.frombuffer(buf, np.uint8), out)


def test_get_buffer_is_none_for_small_frames_and_between_frames() -> None:
    decoder = FrameDecoder()
    assert decoder.get_buffer() is None
    decoder.feed(encode_frame(SAMPLES["array-f4"]))
    assert decoder.get_buffer() is None
    raw = encode_frame(DataFrame(0, rng_array(MiB, "<f4")))
    decoder.feed(raw[: SPILL_THRESHOLD + 10])
    buf = decoder.get_buffer()
    assert buf is not None
    assert len(buf) == len(raw) - SPILL_THRESHOLD - 10
    assert decoder.has_partial
    rest = raw[SPILL_THRESHOLD + 10 :]
    buf[: len(rest)] = rest
    decoder.buffer_updated(len(rest))
    assert decoder.get_buffer() is None
    assert not decoder.has_partial
    got = list(decoder.frames())
    assert len(got) == 2
    decoder.feed_eof()


def test_buffer_updated_without_pending_payload() -> None:
    with pytest.raises(RuntimeError):
        FrameDecoder().buffer_updated(1)


@pytest.mark.parametrize("chunk", [4096, 65536, None])
def test_large_bytes_item_comes_back_as_bytes(chunk: int | None) -> None:
    payload = rng_array(3 * MiB, "|u1", seed=3).tobytes()
    (got,) = decode(encode_frame(DataFrame(0, payload)), chunk)
    assert isinstance(got, DataFrame)
    assert type(got.data) is bytes
    assert got.data == payload


def test_large_frame_with_data_not_last_decodes_without_spill() -> None:
    arr = rng_array(300_000, "<i4", seed=8)
    raw = pack({"kind": "data", "data": arr.tobytes(), "seq": 0, "dtype": "<i4", "shape": [75000]})
    for chunk in (4096, 65536, None):
        assert_same_frames(decode(raw, chunk), [DataFrame(0, arr)])


def test_large_error_frame_decodes() -> None:
    frame = ErrorFrame(seq=3, origin="producer", type="ValueError", message="m" * 200_000)
    for chunk in (4096, 100_000, None):
        assert decode(encode_frame(frame), chunk) == [frame]


# -- rejections -----------------------------------------------------------------------------


def data_map(nbytes: int = 12, **changes: Any) -> dict[str, Any]:
    """A valid array data map (`data` last), with keys changed, or dropped when set to DROP."""
    d: dict[str, Any] = {"kind": "data", "seq": 0, "dtype": "<f4", "shape": [nbytes // 4]}
    d["data"] = bytes(nbytes)
    for key, value in changes.items():
        if value is DROP:
            d.pop(key, None)
        else:
            d[key] = value
    if "data" in d:  # keep data last
        d["data"] = d.pop("data")
    return d


DROP = object()
ERROR_MAP = {"kind": "error", "seq": 1, "origin": "producer", "type": "E", "message": "m"}

# (map, key, words in the message); every one is refused with a RemoteProtocolError.
BAD_FRAMES: dict[str, tuple[Any, str | None, str]] = {
    "unknown-kind": ({"kind": "bogus", "seq": 0}, "kind", "unknown kind 'bogus'"),
    "kind-int": ({"kind": 3, "seq": 0}, "kind", "unknown kind 3"),
    "kind-none": ({"kind": None}, "kind", "unknown kind"),
    "kind-bytes": ({"kind": b"data", "seq": 0}, "kind", "unknown kind"),
    "missing-kind": ({"seq": 0, "data": b""}, "kind", "missing"),
    "empty-map": ({}, "kind", "missing"),
    "missing-seq-data": (data_map(seq=DROP), "seq", "missing"),
    "missing-seq-bytes": ({"kind": "data", "data": b"x"}, "seq", "missing"),
    "missing-seq-end": ({"kind": "end"}, "seq", "missing"),
    "missing-seq-error": ({k: v for k, v in ERROR_MAP.items() if k != "seq"}, "seq", "missing"),
    "missing-data": (data_map(data=DROP), "data", "missing"),
    "missing-data-bytes": ({"kind": "data", "seq": 0}, "data", "missing"),
    "missing-dtype-with-shape": (data_map(dtype=DROP), "dtype", "without dtype"),
    "missing-dtype-with-count": (
        {"kind": "data", "seq": 0, "count": 1, "data": b"abc"},
        "dtype",
        "without dtype",
    ),
    "missing-shape": (data_map(shape=DROP), "shape", "missing"),
    "missing-origin": ({k: v for k, v in ERROR_MAP.items() if k != "origin"}, "origin", "missing"),
    "missing-type": ({k: v for k, v in ERROR_MAP.items() if k != "type"}, "type", "missing"),
    "missing-message": (
        {k: v for k, v in ERROR_MAP.items() if k != "message"},
        "message",
        "missing",
    ),
    "seq-str": (data_map(seq="1"), "seq", "non-negative integer"),
    "seq-negative": (data_map(seq=-1), "seq", "non-negative integer"),
    "seq-bool": (data_map(seq=True), "seq", "non-negative integer"),
    "seq-float": (data_map(seq=1.0), "seq", "non-negative integer"),
    "seq-nil": (data_map(seq=None), "seq", "non-negative integer"),
    "seq-str-end": ({"kind": "end", "seq": "3"}, "seq", "non-negative integer"),
    "seq-negative-end": ({"kind": "end", "seq": -5}, "seq", "non-negative integer"),
    "seq-bool-error": ({**ERROR_MAP, "seq": False}, "seq", "non-negative integer"),
    "shape-str": (data_map(shape="3"), "shape", "ill-typed"),
    "shape-int": (data_map(shape=3), "shape", "ill-typed"),
    "shape-map": (data_map(shape={"n": 3}), "shape", "ill-typed"),
    "shape-negative": (data_map(shape=[-1, -3]), "shape", "non-negative integers"),
    "shape-float": (data_map(shape=[3.0]), "shape", "non-negative integers"),
    "shape-bool": (data_map(shape=[True, 3]), "shape", "non-negative integers"),
    "shape-nested": (data_map(shape=[[3]]), "shape", "non-negative integers"),
    "shape-too-many-dims": (data_map(nbytes=4, shape=[1] * 33), "shape", "at most 32"),
    "data-str": (data_map(data="x" * 12), "data", "msgpack bin"),
    "data-int": (data_map(data=12), "data", "msgpack bin"),
    "data-list": (data_map(data=[0] * 12), "data", "msgpack bin"),
    "data-str-bytes-item": ({"kind": "data", "seq": 0, "data": "text"}, "data", "msgpack bin"),
    "dtype-object": (data_map(dtype="|O"), "dtype", "unsupported dtype '|O'"),
    "dtype-object-8": (data_map(dtype="|O8"), "dtype", "unsupported dtype"),
    "dtype-structured": (data_map(dtype="[('a','<f4')]"), "dtype", "unsupported dtype"),
    "dtype-void": (data_map(dtype="|V4"), "dtype", "unsupported dtype"),
    "dtype-name": (data_map(dtype="float32"), "dtype", "unsupported dtype"),
    "dtype-odd-size": (data_map(dtype="<f3"), "dtype", "unsupported dtype"),
    "dtype-zero-size": (data_map(dtype="|S0", shape=[3], nbytes=0), "dtype", "unsupported dtype"),
    "dtype-empty": (data_map(dtype=""), "dtype", "unsupported dtype"),
    "dtype-newline": (data_map(dtype="<f4\n"), "dtype", "unsupported dtype"),
    "dtype-garbage": (data_map(dtype="\x00\xff!"), "dtype", "unsupported dtype"),
    "dtype-pickle-ish": (data_map(dtype="cos\nsystem\n"), "dtype", "unsupported dtype"),
    "dtype-int": (data_map(dtype=5), "dtype", "ill-typed"),
    "dtype-nil": (data_map(dtype=None), "dtype", "ill-typed"),
    "dtype-bin": (data_map(dtype=b"<f4"), "dtype", "ill-typed"),
    "length-short": (data_map(nbytes=11, shape=[3]), "data", "11 data bytes"),
    "length-long": (data_map(nbytes=16, shape=[3]), "data", "need 12"),
    "length-dtype-size": (data_map(nbytes=12, dtype="<f8", shape=[3]), "data", "need 24"),
    "length-0d": (data_map(nbytes=8, shape=[]), "data", "need 4"),
    "count-mismatch": (data_map(nbytes=24, shape=[3, 2], count=2), "count", "does not match"),
    "count-str": (data_map(nbytes=24, shape=[3, 2], count="3"), "count", "does not match"),
    "count-bool": (data_map(nbytes=4, shape=[1], count=True), "count", "does not match"),
    "count-negative": (data_map(nbytes=0, shape=[0], count=-1), "count", "does not match"),
    "count-0d": (data_map(nbytes=4, shape=[], count=1), "count", "does not match"),
    "origin-int": ({**ERROR_MAP, "origin": 1}, "origin", "ill-typed"),
    "type-nil": ({**ERROR_MAP, "type": None}, "type", "ill-typed"),
    "message-bin": ({**ERROR_MAP, "message": b"m"}, "message", "ill-typed"),
    "traceback-list": ({**ERROR_MAP, "traceback": ["a"]}, "traceback", "ill-typed"),
    "top-int": (5, None, "msgpack map, got int"),
    "top-list": ([1, 2], None, "msgpack map, got list"),
    "top-str": ("kind", None, "msgpack map, got str"),
    "top-bin": (b"\x81", None, "msgpack map, got bytes"),
    "top-nil": (None, None, "msgpack map, got NoneType"),
    "top-bool": (True, None, "msgpack map, got bool"),
    "top-float": (1.5, None, "msgpack map, got float"),
}


def check_rejection(
    error: BaseException, key: str | None, words: str, frame_index: int = 0
) -> None:
    assert isinstance(error, RemoteProtocolError)
    assert isinstance(error, ProtocolError)
    assert not isinstance(error, FrameTooLarge)
    assert error.frame_index == frame_index
    assert error.key == key
    assert words in str(error)
    assert f"frame {frame_index}" in str(error)
    assert error.status_hint == 400


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_rejected(name: str) -> None:
    obj, key, words = BAD_FRAMES[name]
    decoder = FrameDecoder()
    decoder.feed(pack(obj))
    with pytest.raises(RemoteProtocolError) as info:
        list(decoder.frames())
    check_rejection(info.value, key, words)


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_rejected_one_byte_at_a_time_after_good_frames(name: str) -> None:
    obj, key, words = BAD_FRAMES[name]
    good = [SAMPLES["array-f4"], HeartbeatFrame(), SAMPLES["bytes"]]
    raw = b"".join(encode_frame(f) for f in good) + pack(obj) + encode_frame(EndFrame(3))
    decoder = FrameDecoder()
    got: list[Frame] = []
    with pytest.raises(RemoteProtocolError) as info:
        for i in range(len(raw)):
            decoder.feed(raw[i : i + 1])
            for frame in decoder.frames():
                got.append(frame)
    assert_same_frames(got, good)
    check_rejection(info.value, key, words, frame_index=3)


# Rejections of data frames whose payload is large (past SPILL_THRESHOLD): the spill
# path parses their header on its own and must refuse them just as the small path does.
LARGE_BAD = [
    name
    for name, (obj, _, _) in BAD_FRAMES.items()
    if isinstance(obj, dict)
    and obj.get("kind") == "data"
    and type(obj.get("data")) is bytes
    and list(obj)[-1] == "data"
]


def enlarge(obj: dict[str, Any]) -> dict[str, Any]:
    """The same defect, with a payload past SPILL_THRESHOLD (and `shape` scaled to match)."""
    big = dict(obj)
    n = len(obj["data"])
    factor = 3 * SPILL_THRESHOLD // max(n, 1) + 1
    big["data"] = bytes(n * factor) if n else bytes(3 * SPILL_THRESHOLD)
    shape = obj.get("shape")
    if isinstance(shape, list) and shape and type(shape[0]) is int and shape[0] > 0:
        big["shape"] = [shape[0] * factor, *shape[1:]]
    big["data"] = big.pop("data")  # still last
    return big


def first_error(raw: bytes, chunk: int) -> RemoteProtocolError:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(HeartbeatFrame()))
    with pytest.raises(RemoteProtocolError) as info:
        feed_chunks(decoder, raw, chunk)
        decoder.feed_eof()
    return info.value


@pytest.mark.parametrize("name", LARGE_BAD)
@pytest.mark.parametrize("chunk", [4096, 65536 + 7])
def test_bad_large_frame_rejected_like_a_small_one(name: str, chunk: int) -> None:
    obj, key, _ = BAD_FRAMES[name]
    raw = pack(enlarge(obj))
    assert len(raw) > SPILL_THRESHOLD + chunk
    small = first_error(pack(obj), len(raw))
    large = first_error(raw, chunk)
    check_rejection(large, key, "", frame_index=1)
    # the same reason, numbers aside (the shapes were scaled)
    assert re.sub(r"\d+", "N", str(large)) == re.sub(r"\d+", "N", str(small))


def test_large_bad_frames_cover_the_spill_checks() -> None:
    assert {"missing-seq-data", "seq-negative", "dtype-object", "shape-negative"} <= set(LARGE_BAD)
    assert {"missing-dtype-with-shape", "missing-dtype-with-count", "count-mismatch"} <= set(
        LARGE_BAD
    )
    assert {"length-short", "length-long"} <= set(LARGE_BAD)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xc1", "malformed msgpack: byte 0xc1 (reserved, not a msgpack type) at offset 0"),
        (b"\x81\x01\x02", "a key that is not a string"),  # int map key
        # invalid UTF-8 in a str: what and where
        (
            b"\x81\xa1\xff\x01",
            "malformed msgpack: a str that is not UTF-8 (invalid start byte) at offset 2",
        ),
        (
            b"\x82\xa4kind\xa3end\xa3seq\xc1",
            "byte 0xc1 (reserved, not a msgpack type) at offset 14",
        ),
        (b"\x91" * 2000 + b"\xc0", "must be a msgpack map, got list"),  # nested 2000 deep
    ],
    ids=["reserved-byte", "int-key", "bad-utf8", "reserved-in-a-map", "too-deep"],
)
def test_malformed_msgpack_rejected(raw: bytes, words: str) -> None:
    good = encode_frame(EndFrame(0))
    decoder = FrameDecoder()
    decoder.feed(good + raw)
    it = decoder.frames()
    assert next(it) == EndFrame(0)
    with pytest.raises(RemoteProtocolError) as info:
        next(it)
    assert words in str(info.value)
    assert info.value.frame_index == 1


# -- frame size limit ---------------------------------------------------------------------------


def test_oversize_frame_refused_before_its_payload_is_buffered() -> None:
    header = encode_data_parts(0, np.empty(100 * MiB, np.uint8))[0]
    decoder = FrameDecoder(max_frame_size=MiB)
    decoder.feed(header + bytes(100 * 1024 - len(header)))  # the first 100 KiB only
    with pytest.raises(FrameTooLarge) as info:
        list(decoder.frames())
    err = info.value
    assert isinstance(err, RemoteProtocolError) and isinstance(err, ProtocolError)
    assert err.frame_index == 0
    assert err.status_hint == 413
    assert str(MiB) in str(err)
    assert decoder.get_buffer() is None
    with pytest.raises(FrameTooLarge) as again:
        decoder.feed(b"\x00" * 10)
    assert same_error(again.value, err)


@pytest.mark.parametrize("chunk", [1, 1000, 4096])
def test_oversize_frame_refused_early_in_small_chunks(chunk: int) -> None:
    good = encode_frame(EndFrame(0))
    header = encode_data_parts(0, np.empty(100 * MiB, np.uint8))[0]
    raw = good + header + bytes(100 * 1024)
    decoder = FrameDecoder(max_frame_size=MiB)
    got: list[Frame] = []
    with pytest.raises(FrameTooLarge) as info:
        for i in range(0, len(raw), chunk):
            decoder.feed(raw[i : i + chunk])
            got.extend(decoder.frames())
    assert got == [EndFrame(0)]
    assert info.value.frame_index == 1


def sized_frame(kind: str, size: int) -> bytes:
    """A frame of `kind` whose encoding is exactly `size` bytes."""

    def make(n: int, filler: int | None) -> bytes:
        if kind == "bytes":
            obj: dict[str, Any] = {"kind": "data", "seq": 0}
        elif kind == "array":
            obj = {"kind": "data", "seq": 0, "dtype": "|u1", "shape": [n]}
        elif kind == "data-first":  # not spillable: msgpack buffers it whole
            obj = {"data": bytes(n), "kind": "data", "seq": 0}
        else:
            obj = {"kind": "error", "seq": 0, "origin": "relay", "type": "E", "message": "m" * n}
        if filler is not None:
            obj["x"] = "a" * filler
        if kind in ("bytes", "array"):
            obj["data"] = bytes(n)
        return pack(obj)

    for filler in (None, 0, 1, 2, 3):
        guess = size - (len(make(size, filler)) - size)
        for n in (guess, guess + 1, guess - 1, guess + 2, guess - 2):
            if n >= 0 and len(raw := make(n, filler)) == size:
                return raw
    raise AssertionError(f"cannot build a {kind} frame of {size} bytes")


@pytest.mark.parametrize("limit", [64, 4096, SPILL_THRESHOLD + 100, MiB])
@pytest.mark.parametrize("chunk", [1, 1000, None])
@pytest.mark.parametrize("kind", ["bytes", "array", "data-first", "error"])
def test_frame_size_limit_is_exact(limit: int, chunk: int | None, kind: str) -> None:
    if chunk == 1 and limit > 4096:
        chunk = 997
    at_limit = sized_frame(kind, limit)
    over = sized_frame(kind, limit + 1)
    assert (len(at_limit), len(over)) == (limit, limit + 1)
    tail = encode_frame(EndFrame(1))
    got = decode(tail + at_limit + tail, chunk, max_frame_size=limit)
    assert len(got) == 3
    decoder = FrameDecoder(max_frame_size=limit)
    with pytest.raises(FrameTooLarge) as info:
        feed_chunks(decoder, tail + over + tail, chunk or len(over) * 2)
    assert info.value.frame_index == 1
    assert f"{limit}-byte" in str(info.value)


def test_max_frame_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)
    assert FrameDecoder().max_frame_size == DEFAULT_MAX_FRAME_SIZE >= 64 * MiB


def test_ten_megabyte_frame_fits_the_default_limit() -> None:
    arr = rng_array(10_000_000, "<u1", seed=1).reshape(2500, 4000)
    assert_same_frames(decode(encode_frame(DataFrame(0, arr)), MiB), [DataFrame(0, arr)])


# -- errors in a stream, sticky failure, eof ----------------------------------------------------


def five_frames(bad_at: int = 3, large: bool = False) -> tuple[bytes, list[Frame]]:
    n = SPILL_THRESHOLD * 2 if large else 12
    frames: list[Frame] = [
        DataFrame(0, rng_array(n, "<f4", seed=1)),
        DataFrame(1, rng_array(n, "|u1", seed=2).tobytes()),
        HeartbeatFrame(),
        DataFrame(2, rng_array(n, ">i2", seed=3)),
        EndFrame(3),
    ]
    parts = [encode_frame(f) for f in frames]
    parts[bad_at] = pack({"kind": "nope", "seq": 2})
    return b"".join(parts), frames[:bad_at]


@pytest.mark.parametrize("chunk", [1, 7, 4096, None])
@pytest.mark.parametrize("large", [False, True])
def test_error_at_frame_3_yields_the_3_good_frames_first(chunk: int | None, large: bool) -> None:
    if large and chunk in (1, 7):
        chunk = 1001
    raw, good = five_frames(3, large)
    decoder = FrameDecoder()
    got: list[Frame] = []
    error: RemoteProtocolError | None = None
    view = memoryview(raw)
    step = chunk or len(raw)
    for i in range(0, len(raw), step):
        try:
            decoder.feed(view[i : i + step])
        except RemoteProtocolError as exc:  # the decoder had already failed
            error = exc
        try:
            for frame in decoder.frames():
                got.append(frame)
        except RemoteProtocolError as exc:
            error = exc
        if error is not None:
            break
    assert error is not None
    assert_same_frames(got, good)
    assert error.frame_index == 3
    assert error.key == "kind"
    assert "unknown kind 'nope'" in str(error)


def test_error_is_sticky() -> None:
    raw, good = five_frames(3)
    decoder = FrameDecoder()
    decoder.feed(raw)  # no raise: the good frames are still to be read
    it = decoder.frames()
    assert_same_frames([next(it) for _ in range(3)], good)
    with pytest.raises(RemoteProtocolError) as info:
        next(it)
    err = info.value
    for call in (
        lambda: decoder.feed(encode_frame(EndFrame(9))),
        lambda: decoder.feed(b""),
        lambda: list(decoder.frames()),
        decoder.next_frame,
        decoder.feed_eof,
    ):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert same_error(again.value, err)
    assert decoder.get_buffer() is None


def test_feed_after_failure_raises_but_ready_frames_still_come_out() -> None:
    raw, good = five_frames(3)
    decoder = FrameDecoder()
    decoder.feed(raw)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(b"more")
    assert info.value.frame_index == 3
    got = []
    with pytest.raises(RemoteProtocolError):
        for frame in decoder.frames():
            got.append(frame)
    assert_same_frames(got, good)


def test_next_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    decoder.feed(encode_frame(EndFrame(1)) + encode_frame(HeartbeatFrame()))
    assert decoder.next_frame() == EndFrame(1)
    assert decoder.next_frame() == HeartbeatFrame()
    assert decoder.next_frame() is None


def test_feed_eof_on_clean_boundary() -> None:
    decoder = FrameDecoder()
    decoder.feed_eof()  # an empty body is not cut off
    decoder = FrameDecoder()
    decoder.feed(encode_frame(SAMPLES["batched"]) + encode_frame(EndFrame(3)))
    assert not decoder.has_partial
    decoder.feed_eof()
    assert len(list(decoder.frames())) == 2


TRUNCATED = {
    "small": encode_frame(SAMPLES["array-f4"]),
    "error": encode_frame(SAMPLES["error"]),
    "large": encode_frame(DataFrame(0, rng_array(MiB, "<f4"))),
    "large-bytes": encode_frame(DataFrame(0, rng_array(SPILL_THRESHOLD + 1, "|u1").tobytes())),
}
TRUNCATION_CASES = [
    (name, cut)
    for name, raw in TRUNCATED.items()
    for cut in (1, 2, 30, -1, SPILL_THRESHOLD + 10)
    if cut < len(raw)
]


@pytest.mark.parametrize(("name", "cut"), TRUNCATION_CASES)
def test_feed_eof_inside_a_frame_is_truncation(name: str, cut: int) -> None:
    raw = TRUNCATED[name]
    good = encode_frame(EndFrame(0))
    decoder = FrameDecoder()
    decoder.feed(good + raw[:cut])
    assert decoder.has_partial
    assert list(decoder.frames()) == [EndFrame(0)]
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed_eof()
    err = info.value
    assert not isinstance(err, FrameTooLarge)
    assert "truncated" in str(err)
    assert err.frame_index == 1
    with pytest.raises(RemoteProtocolError) as again:
        decoder.feed(raw[cut:])
    assert same_error(again.value, err)


def test_has_partial_tracks_frame_boundaries() -> None:
    raw = encode_frame(EndFrame(5))
    decoder = FrameDecoder()
    assert not decoder.has_partial
    decoder.feed(raw[:1])
    assert decoder.has_partial
    decoder.feed(raw[1:])
    assert not decoder.has_partial
    decoder.feed(raw + raw[:2])
    assert decoder.has_partial
    decoder.feed(raw[2:])
    assert not decoder.has_partial
    assert decoder.frame_index == 3


def test_error_frame_with_lone_surrogates_still_encodes() -> None:
    """Exception text may hold surrogate-escaped bytes (undecodable file names)."""
    name = b"scan\xff.npy".decode("utf-8", "surrogateescape")
    try:
        raise FileExistsError(f"cannot load {name}")
    except FileExistsError as exc:
        frame = ErrorFrame.from_exception(exc, seq=4)
    assert "\udcff" in frame.message
    (got,) = decode(encode_frame(frame))
    assert isinstance(got, ErrorFrame)
    assert got.message == "cannot load scan\\udcff.npy"
    assert "scan\\udcff.npy" in got.traceback
    assert (got.type, got.seq, got.origin) == ("FileExistsError", 4, "producer")
    assert isinstance(got.to_exception(), FileExistsError)


@pytest.mark.parametrize(
    ("obj", "key"),
    [({"kind": "end"}, "seq"), ({"seq": 0}, "kind"), ({"kind": "data", "seq": 0}, "data")],
)
def test_a_missing_key_is_named_in_the_reason_too(obj: dict[str, Any], key: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(pack(obj))
    assert info.value.key == key
    assert info.value.reason == f"missing key {key!r}"  # uploads answer the reason alone


def same_error(a: BaseException, b: BaseException) -> bool:
    """The same failure raised again (a copy: the decoder keeps its error traceback-free)."""
    attrs = ("frame_index", "key", "reason")
    return (type(a), str(a), *(getattr(a, k) for k in attrs)) == (
        type(b),
        str(b),
        *(getattr(b, k) for k in attrs),
    )
