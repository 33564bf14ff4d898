"""ndrelay benchmark suite: ndrelay against a raw TCP socket, pyzmq, Arrow Flight, Zenoh and a
plain redis-py pair on Redis Streams, side by side, on 127.0.0.1, in one run.

    python benchmarks/run.py                 # full run (3 runs of everything, < 10 min)
    python benchmarks/run.py --quick         # tiny sizes, sanity checks, non-zero exit on failure
    python benchmarks/run.py --only W1,LAT --transports raw,ndrelay --runs 5 --out results.md
    python benchmarks/run.py --quick --transports raw,redis,ndrelay-redis   # the Redis rows

See benchmarks/README.md for what each workload and peer does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import traceback
import urllib.request
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import Workload, machine_description, summarize  # noqa: E402
from _harness import ChildFailed, Harness  # noqa: E402

TRANSPORTS = ("raw", "zmq", "flight", "zenoh", "redis", "ndrelay", "ndrelay-redis")
TOPOLOGIES = ("served", "relayed")
MiB = 1 << 20
#: "other load" above this many cores marks a figure as disturbed (⚠).
BUSY = 0.25


# --- workloads -------------------------------------------------------------------------------


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:
        d, w = 0.3, 0.05
        return {
            "W1": Workload("W1", "<f4", (16384,), d, w, description="64 KiB float32 (quick)"),
            "W2": Workload("W2", "<f4", (16,), d, w, description="64 B float32, one per frame"),
            "W2b": Workload(
                "W2b",
                "<f4",
                (16,),
                d,
                w,
                batch=256,
                description="64 B float32, read in stacked batches of 256",
            ),
            "W2c": Workload(
                "W2c",
                "<f4",
                (16,),
                d,
                w,
                batch=256,
                single=True,
                description="64 B float32 yielded one by one, read in stacked batches of 256",
            ),
            "W3": Workload(
                "W3", "|u1", (128, 192, 3), d, w, description="72 KiB uint8 image (quick)"
            ),
        }
    d, w = 1.5, 0.3
    return {
        "W1": Workload("W1", "<f4", (262144,), d, w, description="1 MiB float32 arrays"),
        "W2": Workload("W2", "<f4", (16,), d, w, description="64 B float32, one per frame"),
        "W2b": Workload(
            "W2b",
            "<f4",
            (16,),
            d,
            w,
            batch=256,
            description="64 B float32, read in stacked batches of 256",
        ),
        "W2c": Workload(
            "W2c",
            "<f4",
            (16,),
            d,
            w,
            batch=256,
            single=True,
            description="64 B float32 yielded one by one, read in stacked batches of 256",
        ),
        "W3": Workload(
            "W3",
            "|u1",
            (2048, 1632, 3),
            d,
            w,
            description="10.0 MB uint8 camera frames (2048x1632 RGB)",
        ),
    }


#: Set by --baseline-src: another ndrelay source tree measured next to this one.
BASELINE_SRC: list[str] = []
#: ndrelay's modes on the Redis backend (this tree, and the --baseline-src tree)
ON_REDIS = ("redis", "redis-base")


def variants(wl: Workload) -> list[tuple[str, str]]:
    """(transport, mode) pairs measured for a workload; the first raw one listed in BASELINE
    is the denominator of every ratio."""
    base = [("ndrelay", "base")] if BASELINE_SRC else []
    if wl.single:  # W2c: single items produced; the peers send them one by one
        return [("raw", "coalesce"), ("zmq", ""), ("ndrelay", ""), *base]
    if wl.batch:
        raw = [("raw", "batch")]
    elif wl.name == "W2":
        raw = [("raw", "coalesce"), ("raw", "item")]
    else:
        raw = [("raw", "item")]
    extra = [("ndrelay", "uds"), ("ndrelay", "async")] if wl.name == "W1" else []
    zenoh = [("zenoh", "tcp"), ("zenoh", "shm")]
    redis = [("redis", ""), ("ndrelay", "redis")]
    if BASELINE_SRC:
        redis.append(("ndrelay", "redis-base"))
    return [*raw, ("zmq", ""), ("flight", ""), *zenoh, ("ndrelay", ""), *extra, *redis, *base]


def transport_of(tr: str, mode: str) -> str:
    """The `--transports` name that selects a variant: ndrelay on the Redis backend is
    `ndrelay-redis` (it needs redis-server and a Redis-capable ndrelay)."""
    return "ndrelay-redis" if tr == "ndrelay" and mode in ON_REDIS else tr


def applies(tr: str, mode: str, topo: str) -> bool:
    """Zenoh is measured served only (a relayed Zenoh needs its router, zenohd); Redis
    relayed only (producer -> redis-server (and ndrelay) -> consumer)."""
    if tr == "zenoh":
        return topo == "served"
    if tr == "redis" or (tr == "ndrelay" and mode in ON_REDIS):
        return topo == "relayed"
    return True


def peer_workload(tr: str, wl: Workload) -> Workload:
    """W2c for the peers: single items, one per frame/message (they have no batching
    reader), measured against the same raw baseline."""
    if wl.single and tr != "ndrelay":
        return dataclasses.replace(wl, batch=0, single=False)
    return wl


def ndrelay_size(wl: Workload) -> int:
    """The ndrelay stream's buffer size (items): 64 (DESIGN's default) for large items;
    for 64-byte items SMALL_SIZE, since a 64-item buffer (4 KiB) could never fill a
    256-item batch. Override with NDRELAY_BENCH_SIZE=N (all workloads)."""
    env = os.environ.get("NDRELAY_BENCH_SIZE")
    if env:
        return int(env)
    return SMALL_SIZE if wl.small else 64


SMALL_SIZE = 1024

BASELINE = {
    "W1": ("raw", "item"),
    "W2": ("raw", "coalesce"),
    "W2b": ("raw", "batch"),
    "W2c": ("raw", "coalesce"),
    "W3": ("raw", "item"),
}

LABEL = {
    ("raw", "item"): "raw TCP",
    ("raw", "coalesce"): "raw TCP, coalesced sends",
    ("raw", "batch"): "raw TCP, 1 header/256",
    ("zmq", ""): "pyzmq PUSH/PULL",
    ("flight", ""): "Arrow Flight do_get",
    ("zenoh", "tcp"): "Zenoh pub/sub, TCP",
    ("zenoh", "shm"): "Zenoh pub/sub, shared memory",
    ("ndrelay", ""): "**ndrelay**",
    ("ndrelay", "uds"): "**ndrelay**, Unix socket",
    ("ndrelay", "async"): "**ndrelay**, AsyncRelayClient",
    ("ndrelay", "base"): "ndrelay before (baseline tree)",
    ("redis", ""): "redis-py XADD/XREADGROUP+XACK",
    ("ndrelay", "redis"): "**ndrelay on Redis**",
    ("ndrelay", "redis-base"): "ndrelay on Redis before (baseline tree)",
}


def label(tr: str, mode: str, wl: Workload | None = None) -> str:
    if wl is not None and wl.name == "W2" and (tr, mode) == ("raw", "item"):
        return "raw TCP, one send per item"
    return LABEL[(tr, mode)]


# --- availability ----------------------------------------------------------------------------


def availability() -> dict[str, str]:
    """'' when usable, else why not."""
    out = {"raw": ""}
    out["zmq"] = "" if importlib.util.find_spec("zmq") else "not installed (pip install pyzmq)"
    out["zenoh"] = (
        "" if importlib.util.find_spec("zenoh") else "not installed (pip install eclipse-zenoh)"
    )
    try:
        ok = importlib.util.find_spec("pyarrow") and importlib.util.find_spec("pyarrow.flight")
        out["flight"] = "" if ok else "not installed (pip install pyarrow)"
    except Exception:
        out["flight"] = "not installed (pip install pyarrow)"
    try:
        from ndrelay import Relay, RelayClient, create_app  # noqa: F401

        out["ndrelay"] = ""
    except Exception as exc:
        out["ndrelay"] = f"not importable ({type(exc).__name__}: {exc})"
    if not importlib.util.find_spec("redis"):
        out["redis"] = "not installed (pip install 'redis[hiredis]')"
    elif shutil.which("redis-server") is None:
        out["redis"] = "redis-server not installed (Debian: apt install redis-server)"
    else:
        out["redis"] = ""
    out["ndrelay-redis"] = out["ndrelay"] or out["redis"]
    return out


def _backend_problem() -> str:
    """'' when `ndrelay serve --backend redis://...` exists, else why not (asks the CLI)."""
    from peers.redis_peer import backend_problem

    return backend_problem()


def _ensure_ndrelay_path() -> None:
    """Use the installed package if there is one, else the working tree's src/."""
    if importlib.util.find_spec("ndrelay") is None:
        src = os.path.join(ROOT, "src")
        if os.path.isdir(os.path.join(src, "ndrelay")):
            sys.path.insert(0, src)


