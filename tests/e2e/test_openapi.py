"""`/openapi.json` tells the truth: statuses, content types, parameter patterns and
methods the server really uses are declared; schemathesis finds nothing against it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from _sources import ServeProcess, clean_env

from ndrelay import RelayClient
from ndrelay.registry import NAME_PATTERN

pytestmark = pytest.mark.e2e

STREAMING = ("consume",)  # GET /streams/{name}: declared, not fuzzed (it never ends)

#: An ack names its consumer in the body, and consumer ids come from `GET /streams/{name}`
#: (not fuzzed): every ack the fuzzer makes up is answered 404 `ConsumerNotFound`. That
#: is not the stream it just created going missing, which is what this check looks for.
CONFIG = """
[[operations]]
include-operation-id = "ack"
checks.ensure_resource_availability.enabled = false
"""


def schemathesis_run(url: str, *args: str, examples: int = 60) -> subprocess.CompletedProcess:
    """The schemathesis CLI against `url`, bounded in examples and time. The hooks teach
    it to make upload bodies (msgpack frames)."""
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    cmd = [str(exe), "run", f"{url}/openapi.json"]  # every check: the default
    cmd += ["--max-examples", str(examples), "--seed", "1", "--no-color", "--workers", "1"]
    for operation in STREAMING:
        cmd += ["--exclude-operation-id", operation]
    env = clean_env(SCHEMATHESIS_HOOKS="_schemathesis_hooks")  # importable: PYTHONPATH
    with tempfile.TemporaryDirectory() as cwd:  # where it keeps its cache
        Path(cwd, "schemathesis.toml").write_text(CONFIG)
        return subprocess.run(
            [*cmd, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
        )


def summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if line.startswith("=====")]
    return lines[-1] if lines else output[-2000:]


@pytest.mark.slow
def test_schemathesis_finds_no_failure_on_the_demo_server():
    proc = ServeProcess("--demo")
    try:
        result = schemathesis_run(proc.url)
    finally:
        proc.stop()
    print(summary(result.stdout))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    line = summary(result.stdout)
    assert "failure" not in line and "error" not in line, result.stdout[-6000:]


@pytest.mark.slow
def test_schemathesis_finds_no_failure_with_a_token():
    proc = ServeProcess("--token", "s3cret")
    try:
        result = schemathesis_run(proc.url, "-H", "Authorization: Bearer s3cret", examples=30)
    finally:
        proc.stop()
    print(summary(result.stdout))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def operations(server) -> dict:
    return httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]


def test_every_status_and_content_type_is_declared(server):
    paths = operations(server)
    stream = paths["/streams/{name}"]
    assert {"200", "404", "422", "401"} <= set(stream["get"]["responses"])
    assert set(stream["get"]["responses"]["200"]["content"]) == {
        "application/x-msgpack",
        "application/x-ndjson",
        "text/event-stream",
    }
    assert {"200", "201", "409", "422"} <= set(stream["put"]["responses"])
    assert {"204", "404", "422"} <= set(stream["delete"]["responses"])
    assert {"200", "400", "409", "413", "422"} <= set(stream["post"]["responses"])
    assert "application/x-msgpack" in stream["post"]["requestBody"]["content"]
    latest = paths["/streams/{name}/latest"]["get"]["responses"]
    assert {"200", "204", "404"} <= set(latest)
    assert set(latest["200"]["content"]) == {"application/x-msgpack", "application/x-ndjson"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert {"404", "422"} <= set(paths["/streams/{name}/info"]["get"]["responses"])
    ids = {op["operationId"] for ops in paths.values() for op in ops.values()}
    assert {"consume", "upload", "create_stream", "latest"} <= ids


def test_name_parameter_declares_its_pattern(server):
    for path, ops in operations(server).items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "name":
                    assert param["schema"]["pattern"] == f"^{NAME_PATTERN.pattern}$", path


def test_a_405_lists_every_method_of_the_path(server):
    response = httpx.request("OPTIONS", server.url + "/streams/radar", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, POST, PUT"
    response = httpx.request("PATCH", server.url + "/streams/radar/info", timeout=10)
    assert response.status_code == 405 and response.headers["allow"] == "GET"


@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "DELETE"])
@pytest.mark.parametrize(
    "path", ["/streams/a%2Fb", "/streams/a%2fb/info", "/streams/x%2F..%2Fy/latest"]
)
def test_an_encoded_slash_in_a_name_is_422_like_any_invalid_name(server, method, path):
    response = httpx.request(method, server.url + path, timeout=10, json={})
    if path.endswith("/info") and method != "GET":
        assert response.status_code in (405, 422)
        return
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValueError" and "invalid stream name" in body["message"]
    assert "/" in body["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"shape": [False]}, 422),
        ({"size": "64"}, 422),
        ({"size": True}, 422),
        ({"max_bytes": 0}, 422),
        ({"shape": [-1]}, 422),
        ({"dtype": "i3"}, 422),
        ({"dtype": "object"}, 422),
        ({"max_bytes": 578.0}, 201),
        ({"dtype": "float32", "shape": [2, 3]}, 201),
        ({"dtype": "<M8[ns]"}, 201),
    ],
)
def test_stream_definitions_are_checked_as_the_schema_says(server, body, status):
    response = httpx.put(server.url + f"/streams/def{os.getpid()}{id(body)}", json=body, timeout=10)
    assert response.status_code == status, response.text


def test_latest_answers_204_then_the_item(server):
    with RelayClient(server.url) as client:
        client.create("l")
        assert httpx.get(server.url + "/streams/l/latest", timeout=10).status_code == 204
        client.publish("l", [np.arange(3)], end=False)
        response = httpx.get(server.url + "/streams/l/latest?format=ndjson", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
