"""Frame events of the wire format (DESIGN.md §2): what the codec encodes and decodes."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._exceptions import RemoteError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DataFrame", "EndFrame", "ErrorFrame", "Frame", "HeartbeatFrame", "builtin_bases"]


@dataclass(slots=True)
class Frame:
    """Base class of every frame."""


@dataclass(slots=True)
class DataFrame(Frame):
    """One item, or `count` items stacked on the leading axis of one array.

    Attributes:
        seq: stream position of the (first) item.
        data: an `np.ndarray` (dtype and shape travel with it) or raw `bytes`.
        count: `None` for one item; for a batched frame, the number of items stacked
            on axis 0 of `data` (their seqs are `seq … seq + count - 1`).
    """

    seq: int
    data: np.ndarray | bytes
    count: int | None = None

    def items(self) -> list[Any]:
        """The items this frame carries: `[data]`, or the rows of a batched array."""
        if self.count is None:
            return [self.data]
        return list(self.data)


@dataclass(slots=True)
class EndFrame(Frame):
    """The producer finished; `seq` is the number of items the stream ever held."""

    seq: int


@dataclass(slots=True)
class ErrorFrame(Frame):
    """The stream failed.

    Attributes:
        seq: the stream position at which it failed.
        origin: `"producer"` (its iterator raised) or `"relay"` (deleted, shutting down, ...).
        type: the exception's type name, e.g. `"ValueError"`.
        message: the exception's message.
        traceback: formatted traceback text, possibly empty.
        bases: the builtin exception classes `type` derives from, nearest first, when
            it is not a builtin itself (`("ValueError", "Exception", "BaseException")`
            for `class SensorError(ValueError)`), so that the reader can still catch it
            as a `ValueError`; else `None`.
    """

    seq: int
    origin: str
    type: str
    message: str
    traceback: str = ""
    bases: tuple[str, ...] | None = None

    @classmethod
    def from_exception(
        cls, exc: BaseException, *, seq: int, origin: str = "producer"
    ) -> ErrorFrame:
        """The frame that carries `exc` across the wire: type name, message, traceback text."""
        import traceback

        if isinstance(exc, RemoteError) and hasattr(exc, "remote_type"):
            # Relaying a stream that failed upstream: pass the original failure on, not
            # our local wrapper class (whose name no builtin matches downstream).
            return cls(
                seq=seq,
                origin=origin,
                type=exc.remote_type,
                message=exc.remote_message,
                traceback=exc.remote_traceback,
                bases=getattr(exc, "remote_bases", None) or None,
            )
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(
            seq=seq,
            origin=origin,
            type=type(exc).__name__,
            message=str(exc),
            traceback=text,
            bases=builtin_bases(type(exc)),
        )

    def to_exception(self, stream_name: str | None = None) -> RemoteError:
        """The `RemoteError` (mixed with the matching builtin) this frame stands for."""
        return RemoteError.from_frame(
            type=self.type,
            message=self.message,
            traceback=self.traceback,
            origin=self.origin,
            seq=self.seq,
            stream_name=stream_name,
            bases=self.bases or (),
        )


def builtin_bases(cls: type[BaseException]) -> tuple[str, ...] | None:
    """The names of the builtin exception classes `cls` derives from, nearest first;
    `None` if `cls` is a builtin itself (its name says it all)."""
    if getattr(builtins, cls.__name__, None) is cls:
        return None
    names = tuple(
        base.__name__
        for base in cls.__mro__[1:]
        if issubclass(base, BaseException) and getattr(builtins, base.__name__, None) is base
    )
    return names[:32] or None


@dataclass(slots=True)
class HeartbeatFrame(Frame):
    """Sent on idle streams; readers skip it."""
