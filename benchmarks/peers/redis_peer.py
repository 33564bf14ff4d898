"""Redis Streams peer: a plain redis-py producer/consumer pair through a redis-server, and the
redis-server (and `ndrelay serve --backend redis://...`) that the ndrelay-on-Redis rows use.

The pair is what a user would write without ndrelay, and the baseline the Redis backend is
held to: the producer `XADD`s each item as one entry (field `d`: the item's bytes; W2b: 256
items per entry), pipelined `depth` entries per round trip; the consumer `XREADGROUP`s
(consumer group, `>`), checks the items and, in one pipelined round trip per reply, `XACK`s
and `XDEL`s what it read. Bounded like ndrelay's stream, by credits: the producer may have
`size` entries in Redis; the consumer's round trip also `RPUSH`es the number it took to a
credit list, which the producer `BLPOP`s when it has none left (no polling, and no
`MAXLEN` trimming: that would drop unread items). An entry with field `end` (the item
count) ends the stream. TCP over 127.0.0.1, hiredis parsing the replies when installed.

`redis_server` becomes (exec) a redis-server on a free 127.0.0.1 port without persistence
(`--save ""`, no AOF): its CPU time is that role's, and the harness kills it by PID.
`ndrelay_server` becomes `ndrelay serve --backend redis://127.0.0.1:PORT/0`, after checking
that this ndrelay has that option (a clear error otherwise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from _common import POOL, Checker, LatencyRecorder, Meter, Paced, Workload, item_pool, self_vm

__all__ = [
    "consumer",
    "lat_consumer",
    "lat_producer",
    "ndrelay_server",
    "producer",
    "redis_server",
    "scale_consumer",
]

STREAM = b"bench"
GROUP = b"bench"
CREDITS = b"bench:credits"
TIMEOUT_MS = 60_000
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exec(q: Any, role: str, argv: list[str], ready: dict[str, Any]) -> None:
    """Report `ready` on the queue (flushed), then replace this process with `argv`: the
    harness then samples, and finally kills, that program by this PID. stdout is
    discarded (redis-server's banner); stderr stays. No NDRELAY_* variables of the
    caller's shell (a token, say) reach it: the relay runs as configured here."""
    q.put({"role": role, "ready": True, **ready})
    q.close()
    q.join_thread()
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")}
    os.execve(argv[0], argv, env)


def redis_server(q: Any, role: str = "middle", **_: Any) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
    port = _free_port()
    argv = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
        *("--save", "", "--appendonly", "no", "--dir", tempfile.gettempdir()),
        *("--logfile", "", "--loglevel", "warning", "--daemonize", "no"),
    ]
    _exec(q, role, argv, {"port": port})


