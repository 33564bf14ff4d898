"""Frames off a streaming response, and frames of a recording file, for the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .._codec import FrameDecoder
from .._exceptions import ProtocolError
from .._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

__all__ = ["item_count", "payload_bytes", "read_file", "read_response"]


def item_count(frame: DataFrame) -> int:
    return frame.count if frame.count is not None else 1


def payload_bytes(frame: DataFrame) -> int:
    data = frame.data
    return int(data.nbytes) if hasattr(data, "nbytes") else len(data)


def read_response(response: Any, what: str) -> Iterator[Frame]:
    """The frames of a stream body, heartbeats skipped, ending with its `end` or
    `error` frame; a body cut off before one is a `ClickException` naming `what`."""
    decoder = FrameDecoder()
    try:
        for chunk in response.iter_raw():
            decoder.feed(chunk)
            for frame in decoder.frames():
                if type(frame) is HeartbeatFrame:
                    continue
                yield frame
                if isinstance(frame, EndFrame | ErrorFrame):
                    return
        decoder.feed_eof()
    except ProtocolError as exc:
        raise click.ClickException(f"{what}: bad frame from the relay: {exc}") from None
    raise click.ClickException(f"{what}: the relay's response stopped before the end of the stream")


def read_file(path: Path, chunk: int = 1 << 20) -> Iterator[Frame]:
    """The frames of a recording (a saved stream body), heartbeats skipped; a file cut
    inside a frame, or not msgpack frames at all, is a `ClickException`."""
    decoder = FrameDecoder()
    try:
        with path.open("rb") as f:
            while piece := f.read(chunk):
                decoder.feed(piece)
                for frame in decoder.frames():
                    if type(frame) is not HeartbeatFrame:
                        yield frame
        decoder.feed_eof()
    except ProtocolError as exc:
        raise click.ClickException(f"{path}: not a recording of ndrelay frames: {exc}") from None
