"""The bearer token never reaches the logs: uvicorn's access log (`?token=` is what
browsers' EventSource must send), its error log, ndrelay's own, and logged exceptions."""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest
from _sources import ServeProcess, bounded, clean_env

from ndrelay import RelayClient
from ndrelay.server.redact import SecretRedactor

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

TOKEN = "s3cret-tok3n"


@pytest.mark.slow
def test_a_real_servers_logs_never_show_the_token(backend):
    proc = ServeProcess("--token", TOKEN, "--log-level", "debug", "--demo", env=clean_env())
    try:
        base = proc.url
        assert httpx.get(f"{base}/streams?token={TOKEN}", timeout=10).status_code == 200
        assert httpx.get(f"{base}/streams?token=wr0ng-guess", timeout=10).status_code == 401
        assert httpx.get(f"{base}/streams/nope/info?token={TOKEN}", timeout=10).status_code == 404
        r = httpx.get(f"{base}/streams/count?format=ndjson&token={TOKEN}", timeout=20)
        assert r.status_code == 200 and '"kind":"end"' in r.text
        bad = httpx.post(f"{base}/streams/up?token={TOKEN}", content=b"\xc1junk", timeout=20)
        assert bad.status_code == 400
        with RelayClient(base, token=TOKEN) as client:
            client.publish("up2", [np.zeros(2)])
            assert len(bounded(lambda: list(client.stream("up2")))) == 1
    finally:
        proc.signal(15)
        proc.proc.wait(timeout=20)
        out, err = proc.stdout_text(), proc.stderr_text()
        proc.stop()
    logs = out + err
    assert "GET /streams?token=***" in logs, logs[-3000:]  # the access log did log them
    assert TOKEN not in logs, logs[-3000:]
    assert "wr0ng-guess" not in logs, logs[-3000:]


def test_records_and_exceptions_are_masked(caplog):
    redactor = SecretRedactor(lambda: TOKEN)
    redactor.install()
    log = logging.getLogger("test.redact")
    try:
        with caplog.at_level(logging.INFO, logger="test.redact"):
            log.info(
                '%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", f"/s?a=1&token={TOKEN}", "1.1", 200
            )
            log.info("header: Authorization: Bearer %s", "another-one")
            try:
                raise ValueError(f"bad request for token {TOKEN}")
            except ValueError:
                log.exception("failed")
    finally:
        redactor.uninstall()
    text = caplog.text
    assert TOKEN not in text and "another-one" not in text
    assert "/s?a=1&token=***" in text and "Bearer ***" in text
    assert "ValueError: bad request for token ***" in text
    log.info("after uninstall %s", TOKEN)  # nothing masked once the relay stopped
    assert logging.getLogRecordFactory() is logging.LogRecord
