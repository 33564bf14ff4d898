"""The whole ndrelay exception tree, in one place.

```
NDRelayError
├─ ProtocolError             (abstract; .status_hint, .frame_index, .key)
│  ├─ LocalProtocolError     we were asked to encode an invalid frame
│  └─ RemoteProtocolError    the peer sent bad msgpack, an oversize, ill-formed or cut-off frame
│     └─ FrameTooLarge       a frame over the configured size limit (413)
├─ TransportError            client side; wraps httpx/socket errors, names the URL
│  ├─ ConnectError
│  ├─ RelayTimeout
│  └─ StreamInterrupted      the response ended before an `end` or `error` frame
├─ StreamError
│  ├─ StreamNotFound         404
│  ├─ StreamClosed           409: upload to a finished stream; a stream deleted or shut down
│  ├─ StreamConflict         409: create with a different definition
│  ├─ SchemaMismatch         422: dtype/shape against the stream's declared schema
│  ├─ ConsumerNotFound       404: an ack for a consumer id the stream does not know (.consumer)
│  ├─ AckConflict            409: an ack of a seq never delivered to that consumer (.seq)
│  ├─ SeqGap                 409: a producer's frame skipped ahead (.expected_seq)
│  ├─ RemoteError            an `error` frame arrived; also subclasses the matching builtin
│  │                         (a relay-origin one: the ndrelay class it names, e.g. StreamClosed)
│  └─ UploadRefused          the relay refused a frame of an upload (.frame_index, .accepted)
├─ RelayHTTPError            any other refusal by the relay (.status, .body)
├─ AuthError                 401
└─ RegistryError             backend failure; too many streams
```

Only the leaves are raised. Nothing here ever unpickles or evaluates remote data:
a remote exception is rebuilt from its type *name*, message and traceback text.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "AckConflict",
    "AuthError",
    "ConnectError",
    "ConsumerNotFound",
    "FrameTooLarge",
    "LocalProtocolError",
    "NDRelayError",
    "ProtocolError",
    "RegistryError",
    "RelayTimeout",
    "RemoteError",
    "RemoteProtocolError",
    "SchemaMismatch",
    "SeqGap",
    "StreamClosed",
    "StreamConflict",
    "StreamError",
    "StreamInterrupted",
    "StreamNotFound",
    "TransportError",
    "RelayHTTPError",
    "UploadRefused",
]


class NDRelayError(Exception):
    """Base class of every error ndrelay raises."""


class ProtocolError(NDRelayError):
    """A frame broke the wire format (DESIGN.md §2). Abstract: only subclasses are raised.

    Attributes:
        frame_index: index of the offending frame in its stream or upload body, if known.
        key: the map key at fault, if any.
        status_hint: the HTTP status a server answers with for this error.
    """

    status_hint = 400

    def __init__(
        self, message: str, *, frame_index: int | None = None, key: str | None = None
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        self.reason = message
        self.frame_index = frame_index
        self.key = key
        where = []
        if frame_index is not None:
            where.append(f"frame {frame_index}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the wire format cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame stream."""


class FrameTooLarge(RemoteProtocolError):
    """A frame is larger than the configured limit."""

    status_hint = 413


class TransportError(NDRelayError):
    """A client-side network failure; `url` names the endpoint.

    Attributes:
        accepted_items: raised by `publish`: how many of its items the relay accepted
            (`None` when unknown).
    """

    def __init__(
        self, message: str, *, url: str | None = None, accepted_items: int | None = None
    ) -> None:
        self.url = url
        self.accepted_items = accepted_items
        super().__init__(f"{message} ({url})" if url else message)


class ConnectError(TransportError):
    """The relay could not be reached."""


class RelayTimeout(TransportError):
    """A network operation timed out."""


class StreamInterrupted(TransportError):
    """A stream response ended before its `end` or `error` frame: it was cut off."""


class StreamError(NDRelayError):
    """Something is wrong with a named stream; `stream_name` says which."""

    status_hint = 400

    def __init__(self, message: str, *, stream_name: str | None = None) -> None:
        self.stream_name = stream_name
        super().__init__(message)


class StreamNotFound(StreamError):
    """No stream of that name."""

    status_hint = 404


class StreamClosed(StreamError):
    """The stream has finished (`end` or `error`) and accepts no more items."""

    status_hint = 409

    @classmethod
    def finished(cls, name: str, state: str = "finished") -> StreamClosed:
        """The refusal of an upload or publish to a finished stream, saying what to do.

        Args:
            name: the stream.
            state: how it finished: `"ended"`, `"failed"` (or just `"finished"`).
        """
        return cls(
            f"stream {name!r} has {state}: a finished stream keeps its end (or error) for "
            f"late readers, so it takes no more items; delete it (client.delete({name!r}), "
            f"DELETE /streams/{name}) or publish under another name",
            stream_name=name,
        )


