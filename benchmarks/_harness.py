"""Process orchestration: start each role in its own spawned process, wait for its messages
with timeouts, sample RSS, and kill every process it started (by PID) on the way out."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import resource
import threading
import time
from typing import Any

from _common import child_main, read_cpu, read_vm

__all__ = ["ChildFailed", "Harness"]

CTX = mp.get_context("spawn")


class ChildFailed(RuntimeError):
    pass


def _entry(target: str, q: Any, role: str, kwargs: dict[str, Any]) -> None:
    import importlib
    import sys

    src = kwargs.pop("src", None)
    if src:  # another ndrelay source tree (the baseline): ahead of the installed one
        sys.path.insert(0, src)
        # (and in programs this process runs, such as `ndrelay serve`)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [src, os.environ.get("PYTHONPATH")])
        )

    mod, _, fn = target.partition(":")
    child_main(getattr(importlib.import_module(mod), fn), q, role, kwargs)


class Harness:
    """One measurement: a fresh result queue and `go` event, the processes it started, and
    the messages they sent. Use as a context manager; `__exit__` kills what is still alive."""

    def __init__(self, sample_rss: bool = False, sample_every: float = 0.05) -> None:
        self.q: Any = CTX.Queue()
        self.go: Any = CTX.Event()
        self.procs: dict[str, Any] = {}
        self.mail: dict[tuple[str, str], dict[str, Any]] = {}
        self._sample = sample_rss
        self._every = sample_every
        self.rss: dict[str, list[tuple[float, int]]] = {}
        #: (perf_counter, CPU seconds) of every process, sampled every `cpu_every` s
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self._cpu_every = 0.05
        self._cpu_sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._cpu0 = _cpu_snapshot()
        #: CPU (in cores) that processes other than this harness and its children used
        #: while the measurement ran: set by close().
        self.foreign_cores: float | None = None

    # -- processes ------------------------------------------------------------------------
    def start(self, role: str, target: str, **kwargs: Any) -> int:
        kwargs = dict(kwargs)
        if "go" in _wants_go(target):
            kwargs["go"] = self.go
        kwargs["role"] = role
        p = CTX.Process(
            target=_entry, args=(target, self.q, role, kwargs), daemon=True, name=f"bench-{role}"
        )
        p.start()
        self.procs[role] = p
        if self._cpu_sampler is None:
            self._cpu_sampler = threading.Thread(target=self._cpu_loop, daemon=True)
            self._cpu_sampler.start()
        if self._sample and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
            self._sampler.start()
        return int(p.pid)

    def pid(self, role: str) -> int:
        return int(self.procs[role].pid)

    def _sample_loop(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self._every):
            for role, p in list(self.procs.items()):
                vm = read_vm(p.pid)
                if "VmRSS" in vm:
                    self.rss.setdefault(role, []).append((time.perf_counter() - t0, vm["VmRSS"]))

    def _cpu_loop(self) -> None:
        while not self._stop.wait(self._cpu_every):
            for role, p in list(self.procs.items()):
                cpu = read_cpu(p.pid)
                if cpu is not None:
                    self.cpu.setdefault(role, []).append((time.perf_counter(), cpu))

    def cpu_between(self, role: str, t0: float, t1: float) -> float | None:
        """CPU seconds `role` used between perf_counter times t0 and t1 (interpolated
        between samples); None without samples around both."""
        ss = self.cpu.get(role, [])
        if len(ss) < 2 or t1 <= t0 or ss[0][0] > t0 or ss[-1][0] < t1 - 2 * self._cpu_every:
            return None

        def at(t: float) -> float:
            prev = ss[0]
            for cur in ss:
                if cur[0] >= t:
                    if cur[0] == prev[0]:
                        return cur[1]
                    f = (t - prev[0]) / (cur[0] - prev[0])
                    return prev[1] + f * (cur[1] - prev[1])
                prev = cur
            return ss[-1][1]

        return at(t1) - at(t0)

    # -- messages -------------------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        try:
            msg = self.q.get(timeout=timeout)
        except queue_mod.Empty:
            return
        role = msg.get("role", "?")
        if "error" in msg:
            raise ChildFailed(f"{role}: {msg['error']}\n{msg.get('tb', '')}")
        kind = "ready" if msg.get("ready") else "result"
        self.mail[(role, kind)] = msg

    def wait(self, role: str, kind: str = "result", timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (role, kind) not in self.mail:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"timed out after {timeout:.0f}s waiting for {role} {kind}")
            self._pump(min(0.1, left))
            if (role, kind) in self.mail:
                break
            for r, p in self.procs.items():
                if p.exitcode not in (None, 0):
                    # drain: the child may have reported its error just before dying
                    self._pump(0.2)
                    raise ChildFailed(f"{r} exited with code {p.exitcode} (waiting for {role})")
        msg = self.mail[(role, kind)]
        return msg["result"] if kind == "result" else msg

    def vm(self, role: str) -> dict[str, int]:
        return read_vm(self.pid(role))

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        for p in self.procs.values():
            if p.is_alive():
                p.kill()  # SIGKILL by PID: only processes this harness started
        for p in self.procs.values():
            p.join(timeout=5)
        self.foreign_cores = _foreign_cores(self._cpu0, _cpu_snapshot())
        if self._sampler is not None:
            self._sampler.join(timeout=1)
        if self._cpu_sampler is not None:
            self._cpu_sampler.join(timeout=1)
        self.q.close()
        self.q.join_thread()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall, machine busy CPU seconds (user+nice+system from /proc/stat), CPU seconds of
    this process and its reaped children)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        busy = sum(int(x) for x in fields[1:4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), busy, me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _foreign_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    wall = b[0] - a[0]
    if wall <= 0:
        return float("nan")
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall)


def _wants_go(target: str) -> set[str]:
    # Every peer role takes `go` except the middles/servers that never pace anything.
    mod, _, fn = target.partition(":")
    return set() if fn in ("middle", "bare_server") else {"go"}
