"""EventSource in headless Chromium against a real relay: a page that never closes its
EventSource makes exactly one request after the end (answered 204, so the browser stops:
no reconnect loop), counted server-side; the README's snippet (`ndrelay-sse.js`, which
the dashboard ships) handles data, end and stream errors, with a token."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from _sources import free_port, poll
from conftest import ServerHandle, need

from ndrelay import Relay
from ndrelay.server import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Requests:
    """ASGI wrapper that records (path, status, last-event-id) of every stream read."""

    def __init__(self, app):
        self.app = app
        self.seen: list[tuple[str, int, str | None]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/streams/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        last = headers.get(b"last-event-id")
        entry = [scope["path"], 0, last.decode() if last is not None else None]

        async def watch(message):
            if message["type"] == "http.response.start":
                entry[1] = message["status"]
                self.seen.append(tuple(entry))
            await send(message)

        return await self.app(scope, receive, watch)


def ten(relay, name="count"):
    relay.publish(name, (np.array([i]) for i in range(10)), size=16)


@pytest.fixture
def watched():
    """`watched(relay)`: a running relay whose stream reads are recorded in `.requests`."""
    handles = []

    def start(relay):
        wrappers = []
        handle = ServerHandle(relay, wrap=lambda app: wrappers.append(Requests(app)) or wrappers[0])
        handle.requests = wrappers[0]
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def test_a_page_that_never_closes_stops_after_the_end(watched, browser):
    relay = Relay(settings=Settings(sse_retry=0.2))  # a reconnect loop would be fast
    handle = watched(relay)
    requests = handle.requests
    ten(relay)
    page = browser.new_page()
    page.goto(handle.url + "/healthz")  # the relay's own origin
    page.evaluate(
        """() => {
            window.events = [];
            const es = new EventSource('/streams/count?format=sse');  // never closed
            window.es = es;
            for (const kind of ['data', 'end', 'stream-error'])
                es.addEventListener(kind, (e) => window.events.push([kind, e.lastEventId]));
        }"""
    )
    time.sleep(10)  # long enough for ~40 reconnects at retry 0.2 s, were there a loop
    events = page.evaluate("window.events")
    assert events == [*[["data", str(i)] for i in range(10)], ["end", "10"]]
    assert page.evaluate("window.es.readyState") == 2  # CLOSED: the browser gave up
    reads = [r for r in requests.seen if r[0] == "/streams/count"]
    assert reads == [("/streams/count", 200, None), ("/streams/count", 204, "10")]


SNIPPET_PAGE = """async (args) => {
    const { follow } = await import('/dashboard/ndrelay-sse.js');
    return await new Promise((resolve) => {
        const got = [];
        follow(args.path, {
            token: args.token,
            onData: (frame) => got.push(frame.data),
            onEnd: (end) => resolve({ got, end }),
            onError: (error) => resolve({ got, error }),
        });
        setTimeout(() => resolve({ got, timeout: true }), 20000);
    });
}"""


def test_the_readme_snippet_with_a_token(watched, browser):
    relay = Relay(settings=Settings(token="s3cret", sse_retry=0.2))
    handle = watched(relay)
    requests = handle.requests
    ten(relay)

    def broken():
        yield np.array([1.5])
        raise ValueError("lidar disconnected")

    relay.publish("broken", broken(), size=4)
    page = browser.new_page()
    page.goto(handle.url + "/healthz")
    got = page.evaluate(SNIPPET_PAGE, {"path": "/streams/count", "token": "s3cret"})
    assert got == {"got": [[i] for i in range(10)], "end": {"kind": "end", "seq": 10}}
    got = page.evaluate(SNIPPET_PAGE, {"path": "/streams/broken", "token": "s3cret"})
    assert got["got"] == [[1.5]]
    assert got["error"]["type"] == "ValueError"
    assert got["error"]["message"] == "lidar disconnected"
    got = page.evaluate(SNIPPET_PAGE, {"path": "/streams/count", "token": "wrong"})
    assert got == {"got": [], "error": {"type": "ConnectionClosed"}}  # 401: no retry
    time.sleep(1)  # a reconnect would come within 0.2 s
    reads = [(p, s) for p, s, _ in requests.seen]
    assert reads == [("/streams/count", 200), ("/streams/broken", 200), ("/streams/count", 401)]


def test_the_snippet_acknowledges_a_queue_consumers_items(watched, browser):
    # size 4: unacknowledged items hold the stream, so all ten arrive only if the page
    # acknowledges as it goes; the end goes out once every item is acknowledged
    relay = Relay(settings=Settings(sse_retry=0.2))
    handle = watched(relay)
    relay.publish("jobs", (np.array([i]) for i in range(10)), size=4)
    page = browser.new_page()
    page.goto(handle.url + "/healthz")
    got = page.evaluate(SNIPPET_PAGE, {"path": "/streams/jobs?consumer=tab-1", "token": None})
    assert got == {"got": [[i] for i in range(10)], "end": {"kind": "end", "seq": 10}}
    # the end does not wait for a live consumer's own pending items: the page's last
    # acknowledgement may arrive just after it
    stream = relay.registry.get("jobs")
    poll(lambda: stream.info()["pending"] == 0, "the page to acknowledge its last items", 10)
    assert stream.info()["state"] == "ended"
    acks = [r for r in handle.requests.seen if r[0] == "/streams/jobs/ack"]
    assert acks and all(status == 200 for _, status, _ in acks)


class Nginx:
    """Debian's nginx in front of `upstream` on a port of its own, configured by
    docker/nginx.conf (README: "Behind a proxy"); `restart()` stops it (SIGTERM: open
    connections are cut) and starts it again on the same port."""

    def __init__(self, root, upstream: int) -> None:
        from test_nginx import render

        self.binary = need("nginx")
        self.root = root
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o777)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = root / "nginx.conf"
        self.conf.write_text(render(self.port, (upstream,)))
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-p", f"{self.root}/", "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        poll(lambda: _answers(self.url + "/healthz"), "nginx to proxy /healthz", 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_fanout_page_resumes_across_a_cut_connection(watched, browser, tmp_path):
    relay = Relay(settings=Settings(sse_retry=0.2))
    handle = watched(relay)

    def ticks():
        for i in range(100_000):
            yield np.array([i])
            time.sleep(0.02)

    relay.publish("ticks", ticks(), size=1024, mode="fanout")
    nginx = Nginx(tmp_path / "nginx", handle.port)
    try:
        page = browser.new_page()
        page.goto(nginx.url + "/healthz")  # the page and the relay on one origin
        page.evaluate(
            """() => {
                window.seqs = []; window.opens = 0;
                const es = new EventSource('/streams/ticks?format=sse');
                window.es = es;
                es.onopen = () => window.opens++;
                es.addEventListener('data', (e) => window.seqs.push(JSON.parse(e.data).seq));
            }"""
        )
        poll(lambda: page.evaluate("window.seqs.length") >= 20, "20 events", 20)
        nginx.restart()  # every connection through it is cut
        cut = page.evaluate("window.seqs.length")
        poll(lambda: page.evaluate("window.opens") >= 2, "the browser to reconnect", 30)
        poll(lambda: page.evaluate("window.seqs.length") >= cut + 20, "events after it", 30)
        page.evaluate("window.es.close()")
        seqs = page.evaluate("window.seqs")
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
        reads = [r for r in handle.requests.seen if r[0] == "/streams/ticks"]
        assert len(reads) >= 2 and reads[0][2] is None
        resumed = int(reads[1][2])  # the reconnect's Last-Event-ID
        assert seqs[0] < resumed < seqs[-1] and seqs[seqs.index(resumed) + 1] == resumed + 1
    finally:
        nginx.stop()
