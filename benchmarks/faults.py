"""Fault-injection harness: random faults against a real `ndrelay serve`, counting every
item (DESIGN.md §5). Not a speed test: it checks that nothing is lost, and that nothing
is delivered twice except what a SIGKILLed consumer had taken but not acknowledged.

    python benchmarks/faults.py                    # 20 rounds, seed 1
    python benchmarks/faults.py --rounds 50 --seed 7 --out faults.md
    python benchmarks/faults.py --quick            # one round of each fault, small (CI)
    python benchmarks/faults.py --backend URL      # a relay on another backend (serve --backend)

Each round makes a fresh queue (or fanout) stream of numbered int64 items (element 0 of
item i holds i), injects one fault, drains the stream to its end, and compares what the
consumers got with what was produced:

- consumer-sigkill: a consumer process killed with SIGKILL after a random number of
  items; another consumer gets the rest (after the lease). Duplicates are allowed up to
  the items the relay held unacknowledged for it at the kill (`unacked at kill`).
- consumer-exit: a consumer process leaves its `with` block early (clean exit).
- consumer-cut: a consumer's connection is reset under it (a proxy cuts it) 1-3 times.
- producer-sigkill: a producer process (`publish(producer=ID)`) killed with SIGKILL
  mid-upload, then started again with the same producer id.
- upload-reset: a producer's upload connection reset mid-body 1-3 times (a proxy).
- competing-consumers: 3 consumers sharing the queue, each leaving early at random and
  coming back, until the end.
- fanout-reconnect: a fanout consumer's connection reset 1-3 times; it resumes with
  `after=` (the stream retains every item, so no gap is expected).

Every process is started here and killed by its PID; every wait is bounded. Exit status
1 if any item was lost, or duplicated beyond the bound. Uses the test suite's helpers
(`tests/e2e/_sources.py`: `ndrelay serve` as a process; `tests/e2e/_proxy.py`: a TCP
proxy that cuts connections).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
E2E = os.path.join(ROOT, "tests", "e2e")
for path in (os.path.join(ROOT, "src"), E2E):
    if path not in sys.path:
        sys.path.insert(1, path)

import numpy as np  # noqa: E402
from _proxy import CuttingProxy  # noqa: E402
from _sources import ServeProcess, clean_env  # noqa: E402

import ndrelay  # noqa: E402
from ndrelay import RelayClient  # noqa: E402

FAULTS = (
    "consumer-sigkill",
    "consumer-exit",
    "consumer-cut",
    "producer-sigkill",
    "upload-reset",
    "competing-consumers",
    "fanout-reconnect",
)
LEASE = 1.0  # the relay's --lease: a killed consumer's items come back after this
ROUND_TIMEOUT = 120.0


@dataclass
class Round:
    index: int
    fault: str
    produced: int = 0
    consumed: list[int] = field(default_factory=list)
    unacked: int | None = None  # SIGKILLed consumer: items pending for it at the kill
    note: str = ""
    error: str | None = None

    @property
    def lost(self) -> int:
        return self.produced - len(set(self.consumed) & set(range(self.produced)))

    @property
    def duplicated(self) -> int:
        return len(self.consumed) - len(set(self.consumed))

    @property
    def bound(self) -> int:
        return self.unacked or 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.lost == 0 and self.duplicated <= self.bound


# -- the relay ---------------------------------------------------------------------------


def serve_args(backend: str) -> list[str]:
    """`ndrelay serve` arguments for a backend: the in-memory one, or a URL."""
    if backend == "memory":
        return []
    help_text = subprocess.run(
        [sys.executable, "-m", "ndrelay", "serve", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    if "--backend" not in help_text:
        sys.exit(f"faults.py: this ndrelay serve has no --backend option (for {backend!r})")
    return ["--backend", backend]


# -- processes ---------------------------------------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import os, signal, sys
    from ndrelay import RelayClient
    url, name, consumer, take, how = sys.argv[1:6]
    with RelayClient(url) as client, client.stream(name, consumer=consumer) as s:
        for n, item in enumerate(s):
            print(int(item[0]), flush=True)
            if n + 1 == int(take):
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                break
    """
)

PRODUCER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ndrelay import RelayClient
    url, name, producer, n, width = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
    items = (np.full(width, i, np.int64) for i in range(n))
    with RelayClient(url) as client:
        client.publish(name, items, producer=producer)
    """
)


def python(code: str, *args: Any, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[str, str]:
    """Wait for `proc` (bounded), kill it by PID if it overstays; its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise RuntimeError(
            f"process {proc.pid} did not finish in {timeout} s: {err[-500:]}"
        ) from None
    return out or "", err or ""


def items(n: int, width: int = 32) -> Iterator[np.ndarray]:
    for i in range(n):
        yield np.full(width, i, np.int64)


