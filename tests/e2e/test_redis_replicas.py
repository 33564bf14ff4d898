"""Several `ndrelay serve --backend redis://...` replicas on one real redis-server: streams
written through one replica are read through another, queue consumers split across
replicas share the items exactly once, and a replica killed with SIGKILL behind a real
nginx loses nothing: the consumer's client reconnects through nginx (to the other
replica) with its consumer id and gets its own unacknowledged items first; a producer
retrying with its producer id duplicates nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _proxy import CuttingProxy
from _sources import ServeProcess, bounded, free_port, wait_until
from conftest import RedisServer, need

from ndrelay import RelayClient, StreamClosed
from ndrelay._codec import encode_frame
from ndrelay._frames import DataFrame, EndFrame
from ndrelay.registry import _redis_lua as lua

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 3000

#: nginx in front of two replicas: `primary` takes every request while it lives, then
#: `backup` (so the test knows which replica a connection is on); unbuffered both ways
CONF = """
worker_processes 1;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream relays {{
        server 127.0.0.1:{primary} max_fails=1 fail_timeout=30s;
        server 127.0.0.1:{backup} backup;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://relays;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture
def replicas(redis: RedisServer) -> Iterator[list[ServeProcess]]:
    """Two replicas on one Redis (lease 2 s), stopped by PID at teardown."""
    procs = [ServeProcess("--backend", redis.url, "--lease", "2") for _ in range(2)]
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def balancer(tmp_path: Path, replicas: list[ServeProcess]) -> Iterator[str]:
    """nginx in front of the replicas (first the primary, then the backup); its URL."""
    binary = need("nginx")
    root = tmp_path / "nginx"
    root.mkdir()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / sub).mkdir()
    os.chmod(root, 0o777)
    port = free_port()
    conf = root / "nginx.conf"
    a, b = replicas
    conf.write_text(CONF.format(root=root, port=port, primary=a.port, backup=b.port))
    proc = subprocess.Popen(
        [binary, "-p", str(root), "-c", str(conf), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not proxy /healthz in time")
            time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def test_a_stream_uploaded_to_one_replica_is_read_from_the_other(replicas):
    a, b = replicas
    items = [np.full(1000, i, np.int32) for i in range(50)]
    with RelayClient(a.url) as ca, RelayClient(b.url) as cb:
        ca.create("fan", size=64, mode="fanout")
        ca.create("q", size=8)
        reader = threading.Thread(
            target=lambda: got.extend(int(x[0]) for x in cb.stream("q")), daemon=True
        )
        got: list[int] = []
        reader.start()
        ca.publish("q", iter(items))
        ca.publish("fan", iter(items))
        reader.join(30)
        assert got == list(range(50))
        # the fanout stream keeps its newest items: read whole from the other replica
        lines = httpx.get(f"{b.url}/streams/fan?after=-1&format=ndjson", timeout=30).text
        frames = [json.loads(line) for line in lines.splitlines()]
        assert [f["data"][0] for f in frames if f["kind"] == "data"] == list(range(50))
        assert frames[-1]["kind"] == "end"
        assert cb.info("q")["produced"] == 50 and cb.info("q")["acked"] == 50
        assert [s["name"] for s in cb.streams()] == ["fan", "q"]
        ca.delete("fan")
        assert [s["name"] for s in cb.streams()] == ["q"]


def test_queue_consumers_split_across_replicas_get_every_item_exactly_once(replicas):
    a, b = replicas
    with RelayClient(a.url) as ca:
        ca.create("work", size=64)
        producer = threading.Thread(
            target=lambda: ca.publish("work", (np.array([i]) for i in range(N))), daemon=True
        )
        producer.start()
        got: list[list[int]] = [[] for _ in range(4)]

        def consume(k: int) -> None:
            with RelayClient((a, b)[k % 2].url) as c:
                with c.stream("work", consumer=f"w{k}") as s:
                    got[k].extend(int(x[0]) for x in s)

        workers = [threading.Thread(target=consume, args=(k,), daemon=True) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers + [producer]:
            w.join(60)
        assert not any(w.is_alive() for w in workers)
    everything = [i for part in got for i in part]
    assert sorted(everything) == list(range(N))
    # which consumer wins each take is up to timing; that both replicas served is not
    assert (got[0] or got[2]) and (got[1] or got[3]), "consumers on A and on B got work"


def test_producers_on_both_replicas_append_to_one_bounded_stream_exactly_once(replicas):
    """Each replica appends at the seq it saw last: once the other one appended, its
    guess is wrong and it must start over without keeping an item twice; the small
    bound makes appends that only partly fit, whose rest is taken back."""
    a, b = replicas
    n = 400
    with RelayClient(a.url) as ca:
        ca.create("both", size=4)

        def produce(k: int) -> None:
            with RelayClient((a, b)[k].url) as c:
                items = (np.full(2048, k * n + i, np.int64) for i in range(n))
                c.publish("both", items, end=False)

        producers = [threading.Thread(target=produce, args=(k,), daemon=True) for k in (0, 1)]
        for p in producers:
            p.start()
        got: list[int] = []

        def read() -> None:
            with RelayClient(b.url) as cb, cb.stream("both", consumer="reader") as s:
                for x in s:
                    assert (x == x[0]).all()
                    got.append(int(x[0]))
                    if len(got) == 2 * n:
                        break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(60)
        for p in producers:
            p.join(30)
        assert not reader.is_alive(), f"{len(got)} of {2 * n} items read in 60 s"
        assert not any(p.is_alive() for p in producers)
        assert sorted(got) == list(range(2 * n))
        for k in (0, 1):  # each producer's items in its own order
            mine = [i for i in got if k * n <= i < (k + 1) * n]
            assert mine == sorted(mine)
        info = ca.info("both")
        assert info["produced"] == 2 * n and info["depth"] == 0


def _upload_with_retries(url: str, name: str, n: int, producer: str, errors: list[str]) -> None:
    """A producer that names itself and numbers its frames: on any failure it asks the
    relay (through the balancer) which seq it expects and sends from there."""
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=httpx.Timeout(30, connect=5)) as http:
        sent = 0
        while sent <= n and time.monotonic() < deadline:
            try:
                answer = http.post(f"{url}/streams/{name}?producer={producer}", content=b"")
                sent = answer.json()["expected_seq"]

                def body(start: int = sent) -> Iterator[bytes]:
                    for i in range(start, n):
                        yield encode_frame(DataFrame(i, np.array([i], dtype=np.int64)))
                        if i % 50 == 0:
                            time.sleep(0.01)
                    yield encode_frame(EndFrame(n))

                answer = http.post(f"{url}/streams/{name}?producer={producer}", content=body())
                if answer.status_code == 200:
                    return
                if answer.status_code == 409 and "StreamClosed" in answer.text:
                    return  # the end was accepted before the cut
                errors.append(f"{answer.status_code} {answer.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            time.sleep(0.2)
    raise AssertionError(f"upload did not finish: {errors[-3:]}")


def test_info_counts_survive_redis_forgetting_its_scripts(redis, replicas):
    """`info` reads a stream's counters and its producers and consumers in one round trip
    (a Lua script run by its SHA); after Redis forgot its scripts (`SCRIPT FLUSH`, as on a
    restart) it answers the same, loading the script again."""
    a, b = replicas
    with RelayClient(a.url) as ca:
        ca.create("counted", size=4)
        ca.publish("counted", [np.array([i]) for i in range(3)], end=False)
        s = ca.stream("counted")
        assert wait_until(lambda: ca.info("counted")["consumers"] == 1)
        first = ca.info("counted")
        redis.command("SCRIPT", "FLUSH")
        again = ca.info("counted")
        s.close()
    assert first["produced"] == again["produced"] == 3
    assert again["consumers"] == 1


def test_a_delete_through_one_replica_ends_the_readers_of_the_other(replicas):
    a, b = replicas
    with RelayClient(a.url) as ca, RelayClient(b.url) as cb:
        for mode in ("queue", "fanout"):
            ca.create(f"doomed-{mode}", size=4, mode=mode)
            s = cb.stream(f"doomed-{mode}")
            assert wait_until(lambda m=mode: ca.info(f"doomed-{m}")["consumers"] == 1)
            ca.delete(f"doomed-{mode}")
            with pytest.raises(StreamClosed, match="deleted"):
                bounded(lambda s=s: list(s), 20)
            s.close()
        assert cb.streams() == []


def test_a_replica_killed_with_sigkill_stops_counting_its_producers_and_consumers(replicas):
    """A's producer and consumers show in B's `info`; once A is SIGKILLed (no goodbye to
    Redis) they stop counting within seconds, so the stream can expire again."""
    a, b = replicas
    release = threading.Event()
    with RelayClient(a.url) as ca, RelayClient(b.url) as cb:
        ca.create("q", size=8)
        ca.create("fan", size=8, mode="fanout")

        def body() -> Iterator[bytes]:
            yield encode_frame(DataFrame(0, np.array([0], dtype=np.int64)))
            release.wait(30)  # an upload held open on A until the test is done

        def upload() -> None:
            try:
                httpx.post(f"{a.url}/streams/q", content=body(), timeout=30)
            except httpx.HTTPError:
                pass  # cut by the kill

        def read(path: str) -> None:
            try:
                with httpx.stream("GET", f"{a.url}{path}", timeout=30) as r:
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass  # cut by the kill

        threads = [
            threading.Thread(target=upload, daemon=True),
            threading.Thread(target=read, args=("/streams/q?consumer=r1",), daemon=True),
            threading.Thread(target=read, args=("/streams/fan",), daemon=True),
        ]
        for t in threads:
            t.start()

        def counts() -> tuple[int, int, int]:
            q, fan = cb.info("q"), cb.info("fan")
            return q["producers"], q["consumers"], fan["consumers"]

        try:
            assert wait_until(lambda: counts() == (1, 1, 1), 20), counts()
            a.signal(signal.SIGKILL)
            a.proc.wait(10)
            assert wait_until(lambda: counts() == (0, 0, 0), 20), counts()
        finally:
            release.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_serving_replica_killed_loses_and_duplicates_nothing(replicas, balancer, capsys, how):
    """The consumer and the producer both go through nginx to replica A; A is killed
    with SIGKILL (or stopped with SIGTERM) mid-stream; both carry on through B."""
    a, b = replicas
    with RelayClient(balancer) as setup:
        setup.create("work", size=32)
    errors: list[str] = []
    producer = threading.Thread(
        target=_upload_with_retries, args=(balancer, "work", N, "rig-1", errors), daemon=True
    )
    producer.start()
    got: list[int] = []
    with RelayClient(balancer) as client:
        with client.stream("work", consumer="trainer", reconnect=30) as s:
            for item in s:
                got.append(int(item[0]))
                if len(got) == N // 3:
                    a.signal(getattr(signal, how))
                if len(got) % 100 == 0:
                    time.sleep(0.02)  # a consumer that works a little
        info = client.info("work")
    producer.join(60)
    assert not producer.is_alive()
    counts = Counter(got)
    duplicated = sum(c - 1 for c in counts.values())
    lost = N - len(counts)
    with capsys.disabled():
        print(
            f"\nreplica {how} mid-stream: sent {N}, received {len(got)}, lost {lost}, "
            f"duplicated {duplicated}; relay: produced {info['produced']}, redelivered "
            f"{info['redelivered']}, upload retries {len(errors)}"
        )
    assert sorted(counts) == list(range(N)), f"lost {lost}"
    # duplicates are items delivered again because they were not yet acknowledged; the
    # client drops those it already handed over by seq, so none reach the application
    assert duplicated == 0
    assert info["produced"] == N and info["state"] == "ended"
    if how == "SIGKILL":
        assert errors, "the producer's upload was cut by the kill and retried"


def _fault_between_relay_and_redis(redis: RedisServer, fault: Callable[[CuttingProxy], None]):
    """A relay whose connections to Redis go through a `CuttingProxy`; a producer
    uploads 40 items into a queue stream of size 8 and waits once it is full; then
    `fault(proxy)` is armed, and a consumer reads the stream to its end. Every item must
    arrive exactly once, and the fault must have happened (one cut)."""
    n = 40
    with CuttingProxy(redis.port) as proxy:
        relay = ServeProcess("--backend", f"redis://127.0.0.1:{proxy.port}/0", "--lease", "30")
        try:
            with RelayClient(relay.url) as client:
                client.create("work", size=8)
                producer = threading.Thread(
                    target=client.publish,
                    args=("work", (np.array([i], dtype=np.int64) for i in range(n))),
                    kwargs={"producer": "rig"},
                    daemon=True,
                )
                producer.start()
                assert wait_until(lambda: client.info("work")["depth"] == 8)
                fault(proxy)

                def read() -> list[int]:
                    with client.stream("work", consumer="trainer", reconnect=30) as s:
                        return [int(item[0]) for item in s]

                got = bounded(read, 60)
                producer.join(30)
                assert not producer.is_alive()
        finally:
            relay.stop()
        assert not proxy.armed and proxy.cuts == 1, "the fault did not happen"
    assert Counter(got) == Counter(range(n))


def test_a_take_whose_answer_is_lost_hands_its_items_out_again(redis):
    """The relay's connection to Redis is cut after a queue take reached Redis and before
    Redis' answer came back (Redis handed the items to the consumer; the relay never
    heard which): the relay must not take again as if nothing had happened, leaving those
    items pending for a consumer that never got them. The consumer's response ends, its
    client resumes with its consumer id, and gets them."""
    _fault_between_relay_and_redis(redis, lambda proxy: proxy.lose_reply(b"XREADGROUP"))


def test_an_acknowledgement_redis_never_got_is_said_again(redis):
    """The relay's connection to Redis is cut as it sends an acknowledgement (the relay
    answers 503 to the client's acknowledgement request): the client must say it again
    on a new request, not take the 503 for a refusal, or the items it acknowledged would
    stay pending for it, fill the stream's window, and stop it for good."""
    ack = hashlib.sha1(lua.ACK.encode()).hexdigest().encode()  # EVALSHA of the ACK script
    _fault_between_relay_and_redis(redis, lambda proxy: proxy.drop_request(ack))


def test_while_redis_is_down_the_relay_answers_503_and_readers_resume(tmp_path):
    """redis-server stopped: the relay answers its requests 503 `RegistryError` saying its
    backend is unreachable (with Retry-After), logs a warning, not a traceback, and ends
    its readers' responses without a terminal frame; once Redis is back (AOF on, so the
    stream is still there), a reader resumes with its consumer id and gets every item."""
    redis = RedisServer("--save", "", "--appendonly", "yes", workdir=str(tmp_path))
    relay = ServeProcess("--backend", redis.url, "--lease", "30")
    try:
        with RelayClient(relay.url) as client:
            client.create("work", size=8)
            client.publish("work", [np.array([i], dtype=np.int64) for i in range(5)], end=False)
            with client.stream("work", consumer="trainer", reconnect=30) as s:
                got = [int(next(s)[0]), int(next(s)[0])]
                redis.stop()
                answers = [
                    httpx.get(f"{relay.url}/streams/work/info", timeout=10),
                    httpx.post(f"{relay.url}/streams/work", content=b"", timeout=10),
                    httpx.get(f"{relay.url}/streams/work", timeout=10),
                ]
                # the reader's response ends at its next take (within a second or so)
                assert wait_until(lambda: "'trainer': the stream backend" in relay.stderr_text())
                redis.start()
                client.publish("work", [np.array([i], dtype=np.int64) for i in range(5, 8)])
                got += bounded(lambda: [int(item[0]) for item in s], 60)
                assert s.reconnects >= 1
        log = relay.stderr_text()
    finally:
        relay.stop()
        redis.stop()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        body = answer.json()
        assert body["error"] == "RegistryError"
        assert "backend is unreachable" in body["message"]
    assert Counter(got) == Counter(range(8))
    assert "GET /streams/work/info: the stream backend is unreachable" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_redis_restart_mid_stream(tmp_path, how, capsys):
    """redis-server (AOF on, fsync every second) stopped with SIGTERM or SIGKILL while a
    producer uploads (retrying with its producer id) and a consumer reads; started again
    on the same port and directory. SIGTERM loses nothing (Redis writes its AOF out on
    the way down); SIGKILL may lose up to the last second of writes: the figures are
    printed (docs/DESIGN.md quotes them)."""
    redis = RedisServer(
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        workdir=str(tmp_path),
    )  # fmt: skip
    relay = ServeProcess("--backend", redis.url, "--lease", "2")
    n = 2000
    try:
        with RelayClient(relay.url) as setup:
            setup.create("work", size=32)
        errors: list[str] = []
        producer = threading.Thread(
            target=_upload_with_retries, args=(relay.url, "work", n, "rig", errors), daemon=True
        )
        producer.start()
        got: list[int] = []
        with RelayClient(relay.url) as client:
            with client.stream("work", consumer="trainer", reconnect=60) as s:
                for item in s:
                    got.append(int(item[0]))
                    if len(got) == n // 3:
                        redis.restart(getattr(signal, how))
        producer.join(60)
        assert not producer.is_alive()
    finally:
        relay.stop()
        redis.stop()
    counts = Counter(got)
    lost = n - len(set(counts) & set(range(n)))
    duplicated = sum(c - 1 for c in counts.values())
    with capsys.disabled():
        print(
            f"\nredis {how} mid-stream: sent {n}, received {len(got)} "
            f"({len(counts)} distinct), lost {lost}, duplicated {duplicated}"
        )
    assert set(counts) <= set(range(n))
    if how == "SIGTERM":
        assert lost == 0 and duplicated == 0
