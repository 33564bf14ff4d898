"""The decoder bounds what a frame can make it build or reserve: objects within a small
multiple of the frame's bytes, payload buffers within a step of the bytes received."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ndrelay._codec import (
    MAX_FRAME_ENTRIES,
    MAX_SHAPE_DIMS,
    FrameDecoder,
    encode_data_parts,
    encode_frame,
)
from ndrelay._exceptions import FrameTooLarge, RemoteProtocolError
from ndrelay._frames import DataFrame, ErrorFrame

pack = msgpack.packb
MiB = 1024 * 1024


def decode(body: bytes, chunk: int = MiB, **kw: Any) -> tuple[list[Any], Exception | None, int]:
    """(frames, the error raised or None, peak bytes traced while decoding)."""
    frames: list[Any] = []
    error: Exception | None = None
    tracemalloc.start()
    try:
        decoder = FrameDecoder(**kw)
        for at in range(0, len(body), chunk):
            decoder.feed(body[at : at + chunk])
            frames.extend(decoder.frames())
        decoder.feed_eof()
    except Exception as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return frames, error, peak


def head(n_entries: int, *pairs: bytes) -> bytes:
    """A map header of `n_entries` then the given packed keys and values."""
    prefix = bytes([0x80 | n_entries]) if n_entries < 16 else b"\xdf" + n_entries.to_bytes(4, "big")
    return prefix + b"".join(pairs)


N = 8 * MiB


def list_of_maps() -> bytes:
    """`{"kind": "data", "seq": 0, "x": [{}, {}, ... 8M]}`: 8 MiB that msgpack would
    turn into 8M dicts (about 0.6 GB)."""
    return head(3, pack("kind"), pack("data"), pack("seq"), b"\x00", pack("x")) + (
        b"\xdd" + N.to_bytes(4, "big") + b"\x80" * N
    )


def many_keys() -> bytes:
    """A data frame with 10^6 unknown string keys, `data` last."""
    keys = b"".join(pack(f"k{i}") + b"\x00" for i in range(10**6))
    return (
        b"\xdf"
        + (10**6 + 3).to_bytes(4, "big")
        + pack("kind")
        + pack("data")
        + pack("seq")
        + b"\x00"
        + keys
        + pack("data")
        + pack(b"abc")
    )


def small_lists() -> bytes:
    """Lists within msgpack's per-list limit, nested: each node 32 maps wide."""
    node = b"\xdc\x00\x20" + b"\x80" * 32
    return head(2, pack("kind"), pack("data"), pack("x")) + b"\xdc\x00\x20" + node * 32


def top_level_lists() -> bytes:
    """Frames that are not maps, each a deep list of lists around one map."""
    return (b"\x91" * 1000 + b"\x80") * 1000