class StreamConflict(StreamError):
    """The stream exists with a different definition."""

    status_hint = 409


class SchemaMismatch(StreamError):
    """An array does not match the stream's declared dtype/shape."""

    status_hint = 422


class ConsumerNotFound(StreamError):
    """No consumer of that id on the stream (never connected, or its lease ran out).

    Attributes:
        consumer: the consumer id.

    Answered 404, like a missing stream; the body's `error` (`ConsumerNotFound`, with
    `consumer`) tells the two apart.
    """

    status_hint = 404

    def __init__(
        self, message: str, *, consumer: str | None = None, stream_name: str | None = None
    ) -> None:
        super().__init__(message, stream_name=stream_name)
        self.consumer = consumer


class AckConflict(StreamError):
    """An acknowledgement of a seq that is not pending for that consumer.

    Attributes:
        consumer: the consumer id.
        seq: the seq acknowledged.
    """

    status_hint = 409

    def __init__(
        self,
        message: str,
        *,
        consumer: str | None = None,
        seq: int | None = None,
        stream_name: str | None = None,
    ) -> None:
        super().__init__(message, stream_name=stream_name)
        self.consumer = consumer
        self.seq = seq


class SeqGap(StreamError):
    """A producer's data frame is numbered beyond the seq the relay expects from it.

    Attributes:
        producer: the producer id.
        expected_seq: the seq the relay expects next from that producer.
    """

    status_hint = 409

    def __init__(
        self,
        message: str,
        *,
        producer: str | None = None,
        expected_seq: int | None = None,
        stream_name: str | None = None,
    ) -> None:
        super().__init__(message, stream_name=stream_name)
        self.producer = producer
        self.expected_seq = expected_seq


