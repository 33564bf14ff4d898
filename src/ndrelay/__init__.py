"""ndrelay: stream numpy arrays between machines over HTTP.

The client (`RelayClient`, `AsyncRelayClient`) and the server (`Relay`, `create_app`) are
imported lazily, so `import ndrelay` and the codec need neither httpx nor starlette.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._buffers import (
    Buffer,
    Data,
    ExceptionSentinel,
    Prefetch,
    ReadableQueue,
    Streamable,
    batch_iterator,
)
from ._codec import (
    DEFAULT_MAX_FRAME_SIZE,
    MEDIA_TYPE,
    FrameDecoder,
    encode_frame,
    encode_frame_parts,
)
from ._exceptions import (
    AckConflict,
    AuthError,
    ConnectError,
    ConsumerNotFound,
    FrameTooLarge,
    LocalProtocolError,
    NDRelayError,
    ProtocolError,
    RegistryError,
    RelayHTTPError,
    RelayTimeout,
    RemoteError,
    RemoteProtocolError,
    SchemaMismatch,
    SeqGap,
    StreamClosed,
    StreamConflict,
    StreamError,
    StreamInterrupted,
    StreamNotFound,
    TransportError,
    UploadRefused,
)
from ._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame
from ._version import __version__

if TYPE_CHECKING:
    from ._client import AsyncRelayClient, AsyncRemoteStream, RelayClient, RemoteStream
    from .registry import MemoryRegistry, Registry
    from .server import Relay, create_app

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MEDIA_TYPE",
    "AckConflict",
    "AsyncRelayClient",
    "AsyncRemoteStream",
    "AuthError",
    "Buffer",
    "ConnectError",
    "ConsumerNotFound",
    "Data",
    "DataFrame",
    "EndFrame",
    "ErrorFrame",
    "ExceptionSentinel",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "HeartbeatFrame",
    "LocalProtocolError",
    "MemoryRegistry",
    "NDRelayError",
    "Prefetch",
    "ProtocolError",
    "ReadableQueue",
    "Registry",
    "RegistryError",
    "Relay",
    "RelayClient",
    "RelayHTTPError",
    "RelayTimeout",
    "RemoteError",
    "RemoteProtocolError",
    "RemoteStream",
    "SchemaMismatch",
    "SeqGap",
    "StreamClosed",
    "StreamConflict",
    "StreamError",
    "StreamInterrupted",
    "StreamNotFound",
    "Streamable",
    "TransportError",
    "UploadRefused",
    "__version__",
    "batch_iterator",
    "create_app",
    "encode_frame",
    "encode_frame_parts",
]

_LAZY = {
    "AsyncRelayClient": "._client",
    "AsyncRemoteStream": "._client",
    "RelayClient": "._client",
    "RemoteStream": "._client",
    "MemoryRegistry": ".registry",
    "Registry": ".registry",
    "Relay": ".server",
    "create_app": ".server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ndrelay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
