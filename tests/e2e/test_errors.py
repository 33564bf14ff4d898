"""Errors as a user meets them: the relay's own failures raise ndrelay's classes, and
every error answer of the HTTP API has one JSON shape (`{"error", "message", ...}`)."""

from __future__ import annotations

import anyio
import httpx
import numpy as np
import pytest
from _sources import bounded, wait_until

from ndrelay import (
    AsyncRelayClient,
    ExceptionSentinel,
    RelayClient,
    RelayHTTPError,
    RemoteError,
    StreamClosed,
    encode_frame,
)
from ndrelay._frames import DataFrame, EndFrame

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


# -- relay-origin error frames raise ndrelay's classes -----------------------------------


def test_a_deleted_stream_raises_stream_closed(server):
    with RelayClient(server.url, read_timeout=20) as client:
        client.create("doomed")
        with client.stream("doomed") as s:
            assert wait_until(lambda: client.info("doomed")["consumers"] == 1)
            client.delete("doomed")
            with pytest.raises(StreamClosed) as info:
                bounded(lambda: list(s))
    err = info.value
    assert isinstance(err, RemoteError)  # still a RemoteError, with its attributes
    assert (err.origin, err.remote_type, err.stream_name) == ("relay", "StreamClosed", "doomed")
    assert "deleted" in str(err)


def test_a_deleted_stream_ends_a_queue_with_stream_closed(server):
    with RelayClient(server.url, read_timeout=20) as client:
        client.create("doomed")
        s = client.stream("doomed")
        assert wait_until(lambda: client.info("doomed")["consumers"] == 1)
        client.delete("doomed")
        sentinel = bounded(lambda: s.queue.sentinels.get(timeout=20))
        s.close()
    assert isinstance(sentinel, ExceptionSentinel)
    assert isinstance(sentinel.exception, StreamClosed)


def test_a_producer_error_is_not_a_stream_closed(server):
    def sensor():
        yield np.zeros(2)
        raise ValueError("lidar disconnected")

    server.relay.publish("lidar", sensor())
    with RelayClient(server.url, read_timeout=20) as client, client.stream("lidar") as s:
        with pytest.raises(ValueError) as info:
            bounded(lambda: list(s))
    assert isinstance(info.value, RemoteError)
    assert not isinstance(info.value, StreamClosed)


@pytest.mark.anyio
async def test_async_a_deleted_stream_raises_stream_closed(server):
    async with AsyncRelayClient(server.url, read_timeout=20) as client:
        await client.create("doomed")
        s = await client.stream("doomed")
        with anyio.fail_after(20):
            registered = lambda: server.info("doomed")  # noqa: E731
            assert await anyio.to_thread.run_sync(wait_until, lambda: registered()["consumers"])
            await client.delete("doomed")
            with pytest.raises(StreamClosed) as info:
                async for _ in s:
                    pass
        await s.aclose()
    assert isinstance(info.value, RemoteError)
    assert info.value.origin == "relay"


# -- one error body shape ---------------------------------------------------------------


def _upload(*frames):
    return b"".join(encode_frame(f) for f in frames)


def _cases(server):
    """(request arguments, expected status, expected `error`) for each kind of refusal."""
    server.relay.publish("done", iter([np.zeros(2, np.float32)]))
    assert wait_until(lambda: server.info("done")["state"] == "ended")
    server.create("typed")
    return [
        (("GET", "/streams/nope/info"), {}, 404, "StreamNotFound"),
        (("GET", "/no/such/path"), {}, 404, "NotFound"),
        (("PATCH", "/streams/done"), {}, 405, "MethodNotAllowed"),
        (("GET", "/streams/done?batch=0"), {}, 422, "ValidationError"),
        (("GET", "/streams/done?format=xml"), {}, 422, "ValidationError"),
        (("PUT", "/streams/new"), {"json": {"size": "big"}}, 422, "ValidationError"),
        (("PUT", "/streams/new"), {"json": {"max_byte": 3}}, 422, "ValidationError"),
        (("PUT", "/streams/new"), {"content": b"{not json"}, 422, "ValidationError"),
        (("PUT", "/streams/done"), {"json": {"size": 3}}, 409, "StreamConflict"),
        (("PUT", "/streams/-bad-"), {"json": {}}, 422, "ValueError"),
        (("POST", "/streams/done"), {"content": _upload(EndFrame(0))}, 409, "StreamClosed"),
        (("POST", "/streams/typed"), {"content": b"\xc1garbage"}, 400, "UploadRefused"),
        (
            ("POST", "/streams/typed"),
            {"content": _upload(DataFrame(0, np.zeros(2)), EndFrame(1)) + b"\x81"},
            400,
            "UploadRefused",
        ),
    ]


def test_every_error_answer_has_one_shape(server):
    with httpx.Client(base_url=server.url, timeout=20) as http:
        for (method, path), kwargs, status, error in _cases(server):
            r = http.request(method, path, **kwargs)
            where = f"{method} {path}: {r.status_code} {r.text}"
            assert r.status_code == status, where
            assert r.headers["content-type"] == "application/json", where
            body = r.json()
            assert body["error"] == error, where
            assert isinstance(body["message"], str) and body["message"], where
            assert "detail" not in body, where


def test_validation_errors_say_what_is_wrong(server):
    server.create("s")
    with httpx.Client(base_url=server.url, timeout=20) as http:
        body = http.get("/streams/s?batch=0").json()
        assert body["message"].startswith("query parameter 'batch': ")
        assert "greater than or equal to 1" in body["message"]
        assert body["errors"][0]["loc"] == ["query", "batch"]
        body = http.put("/streams/t", json={"size": 4, "max_byte": 3}).json()
        assert "body field 'max_byte'" in body["message"]


def test_auth_error_has_the_same_shape(serve):
    handle = serve(token="s3cret")
    with httpx.Client(base_url=handle.url, timeout=20) as http:
        r = http.get("/streams")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "AuthError"
    assert r.json()["message"]


def test_the_client_raises_on_validation_errors_with_their_message(server):
    with RelayClient(server.url) as client:
        with pytest.raises(RelayHTTPError, match="body field 'size'") as info:
            client.create("s", size=0)
    assert info.value.status == 422
    assert info.value.body["error"] == "ValidationError"


def test_a_refused_cors_preflight_has_the_same_shape(serve):
    handle = serve(cors_origins=["http://viz.test:3000"])
    preflight = {"Access-Control-Request-Method": "GET"}
    with httpx.Client(base_url=handle.url, timeout=20) as http:
        refused = http.options("/streams", headers={**preflight, "Origin": "http://evil.test"})
        allowed = http.options("/streams", headers={**preflight, "Origin": "http://viz.test:3000"})
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    body = refused.json()
    assert body["error"] == "CORSRefused"
    assert "origin" in body["message"] and "http://evil.test" in body["message"]
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://viz.test:3000"