def backend_problem() -> str:
    """'' when `ndrelay serve` has `--backend` (the Redis backend), else why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ndrelay", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ndrelay serve --help` failed: {exc}"
    if done.returncode != 0:
        return f"`ndrelay serve --help` exited {done.returncode}: {done.stderr.strip()[-200:]}"
    if "--backend" not in done.stdout:
        return "this ndrelay has no Redis backend (`ndrelay serve --backend redis://...`)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'ndrelay[redis]')"
    return ""


def ndrelay_server(q: Any, redis_port: int, role: str = "server", **_: Any) -> None:
    problem = backend_problem()
    if problem:
        raise RuntimeError(f"ndrelay on Redis cannot run: {problem}")
    port = _free_port()
    argv = [
        sys.executable,
        *("-m", "ndrelay", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend", f"redis://127.0.0.1:{redis_port}/0", "--log-level", "warning"),
    ]
    _exec(q, role, argv, {"port": port})


def _client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=TIMEOUT_MS / 1000)


def _depth(w: Workload) -> int:
    """Entries per pipeline (producer) and per XREADGROUP (consumer): 256 small items, or
    about 8 MiB of large ones; at most a quarter of the bound."""
    frame = w.itemsize * (w.batch or 1)
    depth = 256 if frame < 65536 else max(1, (8 * MiB) // frame)
    return max(1, min(depth, _size(w) // 4))


def _size(w: Workload) -> int:
    """The bound on entries in Redis: ndrelay's stream sizes (64 large items, 1024 small),
    at most 64 MiB."""
    env = os.environ.get("NDRELAY_BENCH_SIZE")
    if env:
        return int(env)
    frame = w.itemsize * (w.batch or 1)
    size = 1024 if w.small else 64
    return max(2, min(size, (64 * MiB) // frame))


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    port: int,
    limit: int | None = None,
    role: str = "producer",
    **_: Any,
) -> None:
    w = Workload.from_dict(wl)
    # large items as memoryviews (redis-py writes them without a copy), small ones as bytes
    # (redis-py packs bytes faster: 3x per small XADD, measured)
    pool = [memoryview(a).cast("B") if not w.small else a.tobytes() for a in item_pool(w)]
    r = _client(port)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    q.put({"role": role, "ready": True})
    paced = Paced(go, duration, limit)
    depth, size = _depth(w), _size(w)
    pipe = r.pipeline(transaction=False)
    n = k = 0
    credits = size  # entries the producer may still add before the consumer took some
    while not paced.done(n):
        while credits < depth:  # full: wait for the consumer to take some
            got = r.blpop([CREDITS], timeout=TIMEOUT_MS / 1000)
            if got is None:
                raise TimeoutError(f"the consumer took nothing for {TIMEOUT_MS / 1000:.0f} s")
            credits += int(got[1])
        credits -= depth
        for _ in range(depth):
            if w.batch:
                parts = []
                for _ in range(w.batch):
                    parts.append(pool[k])
                    k = k + 1 if k + 1 < POOL else 0
                pipe.xadd(STREAM, {b"d": b"".join(parts)})
                n += w.batch
            else:
                pipe.xadd(STREAM, {b"d": pool[k]})
                k = k + 1 if k + 1 < POOL else 0
                n += 1
        pipe.execute()
    r.xadd(STREAM, {b"end": n})
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    r.close()


def consumer(
    q: Any, go: Any, wl: dict[str, Any], port: int, role: str = "consumer", **_: Any
) -> None:
    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    dt, shape = np.dtype(w.dtype), tuple(w.shape)
    r = _client(port)
    done = r.pipeline(transaction=False)
    count = _depth(w)
    n = nb = 0
    last: Any = None
    go.set()
    ended = False
    while not ended:
        reply = r.xreadgroup(GROUP, b"c", {STREAM: b">"}, count=count, block=TIMEOUT_MS)
        if not reply:
            raise TimeoutError(f"no entry for {TIMEOUT_MS / 1000:.0f} s")
        entries = reply[0][1]
        ids = []
        for eid, fields in entries:
            ids.append(eid)
            data = fields.get(b"d")
            if data is None:
                ended = True
                break
            if w.batch:
                arr = np.frombuffer(data, dtype=dt).reshape(-1, *shape)
                if nb % 16 == 0:
                    check.batch(n, arr)
                last = (n, arr)
                nb += 1
                n += arr.shape[0]
                meter.tick(n)
            else:
                arr = np.frombuffer(data, dtype=dt).reshape(shape)
                if not w.small or n & 1023 == 0:
                    check.item(n, arr)
                last = (n, arr)
                n += 1
        if not w.batch:
            meter.tick(n)
        done.xack(STREAM, GROUP, *ids)
        done.xdel(STREAM, *ids)
        done.rpush(CREDITS, len(ids))
        done.execute()
    if last is not None:
        (check.batch if w.batch else check.item)(*last)
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )
    r.close()


def lat_producer(
    q: Any, go: Any, duration: float, rate: float, port: int, role: str = "producer", **_: Any
) -> None:
    from _common import paced_items

    r = _client(port)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    q.put({"role": role, "ready": True})
    n = 0
    for item in paced_items(go, duration, rate):
        r.xadd(STREAM, {b"d": memoryview(item).cast("B")})
        n += 1
    r.xadd(STREAM, {b"end": n})
    q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})
    r.close()


def lat_consumer(
    q: Any, go: Any, port: int, warmup: float, role: str = "consumer", **_: Any
) -> None:
    rec = LatencyRecorder(warmup)
    r = _client(port)
    done = r.pipeline(transaction=False)
    go.set()
    ended = False
    while not ended:
        reply = r.xreadgroup(GROUP, b"c", {STREAM: b">"}, count=64, block=TIMEOUT_MS)
        if not reply:
            raise TimeoutError(f"no entry for {TIMEOUT_MS / 1000:.0f} s")
        ids = []
        for eid, fields in reply[0][1]:
            ids.append(eid)
            data = fields.get(b"d")
            if data is None:
                ended = True
                break
            rec.add(np.frombuffer(data, dtype=np.uint8))
        done.xack(STREAM, GROUP, *ids)
        done.xdel(STREAM, *ids)
        done.execute()
    q.put({"role": role, "result": {**rec.result(), "vm": self_vm()}})
    r.close()


def scale_consumer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    port: int,
    name: str,
    index: int,
    role: str = "consumer",
    **_: Any,
) -> None:
    """One of several queue consumers of `name` (consumer id `bench-INDEX`) on one relay
    replica: each gets a share of the items, so an item is checked against the pool by
    its own tag (element 0), not by its position in this consumer's share."""
    from ndrelay import RelayClient

    w = Workload.from_dict(wl)
    pool = item_pool(w)
    last = [p.reshape(-1)[-1] for p in pool]
    dt, shape = np.dtype(w.dtype), tuple(w.shape)
    meter = Meter(w.warmup)
    n = checked = 0
    deadline = time.monotonic() + 20
    go.set()
    with RelayClient(f"http://127.0.0.1:{port}") as c:
        while True:  # the stream exists once the producer made it
            try:
                stream = c.stream(name, consumer=f"bench-{index}")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with stream:
            for arr in stream:
                flat = arr.reshape(-1)
                tag = int(flat[0])
                if arr.dtype != dt or arr.shape != shape or not 0 <= tag < POOL:
                    raise AssertionError(f"item {n}: {arr.dtype}{arr.shape}, tag {flat[0]!r}")
                if flat[-1] != last[tag]:
                    raise AssertionError(f"item {n}: last element {flat[-1]!r} for tag {tag}")
                checked += 1
                n += 1
                meter.tick(n)
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": checked, "vm": self_vm()},
        }
    )
