"""The schema check every backend's streams share (DESIGN.md §3: arrays are verified
against the stream's declared dtype/shape, bytes are not)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._codec import check_dtype
from .._exceptions import LocalProtocolError, SchemaMismatch
from ._base import StreamSpec
from ._block import Block

__all__ = ["SchemaCheck"]


class SchemaCheck:
    """Mixin: `check_item` against `self.spec`; needs `name`, `spec`, `_dtype`, `_checked`."""

    name: str
    spec: StreamSpec
    _dtype: np.dtype[Any] | None
    _checked: set[tuple[np.dtype[Any], tuple[int, ...]]]

    def check_item(self, item: Any) -> None:
        if type(item) is Block:  # its rows are the items
            if len(item.array):
                self.check_item(item.array[0])
            return
        if isinstance(item, np.generic):
            item = np.asarray(item)
        if isinstance(item, np.ndarray):
            if (item.dtype, item.shape) in self._checked:
                return
            try:
                check_dtype(item.dtype)
            except ValueError as exc:
                raise LocalProtocolError(str(exc), key="dtype") from None
            spec = self.spec
            if (self._dtype is not None and item.dtype != self._dtype) or (
                spec.shape is not None and item.shape != spec.shape
            ):
                raise SchemaMismatch(
                    f"stream {self.name!r} takes dtype {spec.dtype} shape {spec.shape}, "
                    f"got dtype {item.dtype.str} shape {item.shape}",
                    stream_name=self.name,
                )
            if len(self._checked) < 256:
                self._checked.add((item.dtype, item.shape))
        elif not isinstance(item, bytes | bytearray):
            raise LocalProtocolError(
                f"a stream item must be an np.ndarray, bytes or bytearray, "
                f"not {type(item).__name__}",
                key="data",
            )
