"""`Block`: several items of a stream stacked in one array (kept and sent whole)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._exceptions import LocalProtocolError

__all__ = ["Block"]


class Block:
    """Several items of a stream stacked on the leading axis of one array.

    Producers that get items in bursts (an IMU driver's FIFO, a batch from a data
    loader) hand them over as one `Block`: the relay keeps and sends it whole, one
    header per block instead of per item, while each row still counts (and is
    numbered) as one item.
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise LocalProtocolError("a Block needs an array with a leading axis", key="data")
        self.array = array

    def rows(self, seq: int) -> list[tuple[int, Any]]:
        """The items as `(seq, row)` pairs, the first numbered `seq`."""
        return list(zip(range(seq, seq + len(self.array)), self.array, strict=True))
