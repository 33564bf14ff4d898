"""The `ndrelay` command in subprocesses: serve (--demo, --source, --token, SIGTERM),
produce and consume. Every process is killed by PID at the end; every wait is bounded."""

from __future__ import annotations

import signal
import subprocess
import threading

import httpx
import pytest
from _sources import ServeProcess, bounded, clean_env, free_port, ndrelay_cmd, wait_until

import ndrelay
from ndrelay import AuthError, RelayClient, RemoteError, StreamClosed

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def run(*args, env=None, timeout=30):
    return subprocess.run(
        ndrelay_cmd(*args),
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def serve_proc(backend):
    """Factory: `serve_proc(*args, env=...)` runs `ndrelay serve`; all killed at teardown."""
    procs = []

    def start(*args, **kwargs):
        proc = ServeProcess(*args, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert ndrelay.__version__ in result.stdout
    assert "ndrelay" in result.stdout


def test_serve_demo(serve_proc):
    proc = serve_proc("--demo")
    health = httpx.get(proc.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    with RelayClient(proc.url, read_timeout=10) as client:
        names = {s["name"] for s in client.streams()}
        assert {"radar", "count"} <= names
        assert client.info("radar")["mode"] == "fanout"
        got = bounded(lambda: list(client.stream("count")), 20)
        assert [a.tolist() for a in got] == [[i, i * i, i * i * i] for i in range(10)]
        assert client.info("count")["state"] == "ended"
        with client.stream("radar", policy="latest") as radar:
            frame = bounded(lambda: next(radar), 20)
        assert frame.shape == (4, 8) and frame.dtype.str == "<f4"


def test_serve_source_registers_streams(serve_proc):
    proc = serve_proc("--source", "_sources:numbers", "--source", "_sources:endless")
    with RelayClient(proc.url, read_timeout=10) as client:
        assert {s["name"] for s in client.streams()} == {"numbers", "endless"}
        got = bounded(lambda: list(client.stream("numbers")), 20)
        assert [a.tolist() for a in got] == [[i, i / 2] for i in range(5)]


def test_serve_source_from_the_environment(serve_proc):
    proc = serve_proc(env=clean_env(NDRELAY_SOURCE="_sources:numbers"))
    with RelayClient(proc.url, read_timeout=10) as client:
        assert [s["name"] for s in client.streams()] == ["numbers"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nope:func", ["nope", "--source"]),
        ("_sources:no_such_function", ["no_such_function", "--source"]),
        ("no-colon", ["module:function", "--source"]),
    ],
)
def test_serve_bad_source_exits_non_zero_with_a_clear_message(spec, words):
    result = run("serve", "--port", str(free_port()), "--source", spec)
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_token_turns_auth_on(serve_proc, how):
    if how == "flag":
        proc = serve_proc("--demo", "--token", "s3cret")
    else:
        proc = serve_proc("--demo", env=clean_env(NDRELAY_TOKEN="s3cret"))
    assert httpx.get(proc.url + "/healthz", timeout=5).status_code == 200
    assert httpx.get(proc.url + "/streams", timeout=5).status_code == 401
    for token in (None, "wrong"):
        with RelayClient(proc.url, token=token, read_timeout=10) as client:
            with pytest.raises(AuthError):
                client.streams()
            with pytest.raises(AuthError):
                client.stream("count")
    with RelayClient(proc.url, token="s3cret", read_timeout=10) as client:
        assert len(bounded(lambda: list(client.stream("count")), 20)) == 10


@pytest.mark.memory_only(
    "on Redis the streams outlive a replica: a stopping replica cuts its readers so that "
    "they resume on another (tests/e2e/test_redis_replicas.py)"
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_fails_open_consumers_with_a_relay_error_and_exits_0(serve_proc, sig):
    proc = serve_proc("--demo", "--source", "_sources:endless")
    outcome = {}
    with RelayClient(proc.url, read_timeout=10) as client:
        streams = {
            "endless": client.stream("endless", prefetch=2),
            "radar": client.stream("radar"),
        }
        for s in streams.values():
            bounded(lambda s=s: next(s), 20)

        def drain(name, s):
            try:
                for _ in s:
                    pass
                outcome[name] = "quiet end"
            except BaseException as exc:
                outcome[name] = exc

        readers = [
            threading.Thread(target=drain, args=item, name=f"test-drain-{item[0]}", daemon=True)
            for item in streams.items()
        ]
        for t in readers:
            t.start()
        proc.signal(sig)
        try:
            returncode = proc.proc.wait(timeout=20)
        finally:
            for t in readers:
                t.join(20)
        assert not any(t.is_alive() for t in readers)
    assert returncode == 0, proc.stderr_text()
    for name in streams:
        err = outcome[name]
        assert isinstance(err, RemoteError), (name, err)
        assert isinstance(err, StreamClosed), (name, err)  # `except StreamClosed:` catches it
        assert err.origin == "relay"
        assert "shutting down" in err.remote_message


def test_produce_then_consume(server):
    produced = run("produce", server.url, "cli", "--count", "5", "--rate", "0", "--shape", "2,3")
    assert produced.returncode == 0, produced.stderr
    with RelayClient(server.url) as client:
        info = client.info("cli")
        assert (info["state"], info["produced"], info["depth"]) == ("ended", 5, 5)
    consumed = run("consume", server.url, "cli")
    assert consumed.returncode == 0, consumed.stderr
    assert "received 5 items" in consumed.stdout
    assert f"{5 * 2 * 3 * 4 / 1e6:.2f} MB" in consumed.stdout


def test_produce_and_consume_with_a_token(serve):
    handle = serve(token="s3cret")
    env = clean_env(NDRELAY_TOKEN="s3cret")
    produced = run(
        "produce", handle.url, "t", "--count", "3", "--rate", "0", "--shape", "4", env=env
    )
    assert produced.returncode == 0, produced.stderr
    consumed = run("consume", handle.url, "t", "--count", "2", env=env)
    assert consumed.returncode == 0, consumed.stderr
    assert "received 2 items" in consumed.stdout
    refused = run("consume", handle.url, "t")
    assert refused.returncode != 0
    assert wait_until(lambda: handle.info("t")["consumers"] == 0, 10)
