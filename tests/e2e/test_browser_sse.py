"""A real browser (headless Chromium) reading a stream with `EventSource`: a producer's
failure arrives as `stream-error`, which a page can tell from EventSource's own `error`
(a dropped connection, after which it reconnects)."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import need

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"

# The page: the README's browser snippet as written (its relay address replaced), after
# a prelude that records what it does and reports it to the test.
PRELUDE = """
const seen = [];
const report = () => fetch("/result", {method: "POST", body: JSON.stringify(seen)});
function draw(frame) { seen.push("data " + frame.seq + " " + frame.dtype); }
console.error = (...args) => { seen.push(args.join(" ")); report(); };
"""


def readme_snippet() -> str:
    blocks = re.findall(r"^```js\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    snippets = [b for b in blocks if "EventSource" in b]
    assert snippets, "README has no EventSource snippet"
    return snippets[0]


def page(relay: str) -> str:
    script = readme_snippet().replace("http://127.0.0.1:8000", relay)
    return f'<!doctype html><meta charset="utf-8"><script>{PRELUDE}\n{script}</script>'


@pytest.fixture
def page_server() -> Iterator[tuple[str, queue.Queue[list[str]], dict[str, str]]]:
    """Serves `page()` at / (its relay URL set through the yielded dict) and collects
    what the page POSTs to /result."""
    results: queue.Queue[list[str]] = queue.Queue()
    state: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page(state["relay"]).encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            results.put(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-page", daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield origin, results, state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_browser_event_source_sees_stream_error(serve, page_server, tmp_path: Path):
    chromium = need("chromium")
    origin, results, state = page_server
    handle = serve(cors_origins=[origin])
    state["relay"] = handle.url

    def sensor() -> Iterator[np.ndarray]:
        yield np.zeros(2, np.float32)
        yield np.ones(2, np.float32)
        raise ValueError("lidar disconnected")

    handle.relay.publish("radar", sensor())
    browser = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            origin + "/",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen = results.get(timeout=90)
    finally:
        browser.send_signal(signal.SIGTERM)
        try:
            browser.wait(20)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)
    assert seen == ["data 0 <f4", "data 1 <f4", "radar failed: lidar disconnected"]
