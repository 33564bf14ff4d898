"""Synthetic streams for `ndrelay serve --demo`, so a new user has something to look at."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["demo_count", "demo_radar"]


def demo_radar(rate: float = 10.0) -> Iterator[Any]:
    """An endless synthetic "radar" stream: small float32 range-doppler maps at `rate` Hz."""
    import numpy as np

    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for i in range(sys.maxsize):
        frame = rng.standard_normal((4, 8), dtype=np.float32)
        frame[i % 4, (i * 3) % 8] += 10.0  # a moving target
        yield frame
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))


def demo_count(n: int = 10) -> Iterator[Any]:
    """A finite stream: `n` int64 arrays [i, i*i, i*i*i], then the end."""
    import numpy as np

    for i in range(n):
        yield np.array([i, i * i, i * i * i], dtype=np.int64)