# --- one measurement -------------------------------------------------------------------------


def _wait_http(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise ChildFailed(f"server on port {port} not healthy after {timeout:.0f}s: {last}")


def _ndrelay_kw(mode: str, uds: str | None) -> dict[str, Any]:
    """Extra arguments of every ndrelay role for a variant."""
    kw: dict[str, Any] = {}
    if mode == "uds":
        kw["uds"] = uds
    if mode in ("base", "redis-base"):
        kw["src"] = BASELINE_SRC[0]
    return kw


def _wait_uds(path: str, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise ChildFailed(f"server on {path} not listening after {timeout:.0f}s")


def _start_pair(
    h: Harness,
    tr: str,
    mode: str,
    wl: Workload,
    topo: str,
    limit: int | None,
    name: str,
    uds: str | None = None,
) -> int:
    """Start producer (and middle/server) for a throughput run; return the consumer's port."""
    wd = wl.to_dict()
    frame = wl.itemsize * (wl.batch or 1)
    if tr in ("raw", "zmq"):
        mod = "peers.raw" if tr == "raw" else "peers.zmq_peer"
        extra = {"mode": mode} if tr == "raw" else {}
        if topo == "served":
            h.start(
                "producer", f"{mod}:producer", wl=wd, duration=wl.duration, limit=limit, **extra
            )
            return int(h.wait("producer", "ready")["port"])
        h.start("middle", f"{mod}:middle", frame_bytes=frame)
        m = h.wait("middle", "ready")
        h.start(
            "producer",
            f"{mod}:producer",
            wl=wd,
            duration=wl.duration,
            limit=limit,
            port=m["port_in"],
            **extra,
        )
        return int(m["port_out"])
    if tr == "zenoh":
        h.start(
            "producer",
            "peers.zenoh_peer:producer",
            wl=wd,
            duration=wl.duration,
            limit=limit,
            mode=mode,
        )
        return int(h.wait("producer", "ready", timeout=60)["port"])
    if tr == "flight":
        h.start("producer", "peers.flight_peer:producer", wl=wd, duration=wl.duration, limit=limit)
        port = int(h.wait("producer", "ready", timeout=60)["port"])
        if topo == "relayed":
            h.start("middle", "peers.flight_peer:middle", upstream=port)
            port = int(h.wait("middle", "ready", timeout=60)["port"])
        return port
    if tr == "redis":
        h.start("middle", "peers.redis_peer:redis_server")
        port = int(h.wait("middle", "ready", timeout=60)["port"])
        _wait_redis(port, 30)
        h.start(
            "producer",
            "peers.redis_peer:producer",
            wl=wd,
            duration=wl.duration,
            port=port,
            limit=limit,
        )
        h.wait("producer", "ready", timeout=60)  # the stream and its group exist
        return port
    if tr == "ndrelay" and mode in ON_REDIS:
        kw = _ndrelay_kw(mode, uds)
        port = _start_ndrelay_on_redis(h, **kw)
        h.start(
            "producer",
            "peers.ndrelay_peer:producer",
            wl=wd,
            duration=wl.duration,
            port=port,
            name=name,
            limit=limit,
            size=ndrelay_size(wl),
            **kw,
        )
        return port
    if tr == "ndrelay":
        kw = _ndrelay_kw(mode, uds)
        if topo == "served":
            h.start(
                "server",
                "peers.ndrelay_peer:served_server",
                wl=wd,
                duration=wl.duration,
                name=name,
                limit=limit,
                size=ndrelay_size(wl),
                **kw,
            )
            port = h.wait("server", "ready", timeout=60)["port"]
            if uds:
                _wait_uds(uds, 30)
                return 0
            _wait_http(int(port), 30)
            return int(port)
        h.start("server", "peers.ndrelay_peer:bare_server", **kw)
        port = h.wait("server", "ready", timeout=60)["port"]
        if uds:
            _wait_uds(uds, 30)
        else:
            _wait_http(int(port), 30)
        h.start(
            "producer",
            "peers.ndrelay_peer:producer",
            wl=wd,
            duration=wl.duration,
            port=port,
            name=name,
            limit=limit,
            size=ndrelay_size(wl),
            client="async" if mode == "async" else "sync",
            **kw,
        )
        return int(port or 0)
    raise ValueError(tr)


def _wait_redis(port: int, timeout: float) -> None:
    """Until the redis-server on `port` answers PING."""
    import socket

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise ChildFailed(f"redis-server on port {port} not answering after {timeout:.0f}s: {last}")


def _start_ndrelay_on_redis(h: Harness, **kw: Any) -> int:
    """A redis-server (role `redis`) and `ndrelay serve --backend` on it (role `server`;
    `src=` another ndrelay tree); the relay's port."""
    h.start("redis", "peers.redis_peer:redis_server")
    redis_port = int(h.wait("redis", "ready", timeout=60)["port"])
    _wait_redis(redis_port, 30)
    h.start("server", "peers.redis_peer:ndrelay_server", redis_port=redis_port, **kw)
    port = int(h.wait("server", "ready", timeout=90)["port"])
    _wait_http(port, 30)
    return port


#: The process that relays (or, served, produces and serves) in each transport and topology:
#: its CPU time per GB moved is the "relay CPU" column (ndrelay on Redis: the relay, not
#: redis-server; the plain Redis pair: redis-server).
def relay_role(tr: str, topo: str) -> str:
    if tr == "ndrelay":
        return "server"
    return "producer" if topo == "served" or tr == "zenoh" else "middle"


def measure(
    tr: str,
    mode: str,
    wl: Workload,
    topo: str,
    *,
    limit: int | None = None,
    sample_rss: bool = False,
    timeout: float = 120.0,
) -> dict[str, Any]:
    import tempfile

    name = wl.name.lower()
    wl = peer_workload(tr, wl)
    t_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="ndrelay-bench-") as tmp,
        Harness(sample_rss=sample_rss) as h,
    ):
        uds = os.path.join(tmp, "relay.sock") if (tr, mode) == ("ndrelay", "uds") else None
        port = _start_pair(h, tr, mode, wl, topo, limit, name, uds)
        ckw: dict[str, Any] = {"wl": wl.to_dict(), "port": port}
        if tr in ("raw", "zenoh"):
            ckw["mode"] = mode
        if tr == "ndrelay":
            ckw["name"] = name
            ckw.update(_ndrelay_kw(mode, uds))
            if mode == "async":
                ckw["client"] = "async"
        mod = {
            "raw": "peers.raw",
            "zmq": "peers.zmq_peer",
            "flight": "peers.flight_peer",
            "zenoh": "peers.zenoh_peer",
            "redis": "peers.redis_peer",
            "ndrelay": "peers.ndrelay_peer",
        }[tr]
        h.start("consumer", f"{mod}:consumer", **ckw)
        c = h.wait("consumer", timeout=timeout)
        p = h.wait("producer", timeout=30)
        out = dict(c)
        out["sent"] = p["sent"]
        out["vm_consumer"] = c.get("vm", {})
        out["vm_producer"] = p.get("vm", {})
        for role in ("server", "middle", "redis"):
            if role in h.procs:
                out[f"vm_{role}"] = h.vm(role)
        if c.get("t0") is not None and c.get("t_end"):
            time.sleep(0.12)  # one more CPU sample past the window's end
            out["cpu_s"] = {
                role: h.cpu_between(role, c["t0"], c["t_end"]) for role in list(h.procs)
            }
        if sample_rss:
            out["rss_samples"] = h.rss
        out["wall_s"] = time.perf_counter() - t_start
    out["foreign_cores"] = h.foreign_cores
    problems = sanity(out)
    if problems:
        raise ChildFailed("; ".join(problems))
    return out


