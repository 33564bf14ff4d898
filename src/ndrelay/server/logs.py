"""Log floods stopped: the same message repeated in a loop (failing accepts, refused uploads
from one client) is logged a few times per window, then counted, never once per event."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimit", "limit_logs"]

#: Loggers whose records are rate-limited by `limit_logs()`.
LOGGERS = ("asyncio", "uvicorn.error", "uvicorn.access", "ndrelay", "ndrelay.server")


class RateLimit(logging.Filter):
    """Lets the first `burst` records of a kind through per `window` seconds and drops the
    rest; the first record of the next window says how many were dropped.

    Records are of one kind when they share logger, level, message template (its first
    line: asyncio puts the socket on the next lines) and exception type: a refused upload
    is one kind whatever the stream. Access lines of answers below 400 are never limited;
    failed ones are one kind per client address and status.
    """

    def __init__(
        self, burst: int = 5, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        # kind -> [window start, records this window, records dropped this window]
        self._kinds: dict[tuple[object, ...], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        exc_type = record.exc_info[0] if record.exc_info else None
        kind: tuple[object, ...] = (
            record.name,
            record.levelno,
            template.split("\n", 1)[0],
            exc_type,
        )
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and record.args:
            # an access line: successes always pass; failures are limited per client, status
            status = record.args[-1]
            if not isinstance(status, int) or status < 400:
                return True
            kind += (str(record.args[0]).rsplit(":", 1)[0], status)
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is None or now - entry[0] >= self.window:
            dropped = int(entry[2]) if entry is not None else 0
            if entry is None and len(self._kinds) >= 1024:  # bounded: forget the oldest kind
                self._kinds.pop(next(iter(self._kinds)))
            self._kinds[kind] = [now, 1, 0]
            if dropped:
                record.msg = (
                    f"{template} [and {dropped} more like it in {self.window:g} s, not logged]"
                )
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


def limit_logs(burst: int = 5, window: float = 10.0) -> RateLimit:
    """Rate-limit the relay's, uvicorn's and asyncio's loggers (one shared filter)."""
    limit = RateLimit(burst, window)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimit)]:
            logger.removeFilter(old)
        logger.addFilter(limit)
    return limit
