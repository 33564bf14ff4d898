"""EventSource in headless Chromium against a real relay: a page that never closes its
EventSource makes exactly one request after the end (answered 204, so the browser stops:
no reconnect loop), counted server-side; the README's snippet (`ndrelay-sse.js`, which
the dashboard ships) handles data, end and stream errors, with a token."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import ServerHandle

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