def deep_in_a_frame() -> bytes:
    return head(2, pack("kind"), pack("end"), pack("x")) + b"\x91" * 100_000 + b"\x80"


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        (list_of_maps, "x", "a list under key 'x'"),
        (many_keys, None, f"map of 1000003 entries (at most {MAX_FRAME_ENTRIES})"),
        (small_lists, "x", "a list under key 'x'"),
        (top_level_lists, None, "must be a msgpack map, got list"),
        (deep_in_a_frame, "x", "a list under key 'x'"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_amplification_bodies_are_refused_within_twice_their_size(
    body: Any, key: str | None, words: str
) -> None:
    raw = body()
    for chunk in (MiB, 64 * 1024, 4096):
        frames, error, peak = decode(raw, chunk)
        assert frames == []
        assert isinstance(error, RemoteProtocolError)
        assert not isinstance(error, FrameTooLarge)
        assert error.status_hint == 400
        assert error.frame_index == 0
        assert error.key == key
        assert words in str(error)
        assert peak < 2 * len(raw) + 4 * MiB, (chunk, peak)


def test_good_frames_before_an_amplifying_one_are_kept() -> None:
    good = encode_frame(DataFrame(0, np.arange(4.0))) + encode_frame(DataFrame(1, b"raw"))
    frames, error, peak = decode(good + list_of_maps())
    assert [f.seq for f in frames] == [0, 1]
    assert isinstance(error, RemoteProtocolError) and error.frame_index == 2
    assert error.key == "x"


@pytest.mark.parametrize(
    ("frame", "key", "words"),
    [
        ({"kind": "end", "seq": 0, b"x": 1}, None, "a key that is not a string"),
        ({"kind": "end", "seq": 0, 1: 1}, None, "a key that is not a string"),
        ({"kind": "end", "seq": 0, "x": [1]}, "x", "a list under key 'x'"),
        ({"kind": "end", "seq": 0, "x": {"a": 1}}, "x", "a map under key 'x'"),
        ({"kind": "end", "seq": 0, "x": msgpack.ExtType(1, b"a")}, "x", "ext value"),
        ({"kind": "data", "seq": 0, "data": b"ab", "x": [1, 2]}, "x", "a list under key"),
        (
            {"kind": "data", "seq": 0, "dtype": "<f4", "shape": [1] * 33, "data": b""},
            "shape",
            f"at most {MAX_SHAPE_DIMS}",
        ),
        (
            {"kind": "data", "seq": 0, "dtype": "<f4", "shape": [[1]], "data": b""},
            "shape",
            "non-negative integers",
        ),
        ({"kind": "data", "seq": 0, "data": [1, 2]}, "data", "msgpack bin"),
    ],
)
def test_keys_and_nesting_the_format_lacks_are_refused(
    frame: dict[Any, Any], key: str | None, words: str
) -> None:
    raw = pack(frame, strict_types=False)
    for body in (raw, raw + b"\x00" * 40):  # short, and long enough for the header probe
        frames, error, _ = decode(body)
        assert frames == []
        assert isinstance(error, RemoteProtocolError), error
        assert error.key == key
        assert words in str(error)


@pytest.mark.parametrize("key", ["message", "traceback", "type", "origin"])
def test_strings_over_the_text_limit_are_refused_naming_the_key(key: str) -> None:
    frame = {"kind": "error", "seq": 0, "origin": "producer", "type": "E", "message": "m"}
    frame[key] = "x" * 5000
    frames, error, _ = decode(pack(frame), max_text_size=4096)
    assert isinstance(error, RemoteProtocolError) and error.key == key
    assert "5000 bytes" in str(error) and "4096" in str(error)
    frame[key] = "x" * 4096
    frames, error, _ = decode(pack(frame), max_text_size=4096)
    assert error is None and isinstance(frames[0], ErrorFrame)
    assert getattr(frames[0], key) == "x" * 4096


def test_default_text_limit_takes_a_long_traceback() -> None:
    frame = ErrorFrame(seq=3, origin="producer", type="E", message="m", traceback="t" * 500_000)
    frames, error, _ = decode(encode_frame(frame))
    assert error is None and frames == [frame]


def test_an_error_frame_may_carry_bases() -> None:
    raw = pack(
        {
            "kind": "error",
            "seq": 0,
            "origin": "producer",
            "type": "SensorError",
            "message": "m",
            "bases": ["ValueError", "Exception"],
        }
    )
    frames, error, _ = decode(raw)
    assert error is None and frames[0].type == "SensorError"


# -- no allocation ahead of the bytes -----------------------------------------------------------


def declared(nbytes: int, array: bool) -> bytes:
    if array:
        return (
            head(
                5,
                pack("kind"),
                pack("data"),
                pack("seq"),
                b"\x00",
                pack("dtype"),
                pack("|u1"),
                pack("shape"),
                pack([nbytes]),
                pack("data"),
            )
            + b"\xc6"
            + nbytes.to_bytes(4, "big")
        )
    return head(3, pack("kind"), pack("data"), pack("seq"), b"\x00", pack("data")) + (
        b"\xc6" + nbytes.to_bytes(4, "big")
    )


@pytest.mark.parametrize("array", [False, True], ids=["bytes", "array"])
def test_a_huge_declared_payload_reserves_one_bounded_step(array: bool) -> None:
    tracemalloc.start()
    decoders = []
    for _ in range(4):
        decoder = FrameDecoder()
        decoder.feed(declared(250 * MiB, array) + b"x" * 64)
        assert list(decoder.frames()) == []
        assert decoder.has_partial
        decoders.append(decoder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 20 * MiB  # a first step each, not 4 x 250 MiB


def chunks_into(decoder: FrameDecoder, payload: bytes, step: int) -> None:
    """Write `payload` the way a `recv_into` reader does: into `get_buffer()`."""
    view, pos = memoryview(payload), 0
    while (target := decoder.get_buffer()) is not None:
        n = min(len(target), step, len(view) - pos)
        target[:n] = view[pos : pos + n]
        pos += n
        decoder.buffer_updated(n)
    assert pos == len(payload)


@pytest.mark.parametrize("nbytes", [1 * MiB, 40 * MiB + 3])
@pytest.mark.parametrize("how", ["recv_into", "feed"])
def test_honest_large_frames_arrive_whole(nbytes: int, how: str) -> None:
    array = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    for item in (array, array.tobytes()):
        header, payload = encode_data_parts(9, item)
        decoder = FrameDecoder()
        decoder.feed(header + bytes(payload[:64]))  # a reader's first, small read
        if how == "recv_into":
            chunks_into(decoder, bytes(payload[64:]), 3 * MiB + 1)
        else:
            for at in range(64, nbytes, 5 * MiB):
                decoder.feed(bytes(payload[at : at + 5 * MiB]))
        (frame,) = decoder.frames()
        assert frame.seq == 9
        if isinstance(item, bytes):
            assert frame.data == item
        else:
            assert frame.data.dtype == array.dtype and np.array_equal(frame.data, array)
            assert frame.data.flags.writeable


# -- property: whatever the bytes, memory stays a small multiple of them ------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=8), inner, max_size=20)
    ),
    max_leaves=400,
)
frames_like = st.dictionaries(
    st.sampled_from(["kind", "seq", "dtype", "shape", "data", "count", "x", "message"]),
    values,
    max_size=8,
).map(lambda d: {**d, "kind": d.get("kind", "data")})


