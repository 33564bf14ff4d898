"""Vectored writes' bookkeeping: what is left of a list of buffers after a `sendmsg`."""

from __future__ import annotations

__all__ = ["IOV_MAX", "drop_sent"]

#: most buffers one sendmsg takes (Linux IOV_MAX is 1024)
IOV_MAX = 1024


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first `sent` bytes from `views` (whole views, then part of one)."""
    while sent:
        n = len(views[0])
        if sent >= n:
            sent -= n
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0
