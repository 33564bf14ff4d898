"""Human formats of frames (DESIGN.md §2): NDJSON lines and server-sent events."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from .._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame

__all__ = ["FORMATS", "SSE_EVENTS", "frame_json", "ndjson_line", "sse_event"]

#: `?format=` values and their media types.
FORMATS = {
    "msgpack": "application/x-msgpack",
    "ndjson": "application/x-ndjson",
    "sse": "text/event-stream",
}


def _array_json(array: np.ndarray) -> Any:
    """Nested lists of JSON values: non-finite floats become null, complex numbers
    `[re, im]`, datetimes ISO strings, byte strings latin-1 text."""
    kind = array.dtype.kind
    if kind == "c":
        return _array_json(np.stack([array.real, array.imag], axis=-1))
    if kind == "f" and not np.isfinite(array).all():
        return np.where(np.isfinite(array), array, np.array(None)).tolist()
    if kind in "mM":
        return np.datetime_as_string(array).tolist() if kind == "M" else array.astype(str).tolist()
    if kind == "S":
        return np.char.decode(array, "latin-1").tolist()
    return array.tolist()


def frame_json(frame: Frame) -> dict[str, Any]:
    """The frame as a JSON-ready map with the same keys as on the wire."""
    if isinstance(frame, DataFrame):
        data = frame.data
        if isinstance(data, np.ndarray):
            out: dict[str, Any] = {
                "kind": "data",
                "seq": frame.seq,
                "dtype": data.dtype.str,
                "shape": list(data.shape),
            }
            if frame.count is not None:
                out["count"] = frame.count
            out["data"] = _array_json(data)
            return out
        return {
            "kind": "data",
            "seq": frame.seq,
            "encoding": "base64",
            "data": base64.b64encode(bytes(data)).decode("ascii"),
        }
    if isinstance(frame, EndFrame):
        return {"kind": "end", "seq": frame.seq}
    if isinstance(frame, ErrorFrame):
        return {
            "kind": "error",
            "seq": frame.seq,
            "origin": frame.origin,
            "type": frame.type,
            "message": frame.message,
            "traceback": frame.traceback,
            **({"bases": list(frame.bases)} if frame.bases else {}),
        }
    if isinstance(frame, HeartbeatFrame):
        return {"kind": "heartbeat"}
    raise TypeError(f"not a frame: {type(frame).__name__}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def ndjson_line(frame: Frame) -> bytes:
    """One NDJSON line."""
    return _dumps(frame_json(frame)) + b"\n"


#: The SSE event name of each frame kind: an `error` frame is `stream-error`, because
#: EventSource fires its own `error` event for connection failures.
SSE_EVENTS = {"data": "data", "end": "end", "error": "stream-error"}


def sse_event(frame: Frame) -> bytes:
    """One server-sent event: `id:` the seq, `event:` the kind (`stream-error` for an
    error frame), `data:` the JSON. A heartbeat is a comment line, which EventSource
    skips by itself."""
    if type(frame) is HeartbeatFrame:
        return b": heartbeat\n\n"
    body = frame_json(frame)
    head = f"id: {body['seq']}\nevent: {SSE_EVENTS[body['kind']]}\n"
    return head.encode() + b"data: " + _dumps(body) + b"\n\n"
