"""Synthetic streams for `ndrelay serve --demo`, so a new user has something to look at."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "CAMERA_SHAPE",
    "camera_frame",
    "demo_camera",
    "demo_count",
    "demo_radar",
    "publish_demo",
]

#: Height, width, channels of the demo camera's frames.
CAMERA_SHAPE = (240, 320, 3)


def publish_demo(relay: Any) -> None:
    """Register the demo streams on `relay`: `radar`, `camera` (fanout) and `count`."""
    relay.publish("radar", demo_radar(), size=64, mode="fanout")
    relay.publish("camera", demo_camera(), size=8, mode="fanout")
    relay.publish("count", demo_count(), size=64)


def camera_frame(i: int) -> Any:
    """Frame `i` of the demo camera: a colour gradient (red across, green down, blue
    cycling with `i`) with a white 40x40 square moving diagonally. A pure function of
    `i`, so a test can check what a viewer shows of frame `seq`."""
    import numpy as np

    h, w, _ = CAMERA_SHAPE
    frame = np.empty(CAMERA_SHAPE, dtype=np.uint8)
    frame[..., 0] = (np.arange(w, dtype=np.int32) * 255 // (w - 1)).astype(np.uint8)[None, :]
    frame[..., 1] = (np.arange(h, dtype=np.int32) * 255 // (h - 1)).astype(np.uint8)[:, None]
    frame[..., 2] = (i * 8) % 256
    top, left = (i * 4) % (h - 40), (i * 6) % (w - 40)
    frame[top : top + 40, left : left + 40] = 255
    return frame


def demo_camera(rate: float = 10.0) -> Iterator[Any]:
    """An endless synthetic camera: `camera_frame(i)` at `rate` Hz (240x320x3 uint8)."""
    t0 = time.monotonic()
    for i in range(sys.maxsize):
        yield camera_frame(i)
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))


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