def bodies() -> Iterator[Any]:
    return st.lists(st.one_of(frames_like, values), min_size=1, max_size=5).map(
        lambda objs: b"".join(pack(o) for o in objs)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), chunk=st.sampled_from([1, 7, 64, 4096]))
def test_any_input_raises_only_protocol_errors_within_bounded_memory(
    body: bytes, chunk: int
) -> None:
    frames, error, peak = decode(body, chunk)
    assert error is None or isinstance(error, RemoteProtocolError), repr(error)
    assert peak < 64 * len(body) + 2 * MiB


@pytest.mark.parametrize("bad", ["malformed", "bad key", "too large"])
def test_a_refused_body_is_freed_while_its_decoder_lives(bad):
    """The error a decoder keeps (and raises again) holds no traceback: the frames that
    fed it, and the body bytes they held, are freed at once, not by the cycle collector
    (an upload handler keeps its decoder until it has answered)."""
    decoder = FrameDecoder(max_frame_size=8 * MiB)
    good = encode_frame(DataFrame(0, np.zeros(4)))
    tail = {
        "malformed": b"\xc1" * 64,  # a msgpack byte that is never valid
        "bad key": pack({"kind": "data", "seq": "x", "dtype": "<f8", "shape": [1], "data": b"1"}),
        "too large": encode_frame(DataFrame(1, np.zeros(2 * MiB))),
    }[bad]

    def feed_a_body() -> None:
        body = bytearray(good * ((4 * MiB) // len(good)) + tail)  # a 4 MiB body message
        try:
            decoder.feed(body)
            list(decoder.frames())
        except RemoteProtocolError:
            pass
        for again in (lambda: decoder.feed(b"more"), decoder.feed_eof):
            with pytest.raises(RemoteProtocolError):
                again()

    gc_was = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed_a_body()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        if gc_was:
            gc.enable()
    assert held < MiB, f"{held} bytes still held after the refusal"
    with pytest.raises(RemoteProtocolError):
        decoder.feed_eof()  # still failed, with the same error
