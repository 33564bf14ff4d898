"""The exception tree, and remote exceptions rebuilt from `error` frames (never evaluated)."""

from __future__ import annotations

import builtins
import os
from typing import Any

import pytest

from ndrelay import _exceptions
from ndrelay._codec import FrameDecoder, encode_frame
from ndrelay._exceptions import (
    AuthError,
    ConnectError,
    FrameTooLarge,
    LocalProtocolError,
    NDRelayError,
    ProtocolError,
    RegistryError,
    RelayTimeout,
    RemoteError,
    RemoteProtocolError,
    SchemaMismatch,
    StreamClosed,
    StreamConflict,
    StreamError,
    StreamInterrupted,
    StreamNotFound,
    TransportError,
)
from ndrelay._frames import ErrorFrame

# -- the tree --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "parent", "status"),
    [
        (LocalProtocolError, ProtocolError, 400),
        (RemoteProtocolError, ProtocolError, 400),
        (FrameTooLarge, RemoteProtocolError, 413),
        (ConnectError, TransportError, None),
        (RelayTimeout, TransportError, None),
        (StreamInterrupted, TransportError, None),
        (StreamNotFound, StreamError, 404),
        (StreamClosed, StreamError, 409),
        (StreamConflict, StreamError, 409),
        (SchemaMismatch, StreamError, 422),
        (RemoteError, StreamError, None),
        (AuthError, NDRelayError, 401),
        (RegistryError, NDRelayError, 503),
    ],
)
def test_tree(cls: type[Exception], parent: type[Exception], status: int | None) -> None:
    assert issubclass(cls, parent)
    assert issubclass(cls, NDRelayError)
    if status is not None:
        assert cls.status_hint == status  # type: ignore[attr-defined]


def test_every_exported_name_is_an_ndrelay_error() -> None:
    for name in _exceptions.__all__:
        assert issubclass(getattr(_exceptions, name), NDRelayError)


def test_relay_timeout_does_not_shadow_the_builtin() -> None:
    assert not issubclass(RelayTimeout, TimeoutError)
    assert "TimeoutError" not in _exceptions.__all__


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ProtocolError("bad")
    with pytest.raises(TypeError):
        ProtocolError("bad", frame_index=1, key="seq")


@pytest.mark.parametrize("cls", [LocalProtocolError, RemoteProtocolError, FrameTooLarge])
def test_protocol_error_subclasses_carry_context(cls: type[ProtocolError]) -> None:
    plain = cls("went wrong")
    assert str(plain) == "went wrong"
    assert plain.frame_index is None and plain.key is None
    assert plain.reason == "went wrong"
    full = cls("ill-typed value str", frame_index=3, key="seq")
    assert full.frame_index == 3
    assert full.key == "seq"
    assert full.reason == "ill-typed value str"
    assert str(full) == "frame 3, key 'seq': ill-typed value str"
    assert str(cls("m", frame_index=0)) == "frame 0: m"
    assert str(cls("m", key="data")) == "key 'data': m"
    assert isinstance(full, ProtocolError) and isinstance(full, NDRelayError)


def test_transport_and_stream_errors_carry_context() -> None:
    err = ConnectError("connection refused", url="http://rig:8000/streams/radar")
    assert err.url == "http://rig:8000/streams/radar"
    assert str(err) == "connection refused (http://rig:8000/streams/radar)"
    assert str(RelayTimeout("read timed out")) == "read timed out"
    nf = StreamNotFound("no stream 'radar'", stream_name="radar")
    assert nf.stream_name == "radar"
    assert str(nf) == "no stream 'radar'"


# -- ErrorFrame <-> exception ---------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def producer_step() -> None:
    raise ValueError("bad frame 7")


def test_from_exception_captures_type_message_and_traceback() -> None:
    try:
        producer_step()
    except ValueError as exc:
        frame = ErrorFrame.from_exception(exc, seq=12)
    assert frame.seq == 12
    assert frame.origin == "producer"
    assert frame.type == "ValueError"
    assert frame.message == "bad frame 7"
    assert "producer_step" in frame.traceback
    assert frame.traceback.rstrip().endswith("ValueError: bad frame 7")
    relay = ErrorFrame.from_exception(RuntimeError("deleted"), seq=0, origin="relay")
    assert relay.origin == "relay"
    assert relay.traceback == "RuntimeError: deleted\n"  # never raised: no frames


