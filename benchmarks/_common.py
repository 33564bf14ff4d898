"""Shared pieces of the benchmark suite: workloads, data pools, content checks, meters, stats.

Everything here is stdlib + numpy, so every child process (whatever transport it runs)
imports it cheaply. Nothing in here is timed except `Meter`, which is the one clock all
consumers share.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "POOL",
    "Checker",
    "LatencyRecorder",
    "Meter",
    "Paced",
    "Workload",
    "block_pool",
    "child_main",
    "item_pool",
    "latency_item",
    "paced_items",
    "machine_description",
    "percentile",
    "read_cpu",
    "read_vm",
    "summarize",
]

#: Pool size: items cycle through POOL pre-generated arrays. Prime, so it is coprime with
#: the batch size 256 and a stuck or repeating transport shows up in the tags.
POOL = 7

#: Tag position: element 0 of every item holds `seq % POOL`; the last element is compared
#: with the pool item's last element (catches truncated or shifted payloads).


@dataclasses.dataclass(frozen=True)
class Workload:
    """One workload: what an item is and how the producer is paced.

    `batch` > 0 means the consumer reads batches of up to `batch` items stacked on a
    leading axis (W2b): ndrelay via `stream(batch=, stack=True)`, the peers by sending
    pre-stacked blocks of `batch` items with one header / message / record batch each.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    duration: float  # producer keeps producing for this long after the consumer says go
    warmup: float  # consumer ignores its first `warmup` seconds
    batch: int = 0
    description: str = ""
    #: W2c: the producer yields single items although the consumer reads batches.
    single: bool = False

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))

    @property
    def small(self) -> bool:
        """Small items: producers check the clock every 64 items, not every item."""
        return self.itemsize < 65536

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


def _rng(wl: Workload) -> np.random.Generator:
    # Fixed seed (not hash(): that is randomized per process).
    return np.random.default_rng(1234 + math.prod(wl.shape))


def item_pool(wl: Workload) -> list[np.ndarray]:
    """POOL distinct items of the workload; item k has tag k at flat[0]. Deterministic,
    so every process regenerates the same pool without shipping it around."""
    rng = _rng(wl)
    dt = np.dtype(wl.dtype)
    pool = []
    for k in range(POOL):
        if dt.kind == "u":
            a = np.frombuffer(rng.bytes(wl.itemsize), dtype=dt).copy().reshape(wl.shape)
        else:
            a = rng.standard_normal(size=wl.shape).astype(dt)
        a.reshape(-1)[0] = k
        a.setflags(write=False)
        pool.append(a)
    return pool