def cpu_per_gb(x: dict[str, Any], role: str, itemsize: int) -> float:
    """CPU seconds `role` spent per GB (10^9 bytes) that reached the consumer in the
    measurement window; nan if unknown."""
    cpu = (x.get("cpu_s") or {}).get(role)
    moved = x.get("window_items", 0) * itemsize
    if cpu is None or moved <= 0:
        return float("nan")
    return cpu / (moved / 1e9)


def sanity(r: dict[str, Any]) -> list[str]:
    bad = []
    if r.get("received") != r.get("sent"):
        bad.append(f"consumer received {r.get('received')} items, producer sent {r.get('sent')}")
    if not r.get("checked"):
        bad.append("no item was content-checked")
    ips = r.get("items_per_s", 0)
    if not (isinstance(ips, float) and math.isfinite(ips) and ips > 0):
        bad.append(f"throughput {ips!r}")
    return bad


def measure_latency(
    tr: str, duration: float, warmup: float, rate: float, topo: str = "relayed"
) -> dict[str, Any]:
    """`tr`: raw, zmq, flight, redis, ndrelay or ndrelay-redis."""
    mod = {
        "raw": "peers.raw",
        "zmq": "peers.zmq_peer",
        "flight": "peers.flight_peer",
        "redis": "peers.redis_peer",
        "ndrelay": "peers.ndrelay_peer",
        "ndrelay-redis": "peers.ndrelay_peer",
    }[tr]
    total = duration + warmup
    with Harness() as h:
        if tr in ("raw", "zmq"):
            h.start("middle", f"{mod}:middle", frame_bytes=1024)
            m = h.wait("middle", "ready")
            h.start("producer", f"{mod}:lat_producer", duration=total, rate=rate, port=m["port_in"])
            h.start("consumer", f"{mod}:lat_consumer", port=m["port_out"], warmup=warmup)
        elif tr == "flight":
            h.start("producer", f"{mod}:lat_producer", duration=total, rate=rate)
            port = h.wait("producer", "ready", timeout=60)["port"]
            h.start("middle", f"{mod}:middle", upstream=port)
            port = h.wait("middle", "ready", timeout=60)["port"]
            h.start("consumer", f"{mod}:lat_consumer", port=port, warmup=warmup)
        elif tr == "redis":
            h.start("middle", f"{mod}:redis_server")
            port = int(h.wait("middle", "ready", timeout=60)["port"])
            _wait_redis(port, 30)
            h.start("producer", f"{mod}:lat_producer", duration=total, rate=rate, port=port)
            h.wait("producer", "ready", timeout=60)
            h.start("consumer", f"{mod}:lat_consumer", port=port, warmup=warmup)
        elif tr == "ndrelay-redis":
            port = _start_ndrelay_on_redis(h)
            h.start(
                "producer", f"{mod}:lat_producer", duration=total, rate=rate, port=port, name="lat"
            )
            h.start("consumer", f"{mod}:lat_consumer", port=port, name="lat", warmup=warmup)
        elif tr == "ndrelay":
            if topo == "served":
                h.start("server", f"{mod}:served_lat_server", duration=total, rate=rate, name="lat")
                port = h.wait("server", "ready", timeout=60)["port"]
                _wait_http(port, 30)
            else:
                h.start("server", f"{mod}:bare_server")
                port = h.wait("server", "ready", timeout=60)["port"]
                _wait_http(port, 30)
                h.start(
                    "producer",
                    f"{mod}:lat_producer",
                    duration=total,
                    rate=rate,
                    port=port,
                    name="lat",
                )
            h.start("consumer", f"{mod}:lat_consumer", port=port, name="lat", warmup=warmup)
        c = h.wait("consumer", timeout=total + 60)
        p = h.wait("producer", timeout=30)
    out = dict(c)
    out["sent"] = p["sent"]
    out["foreign_cores"] = h.foreign_cores
    bad = []
    if c["received"] != p["sent"]:
        bad.append(f"consumer received {c['received']}, producer sent {p['sent']}")
    if not c["samples"]:
        bad.append("no latency samples")
    elif not (0 < c["p50_us"] < 10e6):
        bad.append(f"p50 {c['p50_us']} us")
    if bad:
        raise ChildFailed("; ".join(bad))
    return out


