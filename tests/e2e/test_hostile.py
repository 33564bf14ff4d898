"""Hostile clients against a real `ndrelay serve` process, with raw sockets: the relay keeps
answering /healthz, its memory stays bounded, and what an attacker takes is given back."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import msgpack
import pytest
from _hostile import (
    MiB,
    connect,
    declared_bytes_frame,
    healthz,
    list_of_maps,
    many_keys,
    post_head,
    read_answer,
    sockets,
    upload_raw,
)
from _sources import ServeProcess, rss_bytes

#: A generous bound for /healthz on a loaded machine (the point: it answers at all).
HEALTHY = 5.0


class Relay(ServeProcess):
    """`ndrelay serve` logging at info, with its RSS and log at hand."""

    def __init__(self, *args: str, nofile: int | None = None) -> None:
        super().__init__(*args, "--log-level", "info", nofile=nofile)

    def rss(self) -> int:
        value = rss_bytes(self.pid)
        assert value is not None, "the relay exited"
        return value

    def log(self) -> str:
        return self.stderr_text()

    @property
    def http(self) -> httpx.Client:
        """An HTTP client for the relay, closed with it."""
        if not hasattr(self, "_http"):
            self._http = httpx.Client(base_url=self.url, timeout=10)
        return self._http

    def stop(self) -> None:
        if hasattr(self, "_http"):
            self._http.close()
        super().stop()


@pytest.fixture
def relay() -> Iterator[Callable[..., Relay]]:
    """Factory: `relay(*serve_args, nofile=None)`; every process is stopped by PID."""
    started: list[Relay] = []

    def start(*args: str, nofile: int | None = None) -> Relay:
        started.append(Relay(*args, nofile=nofile))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


class Watch:
    """Polls /healthz in a thread while an attack runs; records the worst answer time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.times: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(healthz(self.port, HEALTHY))
            self._stop.wait(0.2)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(HEALTHY + 5)
        assert self.times, "no /healthz check ran"
        assert None not in self.times, f"/healthz failed during the attack: {self.times}"


def streams(url: str) -> list[str]:
    with httpx.Client(timeout=10) as http:
        return sorted(s["name"] for s in http.get(f"{url}/streams").json())


# -- what one frame can make the relay build (issue: object amplification) ----------------------


@pytest.mark.slow
def test_amplifying_frames_are_refused_before_they_cost_memory(relay) -> None:
    server = relay()
    before = server.rss()
    with Watch(server.port):
        for name, body, key in (
            ("maps8", list_of_maps(8 * MiB), "x"),
            ("maps16", list_of_maps(16 * MiB), "x"),
            ("keys", many_keys(10**6), None),
        ):
            status, answer = upload_raw(server.port, name, body)
            assert status == 400, answer
            assert answer["frame_index"] == 0 and answer["accepted"] == 0
            assert answer.get("key") == key
            growth = server.rss() - before
            # the body itself passes through (at most twice), nothing multiplies it
            assert growth < 2 * len(body) + 32 * MiB, (name, growth / MiB)
    assert streams(server.url) == []  # refused uploads leave no stream behind


