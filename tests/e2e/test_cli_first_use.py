"""The `ndrelay` command as a new user first types it, run as the installed console
script in subprocesses: URLs without a scheme, help texts, `--source` modules in the
current directory, dtype names. Every process is stopped by its PID; every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from _sources import free_port, wait_until

from ndrelay import Relay, RelayClient

pytestmark = pytest.mark.e2e

#: the console script pip installs next to this interpreter, as a user runs it
NDRELAY = str(Path(sys.executable).with_name("ndrelay"))


def env_without_ndrelay() -> dict[str, str]:
    """The user's environment: no NDRELAY_* settings and no PYTHONPATH."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_") and k != "PYTHONPATH"
    }


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NDRELAY, *args],
        cwd=cwd,
        env=env_without_ndrelay(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- URLs ---------------------------------------------------------------------------------


def test_produce_and_consume_take_a_url_without_scheme(server):
    address = f"127.0.0.1:{server.port}"  # what a user types: no http://
    produced = run("produce", address, "plain", "--count", "3", "--rate", "0", "--shape", "2")
    assert produced.returncode == 0, produced.stderr
    assert "Traceback" not in produced.stderr
    consumed = run("consume", address, "plain")
    assert consumed.returncode == 0, consumed.stderr
    assert "received 3 items" in consumed.stdout


def test_produce_and_consume_take_url_like_every_client_command(server):
    """`--url` or NDRELAY_URL, as `ls`, `cat`, `rm`, ... take it."""
    address = f"127.0.0.1:{server.port}"
    produced = run("produce", "viaopt", "--url", address, "--count", "2", "--rate", "0")
    assert produced.returncode == 0, produced.stderr
    env = dict(env_without_ndrelay(), NDRELAY_URL=address)
    consumed = subprocess.run(
        [NDRELAY, "consume", "viaopt"], env=env, capture_output=True, text=True, timeout=60
    )
    assert consumed.returncode == 0, consumed.stderr
    assert "received 2 items" in consumed.stdout
    both = run("consume", address, "viaopt", "--url", "127.0.0.1:1")
    assert both.returncode == 2
    assert "two relay URLs" in both.stderr


def test_a_client_url_without_scheme_means_http(server):
    with RelayClient(f"127.0.0.1:{server.port}") as client:
        assert client.url == f"http://127.0.0.1:{server.port}"
        assert client.healthz()["status"] == "ok"


@pytest.mark.parametrize("command", ["produce", "consume"])
def test_an_unusable_url_is_a_one_line_error(command):
    done = run(command, "ftp://rig", "x", "--count", "1")
    assert done.returncode == 2  # click's usage error
    assert "Traceback" not in done.stderr
    assert "Invalid value for 'URL'" in done.stderr
    assert "http:// or https://" in done.stderr


# -- help texts ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["produce", "consume"])
def test_token_has_help(command):
    done = run(command, "--help")
    assert done.returncode == 0
    line = re.search(r"--token TEXT\s+(.*)", done.stdout)
    assert line is not None and line.group(1).strip(), done.stdout
    assert "NDRELAY_TOKEN" in done.stdout


def test_serve_help_names_every_environment_variable():
    done = run("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # click wraps lines
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"^\| `--[^|]*\| `(NDRELAY_[A-Z_]+)", readme, re.MULTILINE))
    assert {"NDRELAY_HOST", "NDRELAY_PORT", "NDRELAY_TOKEN", "NDRELAY_SOURCE"} <= documented
    for var in documented:
        assert re.search(rf"\[env(?: var:)? {var}\b", text), var


def test_readme_documents_produce_and_consume():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "ndrelay produce " in readme
    assert "ndrelay consume " in readme


# -- --source from the current directory ----------------------------------------------------


def test_serve_source_finds_a_module_in_the_current_directory(tmp_path):
    (tmp_path / "mysensors.py").write_text(
        "import numpy as np\n\n"
        "def register(relay):\n"
        "    relay.publish('mine', iter([np.arange(3)]))\n"
    )
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [NDRELAY, "serve", "--port", str(port), "--source", "mysensors:register"],
        cwd=tmp_path,
        env=env_without_ndrelay(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).is_success
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(up, 30)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        with RelayClient(f"127.0.0.1:{port}") as client:
            assert client.info("mine")["produced"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_serve_source_says_where_it_looked(tmp_path):
    done = run("serve", "--source", "nosuchmodule:register", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cannot import 'nosuchmodule'" in done.stderr
    assert f"current directory ({tmp_path})" in done.stderr
    assert "looked in" in done.stderr


def test_serve_source_reports_an_import_error_inside_the_module(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_dependency\n")
    done = run("serve", "--source", "broken:register", cwd=tmp_path)
    assert done.returncode == 2
    assert "No module named 'no_such_dependency'" in done.stderr


# -- dtype names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("float32", "<f4"), ("f4", "<f4"), ("<f4", "<f4"), ("uint8", "|u1"), ("int64", "<i8")],
)
def test_put_accepts_any_numpy_dtype_name_and_answers_dtype_str(server, name, canonical):
    with httpx.Client(base_url=server.url, timeout=20) as http:
        r = http.put("/streams/typed", json={"dtype": name, "shape": [2]})
        assert r.status_code == 201, r.text
        assert r.json()["dtype"] == canonical
        # the same definition written another way is the same stream
        again = http.put("/streams/typed", json={"dtype": canonical, "shape": [2]})
        assert again.status_code == 200, again.text
        assert http.get("/streams/typed/info").json()["dtype"] == canonical


@pytest.mark.parametrize("name", ["object", "floaty", "f4,i4", "V8"])
def test_put_refuses_a_dtype_that_cannot_travel_naming_it(server, name):
    with httpx.Client(base_url=server.url, timeout=20) as http:
        r = http.put("/streams/typed", json={"dtype": name})
    assert r.status_code == 422
    assert name in r.json()["message"]


def test_dtype_names_in_the_client_and_in_process():
    relay = Relay()
    stream = relay.publish("x", iter([np.zeros(2, np.float32)]), dtype="float32")
    assert stream.info()["dtype"] == "<f4"
    relay.close()


def test_produce_dtype_name_matches_a_declared_stream(server):
    with RelayClient(server.url) as client:
        client.create("typed", dtype="float32", shape=(2, 2))
        assert client.info("typed")["dtype"] == "<f4"
    done = run("produce", server.url, "typed", "--count", "2", "--rate", "0", "--shape", "2,2")
    assert done.returncode == 0, done.stderr
    done = run("produce", server.url, "x", "--dtype", "floaty", "--count", "1")
    assert done.returncode == 2
    assert "Invalid value for '--dtype'" in done.stderr and "floaty" in done.stderr
