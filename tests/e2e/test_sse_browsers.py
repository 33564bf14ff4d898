"""SSE for browsers, seen with curl: `retry:` once at the start, heartbeats as comments,
error frames as `stream-error`, and a reconnect (`Last-Event-ID`) at or past the end, or
to a deleted stream, answered 204 so that EventSource stops."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import need

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def curl(url: str, *headers: str, max_time: float = 20) -> tuple[int, str]:
    """`curl -i` of `url`: the status and the body."""
    args = [need("curl"), "-s", "-i", "--max-time", str(max_time)]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=max_time + 10)
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    return int(head.split()[1]), body


def ten(relay, name="count", mode="queue"):
    relay.publish(name, (np.array([i]) for i in range(10)), size=16, mode=mode)


def test_retry_first_then_events_with_seq_ids(serve):
    server = serve(sse_retry=0.25)
    ten(server.relay)
    status, body = curl(f"{server.url}/streams/count?format=sse")
    assert status == 200
    blocks = body.split("\n\n")
    assert blocks[0] == "retry: 250"
    assert blocks[1].startswith("id: 0\nevent: data\ndata: ")
    assert blocks[11] == 'id: 10\nevent: end\ndata: {"kind":"end","seq":10}'
    assert body.count("retry:") == 1


def test_last_event_id_at_or_past_the_end_is_204(server):
    for mode in ("queue", "fanout"):
        name = f"done-{mode}"
        ten(server.relay, name, mode)
        url = f"{server.url}/streams/{name}?format=sse"
        status, body = curl(url)  # a first request: the events, the end
        assert status == 200 and "event: end" in body
        for seen in ("10", "11", "999"):
            assert curl(url, f"Last-Event-ID: {seen}") == (204, "")
        status, body = curl(url, "Last-Event-ID: 9")  # the end was not seen yet: it comes
        assert status == 200 and 'id: 10\nevent: end\ndata: {"kind":"end","seq":10}' in body


def test_a_failed_stream_after_its_error_frame_is_204(server):
    def broken():
        yield np.zeros(1)
        raise ValueError("no")

    server.relay.publish("broken", broken(), size=4)
    url = f"{server.url}/streams/broken?format=sse"
    status, body = curl(url)
    assert status == 200
    assert "id: 1\nevent: stream-error\ndata: " in body
    assert curl(url, "Last-Event-ID: 1") == (204, "")


def test_a_deleted_stream_is_204_for_a_reconnect_and_404_for_a_first_request(server):
    ten(server.relay, "gone", "fanout")
    server.delete("gone")
    url = f"{server.url}/streams/gone?format=sse"
    assert curl(url, "Last-Event-ID: 3") == (204, "")
    assert curl(url)[0] == 404


def test_last_event_id_is_only_for_sse_and_must_be_a_seq(server):
    ten(server.relay, "f", "fanout")
    status, body = curl(f"{server.url}/streams/f?format=ndjson", "Last-Event-ID: 10")
    assert status == 200 and body.strip().endswith('{"kind":"end","seq":10}')
    status, body = curl(f"{server.url}/streams/f?format=sse", "Last-Event-ID: abc")
    assert status == 422 and "Last-Event-ID" in body


def test_heartbeat_is_a_comment(serve):
    server = serve(heartbeat_interval=0.2)
    server.create("idle")
    status, body = curl(f"{server.url}/streams/idle?format=sse", max_time=1.5)
    assert status == 200
    blocks = [b for b in body.split("\n\n") if b]
    assert blocks[0] == "retry: 3000"
    assert len(blocks) >= 2 and set(blocks[1:]) == {": heartbeat"}
