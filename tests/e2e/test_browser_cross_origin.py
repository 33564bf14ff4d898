"""A page on another origin (another port of 127.0.0.1) reading and writing a relay in
headless Chromium: allowed with `cors_origins` naming it, refused by the browser without."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAGE = """<!doctype html><meta charset="utf-8"><title>viz</title><script>
const RELAY = new URLSearchParams(location.search).get("relay");
window.result = (async () => {
  const out = {};
  try {
    const r = await fetch(RELAY + "/streams");
    out.list = (await r.json()).map((s) => s.name);
  } catch (e) { out.list = "refused"; }
  try {  // JSON body: a preflighted request
    const r = await fetch(RELAY + "/streams/fromviz", {
      method: "PUT", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({size: 4, mode: "fanout"}),
    });
    out.put = r.status;
  } catch (e) { out.put = "refused"; }
  out.sse = await new Promise((resolve) => {
    const es = new EventSource(RELAY + "/streams/numbers?format=sse");
    const seqs = [];
    es.addEventListener("data", (e) => seqs.push(JSON.parse(e.data).seq));
    es.addEventListener("end", () => { es.close(); resolve(seqs); });
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) resolve("refused"); };
    setTimeout(() => { es.close(); resolve("timeout"); }, 15000);
  });
  return out;
})();
</script>"""


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The origin of a small page server; its page calls the relay at `?relay=URL`."""
    body = PAGE.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-page", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def run_page(browser, origin, relay_url):
    page = browser.new_page()
    page.goto(f"{origin}/?relay={relay_url}")
    return page.evaluate("window.result")  # awaits the page's promise


def test_an_allowed_origin_reads_writes_and_follows(serve, browser, page_origin):
    server = serve(cors_origins=[page_origin])
    server.relay.publish("numbers", (np.array([i]) for i in range(3)), size=4)
    got = run_page(browser, page_origin, server.url)
    assert got == {"list": ["numbers"], "put": 201, "sse": [0, 1, 2]}
    assert server.relay.registry.get("fromviz").info()["mode"] == "fanout"


def test_other_origins_are_refused_by_the_browser(serve, browser, page_origin):
    server = serve(cors_origins=["http://127.0.0.1:1"])  # some other origin only
    server.relay.publish("numbers", (np.array([i]) for i in range(3)), size=4)
    got = run_page(browser, page_origin, server.url)
    assert got == {"list": "refused", "put": "refused", "sse": "refused"}
    # the preflight failed, so the PUT was never sent
    assert "fromviz" not in [s.name for s in server.relay.registry.streams()]
