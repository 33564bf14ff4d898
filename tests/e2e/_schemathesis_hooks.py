"""Schemathesis hooks (`SCHEMATHESIS_HOOKS=_schemathesis_hooks`): how to send an upload.

`POST /streams/{name}` takes a body of msgpack frames, which a fuzzer cannot make from
the schema (`string`, `binary`). This serializer turns what it generates into a valid
body: 0-2 heartbeat frames (skipped by the relay), then an `end` frame. No data frame:
one could fill a stream without consumers, and the upload would wait for one; and not
nothing: an upload that created its stream and accepted nothing removes it again.
"""

from __future__ import annotations

from typing import Any

import msgpack
import schemathesis

HEARTBEAT = msgpack.packb({"kind": "heartbeat"})
END = msgpack.packb({"kind": "end"})  # `seq` is optional in an upload


@schemathesis.serializer("application/x-msgpack")
def frames(ctx: Any, value: Any) -> bytes:
    size = len(value) if isinstance(value, bytes | str) else 0
    return HEARTBEAT * (size % 3) + END
