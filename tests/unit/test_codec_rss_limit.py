"""The decoder fuzzed under an RSS limit, in a process of its own: bodies built to expand
into millions of objects when decoded (lists of empty maps, lists of lists, floats, deep
nesting, huge declared lengths, maps of many keys) may raise the process's peak resident
memory by at most twice the body plus 64 MiB (the allocator and the kernel move RSS by
tens of MiB on their own). The peak (`VmHWM`) is reset before each decode
(`/proc/self/clear_refs`), once the body is built; a decoder that built what an 8 MiB
body of empty maps describes takes about 600 MiB."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

CHILD = r"""
import gc
import sys
import msgpack
from hypothesis import HealthCheck, given, settings, strategies as st
from ndrelay._codec import FrameDecoder
from ndrelay._exceptions import RemoteProtocolError

MiB = 1 << 20
pack = msgpack.packb


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def rss_growth(fn):
    # how far fn() raised the peak resident memory above the resident memory before
    gc.collect()  # a refused body stays in a cycle (error, traceback, frame) until then
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def check(raw, chunk, what):
    growth = rss_growth(lambda: decode(raw, chunk))
    limit = 2 * len(raw) + 64 * MiB
    if growth > limit:
        sys.exit(f"{what}: peak RSS grew {growth / MiB:.0f} MiB (limit {limit / MiB:.0f} MiB)")


def element_run(kind, n):
    # a list of n elements that a plain msgpack decoder turns into n objects
    one = {"maps": b"\x80", "lists": b"\x90", "floats": b"\xca\x00\x00\x00\x01"}[kind]
    return b"\xdd" + n.to_bytes(4, "big") + one * n


def body(kind, n, key):
    if kind == "deep":
        value = b"\x91" * min(n, 100_000) + b"\x80"
    elif kind == "str":  # declares n bytes of text, sends 64
        value = b"\xdb" + n.to_bytes(4, "big") + b"a" * 64
    elif kind == "bin":  # declares a n-byte payload, sends 64
        value = b"\xc6" + n.to_bytes(4, "big") + b"a" * 64
    elif kind == "keys":  # a map of n entries, distinct keys
        m = min(n, 2 * MiB)
        value = b"\xdf" + m.to_bytes(4, "big") + b"".join(
            b"\xce" + i.to_bytes(4, "big") + b"\xc0" for i in range(m)
        )
    else:
        value = element_run(kind, n)
    if key is None:
        return value
    return b"\x83" + pack("kind") + pack("data") + pack("seq") + b"\x00" + pack(key) + value


KINDS = ["maps", "lists", "floats", "deep", "str", "bin", "keys"]
KEYS = [None, "x", "data", "shape", "message"]


def decode(raw, chunk):
    decoder = FrameDecoder()
    try:
        for at in range(0, len(raw), chunk):
            decoder.feed(raw[at : at + chunk])
            for _ in decoder.frames():
                pass
        decoder.feed_eof()
    except RemoteProtocolError:
        pass


for kind in KINDS:  # the worst of each, at its largest
    for key in KEYS:
        check(body(kind, 8 * MiB, key), MiB, f"{kind} of 8 MiB under key {key!r}")


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(KINDS),
    n=st.sampled_from([1, 1000, MiB, 4 * MiB]),
    key=st.sampled_from(KEYS),
    chunk=st.sampled_from([4096, 65536, MiB]),
    tail=st.binary(max_size=64),
)
def fuzz(kind, n, key, chunk, tail):
    check(body(kind, n, key) + tail, chunk, f"{kind} of {n} under key {key!r}, chunk {chunk}")


fuzz()
print("ok")
"""


def run_capped(src: Path) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", CHILD],
            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.mark.slow
def test_fuzzed_amplifying_bodies_stay_within_an_rss_limit() -> None:
    result = run_capped(SRC)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