@pytest.mark.parametrize(
    ("exc", "builtin"),
    [
        (ValueError("bad value"), ValueError),
        (KeyError("missing"), KeyError),
        (TimeoutError("took too long"), TimeoutError),
        (OSError("disk gone"), OSError),
        (ConnectionResetError("peer reset"), ConnectionResetError),
        (ZeroDivisionError("division by zero"), ArithmeticError),
        (IndexError("out of range"), LookupError),
        (RuntimeError("oops"), RuntimeError),
        (NotImplementedError(), RuntimeError),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ValueError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_round_trip_mixes_in_the_builtin(exc: BaseException, builtin: type) -> None:
    frame = ErrorFrame.from_exception(raised(exc), seq=5)
    remote = frame.to_exception(stream_name="radar")
    assert isinstance(remote, RemoteError)
    assert isinstance(remote, StreamError) and isinstance(remote, NDRelayError)
    assert isinstance(remote, builtin)
    assert isinstance(remote, type(exc))
    assert remote.remote_type == type(exc).__name__
    assert remote.remote_message == str(exc)
    assert remote.remote_traceback == frame.traceback
    assert remote.origin == "producer"
    assert remote.seq == 5
    assert remote.stream_name == "radar"
    text = str(remote)
    assert text.startswith(type(exc).__name__)
    assert str(exc) in text
    assert "Remote traceback:" in text
    with pytest.raises(builtin):
        raise remote
    # the same class every time, so `type(e) is type(f)` holds between two failures
    assert type(frame.to_exception()) is type(remote)


def test_except_clause_catches_a_remote_value_error() -> None:
    frame = ErrorFrame(seq=1, origin="producer", type="ValueError", message="x")
    try:
        raise frame.to_exception()
    except ValueError as exc:
        assert isinstance(exc, RemoteError)
        assert exc.remote_type == "ValueError"
    else:
        pytest.fail("not caught")


def test_round_trip_through_the_codec() -> None:
    frame = ErrorFrame.from_exception(raised(KeyError("k")), seq=3)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame))
    (got,) = decoder.frames()
    assert got == frame
    assert isinstance(got, ErrorFrame)
    exc = got.to_exception()
    assert isinstance(exc, KeyError) and isinstance(exc, RemoteError)
    assert exc.remote_message == "'k'"


def test_relay_origin_is_named_in_the_message() -> None:
    exc = ErrorFrame(seq=4, origin="relay", type="StreamDeleted", message="gone").to_exception()
    assert exc.origin == "relay"
    assert "(origin: relay)" in str(exc)
    assert "gone" in str(exc)


def test_empty_message_and_traceback() -> None:
    exc = ErrorFrame(seq=0, origin="producer", type="RuntimeError", message="").to_exception()
    assert str(exc) == "RuntimeError"
    assert exc.remote_traceback == ""
    assert "Remote traceback" not in str(exc)


@pytest.mark.parametrize(
    "type_name",
    [
        "MyCustomError",  # user code's own class: not a builtin
        "JSONDecodeError",
        "StreamNotFound",  # an ndrelay class, not a builtin
        "NDRelayError",
        "RemoteError",
        "object",  # builtins that are not exceptions
        "int",
        "print",
        "__import__",
        "__build_class__",
        "",
        "valueerror",
        "ValueError ",
    ],
)
def test_unknown_type_gives_plain_remote_error(type_name: str) -> None:
    exc = ErrorFrame(seq=1, origin="producer", type=type_name, message="m").to_exception()
    assert type(exc) is RemoteError
    assert exc.remote_type == type_name
    assert exc.remote_message == "m"


def test_user_exception_round_trip_keeps_its_name() -> None:
    class SensorFault(Exception):
        pass

    frame = ErrorFrame.from_exception(raised(SensorFault("lidar lost")), seq=9)
    assert frame.type == "SensorFault"
    exc = frame.to_exception()
    assert type(exc) is RemoteError
    assert exc.remote_type == "SensorFault"
    assert "SensorFault: lidar lost" in str(exc)