def measure_scale(wl: Workload, consumers: int, replicas: int = 2) -> dict[str, Any]:
    """ndrelay on Redis scaled out: `replicas` relay processes on one redis-server, one
    producer uploading W1 items to the first, `consumers` queue consumers spread over the
    replicas (the first on the second replica: a single consumer reads across replicas).
    Throughput = the sum of the consumers' rates; every item must arrive once."""
    wd = wl.to_dict()
    t_start = time.perf_counter()
    with Harness() as h:
        h.start("redis", "peers.redis_peer:redis_server")
        redis_port = int(h.wait("redis", "ready", timeout=60)["port"])
        _wait_redis(redis_port, 30)
        ports = []
        for r in range(replicas):
            role = "server" if r == 0 else f"server{r}"
            h.start(role, "peers.redis_peer:ndrelay_server", redis_port=redis_port)
            ports.append(int(h.wait(role, "ready", timeout=90)["port"]))
        for port in ports:
            _wait_http(port, 30)
        h.start(
            "producer",
            "peers.ndrelay_peer:producer",
            wl=wd,
            duration=wl.duration,
            port=ports[0],
            name="scale",
            size=ndrelay_size(wl),
        )
        for i in range(consumers):
            h.start(
                f"consumer{i}",
                "peers.redis_peer:scale_consumer",
                wl=wd,
                port=ports[(i + 1) % replicas],
                name="scale",
                index=i,
            )
        cs = [h.wait(f"consumer{i}", timeout=180) for i in range(consumers)]
        p = h.wait("producer", timeout=30)
        t0 = min(c["t0"] for c in cs if c.get("t0") is not None)
        t_end = max(c["t_end"] for c in cs)
        time.sleep(0.12)  # one more CPU sample past the window's end
        cpu = {role: h.cpu_between(role, t0, t_end) for role in list(h.procs)}
    received = sum(c["received"] for c in cs)
    out = {
        "consumers": consumers,
        "replicas": replicas,
        "sent": p["sent"],
        "received": received,
        "shares": [c["received"] for c in cs],
        "items_per_s": sum(c["items_per_s"] for c in cs),
        "checked": sum(c["checked"] for c in cs),
        "window_s": t_end - t0,
        "cpu_s": cpu,
        "wall_s": time.perf_counter() - t_start,
        "foreign_cores": h.foreign_cores,
    }
    out["bytes_per_s"] = out["items_per_s"] * wl.itemsize
    problems = sanity(out)
    if problems:
        raise ChildFailed("; ".join(problems))
    return out


# --- the run ---------------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _fmt_n(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _fmt_mb(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x / 1e6:,.0f}" if x >= 1e7 else f"{x / 1e6:.3g}"


def _fmt_ratio(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2f}×"


def _fmt_load(ok: list[dict[str, Any]]) -> str:
    """Median over runs of the CPU (cores) used by processes outside the benchmark."""
    v = summarize([x.get("foreign_cores") for x in ok])
    if not math.isfinite(v["median"]):
        return "–"
    flag = " ⚠" if v["max"] > BUSY else ""
    return f"{v['median']:.2f}{flag}"


def _fmt_cpu(ok: list[dict[str, Any]], role: str, wl: Workload) -> str:
    v = summarize([cpu_per_gb(x, role, wl.itemsize) for x in ok])
    return "–" if not math.isfinite(v["median"]) else f"{v['median']:.2f}"


def _fmt_bytes(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x / MiB:,.0f} MiB"


