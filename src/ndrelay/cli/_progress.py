"""Progress and rate lines on stderr for long commands (record, play, push, cat --stats),
drawn by rich: live on a terminal, silent when stderr is not one (unless asked for lines)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = ["Meter", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Meter:
    """Counts items and bytes, and shows `label: N items, X MB, r items/s, R MB/s, t s`.

    Args:
        label: what is being done (`recording camera -> cam.msgpack`).
        lines: print a plain line every `interval` seconds even when stderr is not a
            terminal (`cat --stats`); otherwise nothing is shown off a terminal.
        interval: seconds between lines; also the window the rate is taken over (x3).
    """

    def __init__(self, label: str, lines: bool = False, interval: float = 1.0) -> None:
        self.label = label
        self.items = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._lines = lines
        self._interval = interval
        self._window: deque[tuple[float, int, int]] = deque([(self.start, 0, 0)])
        self._last_line = self.start
        self._console = Console(stderr=True, highlight=False)
        self._live: Live | None = None
        if self._console.is_terminal:
            self._live = Live(
                self._text(), console=self._console, refresh_per_second=4, transient=False
            )
            self._live.start()

    def add(self, items: int, nbytes: int) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._window[-1][0] >= self._interval / 4:
            self._window.append((now, self.items, self.bytes))
            while len(self._window) > 2 and now - self._window[0][0] > 3 * self._interval:
                self._window.popleft()
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Redraw (or print a line, when due)."""
        now = time.monotonic() if now is None else now
        if self._live is not None:
            self._live.update(self._text(now))
        elif self._lines and now - self._last_line >= self._interval:
            self._last_line = now
            self._console.print(self._text(now), soft_wrap=True)

    def rates(self, now: float | None = None) -> tuple[float, float]:
        now = time.monotonic() if now is None else now
        t0, n0, b0 = self._window[0]
        span = now - t0
        if span <= 0:
            return 0.0, 0.0
        return (self.items - n0) / span, (self.bytes - b0) / span

    def _text(self, now: float | None = None) -> Text:
        now = time.monotonic() if now is None else now
        items_s, bytes_s = self.rates(now)
        return Text(
            f"{self.label}: {self.items} items, {human_bytes(self.bytes)}, "
            f"{items_s:.1f} items/s, {human_bytes(bytes_s)}/s, {now - self.start:.1f} s"
        )

    def close(self, summary: str | None = None, **extra: Any) -> None:
        """Stop the live line; print `summary` (a plain line, always)."""
        if self._live is not None:
            self._live.update(self._text())
            self._live.stop()
            self._live = None
        if summary is not None:
            self._console.print(Text(summary), soft_wrap=True)
