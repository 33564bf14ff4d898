"""`/metrics` as an operator scrapes it: payload bytes in and out per stream and the
process's own memory, CPU and file descriptors, valid for Prometheus' own `promtool`."""

from __future__ import annotations

import subprocess

import httpx
import numpy as np
import pytest
from _sources import bounded, wait_until
from conftest import need
from prometheus_client.parser import text_string_to_metric_families

from ndrelay import RelayClient

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def scrape(url: str) -> tuple[str, dict[str, list]]:
    text = httpx.get(url + "/metrics", timeout=20).text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return text, families


def sample(families, family: str, name: str, **labels: str) -> float:
    for s in families[family]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels} in {families[family]}")


def test_bytes_in_and_out_per_stream(server):
    frame = np.zeros((64, 128), np.float32)  # 32 KiB of payload each
    with RelayClient(server.url, read_timeout=20) as client:
        client.publish("cam", [frame] * 5)
        client.publish("imu", [b"x" * 10] * 3)
        with client.stream("cam") as s:
            got = bounded(lambda: [next(s) for _ in range(2)])
            assert len(got) == 2
            assert wait_until(lambda: client.info("cam")["consumed"] >= 2)
            _, families = scrape(server.url)

    def traffic(stream: str, direction: str) -> float:
        return sample(
            families,
            "ndrelay_stream_bytes",
            "ndrelay_stream_bytes_total",
            stream=stream,
            direction=direction,
        )

    assert traffic("cam", "in") == 5 * frame.nbytes
    out = traffic("cam", "out")
    # what the relay handed to the reader: at least the 2 items taken, at most all 5
    assert 2 * frame.nbytes <= out <= 5 * frame.nbytes
    assert out % frame.nbytes == 0
    assert traffic("imu", "in") == 30
    assert traffic("imu", "out") == 0
    buffered = sample(
        families, "ndrelay_stream_buffered_bytes", "ndrelay_stream_buffered_bytes", stream="imu"
    )
    assert buffered == 30


def test_process_metrics(server):
    _, families = scrape(server.url)
    assert sample(families, "process_resident_memory_bytes", "process_resident_memory_bytes") > 1e6
    assert sample(families, "process_open_fds", "process_open_fds") >= 3
    assert sample(families, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    assert sample(families, "process_max_fds", "process_max_fds") > 0


def test_promtool_accepts_the_metrics(server):
    promtool = need("promtool")
    with RelayClient(server.url) as client:
        client.publish("cam", [np.zeros(3)] * 2)
        client.create("fan", mode="fanout")
    text, _ = scrape(server.url)
    assert "ndrelay_stream_bytes_total" in text and "process_open_fds" in text
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_metrics_want_the_token(serve):
    handle = serve(token="s3cret")
    assert httpx.get(handle.url + "/metrics", timeout=20).status_code == 401
    r = httpx.get(handle.url + "/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=20)
    assert r.status_code == 200 and "process_open_fds" in r.text