def block_pool(wl: Workload, pool: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """POOL contiguous blocks of `wl.batch` items: block b holds items with seq
    b*batch ... b*batch+batch-1, so a stream of blocks b = 0,1,2,... (cycled mod POOL)
    carries exactly the same items, in the same order, as the per-item stream."""
    pool = pool if pool is not None else item_pool(wl)
    blocks = []
    for b in range(POOL):
        idx = [(b * wl.batch + j) % POOL for j in range(wl.batch)]
        blk = np.stack([pool[i] for i in idx])
        blk.setflags(write=False)
        blocks.append(blk)
    return blocks


class Checker:
    """Spot-checks received items against the pool: dtype, shape, tag (= seq % POOL) and
    last element. Every item for large items, a sample for small ones (so checking does not
    dominate a 64-byte-item loop). Raises AssertionError on a mismatch."""

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        pool = item_pool(wl)
        self.dtype = np.dtype(wl.dtype)
        self.shape = tuple(wl.shape)
        self.last = np.array([p.reshape(-1)[-1] for p in pool])
        self.tags = np.arange(POOL)
        self.checked = 0

    def item(self, seq: int, arr: np.ndarray) -> None:
        if arr.dtype != self.dtype or arr.shape != self.shape:
            raise AssertionError(
                f"item {seq}: got {arr.dtype}{arr.shape}, want {self.dtype}{self.shape}"
            )
        flat = arr.reshape(-1)
        k = seq % POOL
        if flat[0] != k or flat[-1] != self.last[k]:
            raise AssertionError(
                f"item {seq}: tag {flat[0]!r} / last {flat[-1]!r}, want {k} / {self.last[k]!r}"
            )
        self.checked += 1

    def batch(self, seq0: int, arr: np.ndarray) -> None:
        if arr.dtype != self.dtype or tuple(arr.shape[1:]) != self.shape:
            raise AssertionError(
                f"batch at {seq0}: got {arr.dtype}{arr.shape}, want {self.dtype}(n, *{self.shape})"
            )
        n = arr.shape[0]
        flat = arr.reshape(n, -1)
        k = (seq0 + np.arange(n)) % POOL
        if not (np.array_equal(flat[:, 0], k) and np.array_equal(flat[:, -1], self.last[k])):
            raise AssertionError(f"batch at {seq0}: tags {flat[:, 0][:8]}..., want {k[:8]}...")
        self.checked += n


class Meter:
    """Consumer-side clock. Call `tick(n)` with the running item count (every item, or every
    few dozen for tiny items); `finish(n)` at the end. The window starts at the first tick
    after `warmup` seconds from the first item (falls back to the whole stream if the stream
    was shorter than the warm-up)."""

    def __init__(self, warmup: float) -> None:
        self.warmup = warmup
        self.t_first: float | None = None
        self.n_first = 0
        self.t0: float | None = None
        self.n0 = 0
        self.t_end = 0.0
        self.n_end = 0

    def tick(self, n: int) -> None:
        t = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.n_first = t, n
        elif self.t0 is None and t - self.t_first >= self.warmup:
            self.t0, self.n0 = t, n

    def finish(self, n: int) -> None:
        self.t_end, self.n_end = time.perf_counter(), n
        if self.t0 is None or self.n_end - self.n0 < 2:
            self.t0, self.n0 = self.t_first or self.t_end, self.n_first

    def result(self, itemsize: int) -> dict[str, Any]:
        dt = self.t_end - (self.t0 or self.t_end)
        n = self.n_end - self.n0
        ips = n / dt if dt > 0 else 0.0
        return {
            "received": self.n_end,
            "window_items": n,
            "window_s": dt,
            "items_per_s": ips,
            "bytes_per_s": ips * itemsize,
            # the window on the shared monotonic clock, to charge CPU time to it
            "t0": self.t0,
            "t_end": self.t_end,
        }


class Paced:
    """Producer-side stop condition. Time-bounded: the clock starts when the consumer sets
    `go` and runs for `duration`; or count-bounded with `limit` (memory runs). Call
    `done(n)` every item, or every few dozen items for tiny ones."""

    def __init__(self, go: Any, duration: float, limit: int | None = None) -> None:
        self.go = go
        self.duration = duration
        self.limit = limit
        self.deadline: float | None = None

    def done(self, n: int) -> bool:
        if self.limit is not None:
            return n >= self.limit
        if self.deadline is None:
            if self.go.is_set():
                self.deadline = time.perf_counter() + self.duration
            return False
        return time.perf_counter() >= self.deadline


class LatencyRecorder:
    """Consumer side of the latency runs: `add(item)` on every arrival, with the producer's
    `time.monotonic_ns()` stamp in the item's first 8 bytes. Items arriving in the first
    `warmup` seconds are not recorded."""

    def __init__(self, warmup: float) -> None:
        self.warmup_ns = int(warmup * 1e9)
        self.first: int | None = None
        self.lat: list[int] = []
        self.received = 0

    def add(self, item: Any) -> None:
        now = time.monotonic_ns()
        stamp = int(np.frombuffer(item, dtype=np.int64, count=1)[0])
        self.received += 1
        if self.first is None:
            self.first = now
        if now - self.first >= self.warmup_ns:
            self.lat.append(now - stamp)

    def result(self) -> dict[str, Any]:
        us = [x / 1000 for x in self.lat]
        return {
            "received": self.received,
            "samples": len(us),
            "p50_us": percentile(us, 50),
            "p99_us": percentile(us, 99),
            "max_us": max(us) if us else float("nan"),
        }


def paced_items(go: Any, duration: float, rate: float, itemsize: int = 1024) -> Any:
    """Generator of fresh latency items (stamp in the first 8 bytes, stamped at yield) at
    `rate` per second until `duration` after go. Does not burst to catch up after a stall.
    The generator's return value (StopIteration.value) is the number of items yielded."""
    template = np.zeros(itemsize, dtype=np.uint8)
    template[8:] = np.arange(itemsize - 8, dtype=np.uint64).astype(np.uint8)
    period = 1.0 / rate
    paced = Paced(go, duration)
    n = 0
    nxt = time.perf_counter()
    while not paced.done(n):
        now = time.perf_counter()
        if nxt > now:
            time.sleep(nxt - now)
        yield latency_item(template)
        n += 1
        nxt += period
        now = time.perf_counter()
        if now - nxt > 0.05:  # stalled (back-pressure, start-up): restart the schedule
            nxt = now
    return n


def latency_item(template: np.ndarray) -> np.ndarray:
    """A fresh 1 KiB item with `time.monotonic_ns()` in its first 8 bytes (system-wide clock
    on Linux, so producer and consumer processes compare the same clock)."""
    a = template.copy()
    a[:8].view(np.int64)[0] = time.monotonic_ns()
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes from /proc/PID/status; {} if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def read_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_vm() -> dict[str, int]:
    return read_vm(os.getpid())


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def child_main(target: Callable[..., Any], q: Any, role: str, kwargs: dict[str, Any]) -> None:
    """Entry of every child process: run `target(q=q, **kwargs)`, report any exception on
    the result queue as {"role", "error"} instead of dying silently."""
    try:
        target(q=q, **kwargs)
    except BaseException as exc:
        q.put({"role": role, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})
        raise SystemExit(1) from None


def _version(mod: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(mod)
    except Exception:
        pass
    try:  # e.g. ndrelay run from the working tree's src/ without being installed
        m = __import__(mod)
        v = getattr(m, "__version__", None)
        return f"{v} (not installed, from {os.path.dirname(m.__file__ or '?')})" if v else "?"
    except Exception:
        return "not installed"


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 0
    commit = "?"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = (
            subprocess.run(
                ["git", "-C", here, "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or "?"
        )
    except Exception:
        pass
    libzmq = ""
    try:
        import zmq

        libzmq = f" (libzmq {zmq.zmq_version()})"
    except Exception:
        pass
    d = {
        "CPU": f"{cpu}, {ncpu} usable cores (os.cpu_count {os.cpu_count()})",
        "Memory": mem,
        "OS": f"{platform.system()} {platform.release()} {platform.machine()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "ndrelay": f"{_version('ndrelay')} (git {commit})",
        "msgpack / fastapi / starlette / uvicorn / httpx": " / ".join(
            _version(m) for m in ("msgpack", "fastapi", "starlette", "uvicorn", "httpx")
        ),
        "httptools / uvloop / h11": " / ".join(_version(m) for m in ("httptools", "uvloop", "h11")),
        "pyzmq": _version("pyzmq") + libzmq,
        "pyarrow": _version("pyarrow"),
        "psutil": _version("psutil"),
    }
    return d


if sys.platform != "linux":  # pragma: no cover
    print("warning: benchmarks assume Linux (/proc, system-wide CLOCK_MONOTONIC)", file=sys.stderr)