@contextlib.contextmanager
def _guard(log: Log, what: str, failures: list[str], store: list[Any]) -> Iterator[None]:
    try:
        yield
    except (ChildFailed, Exception) as exc:
        msg = (
            f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        )
        log(f"FAILED {msg}")
        if not isinstance(exc, ChildFailed):
            traceback.print_exc(file=sys.stderr)
        else:
            detail = str(exc).strip().splitlines()
            if len(detail) > 1:
                print("\n".join(detail[-8:]), file=sys.stderr)
        failures.append(msg)
        store.append({"error": msg})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, sanity checks (CI)")
    ap.add_argument("--runs", type=int, default=None, help="runs of each measurement (3; quick 1)")
    ap.add_argument(
        "--only",
        default="",
        help="comma list of W1,W2,W2b,W2c,W3,LAT,MEM,SCALE (SCALE: ndrelay on Redis with "
        "1, 2, 4 consumers across 2 replicas; only when named)",
    )
    ap.add_argument(
        "--scale-consumers",
        default="1,2,4",
        help="consumer counts of the SCALE measurement (default 1,2,4)",
    )
    ap.add_argument(
        "--transports",
        default="",
        help=f"comma list of {','.join(TRANSPORTS)} (default: all; ndrelay-redis shows as "
        "not available when this ndrelay has no Redis backend, and fails when named)",
    )
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--out", default="", help="write the markdown report here")
    ap.add_argument("--json", default="", help="write every raw result here")
    ap.add_argument("--duration", type=float, default=None, help="producer seconds per run")
    ap.add_argument("--mem-gb", type=float, default=None, help="GB to pass in the memory run")
    ap.add_argument(
        "--nice",
        type=int,
        default=None,
        help="run the benchmark (and every child) at this nice value, e.g. -10 on a shared "
        "machine (negative values need root); recorded in the report",
    )
    ap.add_argument(
        "--retry-busy",
        type=int,
        default=0,
        help=f"measure again (up to N times) when other processes used > {BUSY} cores "
        "meanwhile; keeps the least disturbed (default 0)",
    )
    ap.add_argument(
        "--retry-budget",
        type=float,
        default=240.0,
        help="no retries after this many seconds into the run (keeps a full run < 10 min)",
    )
    ap.add_argument(
        "--baseline-src",
        default="",
        help="an older ndrelay source tree (its src/ directory): measured as 'ndrelay "
        "before' next to this one, in the same run",
    )
    ap.add_argument(
        "--allow-missing-ndrelay",
        action="store_true",
        help="do not fail when ndrelay is not importable (peers only)",
    )
    args = ap.parse_args(argv)

    _ensure_ndrelay_path()
    if args.baseline_src:
        BASELINE_SRC[:] = [os.path.abspath(args.baseline_src)]
    log = Log()
    if args.nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # children inherit it
    quick = args.quick
    runs = args.runs or (1 if quick else 3)
    wls = workloads(quick)
    if args.duration:
        wls = {
            k: Workload(**{**v.to_dict(), "shape": v.shape, "duration": args.duration})
            for k, v in wls.items()
        }
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    sel = [k for k in wls if not only or k.upper() in only]
    do_lat = not only or "LAT" in only
    do_mem = not only or "MEM" in only
    do_scale = "SCALE" in only
    transports = [t for t in args.transports.split(",") if t] or list(TRANSPORTS)
    unknown = [t for t in transports if t not in TRANSPORTS]
    if unknown:
        ap.error(f"unknown transport(s) {', '.join(unknown)}: choose from {', '.join(TRANSPORTS)}")
    topologies = [t for t in args.topologies.split(",") if t]
    avail = availability()
    for t in transports:
        if avail.get(t):
            log(f"{t}: {avail[t]}")
    retries = args.retry_busy
    budget = args.retry_budget

    def retrying(fn: Any) -> dict[str, Any]:
        """Run a measurement; while another process used more than BUSY cores meanwhile,
        run it again (up to `retries` times, and only within the first `budget` seconds of
        the whole run, so a full run still ends in time); keep the least disturbed."""
        best: dict[str, Any] | None = None
        for attempt in range(1, retries + 2):
            res = fn()
            res["attempts"] = attempt
            fc = res.get("foreign_cores")
            if best is None or (fc is not None and fc < best.get("foreign_cores", math.inf)):
                best = res
            if fc is None or not fc > BUSY or time.perf_counter() - log.t0 > budget:
                break
            if attempt <= retries:
                log(f"  other load {fc:.2f} cores: measuring again")
        assert best is not None
        return best

    failures: list[str] = []
    if "ndrelay" in transports and avail["ndrelay"] and not args.allow_missing_ndrelay:
        failures.append(f"ndrelay {avail['ndrelay']}")
    if "ndrelay-redis" in transports and not avail["ndrelay-redis"]:
        avail["ndrelay-redis"] = _backend_problem()
        if avail["ndrelay-redis"]:
            log(f"ndrelay-redis: {avail['ndrelay-redis']}")
            # asked for by name: a failure; in the default list: a row saying why not
            if "ndrelay-redis" in args.transports.split(","):
                failures.append(f"ndrelay on Redis: {avail['ndrelay-redis']}")
    usable = [t for t in transports if not avail.get(t)]

    results: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in range(runs):
        for wname in sel:
            wl = wls[wname]
            vs = [v for v in variants(wl) if transport_of(*v) in usable]
            # rotate the order each run so no transport always goes first or last
            vs = vs[r % len(vs) :] + vs[: r % len(vs)] if vs else vs
            for topo in topologies:
                for tr, mode in vs:
                    if not applies(tr, mode, topo):
                        continue
                    key = (wname, topo, tr, mode)
                    store = results.setdefault(key, [])
                    with _guard(
                        log, f"{wname} {topo} {label(tr, mode, wl)} run {r + 1}", failures, store
                    ):
                        res = retrying(functools.partial(measure, tr, mode, wl, topo))
                        res["run"] = r
                        store.append(res)
                        log(
                            f"{wname:3} {topo:7} {label(tr, mode, wl):28} run {r + 1}: "
                            f"{_fmt_n(res['items_per_s'])} items/s "
                            f"{res['bytes_per_s'] / 1e6:8.1f} MB/s "
                            f"({res['received']} items, {res['wall_s']:.1f}s wall, "
                            f"other load {res['foreign_cores']:.2f}, "
                            f"attempt {res['attempts']})"
                        )

    lat: dict[tuple[str, str], list[dict[str, Any]]] = {}
    lat_cfg = (0.6, 0.2, 1000.0) if quick else (3.0, 0.5, 1000.0)
    if do_lat:
        lat_cases = [
            (t, "relayed")
            for t in ("raw", "zmq", "flight", "redis", "ndrelay", "ndrelay-redis")
            if t in usable
        ]
        if "ndrelay" in usable:
            lat_cases.append(("ndrelay", "served"))
        for r in range(runs):
            for tr, topo in lat_cases:
                store = lat.setdefault((tr, topo), [])
                with _guard(log, f"latency {tr} {topo} run {r + 1}", failures, store):
                    res = retrying(functools.partial(measure_latency, tr, *lat_cfg, topo=topo))
                    res["run"] = r
                    store.append(res)
                    log(
                        f"latency {tr:8} {topo:7} run {r + 1}: p50 {res['p50_us']:.0f} us, "
                        f"p99 {res['p99_us']:.0f} us, max {res['max_us']:.0f} us "
                        f"({res['samples']} samples, other load {res['foreign_cores']:.2f}, "
                        f"attempt {res['attempts']})"
                    )

    mem: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if do_mem:
        wl = wls["W1"]
        gb = args.mem_gb if args.mem_gb is not None else (0.02 if quick else 10.0)
        limit = max(50, math.ceil(gb * 1e9 / wl.itemsize))
        cases = [
            (t, topo)
            for t, topo in (("raw", "relayed"), ("ndrelay", "relayed"), ("ndrelay", "served"))
            if t in usable
        ]
        for tr, topo in cases:
            store = mem.setdefault((tr, topo), [])
            mode = "item" if tr == "raw" else ""
            with _guard(log, f"memory {tr} {topo}", failures, store):
                res = measure(tr, mode, wl, topo, limit=limit, sample_rss=True, timeout=600)
                res["bytes_total"] = res["received"] * wl.itemsize
                store.append(res)
                log(
                    f"memory {tr} {topo}: {res['bytes_total'] / 1e9:.2f} GB in "
                    f"{res['wall_s']:.1f}s; peaks "
                    + ", ".join(
                        f"{k[3:]} {_fmt_bytes(v.get('VmHWM'))}"
                        for k, v in res.items()
                        if k.startswith("vm_") and v
                    )
                )

    scale: dict[int, list[dict[str, Any]]] = {}
    if do_scale:
        problem = avail.get("ndrelay-redis") or _backend_problem()
        if problem:
            log(f"SCALE: {problem}")
            failures.append(f"SCALE (ndrelay on Redis): {problem}")
        else:
            for r in range(runs):
                for n in [int(x) for x in args.scale_consumers.split(",") if x.strip()]:
                    store = scale.setdefault(n, [])
                    with _guard(log, f"scale {n} consumer(s) run {r + 1}", failures, store):
                        res = retrying(functools.partial(measure_scale, wls["W1"], n))
                        res["run"] = r
                        store.append(res)
                        log(
                            f"scale   {n} consumer(s), 2 replicas run {r + 1}: "
                            f"{_fmt_n(res['items_per_s'])} items/s "
                            f"{res['bytes_per_s'] / 1e6:8.1f} MB/s (shares {res['shares']}, "
                            f"other load {res['foreign_cores']:.2f}, attempt {res['attempts']})"
                        )

    report = render(
        args,
        quick,
        runs,
        wls,
        sel,
        topologies,
        usable,
        avail,
        results,
        lat,
        lat_cfg,
        mem,
        failures,
        log,
        scale,
    )
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "results": [{"key": list(k), "runs": v} for k, v in results.items()],
                    "latency": [{"key": list(k), "runs": v} for k, v in lat.items()],
                    "memory": [{"key": list(k), "runs": v} for k, v in mem.items()],
                    "scale": [{"consumers": k, "runs": v} for k, v in scale.items()],
                },
                f,
                indent=1,
                default=str,
            )
    log(f"done in {time.perf_counter() - log.t0:.0f}s, {len(failures)} failure(s)")
    for f_ in failures:
        print(f"FAILED: {f_}", file=sys.stderr)
    return 1 if failures else 0


# --- report ----------------------------------------------------------------------------------


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [x for x in runs if "error" not in x]


def ratio_runs(
    results: dict[tuple[str, str, str, str], list[dict[str, Any]]], key: tuple[str, str, str, str]
) -> list[float]:
    """Per-run ratios to the baseline of the same run (same workload and topology)."""
    w, topo, _tr, _m = key
    base = {x["run"]: x["items_per_s"] for x in _ok(results.get((w, topo, *BASELINE[w]), []))}
    return [
        x["items_per_s"] / base[x["run"]]
        for x in _ok(results.get(key, []))
        if x["run"] in base and base[x["run"]] > 0
    ]


