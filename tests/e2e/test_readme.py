"""The README's Python examples, run as written against a real `ndrelay serve --demo`.

Every ```python block of README.md runs, in the README's order and in one namespace
(as a reader pasting them into one session would), in a fresh Python process whose
working directory is an empty temporary directory. The only change: the address the
README writes (`127.0.0.1:8000`, `localhost:8000`) becomes the test server's. The
whole sequence runs twice in a row against the same server, so an example that
leaves state behind that breaks its own second run (a finished stream under a fixed
name, say) fails. A block that raises, or that does not finish within `RUN_TIMEOUT`,
fails the test with its README line numbers in the traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
#: seconds the whole README sequence may take, once.
RUN_TIMEOUT = 180
#: the addresses the README writes for a local `ndrelay serve`.
README_ADDRESSES = ("127.0.0.1:8000", "localhost:8000")

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Runs the blocks (a JSON list of [first line, code]) in one namespace; each compiles
# under the name README.md with its README line numbers, and `run_blocks` writes the
# blocks at those lines into ./README.md, so that tracebacks show the README's lines.
_DRIVER = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    for line, code in json.load(open(sys.argv[1])):
        print(f"--- README.md line {line}", flush=True)
        exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
    print("--- all blocks ran", flush=True)
    """
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown text: (line of their first code line, code)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def run_blocks(
    blocks: list[tuple[int, str]], address: str, workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Run `blocks` in a fresh Python process in `workdir`, the README's address
    replaced by `address`."""
    code = []
    for line, block in blocks:
        for written in README_ADDRESSES:
            block = block.replace(written, address)
        code.append([line, block])
    (workdir / "blocks.json").write_text(json.dumps(code))
    text: list[str] = []
    for line, block in code:
        text += [""] * (line - 1 - len(text)) + block.splitlines()
    (workdir / "README.md").write_text("\n".join(text) + "\n")
    (workdir / "driver.py").write_text(_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")}
    return subprocess.run(
        [sys.executable, "driver.py", "blocks.json"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    """`ndrelay serve --demo` in a subprocess, as the README starts it: its address."""
    port = _free_port()
    workdir = tmp_path / "server"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")}
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ndrelay", "serve", "--demo", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"ndrelay serve did not start:\n{(workdir / 'serve.log').read_text()}"
                    )
                time.sleep(0.1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _report(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def test_readme_has_python_examples() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    for _, code in blocks:
        compile(code, "README.md", "exec")  # each block is valid Python on its own


def test_readme_python_examples_run_twice(demo_server: str, tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text())
    for run in (1, 2):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        done = run_blocks(blocks, demo_server, workdir)
        assert done.returncode == 0, f"README examples, run {run}: {_report(done)}"
        assert done.stdout.rstrip().endswith("--- all blocks ran"), _report(done)
        # what the README's comments say the first examples print
        assert "(4, 3)\n(4, 3)\n(2, 3)\n" in done.stdout, _report(done)
        assert done.stdout.count("(1024, 6)\n") == 4, _report(done)
        assert "producer failed: ValueError: lidar disconnected" in done.stdout, _report(done)


def test_a_readme_example_that_fails_fails_the_run(demo_server: str, tmp_path: Path) -> None:
    """The runner is not fooled: an example that raises (here: publishing twice to a
    stream name that finished, with nothing deleting it) fails, naming its README line."""
    lying = textwrap.dedent(
        """\
        import numpy as np
        from ndrelay import RelayClient
        with RelayClient("http://127.0.0.1:8000") as client:
            client.publish("kept", [np.zeros(3)])
        """
    )
    first = run_blocks([(40, lying)], demo_server, tmp_path)
    assert first.returncode == 0, _report(first)
    second = run_blocks([(40, lying)], demo_server, tmp_path)
    assert second.returncode != 0
    assert 'File "README.md", line 43' in second.stderr, second.stderr
    assert 'client.publish("kept", [np.zeros(3)])' in second.stderr  # the line itself
    # the refusal says why and what to do
    assert "StreamClosed" in second.stderr
    assert "keeps its end" in second.stderr and "delete it" in second.stderr, second.stderr
