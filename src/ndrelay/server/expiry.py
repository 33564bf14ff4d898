"""Stream expiry: finished streams, and open ones left empty and unused, are removed after
`stream_ttl` seconds, so that names and slots do not stay taken forever."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .._exceptions import StreamNotFound
from ..registry import Registry, Stream

__all__ = ["Expiry"]

log = logging.getLogger("ndrelay.server")


def _expirable(info: dict[str, Any]) -> bool:
    """Nobody is using the stream: finished, or open and empty; no producer, no consumer."""
    if info["producers"] or info["consumers"]:
        return False
    # (pending: items delivered to a consumer that left, waiting out its lease)
    return info["state"] != "open" or (info["depth"] == 0 and not info.get("pending"))


def _key(stream: Stream) -> tuple[str, Any]:
    # a stream deleted and created again under its name starts a new clock
    return stream.name, getattr(stream, "created", None)


class Expiry:
    """Tracks how long each stream has been expirable; `sweep()` removes those past the TTL.

    A stream's clock starts when it becomes expirable (finished, or open with nothing
    buffered, and no producer or consumer attached) and restarts whenever it stops being
    so: an item, a producer or a consumer keeps it alive.

    Args:
        registry: the streams.
        ttl: seconds; 0 or less: streams never expire.
    """

    def __init__(self, registry: Registry, ttl: float) -> None:
        self.registry = registry
        self.ttl = ttl
        # (name, creation time) -> since when it has been expirable
        self._since: dict[tuple[str, Any], float] = {}

    @property
    def interval(self) -> float:
        """Seconds between sweeps: a tenth of the TTL, from 0.05 s to 10 s."""
        return min(10.0, max(0.05, self.ttl / 10))

    def expires_in(
        self, stream: Stream, info: dict[str, Any], now: float | None = None
    ) -> float | None:
        """Seconds until `stream` expires if nothing happens, or None (in use, or no TTL);
        `info`: its `ainfo()`."""
        if self.ttl <= 0 or not _expirable(info):
            return None
        since = self._since.get(_key(stream))
        if since is None:
            return self.ttl
        now = time.monotonic() if now is None else now
        return max(0.0, self.ttl - (now - since))

    async def sweep(self, now: float | None = None) -> list[str]:
        """Remove the streams expirable for the TTL or longer; returns their names."""
        if self.ttl <= 0:
            return []
        now = time.monotonic() if now is None else now
        removed: list[str] = []
        seen: dict[tuple[str, Any], float] = {}
        for stream in await self.registry.list_streams():
            if not _expirable(await stream.ainfo()):
                continue
            key = _key(stream)
            since = self._since.get(key, now)
            if now - since < self.ttl:
                seen[key] = since
                continue
            try:
                await self.registry.delete_stream(stream.name, "stream expired")
                removed.append(stream.name)
            except StreamNotFound:
                pass
        self._since = seen
        if removed:
            log.info(
                "expired %d stream(s) unused for %g s: %s",
                len(removed),
                self.ttl,
                ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
            )
        return removed

    async def run(self, closed: Any) -> None:
        """Sweep every `interval` seconds until cancelled or `closed()` is true."""
        while not closed():
            await asyncio.sleep(self.interval)
            if closed():
                break
            await self.sweep()