def render(
    args: Any,
    quick: bool,
    runs: int,
    wls: dict[str, Workload],
    sel: list[str],
    topologies: list[str],
    usable: list[str],
    avail: dict[str, str],
    results: dict[tuple[str, str, str, str], list[dict[str, Any]]],
    lat: dict[tuple[str, str], list[dict[str, Any]]],
    lat_cfg: tuple[float, float, float],
    mem: dict[tuple[str, str], list[dict[str, Any]]],
    failures: list[str],
    log: Log,
    scale: dict[int, list[dict[str, Any]]] | None = None,
) -> str:
    L: list[str] = []
    mode = "QUICK (tiny sizes; numbers are a smoke test, not a measurement)" if quick else "full"
    L.append(f"# ndrelay benchmarks ({mode})\n")
    L.append(
        f"`python benchmarks/run.py {' '.join(sys.argv[1:])}`".replace("  ", " ") + "; "
        f"{runs} run(s) per figure; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"all processes on 127.0.0.1 (loopback).\n"
    )
    L.append("## Throughput\n")
    L.append(
        "Items received per second at the consumer, from the first item after a "
        f"warm-up to the last; median of {runs} run(s), spread = min–max over runs. "
        "**× raw** = median over runs of (this transport / the raw TCP baseline of "
        "the same run and topology): raw TCP for W1 and W3, raw TCP with coalesced "
        "sends for W2, raw TCP with one header per 256 items for W2b; relayed rows are "
        "divided by the raw TCP relay. MB = 10^6 bytes. **other load** = CPU (in cores, "
        f"of {os.cpu_count()}) used by processes outside this benchmark while the "
        "measurement ran, median over runs (from /proc/stat minus the benchmark's own "
        f"rusage); ⚠ = above {BUSY} cores in some run: that figure was disturbed. "
        "**relay CPU s/GB** = CPU seconds (user + system, from /proc) of the process that "
        "serves or relays (served: the producer/server process; relayed: the middle "
        "process or ndrelay's server) per GB that reached the consumer in the measurement "
        "window, median over runs; **consumer CPU s/GB** the same for the consumer.\n"
    )
    L.append(
        "| workload | topology | transport | items/s | items/s min–max | MB/s "
        "| × raw | × raw min–max | relay CPU s/GB | consumer CPU s/GB | other load |"
    )
    L.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for w in sel:
        wl = wls[w]
        for topo in topologies:
            for tr, m in variants(wl):
                if not applies(tr, m, topo):
                    continue
                name = label(tr, m, wl)
                if transport_of(tr, m) not in usable:
                    why = avail.get(transport_of(tr, m)) or "not run"
                    L.append(f"| {w} | {topo} | {name} | {why} |" + " |" * 7)
                    continue
                rs = results.get((w, topo, tr, m), [])
                ok = _ok(rs)
                if not ok:
                    err = rs[0]["error"] if rs else "not run"
                    L.append(f"| {w} | {topo} | {name} | FAILED: {err[:80]} |" + " |" * 7)
                    continue
                s = summarize([x["items_per_s"] for x in ok])
                rr = summarize(ratio_runs(results, (w, topo, tr, m)))
                nfail = len(rs) - len(ok)
                fail = f" ({nfail} failed)" if nfail else ""
                L.append(
                    f"| {w} | {topo} | {name}{fail} | {_fmt_n(s['median'])} | "
                    f"{_fmt_n(s['min'])}–{_fmt_n(s['max'])} | "
                    f"{_fmt_mb(s['median'] * wl.itemsize)} | {_fmt_ratio(rr['median'])} | "
                    f"{_fmt_ratio(rr['min'])}–{_fmt_ratio(rr['max'])} | "
                    f"{_fmt_cpu(ok, relay_role(tr, topo), wl)} | "
                    f"{_fmt_cpu(ok, 'consumer', wl)} | "
                    f"{_fmt_load(ok)} |"
                )
    L.append("")
    L.append(
        "Workloads: "
        + "; ".join(
            f"**{w}** {wls[w].description} ({wls[w].dtype}{list(wls[w].shape)}, "
            f"{wls[w].itemsize:,} B/item)"
            for w in sel
        )
        + ". Each producer runs "
        f"{wls[sel[0]].duration if sel else '?'} s after the consumer connects; "
        "the consumer's count must equal the producer's, and items are spot-checked "
        "against the data pool (tag, last element, dtype, shape).\n"
    )

    if lat:
        dur, warm, rate = lat_cfg
        L.append("## Latency\n")
        L.append(
            f"1 KiB items at {rate:.0f} Hz for {dur:.1f} s (first {warm:.1f} s "
            "dropped), producer to consumer: the producer writes `time.monotonic_ns()` "
            "into the first 8 bytes as it hands the item to the transport, the consumer "
            "subtracts on arrival. Relayed = producer → middle/server process → consumer. "
            f"Median over {runs} run(s) of each run's percentile; max = worst of all runs.\n"
        )
        L.append(
            "| transport | topology | p50 µs | p99 µs | p99 min–max | max µs | samples/run "
            "| other load |"
        )
        L.append("|---|---|--:|--:|--:|--:|--:|--:|")
        for (tr, topo), rs in lat.items():
            ok = _ok(rs)
            name = {
                "raw": "raw TCP relay",
                "zmq": "pyzmq (zmq.proxy)",
                "flight": "Arrow Flight (middle do_get)",
                "redis": "redis-py pair (redis-server)",
                "ndrelay": "**ndrelay**",
                "ndrelay-redis": "**ndrelay on Redis**",
            }[tr]
            if not ok:
                L.append(
                    f"| {name} | {topo} | FAILED: {rs[0]['error'][:80] if rs else '?'} |" + " |" * 5
                )
                continue
            p50 = summarize([x["p50_us"] for x in ok])
            p99 = summarize([x["p99_us"] for x in ok])
            mx = max(x["max_us"] for x in ok)
            smp = summarize([x["samples"] for x in ok])
            L.append(
                f"| {name} | {topo} | {p50['median']:.0f} | {p99['median']:.0f} | "
                f"{p99['min']:.0f}–{p99['max']:.0f} | {mx:.0f} | {smp['median']:.0f} | "
                f"{_fmt_load(ok)} |"
            )
        L.append("")

    if mem:
        L.append("## Memory\n")
        L.append(
            "W1 items (1 MiB float32 in the full run) until the given volume has passed, "
            "count-bounded. Peak = the process's VmHWM (kernel's peak RSS); "
            "RSS at 25 % / at end sampled every 50 ms from /proc; growth = end − 25 %. "
            "ndrelay's buffer bound for this stream is size × item = 64 × 1 MiB in the "
            "served topology (server default size when relayed).\n"
        )
        L.append(
            "| transport | topology | volume | process | RSS at 25 % | RSS at end | peak RSS "
            "| growth | throughput MB/s |"
        )
        L.append("|---|---|--:|---|--:|--:|--:|--:|--:|")
        for (tr, topo), rs in mem.items():
            ok = _ok(rs)
            name = {"raw": "raw TCP relay", "ndrelay": "**ndrelay**"}.get(tr, tr)
            if not ok:
                err = rs[0]["error"][:80] if rs else "?"
                L.append(f"| {name} | {topo} | | FAILED: {err} | | | | | |")
                continue
            x = ok[0]
            vol = f"{x['bytes_total'] / 1e9:.2f} GB"
            samples = x.get("rss_samples", {})
            for role in ("server", "middle", "producer", "consumer"):
                vm = x.get(f"vm_{role}")
                if not vm and role not in samples:
                    continue
                at25, end = _rss_points(samples.get(role, []))
                peak = (vm or {}).get("VmHWM")
                growth = (end - at25) if (end is not None and at25 is not None) else None
                who = {
                    "server": "server",
                    "middle": "middle (relay)",
                    "producer": "producer"
                    + (" (in server)" if tr == "ndrelay" and topo == "served" else ""),
                    "consumer": "consumer",
                }[role]
                if tr == "ndrelay" and topo == "served" and role == "producer":
                    continue
                gtxt = "–" if growth is None else f"{growth / MiB:+,.0f} MiB"
                L.append(
                    f"| {name} | {topo} | {vol} | {who} | {_fmt_bytes(at25)} | "
                    f"{_fmt_bytes(end)} | {_fmt_bytes(peak)} | {gtxt} | "
                    f"{x['bytes_per_s'] / 1e6:,.0f} |"
                )
        L.append("")

    if scale:
        wl = wls["W1"]
        L.append("## Scale-out on Redis\n")
        L.append(
            f"ndrelay on the Redis backend: 2 `ndrelay serve --backend` replicas on one "
            f"redis-server, one producer uploading W1 items ({wl.itemsize:,} B) to the "
            "first, N queue consumers spread over the replicas (one consumer: on the second "
            "replica). items/s = the sum of the consumers' rates, median over runs; "
            "× 1 = against the one-consumer figure; relay CPU = both replicas together, "
            "per GB received.\n"
        )
        L.append("| consumers | items/s | MB/s | × 1 | relay CPU s/GB | shares | other load |")
        L.append("|--:|--:|--:|--:|--:|---|--:|")
        one = summarize([x["items_per_s"] for x in _ok(scale.get(1, []))])["median"]
        for n, rs in scale.items():
            ok = _ok(rs)
            if not ok:
                err = rs[0]["error"][:80] if rs else "?"
                L.append(f"| {n} | FAILED: {err} | | | | | |")
                continue
            ips = summarize([x["items_per_s"] for x in ok])["median"]
            cpu = summarize(
                [
                    sum(v for k, v in x["cpu_s"].items() if k.startswith("server") and v)
                    / (x["items_per_s"] * x["window_s"] * wl.itemsize / 1e9)
                    for x in ok
                ]
            )["median"]
            rel = f"{ips / one:.2f}×" if math.isfinite(one) and one > 0 else "–"
            L.append(
                f"| {n} | {_fmt_n(ips)} | {_fmt_mb(ips * wl.itemsize)} | {rel} | "
                f"{cpu:.2f} | {ok[-1]['shares']} | {_fmt_load(ok)} |"
            )
        L.append("")

    issue = _issue_table(results)
    if issue:
        L.append("## Before and now, one run\n")
        L.append(
            "Ratios to raw TCP of the same run and topology (median over runs); W2c in "
            "items/s. *ndrelay before* is the `--baseline-src` tree, measured in this run.\n"
        )
        L.extend(issue)
        L.append("")
    targets = _targets(results, lat, mem, wls)
    if targets:
        L.append("## ndrelay against its targets\n")
        L.append("Informational: nothing here is asserted.\n")
        L.append("| target | measured | met |")
        L.append("|---|--:|:-:|")
        L.extend(targets)
        L.append("")

    L.append("## Peers\n")
    L.append(
        "- **raw TCP**: 8-byte length prefix per frame, TCP_NODELAY; consumer `recv_into` "
        "a fresh `np.empty` per item (small items: one `recv_into` of a 1 MiB staging "
        "buffer, then a fresh copy per item). W2 one-send-per-item = one `sendmsg` per "
        "item; W2 coalesced = 256 framed items per `sendall`; W2b = 256 items behind "
        "one header. Relayed: a middle process forwards whole frames (small: batches "
        "of complete frames per `sendall`; large: store-and-forward per frame)."
    )
    L.append(
        "- **pyzmq**: PUSH/PULL over tcp, one item per message (W2b: 256 per message), "
        "`copy=False` for messages ≥ 64 KiB; relayed through `zmq.proxy(PULL, PUSH)`."
    )
    L.append(
        "- **Arrow Flight**: `do_get` streaming record batches of one "
        "FixedSizeList<dtype, N> column, one row per item (W2b: 256 rows per batch); "
        "relayed through a middle Flight server that `do_get`s from the producer and "
        "forwards with `RecordBatchStream` (C++, no GIL)."
    )
    L.append(
        "- **ndrelay**: served = `relay.publish(name, generator, size=64)` in the server "
        "process, `RelayClient.stream` over HTTP; relayed = bare `create_app(Relay())` "
        "server, `RelayClient.publish` uploader process, `RelayClient.stream` consumer "
        "process. W2b consumer: `stream(batch=256, stack=True)`."
    )
    L.append(
        "- **redis-py pair**: a redis-server (no persistence) on 127.0.0.1; the producer "
        "`XADD`s one entry per item (W2b: 256 items per entry), pipelined; the consumer "
        "`XREADGROUP`s and `XACK`s + `XDEL`s what it read in one pipelined round trip; the "
        "producer holds while it has ndrelay's `size` entries in Redis (credits the consumer "
        "`RPUSH`es, the producer `BLPOP`s). "
        "**ndrelay on Redis**: `ndrelay serve --backend redis://...` on such a "
        "redis-server, with ndrelay's relayed producer and consumer; its relay CPU "
        "column is the relay's own (redis-server not counted)."
    )
    L.append("")
    L.append("## Machine\n")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in machine_description().items():
        L.append(f"| {k} | {v} |")
    L.append(f"| wall time of this run | {time.perf_counter() - log.t0:.0f} s |")
    L.append(f"| nice value of the benchmark processes | {os.getpriority(os.PRIO_PROCESS, 0)} |")
    L.append(f"| load average at the end | {' / '.join(f'{x:.2f}' for x in os.getloadavg())} |")
    L.append("")
    missing = [f"{t}: {avail[t]}" for t in TRANSPORTS if avail.get(t)]
    if missing:
        L.append("Not run: " + "; ".join(missing) + "\n")
    if failures:
        L.append("## Failures\n")
        L.extend(f"- {f}" for f in failures)
        L.append("")
    return "\n".join(L)