@pytest.mark.parametrize(
    "type_name",
    [
        "StopIteration",
        "StopAsyncIteration",
        "GeneratorExit",
        "KeyboardInterrupt",
        "SystemExit",
        "BaseException",
        "Exception",
        "BaseExceptionGroup",
        "ExceptionGroup",
    ],
)
def test_control_flow_exceptions_are_not_mixed_in(type_name: str) -> None:
    exc = ErrorFrame(seq=1, origin="producer", type=type_name, message="m").to_exception()
    assert type(exc) is RemoteError
    if type_name not in ("Exception", "BaseException"):
        assert not isinstance(exc, getattr(builtins, type_name))
    assert isinstance(exc, Exception)  # an ordinary exception: `except Exception` sees it


def test_remote_stop_iteration_does_not_end_a_for_loop_quietly() -> None:
    remote = ErrorFrame(seq=2, origin="producer", type="StopIteration", message="").to_exception()

    class RemoteStream:
        def __init__(self) -> None:
            self.n = 0

        def __iter__(self) -> RemoteStream:
            return self

        def __next__(self) -> int:
            self.n += 1
            if self.n > 2:
                raise remote
            return self.n

    seen = []
    with pytest.raises(RemoteError) as info:
        for item in RemoteStream():
            seen.append(item)
    assert seen == [1, 2]
    assert info.value.remote_type == "StopIteration"


def test_nothing_remote_is_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def forbidden(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise AssertionError("remote data was evaluated")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    for type_name in (
        "__import__('os').system('touch /tmp/pwned')",
        "os.system",
        "builtins.ValueError",
        "ValueError; import os",
        "ValueError('x')",
    ):
        frame = ErrorFrame(
            seq=1, origin="producer", type=type_name, message="__import__('os')", traceback="tb"
        )
        exc = frame.to_exception()
        assert type(exc) is RemoteError
        assert exc.remote_type == type_name
        assert type_name in str(exc)
    assert calls == []


def test_remote_os_error_attributes_are_harmless() -> None:
    exc = ErrorFrame(seq=1, origin="producer", type="OSError", message="[Errno 28] full")
    remote = exc.to_exception()
    assert isinstance(remote, OSError)
    assert remote.errno is None  # nothing parsed from the remote text
    assert "[Errno 28] full" in str(remote)


def test_remote_error_is_raisable_and_chainable() -> None:
    remote = ErrorFrame(seq=1, origin="producer", type="KeyError", message="'k'").to_exception()
    with pytest.raises(KeyError) as info:
        try:
            raise remote
        except LookupError as exc:
            raise exc from None
    assert info.value is remote
    assert "KeyError: 'k'" in str(info.value)
    assert repr(info.value)


def test_remote_type_names_do_not_grow_memory() -> None:
    """Type names come from the network: only the finite set of builtins may be cached."""
    ErrorFrame(seq=0, origin="producer", type="ValueError", message="").to_exception()
    before = len(_exceptions._remote_classes)
    for i in range(2000):
        name = f"ProducerError{i}"
        exc = ErrorFrame(seq=0, origin="producer", type=name, message="").to_exception()
        assert exc.remote_type == name
    assert len(_exceptions._remote_classes) <= before + 1


def test_relaying_a_remote_error_keeps_the_original_type() -> None:
    """A stream re-published from another relay fails downstream as it failed upstream."""
    upstream = ErrorFrame.from_exception(raised(ValueError("bad sensor")), seq=7)
    remote = upstream.to_exception(stream_name="radar")
    relayed = ErrorFrame.from_exception(raised(remote), seq=3)
    assert relayed.type == "ValueError"
    assert relayed.message == "bad sensor"
    assert relayed.traceback == upstream.traceback
    again = relayed.to_exception()
    assert isinstance(again, ValueError)
    assert again.remote_type == "ValueError"
    assert again.remote_message == "bad sensor"
    assert str(again) == str(remote)