@pytest.mark.slow
def test_half_sent_huge_frames_cost_about_what_was_sent(relay) -> None:
    server = relay()
    before = server.rss()
    body = declared_bytes_frame(250 * MiB) + b"x" * 64  # 90 bytes of a 250 MiB frame
    with sockets() as held, Watch(server.port):
        for i in range(4):
            sock = connect(server.port)
            held.append(sock)
            sock.sendall(post_head(f"big{i}", length=250 * MiB + 26) + body)
        deadline = time.monotonic() + 30
        while len(streams(server.url)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(streams(server.url)) == 4  # all four uploads are being read
        time.sleep(1)
        growth = server.rss() - before
        assert growth < 4 * (len(body) + 4 * MiB), growth / MiB
    deadline = time.monotonic() + 30
    while streams(server.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert streams(server.url) == []  # the cut uploads accepted nothing: no streams left


# -- connections: heads, idleness, numbers, files -----------------------------------------------


def test_a_request_head_that_never_ends_is_refused_431(relay) -> None:
    server = relay("--max-header-bytes", "16384")
    before = server.rss()
    with sockets() as held, Watch(server.port):
        for _ in range(9):
            sock = connect(server.port)
            held.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        junk = b"a" * 4096
        answers = []
        for sock in held:
            try:
                for _ in range(64):  # 256 KiB each, far past the limit
                    sock.sendall(junk)
            except OSError:
                pass  # the relay closed it: what we want
            answers.append(read_answer(sock, 10)[0])
        assert answers == [431] * 9
        assert server.rss() - before < 32 * MiB


def test_a_connection_that_sends_no_request_is_closed_408(relay) -> None:
    server = relay("--header-timeout", "1")
    with sockets() as held:
        held.append(connect(server.port))
        held.append(connect(server.port))
        held[1].sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and then nothing
        start = time.monotonic()
        assert [read_answer(sock, 30)[0] for sock in held] == [408, 408]
        assert held[0].recv(10) == b""  # closed by the relay
        assert time.monotonic() - start < 25
        assert healthz(server.port, HEALTHY) is not None


@pytest.mark.slow
def test_idle_connections_past_the_open_files_limit_leave_the_relay_answering(relay) -> None:
    server = relay(nofile=256)
    log_before = len(server.log())
    with sockets() as held, Watch(server.port) as watch:
        for _ in range(300):  # more than the process may even have files
            try:
                held.append(connect(server.port))
            except OSError:
                break
        time.sleep(3)
        assert healthz(server.port, HEALTHY) is not None
    assert len(watch.times) >= 3
    log = server.log()[log_before:]
    assert "connection limit (117) reached" in log
    assert len(log) < 64 * 1024, len(log)  # a few lines, not a flood
    assert "more like it" in server.log() or log.count("connection limit") <= 5


@pytest.mark.slow
def test_reopened_idle_connections_never_exhaust_the_open_files(relay) -> None:
    """An attacker who opens the closed ones again, in bursts: the relay accepts a burst
    before it can close the connections it makes room with, so the burst must fit in
    the files it keeps spare; else accepting fails (EMFILE) and pauses for a second."""
    server = relay(nofile=256)
    with sockets() as held, Watch(server.port):
        for _ in range(6):
            for sock in list(held):  # reopen those the relay closed
                sock.setblocking(False)
                try:
                    gone = sock.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    held.remove(sock)
                    sock.close()
            while len(held) < 260:
                held.append(connect(server.port))
            time.sleep(1)
    log = server.log()
    assert "out of system resource" not in log, log[-2000:]
    assert healthz(server.port, HEALTHY) is not None


def test_past_max_connections_busy_ones_stay_and_the_newcomer_gets_503(relay) -> None:
    server = relay("--max-connections", "3")
    http = server.http
    assert http.put("/streams/s", json={"size": 4, "mode": "fanout"}).status_code == 201
    with sockets() as held:
        for _ in range(3):  # three consumers, streaming: busy connections
            sock = connect(server.port)
            sock.sendall(b"GET /streams/s HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(sock)
        for sock in held:
            sock.settimeout(10)
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
        late = connect(server.port)
        held.append(late)
        late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = read_answer(late, 10)
        assert status == 503 and b"too many connections" in body
        held[0].close()
        deadline = time.monotonic() + 10
        while healthz(server.port, 2) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert healthz(server.port, HEALTHY) is not None


def test_an_idle_upload_is_ended_408_keeping_its_frames(relay) -> None:
    server = relay("--upload-idle-timeout", "1")
    frame = msgpack.packb({"kind": "data", "seq": 0, "data": b"abc"})
    with sockets() as held:
        sock = connect(server.port)
        held.append(sock)
        sock.sendall(post_head("idle") + b"%x\r\n%s\r\n" % (len(frame), frame))
        status, body = read_answer(sock, 30)
    assert status == 408
    answer = json.loads(body)
    assert answer["accepted"] == 1 and "idle" in answer["message"]
    info = server.http.get("/streams/idle/info").json()
    assert info["produced"] == 1 and info["state"] == "open"


# -- streams a cheap request must not hold ------------------------------------------------------


def test_a_refused_upload_does_not_take_a_stream_slot(relay) -> None:
    server = relay("--max-streams", "3")
    http = server.http
    for name in ("a", "b"):
        assert http.put(f"/streams/{name}", json={"size": 4}).status_code == 201
    for body in (b"\xc1", b"", list_of_maps(1000)):
        status, _ = upload_raw(server.port, "garbage", body)
        assert status in (200, 400)
        assert streams(server.url) == ["a", "b"]
    assert http.put("/streams/c", json={"size": 4}).status_code == 201


def test_finished_and_unused_streams_expire(relay) -> None:
    server = relay("--stream-ttl", "1")
    http = server.http
    assert http.put("/streams/empty", json={"size": 4}).status_code == 201
    end = msgpack.packb({"kind": "data", "seq": 0, "data": b"x"}) + msgpack.packb(
        {"kind": "end", "seq": 1}
    )
    assert http.post("/streams/done", content=end).status_code == 200
    info = http.get("/streams/done/info").json()
    assert info["ttl"] == 1 and 0 <= info["expires_in"] <= 1
    with http.stream("GET", "/streams/kept", timeout=10) as r:  # missing: 404, not created
        assert r.status_code == 404
    assert http.put("/streams/kept", json={"size": 4}).status_code == 201
    with http.stream("GET", "/streams/kept", timeout=30) as reading:
        assert reading.status_code == 200
        deadline = time.monotonic() + 30
        while streams(server.url) != ["kept"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert streams(server.url) == ["kept"]  # a stream being read is in use
        assert http.get("/streams/kept/info").json()["expires_in"] is None


def test_a_definition_beyond_the_memory_bound_is_refused_422(relay) -> None:
    server = relay("--max-memory", "64MiB")
    http = server.http
    r = http.put("/streams/huge", json={"size": 1000000, "max_bytes": 10**18})
    assert r.status_code == 422
    assert "max_bytes" in r.json()["message"] and str(64 * MiB) in r.json()["message"]
    assert http.put("/streams/ok", json={"size": 10, "max_bytes": MiB}).status_code == 201
    assert streams(server.url) == ["ok"]


# -- browsers -----------------------------------------------------------------------------------

END = msgpack.packb({"kind": "end", "seq": 0})


def test_cross_origin_writes_are_refused_without_a_token(relay) -> None:
    server = relay("--cors-origin", "http://viz.example:3000")
    http = server.http
    plain = {"content-type": "text/plain"}
    evil = http.post("/streams/x", content=END, headers={**plain, "origin": "http://evil.example"})
    assert evil.status_code == 403 and "evil.example" in evil.json()["message"]
    assert streams(server.url) == []
    assert http.put("/streams/y", json={"size": 2}).status_code == 201
    r = http.delete("/streams/y", headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and streams(server.url) == ["y"]
    own = {**plain, "origin": server.url}  # a page the relay serves itself
    assert http.post("/streams/x", content=END, headers=own).status_code == 200
    listed = {**plain, "origin": "http://viz.example:3000"}
    assert http.post("/streams/z", content=END, headers=listed).status_code == 200
    assert http.post("/streams/w", content=END).status_code == 200  # not a browser
    r = http.get("/streams", headers={"origin": "http://evil.example"})  # reads: CORS' job
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_with_a_token_the_token_guards_cross_origin_writes(relay) -> None:
    server = relay("--token", "s3cret")
    http = server.http
    evil = {"origin": "http://evil.example", "content-type": "text/plain"}
    assert http.post("/streams/x", content=END, headers=evil).status_code == 401
    auth = {**evil, "authorization": "Bearer s3cret"}
    assert http.post("/streams/x", content=END, headers=auth).status_code == 200


def test_allowed_hosts_refuse_other_host_headers_but_healthz(relay) -> None:
    server = relay("--allowed-hosts", "127.0.0.1,relay.lab")
    http = server.http
    assert http.get("/streams").status_code == 200
    assert http.get("/streams", headers={"host": "relay.lab:8000"}).status_code == 200
    assert http.get("/streams", headers={"host": "rebind.evil.example"}).status_code == 400
    assert http.get("/healthz", headers={"host": "rebind.evil.example"}).status_code == 200


# -- the log --------------------------------------------------------------------------------------


def test_repeated_refusals_are_counted_not_logged_each(relay) -> None:
    server = relay()
    for _ in range(60):
        assert upload_raw(server.port, "g", b"\xc1")[0] == 400
    deadline = time.monotonic() + 10
    log = server.log()
    while log.count("refused") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        log = server.log()
    assert 1 <= log.count("upload to 'g' refused") <= 5