def _median_ratio(results: Any, w: str, topo: str, tr: str, mode: str) -> float:
    return summarize(ratio_runs(results, (w, topo, tr, mode)))["median"]


def _median_ips(results: Any, w: str, topo: str, tr: str, mode: str) -> float:
    return summarize([x["items_per_s"] for x in _ok(results.get((w, topo, tr, mode), []))])[
        "median"
    ]


def _issue_table(results: Any) -> list[str]:
    """ndrelay before and now, and the peers, as ratios to raw TCP of the same run."""
    cols = [
        ("ndrelay", "base"),
        ("ndrelay", ""),
        ("zmq", ""),
        ("flight", ""),
        ("zenoh", "tcp"),
        ("zenoh", "shm"),
    ]
    if not any(results.get(k) for k in results if k[2:] == ("ndrelay", "")):
        return []
    names = ["ndrelay before", "ndrelay now", "pyzmq", "Arrow Flight", "Zenoh TCP", "Zenoh SHM"]
    out = ["| workload | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names)]

    def cell(w: str, topos: tuple[str, ...], tr: str, mode: str, absolute: bool) -> str:
        vals = []
        for topo in topos:
            if absolute:
                v = _median_ips(results, w, topo, tr, mode)
                vals.append(f"{_fmt_n(v)}/s" if math.isfinite(v) else "")
            else:
                vals.append(_fmt_ratio(_median_ratio(results, w, topo, tr, mode)).replace("–", ""))
        return " / ".join(vals) if any(vals) else ""

    rows = [
        ("W1 1 MiB served", "W1", ("served",), False),
        ("W1 1 MiB relayed", "W1", ("relayed",), False),
        ("W3 10 MB served / relayed", "W3", ("served", "relayed"), False),
        ("W2 64 B per item, served / relayed", "W2", ("served", "relayed"), False),
        ("W2b 64 B batched 256, served / relayed", "W2b", ("served", "relayed"), False),
        ("W2c single items, batched reader, served / relayed", "W2c", ("served", "relayed"), True),
    ]
    for title, w, topos, absolute in rows:
        if not any(results.get((w, t, "raw", BASELINE[w][1])) for t in topos):
            continue
        cells = [cell(w, topos, tr, m, absolute) for tr, m in cols]
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    for title, mode in (
        ("W1 served, Unix socket", "uds"),
        ("W1 served, AsyncRelayClient", "async"),
    ):
        v = _median_ratio(results, "W1", "served", "ndrelay", mode)
        if math.isfinite(v):
            out.append(f"| {title} | | {_fmt_ratio(v)} |" + " |" * (len(names) - 2))
    return out


def _targets(
    results: dict[tuple[str, str, str, str], list[dict[str, Any]]],
    lat: dict[tuple[str, str], list[dict[str, Any]]],
    mem: dict[tuple[str, str], list[dict[str, Any]]],
    wls: dict[str, Workload],
) -> list[str]:
    rows = []

    def ratio(w: str, topo: str, tr: str = "ndrelay", mode: str = "") -> float:
        return _median_ratio(results, w, topo, tr, mode)

    def row(name: str, val: float, fmt: str, ok: bool) -> None:
        if math.isfinite(val):
            rows.append(f"| {name} | {fmt} | {'yes' if ok else '**no**'} |")

    for w in ("W1", "W3"):
        r, z = ratio(w, "served"), ratio(w, "served", "zmq")
        ahead = not math.isfinite(z) or r > z
        row(
            f"{w} served ≥ 0.95× raw TCP and ahead of pyzmq ({_fmt_ratio(z)})",
            r,
            _fmt_ratio(r),
            r >= 0.95 and ahead,
        )
    for w in ("W1", "W3"):
        r = ratio(w, "relayed")
        row(f"{w} relayed ≥ 0.85× raw TCP relay", r, _fmt_ratio(r), r >= 0.85)
    for topo, goal in (("served", 0.6), ("relayed", 0.4)):
        r = ratio("W2", topo)
        row(f"W2 {topo} ≥ {goal}× raw coalesced sends", r, _fmt_ratio(r), r >= goal)
    for topo, goal in (("served", 2e6), ("relayed", 1.5e6)):
        v = _median_ips(results, "W2c", topo, "ndrelay", "")
        row(f"W2c {topo} ≥ {_fmt_n(goal)} items/s", v, f"{_fmt_n(v)}/s", v >= goal)
    sync, asy = (
        _median_ips(results, "W1", "served", "ndrelay", ""),
        _median_ips(results, "W1", "served", "ndrelay", "async"),
    )
    if math.isfinite(sync) and sync > 0:
        row(
            "W1 AsyncRelayClient ≥ 0.9× the sync client",
            asy / sync,
            f"{asy / sync:.2f}×",
            asy / sync >= 0.9,
        )
    r = ratio("W1", "served", "ndrelay", "uds")
    row("W1 over the Unix socket ≥ 1.2× raw TCP loopback", r, _fmt_ratio(r), r >= 1.2)
    on_redis = _median_ips(results, "W1", "relayed", "ndrelay", "redis")
    pair = _median_ips(results, "W1", "relayed", "redis", "")
    if math.isfinite(pair) and pair > 0:
        row(
            "W1 relayed on Redis ≥ 0.8× the plain redis-py pair "
            f"({_fmt_ratio(ratio('W1', 'relayed', 'redis'))} raw)",
            on_redis / pair,
            f"{on_redis / pair:.2f}×",
            on_redis / pair >= 0.8,
        )
    ok = _ok(lat.get(("ndrelay", "relayed"), []))
    if ok:
        v = summarize([x["p99_us"] for x in ok])["median"]
        row("relayed latency p99 ≤ 1 ms at 1 kHz", v, f"{v / 1000:.2f} ms", v <= 1000)
    for topo in ("relayed", "served"):
        ok = _ok(mem.get(("ndrelay", topo), []))
        if ok:
            x = ok[0]
            peak = x.get("vm_server", {}).get("VmHWM", float("nan"))
            at25, end = _rss_points(x.get("rss_samples", {}).get("server", []))
            growth = (end - at25) if end is not None and at25 is not None else float("nan")
            # bounded: no growth beyond one buffer's worth (64 x 1 MiB) from 25 % of the
            # volume to the end, and a peak under 512 MiB (buffer + interpreter + copies)
            row(
                f"server RSS bounded ({topo}; {x['bytes_total'] / 1e9:.1f} GB through)",
                peak,
                f"peak {_fmt_bytes(peak)}, growth {growth / MiB:+,.0f} MiB",
                peak <= 512 * MiB and growth <= 64 * MiB,
            )
    return rows


def _rss_points(ss: list[tuple[float, int]]) -> tuple[int | None, int | None]:
    """(RSS a quarter into the process's sampled lifetime, so past its start-up; RSS at
    its last sample)."""
    if not ss:
        return None, None
    t0, t1 = ss[0][0], ss[-1][0]
    q = next((v for t, v in ss if t >= t0 + 0.25 * (t1 - t0)), ss[0][1])
    return q, ss[-1][1]


if __name__ == "__main__":
    sys.exit(main())