class UploadRefused(StreamError):
    """The relay refused a frame of an upload; the frames before it were accepted.

    Attributes:
        status: the HTTP status (400 malformed, 413 too large, 422 schema, 409 finished).
        frame_index: index of the refused frame in the upload.
        accepted: frames accepted before it.
        next_seq: the stream's next seq after the accepted ones.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        frame_index: int | None = None,
        accepted: int | None = None,
        next_seq: int | None = None,
        stream_name: str | None = None,
    ) -> None:
        super().__init__(message, stream_name=stream_name)
        self.status = status
        self.frame_index = frame_index
        self.accepted = accepted
        self.next_seq = next_seq


class RelayHTTPError(NDRelayError):
    """The relay answered an error status not covered by a more precise exception."""

    def __init__(self, message: str, *, status: int, body: object = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class AuthError(NDRelayError):
    """Missing or wrong bearer token."""

    status_hint = 401


class RegistryError(NDRelayError):
    """The registry backend failed or refused (e.g. too many streams)."""

    status_hint = 503


class RemoteError(StreamError):
    """The remote stream failed: an `error` frame arrived.

    Built with `RemoteError.from_frame(...)`, the instance is also an instance of the
    builtin exception the remote type names, so `except ValueError:` still catches a
    producer's `ValueError`; for a type of the producer's own (`class
    SensorError(ValueError)`), of the builtins the frame's `bases` name.

    Built for an error of the relay itself (`origin == "relay"`: the stream was
    deleted, the server is shutting down), it is also an instance of the ndrelay class
    the frame names, so `except StreamClosed:` catches a deleted stream.

    Attributes:
        remote_type: the remote exception's type name, e.g. `"ValueError"`.
        remote_message: its message.
        remote_traceback: its formatted traceback text (may be empty).
        remote_bases: the builtin classes the remote type derives from, if it is not
            a builtin itself (else `()`).
        origin: `"producer"` (the producer's iterator raised) or `"relay"`
            (the stream was deleted, the server is shutting down, ...).
        seq: the stream position at which it failed.
    """

    remote_type: str
    remote_message: str
    remote_traceback: str
    remote_bases: tuple[str, ...]
    origin: str
    seq: int | None

    @classmethod
    def from_frame(
        cls,
        *,
        type: str,
        message: str,
        traceback: str = "",
        origin: str = "producer",
        seq: int | None = None,
        stream_name: str | None = None,
        bases: tuple[str, ...] = (),
    ) -> RemoteError:
        """Build the exception for an `error` frame, mixing in the matching builtin (the
        one `type` names, else the nearest builtins of `bases`), or, for an error of the
        relay itself, the ndrelay class it names (`StreamClosed`)."""
        exc_cls = _relay_class(type) if origin == "relay" else _remote_class(type)
        if exc_cls is RemoteError and bases and origin != "relay":
            exc_cls = _remote_class_of_bases(bases)
        try:
            exc = exc_cls.__new__(exc_cls)
        except TypeError:  # a builtin whose __new__ wants arguments
            exc = RemoteError.__new__(RemoteError)
        text = f"{type}: {message}" if message else type
        if origin != "producer":
            text = f"{text} (origin: {origin})"
        # Initialise both bases by hand: a builtin's own __init__ may want other args
        # (UnicodeDecodeError, say), and nothing remote is trusted to build it.
        Exception.__init__(exc, text)
        exc.stream_name = stream_name
        exc.remote_type = type
        exc.remote_message = message
        exc.remote_traceback = traceback
        exc.remote_bases = tuple(bases)
        exc.origin = origin
        exc.seq = seq
        return exc

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        if getattr(self, "remote_traceback", ""):
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


_remote_classes: dict[str, type[RemoteError]] = {}

# Builtins whose semantics make a mixed-in subclass misleading: a remote StopIteration
# must not end the local loop quietly, and exception groups want sub-exceptions.
_NOT_MIXED = {
    "BaseException",
    "BaseExceptionGroup",
    "Exception",
    "ExceptionGroup",
    "GeneratorExit",
    "KeyboardInterrupt",
    "StopAsyncIteration",
    "StopIteration",
    "SystemExit",
}


def _remote_class_of_bases(bases: tuple[str, ...]) -> type[RemoteError]:
    """`RemoteError` mixed with the builtins of `bases` that no other of them derives
    from (`SensorError(ValueError, KeyError)` is caught by both); unknown names skipped."""
    known = [b for b in bases[:32] if _remote_class(b) is not RemoteError]
    if not known:
        return RemoteError
    classes = [getattr(builtins, b) for b in dict.fromkeys(known)]
    leaves = tuple(c for c in classes if not any(o is not c and issubclass(o, c) for o in classes))
    if len(leaves) == 1:
        return _remote_class(leaves[0].__name__)
    key = "+".join(c.__name__ for c in leaves)
    cached = _remote_classes.get(key)
    if cached is not None:
        return cached
    try:
        result: type[RemoteError] = type(
            f"Remote_{key.replace('+', '_')}", (RemoteError, *leaves), {}
        )
    except TypeError:  # incompatible layouts: the nearest builtin alone
        result = _remote_class(leaves[0].__name__)
    if len(_remote_classes) < 1024:  # combinations come from the network: bounded cache
        _remote_classes[key] = result
    return result


def _remote_class(type_name: str) -> type[RemoteError]:
    """`RemoteError`, or a cached subclass of it and the builtin named `type_name`."""
    cached = _remote_classes.get(type_name)
    if cached is not None:
        return cached
    builtin: Any = getattr(builtins, type_name, None)
    result: type[RemoteError] = RemoteError
    if (
        isinstance(builtin, type)
        and issubclass(builtin, Exception)
        and type_name not in _NOT_MIXED
        and not issubclass(builtin, NDRelayError)
    ):
        try:
            result = type(f"Remote{type_name}", (RemoteError, builtin), {})
        except TypeError:  # incompatible instance layout: plain RemoteError
            result = RemoteError
    if builtin is not None:  # names come from the network: cache only the finite builtins
        _remote_classes[type_name] = result
    return result


#: ndrelay classes a relay-origin `error` frame may name (the leaves that carry no
#: attributes beyond `stream_name`).
_RELAY_CLASSES: dict[str, type[NDRelayError]] = {
    cls.__name__: cls
    for cls in (StreamNotFound, StreamClosed, StreamConflict, SchemaMismatch, RegistryError)
}
_relay_classes: dict[str, type[RemoteError]] = {}


def _relay_class(type_name: str) -> type[RemoteError]:
    """A cached subclass of `RemoteError` and the ndrelay class `type_name` names, for
    the relay's own errors; `RemoteError` for any other name."""
    cached = _relay_classes.get(type_name)
    if cached is not None:
        return cached
    base = _RELAY_CLASSES.get(type_name)
    if base is None:
        return RemoteError
    result: type[RemoteError] = type(f"Remote{type_name}", (RemoteError, base), {})
    _relay_classes[type_name] = result
    return result
