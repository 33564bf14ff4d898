"""SSE resume with `Last-Event-ID`, as a browser reconnects (seen with curl): a fanout
stream continues after that seq, a queue consumer named in the URL gets its own
unacknowledged items first and has those up to that seq acknowledged."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from _sources import poll
from conftest import need

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def sse_events(body: str) -> list[tuple[str, dict]]:
    """(event name, JSON data) of each event; `retry:` and comments left out."""
    out = []
    for block in body.split("\n\n"):
        if not block or block.startswith((":", "retry:")):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def curl(url: str, *headers: str, max_time: float = 20) -> str:
    args = [need("curl"), "-sN", "--max-time", str(max_time)]
    for h in headers:
        args += ["-H", h]
    return subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=max_time + 10
    ).stdout


def test_fanout_resumes_after_last_event_id(server):
    server.relay.publish("ticks", (np.array([i]) for i in range(20)), size=32, mode="fanout")
    poll(lambda: server.info("ticks")["state"] == "ended", "the stream's end")
    url = f"{server.url}/streams/ticks?format=sse"
    again = sse_events(curl(url, "Last-Event-ID: 12"))
    assert [d["seq"] for k, d in again if k == "data"] == list(range(13, 20))
    assert again[-1] == ("end", {"kind": "end", "seq": 20})


def test_queue_consumer_gets_its_own_pending_items_first(serve):
    import httpx

    server = serve()
    server.relay.publish("jobs", (np.array([i]) for i in range(10)), size=16)
    base = f"{server.url}/streams/jobs"
    got = []
    # the page's first connection: it takes events 0..3, then the connection is cut
    with httpx.stream("GET", base, params={"format": "sse", "consumer": "tab-1"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["seq"])
                if len(got) == 4:
                    break
    assert got == [0, 1, 2, 3]
    # the items sent to tab-1 are still tab-1's (pending), waiting for it to come back
    assert httpx.get(base + "/info").json()["pending"] >= 4
    # the browser reconnects with Last-Event-ID: 3 and the same consumer id
    body = curl(f"{base}?format=sse&consumer=tab-1", "Last-Event-ID: 3", max_time=5)
    events = sse_events(body)
    seqs = [d["seq"] for k, d in events if k == "data"]
    assert seqs == list(range(4, 10))  # nothing lost, nothing twice
    # 0..3 were acknowledged by the reconnect; 4..9 wait for tab-1's own acknowledgement
    acked = httpx.post(base + "/ack", json={"consumer": "tab-1", "upto": 9}).json()
    assert acked["acked"] == 6
