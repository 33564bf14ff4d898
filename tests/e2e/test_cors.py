"""CORS: `--cors-origin` / `NDRELAY_CORS_ORIGINS` lets named origins' pages call the relay
(preflight and simple requests), and no origin is allowed by default. The browser's own
view of the same headers is tested in tests/browser/."""

from __future__ import annotations

import httpx
import pytest
from _sources import ServeProcess, clean_env

from ndrelay import Relay
from ndrelay.server import Settings, create_app

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

PAGE = "http://127.0.0.1:5173"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.fixture
def proc(backend):
    procs = []

    def start(*args, **kwargs):
        procs.append(ServeProcess(*args, **kwargs))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()


def test_no_origin_is_allowed_by_default(server):
    server.relay.publish("count", iter([b"x"]))
    got = httpx.get(server.url + "/streams/count?format=ndjson", headers={"Origin": PAGE})
    assert got.status_code == 200
    assert "access-control-allow-origin" not in got.headers
    pre = httpx.options(server.url + "/streams/count", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in pre.headers


def test_a_named_origin_may_read_and_write(serve):
    server = serve(cors_origins=[PAGE])
    pre = httpx.options(server.url + "/streams/x", headers=PREFLIGHT)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == PAGE
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    server.relay.publish("count", iter([b"x"]))
    got = httpx.get(server.url + "/streams/count?format=sse", headers={"Origin": PAGE})
    assert got.headers["access-control-allow-origin"] == PAGE
    assert "event: end" in got.text


def test_another_origin_is_refused(serve):
    server = serve(cors_origins=[PAGE])
    pre = httpx.options(
        server.url + "/streams/x", headers={**PREFLIGHT, "Origin": "http://evil.example"}
    )
    assert pre.status_code == 400
    assert "access-control-allow-origin" not in pre.headers
    got = httpx.get(server.url + "/streams", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in got.headers


def test_a_malformed_origin_is_refused_at_start():
    with pytest.raises(ValueError, match="localhost:3000"):
        create_app(Relay(settings=Settings(cors_origins=["localhost:3000"])))


@pytest.mark.parametrize(
    "how",
    [
        ("--cors-origin", PAGE, "--cors-origin", "http://127.0.0.1:9999"),
        {"NDRELAY_CORS_ORIGINS": f"{PAGE}, http://127.0.0.1:9999"},
    ],
    ids=["flags", "environment"],
)
def test_serve_cors_origins_from_flags_and_environment(proc, how):
    if isinstance(how, dict):
        p = proc(env=clean_env(**how))
    else:
        p = proc(*how)
    for origin in (PAGE, "http://127.0.0.1:9999"):
        pre = httpx.options(p.url + "/streams/x", headers={**PREFLIGHT, "Origin": origin})
        assert pre.headers.get("access-control-allow-origin") == origin
    pre = httpx.options(p.url + "/streams/x", headers={**PREFLIGHT, "Origin": "http://x.test"})
    assert "access-control-allow-origin" not in pre.headers


def test_serve_refuses_a_malformed_origin_in_one_line():
    import subprocess

    from _sources import ndrelay_cmd

    out = subprocess.run(
        ndrelay_cmd("serve", "--cors-origin", "localhost:3000/"),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--cors-origin" in out.stderr and "localhost:3000/" in out.stderr
    assert "Traceback" not in out.stderr
