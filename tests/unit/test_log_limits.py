"""Repeated log records are let through a few per window, then counted."""

from __future__ import annotations

import logging

from ndrelay.server.logs import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "ndrelay.server") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_a_flood_is_cut_to_the_burst_and_the_next_window_says_how_many() -> None:
    clock = Clock()
    limit = RateLimit(burst=3, window=10, clock=clock)
    passed = [limit.filter(record("upload to %r refused: %s", f"s{i}", "bad")) for i in range(100)]
    assert passed == [True] * 3 + [False] * 97
    clock.now += 10
    summary = record("upload to %r refused: %s", "s", "bad")
    assert limit.filter(summary)
    assert "97 more like it in 10 s" in summary.getMessage()
    assert summary.getMessage().startswith("upload to 's' refused: bad")
    clock.now += 10
    quiet = record("upload to %r refused: %s", "s", "bad")
    assert limit.filter(quiet) and "more like it" not in quiet.getMessage()


def test_kinds_are_counted_apart() -> None:
    limit = RateLimit(burst=1, window=10, clock=Clock())
    assert limit.filter(record("a %s", 1))
    assert not limit.filter(record("a %s", 2))
    assert limit.filter(record("b %s", 1))
    assert limit.filter(record("a %s", 1, name="asyncio"))
    # asyncio's accept failure: the first line is the kind, the socket follows
    assert limit.filter(record("socket.accept() out of system resource\nsocket: <fd=6>"))
    assert not limit.filter(record("socket.accept() out of system resource\nsocket: <fd=7>"))


def test_access_lines_of_successes_are_never_limited() -> None:
    limit = RateLimit(burst=1, window=10, clock=Clock())
    line = '%s - "%s %s HTTP/%s" %d'
    ok = [limit.filter(record(line, "1.2.3.4:5", "GET", "/", "1.1", 200, name="uvicorn.access"))]
    ok += [limit.filter(record(line, "1.2.3.4:6", "GET", "/", "1.1", 200, name="uvicorn.access"))]
    assert ok == [True, True]
    bad = [
        limit.filter(
            record(line, f"1.2.3.4:{port}", "POST", "/s", "1.1", 400, name="uvicorn.access")
        )
        for port in range(5)
    ]
    assert bad == [True, False, False, False, False]  # one client, one status: one kind
    other = record(line, "5.6.7.8:9", "POST", "/s", "1.1", 400, name="uvicorn.access")
    assert limit.filter(other)