class Background:
    """A call in a daemon thread; `result()` waits for it (bounded) and re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._out: list[Any] = []
        self._err: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out.append(fn())
        except BaseException as exc:
            self._err.append(exc)

    def result(self, timeout: float = ROUND_TIMEOUT) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not finish in {timeout} s")
        if self._err:
            raise self._err[0]
        return self._out[0] if self._out else None


def drain(url: str, name: str, out: list[int], **kwargs: Any) -> None:
    with RelayClient(url) as client, client.stream(name, **kwargs) as s:
        for item in s:
            out.append(int(item[0]))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the faults --------------------------------------------------------------------------


class Faults:
    def __init__(self, relay: ServeProcess, rng: random.Random, n: int) -> None:
        self.relay = relay
        self.url = relay.url
        self.rng = rng
        self.n = n

    def run(self, r: Round) -> None:
        name = f"r{r.index}-{r.fault}"
        getattr(self, r.fault.replace("-", "_"))(r, name)
        with RelayClient(self.url) as client:
            r.produced = client.info(name)["produced"]
            client.delete(name)

    def _producer_thread(self, name: str, url: str | None = None, width: int = 32) -> Background:
        def publish() -> Any:
            with RelayClient(url or self.url) as client:
                return client.publish(name, items(self.n, width))

        return Background(publish, "faults-producer")

    def consumer_sigkill(self, r: Round, name: str) -> None:
        self._create(name)
        producer = self._producer_thread(name)
        take = self.rng.randint(1, self.n // 2)
        proc = python(CONSUMER, self.url, name, "doomed", take, "kill")
        out, err = finish(proc)
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"consumer exited with {proc.returncode}: {err[-500:]}")
        with RelayClient(self.url) as client:
            r.unacked = client.info(name)["pending"]  # the dead consumer's, lease running
        r.consumed += [int(x) for x in out.split()]
        drain(self.url, name, r.consumed)
        producer.result()
        r.note = f"killed after {take}"

    def consumer_exit(self, r: Round, name: str) -> None:
        self._create(name)
        producer = self._producer_thread(name)
        take = self.rng.randint(1, self.n // 2)
        proc = python(CONSUMER, self.url, name, "leaver", take, "break")
        out, err = finish(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"consumer exited with {proc.returncode}: {err[-500:]}")
        r.consumed += [int(x) for x in out.split()]
        drain(self.url, name, r.consumed)
        producer.result()
        r.note = f"left after {take}"

    def consumer_cut(self, r: Round, name: str, mode: str = "queue") -> None:
        self._create(name, mode)
        cuts = self.rng.randint(1, 3)
        at = sorted(self.rng.sample(range(1, self.n - 1), cuts))
        with CuttingProxy(self.relay.port) as proxy, RelayClient(proxy.url) as client:
            # connected before the producer starts (a fanout reader sees items from then)
            with client.stream(name, prefetch=self.rng.choice([1, 8, 64])) as s:
                producer = self._producer_thread(name)
                for item in s:
                    r.consumed.append(int(item[0]))
                    if at and len(r.consumed) == at[0]:
                        at.pop(0)
                        proxy.cut_all()
            producer.result()
            # a cut resets the stream's connection and the acknowledgements' together
            r.note = f"{proxy.cuts} connections reset, {s.reconnects} resumes"

    def fanout_reconnect(self, r: Round, name: str) -> None:
        self.consumer_cut(r, name, mode="fanout")

    def producer_sigkill(self, r: Round, name: str) -> None:
        self._create(name)
        consumer = Background(lambda: drain(self.url, name, r.consumed), "faults-consumer")
        at = self.rng.randint(1, self.n // 2)
        args = (self.url, name, f"producer-{r.index}", self.n, 2048)  # 16 KiB items
        first = python(PRODUCER, *args, stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(r.consumed) >= at or first.poll() is not None, 60, "items")
            killed = first.poll() is None
            os.kill(first.pid, signal.SIGKILL) if killed else None
        finally:
            finish(first)
        with RelayClient(self.url) as client:
            had = client.info(name)["produced"]
        again = python(PRODUCER, *args, stdout=subprocess.DEVNULL)
        _, err = finish(again)
        if again.returncode != 0:
            raise RuntimeError(f"restarted producer exited with {again.returncode}: {err[-500:]}")
        consumer.result()
        r.note = f"killed with {had} accepted" if killed else "finished before the kill"

    def upload_reset(self, r: Round, name: str) -> None:
        self._create(name)
        consumer = Background(lambda: drain(self.url, name, r.consumed), "faults-consumer")
        cuts = self.rng.randint(1, 3)
        width = 128  # 1 KiB items
        with CuttingProxy(self.relay.port) as proxy:
            total = self.n * width * 8
            # each connection carries more than the one cut before it passed
            proxy.arm(self.rng.randint(1, max(2, total // (cuts + 1))))
            producer = self._producer_thread(name, proxy.url, width)
            for i in range(cuts):
                if i:
                    proxy.arm(self.rng.randint(1, max(2, total // (cuts + 1))))
                deadline = time.monotonic() + 10
                while proxy.armed and time.monotonic() < deadline:
                    time.sleep(0.005)
            answer = producer.result()
            proxy.arm(1 << 62)  # disarmed in effect
            r.note = f"{proxy.cuts} uploads reset, {answer['reconnects']} resumes"
            if not proxy.cuts:
                raise RuntimeError("the fault was not injected: no upload was reset")
        consumer.result()

    def competing_consumers(self, r: Round, name: str) -> None:
        self._create(name)
        producer = self._producer_thread(name)
        lock = threading.Lock()
        exits = [0]

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with RelayClient(self.url) as client:
                while True:
                    stop = rng.randint(1, max(2, self.n // 5))
                    got: list[int] = []
                    ended = True
                    with client.stream(name, prefetch=rng.choice([1, 8, 64])) as s:
                        for item in s:
                            got.append(int(item[0]))
                            if len(got) == stop:
                                ended = False
                                break
                    with lock:
                        r.consumed.extend(got)
                        exits[0] += not ended
                    if ended:
                        return

        workers = [Background(lambda s=s: worker(s), "faults-worker") for s in self._seeds(3)]
        for w in workers:
            w.result()
        producer.result()
        drain(self.url, name, r.consumed)  # items given back after the others had ended
        r.note = f"{exits[0]} early exits"

    def _seeds(self, k: int) -> list[int]:
        return [self.rng.randrange(1 << 30) for _ in range(k)]

    def _create(self, name: str, mode: str = "queue") -> None:
        size = 64 if mode == "queue" else self.n  # fanout: every item retained
        with RelayClient(self.url) as client:
            client.create(name, size, mode=mode)


# -- the report --------------------------------------------------------------------------


def row(r: Round) -> str:
    unacked = "-" if r.unacked is None else str(r.unacked)
    status = "ok" if r.ok else ("ERROR: " + r.error if r.error else "FAIL")
    return (
        f"| {r.index} | {r.fault} | {r.produced} | {len(r.consumed)} | {r.lost} | "
        f"{r.duplicated} | {unacked} | {status} | {r.note} |"
    )


def report(rounds: list[Round], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "| round | fault | produced | consumed | lost | duplicated | unacked at kill | result "
        "| detail |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row(r) for r in rounds),
        "",
        "| fault | rounds | produced | consumed | lost | duplicated | unacked at kill (sum) |",
        "|---|---|---|---|---|---|---|",
    ]
    by_fault: dict[str, list[Round]] = collections.defaultdict(list)
    for r in rounds:
        by_fault[r.fault].append(r)
    for fault in FAULTS:
        rs = by_fault.get(fault, [])
        if not rs:
            continue
        unacked = [r.unacked for r in rs if r.unacked is not None]
        lines.append(
            f"| {fault} | {len(rs)} | {sum(r.produced for r in rs)} | "
            f"{sum(len(r.consumed) for r in rs)} | {sum(r.lost for r in rs)} | "
            f"{sum(r.duplicated for r in rs)} | {sum(unacked) if unacked else '-'} |"
        )
    lines.append(
        f"| **all** | {len(rounds)} | {sum(r.produced for r in rounds)} | "
        f"{sum(len(r.consumed) for r in rounds)} | **{sum(r.lost for r in rounds)}** | "
        f"{sum(r.duplicated for r in rounds)} | "
        f"{sum(r.unacked or 0 for r in rounds)} |"
    )
    lines += [
        "",
        f"Command: `{' '.join(['python benchmarks/faults.py', *sys.argv[1:]])}`",
        f"Backend: {args.backend}; {args.items} items per round; lease {LEASE:g} s; "
        f"{seconds:.0f} s in all; ndrelay {ndrelay.__version__}, Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--items", type=int, default=2000, help="items per round")
    ap.add_argument("--quick", action="store_true", help="one small round of each fault")
    ap.add_argument("--only", default="", help="comma list of faults (default: all)")
    ap.add_argument("--backend", default="memory", help="memory, or a URL for serve --backend")
    ap.add_argument("--out", help="also write the report (markdown) here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.items = len(FAULTS), 400
    faults = tuple(f for f in args.only.split(",") if f) or FAULTS
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown fault {sorted(unknown)}; the faults are: {', '.join(FAULTS)}")
    if args.quick:
        args.rounds = len(faults)
    rng = random.Random(args.seed)
    order: list[str] = []
    while len(order) < args.rounds:  # every fault as often as the others, in random order
        order += rng.sample(faults, len(faults))
    relay = ServeProcess("--lease", str(LEASE), *serve_args(args.backend))
    rounds: list[Round] = []
    start = time.monotonic()
    try:
        injector = Faults(relay, rng, args.items)
        for i, fault in enumerate(order[: args.rounds], 1):
            r = Round(i, fault)
            try:
                Background(lambda r=r: injector.run(r), "faults-round").result(ROUND_TIMEOUT)
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"[:300]
            rounds.append(r)
            print(row(r), file=sys.stderr, flush=True)
    finally:
        relay.stop()
    text = report(rounds, args, time.monotonic() - start)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(r.ok for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
