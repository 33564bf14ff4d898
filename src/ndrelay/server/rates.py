"""Recent rates of every stream (items/s and bytes/s produced, items/s consumed), from
counter samples taken about once a second, for `GET /streams`, the CLI and the dashboard."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

__all__ = ["RateMeter"]

_Sample = tuple[float, int, int, int]  # (monotonic time, produced, produced_bytes, consumed)


class RateMeter:
    """Per-stream counter samples over the last `window` seconds.

    `sample(infos)` records the counters of each stream's info; `annotate(info)` adds
    `items_per_s`, `bytes_per_s` and `consumed_per_s` over the samples in the window
    (`None` until two samples at least `min_span` apart exist). `run()` samples
    every `interval` seconds until cancelled (the app's lifespan owns that task).
    """

    def __init__(self, window: float = 5.0, interval: float = 1.0, min_span: float = 0.5) -> None:
        self.window = window
        self.interval = interval
        self.min_span = min_span
        self._samples: dict[str, deque[_Sample]] = {}

    def sample(
        self, infos: list[dict[str, Any]], now: float | None = None, complete: bool = True
    ) -> None:
        """Record counters; with `complete`, `infos` lists every stream (others are gone)."""
        now = time.monotonic() if now is None else now
        seen = set()
        for info in infos:
            name = info["name"]
            seen.add(name)
            point = (
                now,
                int(info.get("produced", 0)),
                int(info.get("produced_bytes", 0)),
                int(info.get("consumed", 0)),
            )
            samples = self._samples.get(name)
            if samples is None or (samples and point[1] < samples[-1][1]):
                # new, or deleted and created again: counters restarted
                samples = self._samples[name] = deque()
            if samples and now - samples[-1][0] < self.min_span / 2:
                samples[-1] = point  # sampled again at once: keep the newest
            else:
                samples.append(point)
            while len(samples) > 2 and now - samples[1][0] >= self.window:
                samples.popleft()
        for name in list(self._samples) if complete else ():
            if name not in seen:
                del self._samples[name]

    def annotate(self, info: dict[str, Any]) -> dict[str, Any]:
        samples = self._samples.get(info["name"])
        rates: dict[str, float | None] = {
            "items_per_s": None,
            "bytes_per_s": None,
            "consumed_per_s": None,
        }
        if samples and len(samples) >= 2:
            (t0, p0, b0, c0), (t1, p1, b1, c1) = samples[0], samples[-1]
            span = t1 - t0
            if span >= self.min_span:
                rates = {
                    "items_per_s": round((p1 - p0) / span, 3),
                    "bytes_per_s": round((b1 - b0) / span, 1),
                    "consumed_per_s": round((c1 - c0) / span, 3),
                }
        return {**info, **rates}

    async def run(self, infos: Any) -> None:
        """Sample `infos()` every `interval` seconds, until cancelled."""
        while True:
            self.sample(await infos())
            await asyncio.sleep(self.interval)
