"""`FrameDecoder(runs=True)` reads runs of small array frames of one layout without msgpack:
whatever the input and its chunking, it gives the same items, seqs, frame count and errors
as the frame-by-frame decoder, and only ever batches frames of consecutive seqs."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ndrelay._codec import FrameDecoder, encode_frame, encode_items
from ndrelay._exceptions import ProtocolError
from ndrelay._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

LAYOUTS = [
    np.arange(16, dtype="<f4"),  # the benchmark's 64-byte items
    np.arange(3, dtype=">i8"),  # a non-native byte order
    np.arange(6, dtype="|u1").reshape(2, 3),  # two dimensions
    np.zeros(1024, dtype="<f4"),  # at the largest payload read as a run (4 KiB)
    np.zeros(1025, dtype="<f4"),  # above it: frame by frame
    np.array(7, dtype="<i4"),  # 0-d: frame by frame
]
#: seqs around msgpack's integer widths (fixint, 1, 2, 4 and 8 bytes)
STARTS = [0, 120, 250, 65_530, 2**32 - 4, 2**63 + 5]


def _wire(frame: Any) -> bytes:
    if isinstance(frame, tuple):  # (seq, item): what the relay writes
        return b"".join(bytes(b) for b in encode_items([frame]))
    if isinstance(frame, bytes):  # raw bytes on the wire (malformed input)
        return frame
    return encode_frame(frame)


@st.composite
def streams(draw: Any) -> list[Any]:
    """Frames as a relay sends them: runs of array items with mostly consecutive seqs
    (redelivered ones, repeats and jumps too), bytes items, heartbeats, an end."""
    seq = draw(st.sampled_from(STARTS))
    out: list[Any] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["run", "run", "run", "bytes", "heartbeat", "jump", "big"]))
        if kind == "run":
            base = LAYOUTS[draw(st.integers(0, len(LAYOUTS) - 1))]
            for _ in range(draw(st.integers(1, 60))):
                item = (base + (seq % 100)).astype(base.dtype)
                out.append((seq, item))
                seq += draw(st.sampled_from([1, 1, 1, 1, 1, 1, 0, 2, -3])) if seq > 3 else 1
        elif kind == "bytes":
            out.append((seq, draw(st.binary(max_size=40))))
            seq += 1
        elif kind == "heartbeat":
            out.append(HeartbeatFrame())
        elif kind == "big":  # a payload the decoder writes straight into its array
            out.append((seq, np.full(70_000 + seq % 7, seq % 251, dtype="|u1")))
            seq += 1
        else:
            seq += draw(st.integers(1, 100_000))
    out.append(EndFrame(seq=seq))
    return out


def _items(frames: list[Frame]) -> list[Any]:
    """What a reader takes out: one (seq, dtype, shape, bytes) per item."""
    out: list[Any] = []
    for f in frames:
        if isinstance(f, DataFrame):
            if f.count is not None:
                assert f.count >= 2 and len(f.data) == f.count
                rows = enumerate(f.data)
                out += [(f.seq + i, r.dtype.str, r.shape, r.tobytes()) for i, r in rows]
            elif isinstance(f.data, np.ndarray):
                out.append((f.seq, f.data.dtype.str, f.data.shape, f.data.tobytes()))
            else:
                out.append((f.seq, None, None, bytes(f.data)))
        else:
            out.append((type(f).__name__, getattr(f, "seq", None)))
    return out


def _decode(body: bytes, cuts: list[int], runs: bool, limit: int = 1 << 20) -> Any:
    """(items, frame_index, error) of `body` fed in pieces cut at `cuts`."""
    decoder = FrameDecoder(limit, runs=runs)
    frames: list[Frame] = []
    error = None
    pos = 0
    try:
        for cut in [*sorted(cuts), len(body)]:
            if cut > pos:
                decoder.feed(body[pos:cut])
                pos = cut
                frames += decoder.frames()
        decoder.feed_eof()
        frames += decoder.frames()
    except ProtocolError as exc:
        error = (type(exc).__name__, str(exc), exc.frame_index)
    return _items(frames), decoder.frame_index, error, frames


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(data=st.data())
def test_runs_decode_as_frame_by_frame(data: Any) -> None:
    frames = data.draw(streams())
    body = b"".join(_wire(f) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=30))
    if data.draw(st.booleans()):  # few cuts: pieces holding whole large frames and runs
        cuts = cuts[:2]
    plain = _decode(body, cuts, runs=False)
    runs = _decode(body, cuts, runs=True)
    assert runs[:3] == plain[:3]
    assert plain[2] is None  # a valid stream
    for f in runs[3]:
        if isinstance(f, DataFrame) and f.count is not None:
            # its own memory, at most 16 KiB of it: an item kept keeps little alive
            assert f.data.flags.writeable and f.data.flags.c_contiguous
            base = f.data if f.data.base is None else f.data.base
            assert f.data.nbytes == base.nbytes <= 16 * 1024


@SETTINGS
@given(data=st.data())
def test_bad_input_after_runs_fails_the_same_way(data: Any) -> None:
    frames = data.draw(streams())[:-1]  # no end: a bad frame follows
    bad = data.draw(
        st.sampled_from(
            [
                b"\xc1",  # never used in msgpack
                msgpack.packb(
                    {"kind": "data", "seq": 5, "dtype": "<f4", "shape": [16], "data": b"x"}
                ),
                msgpack.packb({"kind": "nope"}),
                msgpack.packb([1, 2]),
                encode_frame(ErrorFrame(seq=1, origin="producer", type="E", message="m")),
            ]
        )
    )
    body = b"".join(_wire(f) for f in frames) + bad
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    assert _decode(body, cuts, runs=True)[:3] == _decode(body, cuts, runs=False)[:3]


@SETTINGS
@given(data=st.data())
def test_a_stream_cut_inside_a_run_is_truncated(data: Any) -> None:
    frames = [(s, np.arange(16, dtype="<f4")) for s in range(data.draw(st.integers(2, 300)))]
    body = b"".join(_wire(f) for f in frames)
    body = body[: data.draw(st.integers(1, len(body) - 1))]
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    runs = _decode(body, cuts, runs=True)
    assert runs[:3] == _decode(body, cuts, runs=False)[:3]


def test_a_run_comes_out_as_batched_frames() -> None:
    item = np.arange(16, dtype="<f4")
    body = b"".join(_wire((s, item)) for s in [*range(300), *range(400, 410)])
    _, index, error, frames = _decode(body, [], runs=True)
    assert error is None and index == 310
    # the first frame teaches the layout; msgpack's seq width changes at 128 and 256
    assert [(f.seq, f.count) for f in frames] == [
        (0, None),
        (1, 127),
        (128, 128),
        (256, 44),
        (400, 10),
    ]
    assert isinstance(frames[1], DataFrame)
    assert [r.tolist() for r in frames[1].items()] == [item.tolist()] * 127


@pytest.mark.parametrize("limit", [10, 100])
def test_the_frame_limit_still_applies(limit: int) -> None:
    item = np.arange(16, dtype="<f4")  # frames of about 90 bytes
    body = b"".join(_wire((s, item)) for s in range(50))
    plain = _decode(body, [], runs=False, limit=limit)
    assert _decode(body, [], runs=True, limit=limit)[:3] == plain[:3]
    assert plain[2] is not None and plain[2][0] == "FrameTooLarge"
