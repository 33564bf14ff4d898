"""The `ndrelay` command: `serve` the relay, `produce` synthetic frames, `consume` a stream."""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from ._version import __version__

__all__ = ["main"]

log = logging.getLogger("ndrelay")


def _demo_radar(rate: float = 10.0) -> Iterator[Any]:
    """An endless synthetic "radar" stream: small float32 range-doppler maps at `rate` Hz."""
    import numpy as np

    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for i in range(sys.maxsize):
        frame = rng.standard_normal((4, 8), dtype=np.float32)
        frame[i % 4, (i * 3) % 8] += 10.0  # a moving target
        yield frame
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))


def _demo_count(n: int = 10) -> Iterator[Any]:
    """A finite stream: `n` int64 arrays [i, i*i, i*i*i], then the end."""
    import numpy as np

    for i in range(n):
        yield np.array([i, i * i, i * i * i], dtype=np.int64)


def _load_source(spec: str) -> Any:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise click.BadParameter(
            f"{spec!r} is not of the form module:function", param_hint="--source"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="--source"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise click.BadParameter(
            f"{module_name!r} has no function {func_name!r}", param_hint="--source"
        )
    return func


@click.group()
@click.version_option(__version__, prog_name="ndrelay")
def main() -> None:
    """ndrelay: stream numpy arrays between machines over HTTP."""


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="NDRELAY_HOST",
    help="Interface to bind.",
)
@click.option(
    "--port", default=8000, show_default=True, envvar="NDRELAY_PORT", type=int, help="TCP port."
)
@click.option(
    "--token", envvar="NDRELAY_TOKEN", help="Bearer token every endpoint but /healthz requires."
)
@click.option(
    "--demo", is_flag=True, envvar="NDRELAY_DEMO", help="Add demo streams 'radar' and 'count'."
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    envvar="NDRELAY_SOURCE",
    help="module:function called with the Relay at start-up to register streams (repeatable).",
)
@click.option(
    "--max-frame-bytes",
    type=int,
    envvar="NDRELAY_MAX_FRAME_BYTES",
    help="Largest frame accepted in uploads [default: 268435456].",
)
@click.option(
    "--max-streams",
    type=int,
    envvar="NDRELAY_MAX_STREAMS",
    help="Most streams at once [default: 1024].",
)
@click.option(
    "--heartbeat",
    type=float,
    envvar="NDRELAY_HEARTBEAT",
    help="Seconds between heartbeats on idle streams [default: 15].",
)
@click.option(
    "--shutdown-timeout",
    type=float,
    default=10.0,
    show_default=True,
    envvar="NDRELAY_SHUTDOWN_TIMEOUT",
    help="Seconds open connections get to finish on shutdown.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="NDRELAY_LOG_LEVEL",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    host: str,
    port: int,
    token: str | None,
    demo: bool,
    sources: tuple[str, ...],
    max_frame_bytes: int | None,
    max_streams: int | None,
    heartbeat: float | None,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    """Run the relay server (one worker: streams live in this process's memory)."""
    import uvicorn

    from .server import Relay, Settings, create_app

    settings = Settings.from_env()
    if token:
        settings.token = token
    if max_frame_bytes is not None:
        settings.max_frame_bytes = max_frame_bytes
    if max_streams is not None:
        settings.max_streams = max_streams
    if heartbeat is not None:
        settings.heartbeat_interval = heartbeat
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    relay = Relay(settings=settings)
    if demo:
        relay.publish("radar", _demo_radar(), size=64, mode="fanout")
        relay.publish("count", _demo_count(), size=64)
    for spec in sources:
        _load_source(spec)(relay)
    app = create_app(relay)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = _server(config, relay)
    names = ", ".join(s.name for s in relay.registry.streams()) or "none yet"
    click.echo(
        f"ndrelay {__version__}: http://{host}:{port} (1 worker, in-memory streams; "
        f"auth {'on' if settings.token else 'off'}; streams: {names})",
        err=True,
    )
    server.run()
    if not server.started:
        sys.exit(1)


def _server(config: Any, relay: Any) -> Any:
    """uvicorn's server, with a graceful shutdown that tells consumers why they stop."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Stop accepting first; then consumers get a `relay` error frame ("server
            # shutting down") and their responses complete, before uvicorn waits for
            # connections to close.
            for server in self.servers:
                server.close()
            await asyncio.to_thread(relay.close, "server shutting down", 2.0)
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # The shutdown is graceful, so the process exits normally (status 0). uvicorn
            # would raise the signal again once it is done, and the process would die of
            # it (SIGTERM: killed, status 143; SIGINT: click's "Aborted!", status 1).
            captured = getattr(self, "_captured_signals", None)
            if captured:
                captured.clear()

    return GracefulServer(config)


def _relay_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Report the relay's errors (refused connection, unknown stream, shutdown, ...) as
    one line and exit status 1, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from ._exceptions import NDRelayError

        try:
            func(*args, **kwargs)
        except NDRelayError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


@main.command()
@click.argument("url", envvar="NDRELAY_URL")
@click.argument("stream")
@click.option(
    "--rate", default=10.0, show_default=True, help="Frames per second (0: as fast as possible)."
)
@click.option("--shape", default="64,128", show_default=True, help="Array shape, comma-separated.")
@click.option("--dtype", default="<f4", show_default=True, help="numpy dtype.")
@click.option(
    "--count",
    type=int,
    default=None,
    help="Frames to send, then end the stream [default: endless].",
)
@click.option("--token", envvar="NDRELAY_TOKEN")
@_relay_errors
def produce(
    url: str, stream: str, rate: float, shape: str, dtype: str, count: int | None, token: str | None
) -> None:
    """Publish synthetic frames to STREAM on the relay at URL."""
    import numpy as np

    from ._client import RelayClient

    dims = _shape(shape)
    rng = np.random.default_rng()
    template = rng.standard_normal(dims).astype(dtype)

    def frames() -> Iterator[Any]:
        t0 = time.monotonic()
        i = 0
        while count is None or i < count:
            yield template
            i += 1
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))

    with RelayClient(url, token=token) as client:
        click.echo(
            f"producing {'endless' if count is None else count} frames {dims} {dtype} "
            f"at {rate} Hz to {stream}",
            err=True,
        )
        result = client.publish(stream, frames())
    click.echo(f"done: {result}", err=True)


@main.command()
@click.argument("url", envvar="NDRELAY_URL")
@click.argument("stream")
@click.option(
    "--count", type=int, default=None, help="Stop after this many items [default: until the end]."
)
@click.option("--interval", default=1.0, show_default=True, help="Seconds between rate reports.")
@click.option("--policy", default=None, help="Fanout streams: block, drop_oldest or latest.")
@click.option("--token", envvar="NDRELAY_TOKEN")
@_relay_errors
def consume(
    url: str, stream: str, count: int | None, interval: float, policy: str | None, token: str | None
) -> None:
    """Read STREAM from the relay at URL and report items/s and MB/s."""
    from ._client import RelayClient

    with RelayClient(url, token=token) as client, client.stream(stream, policy=policy) as remote:
        n = nbytes = 0
        window_n = window_bytes = 0
        last = time.monotonic()
        for item in remote:
            size = getattr(item, "nbytes", None) or len(item)
            n += 1
            nbytes += size
            window_n += 1
            window_bytes += size
            now = time.monotonic()
            if now - last >= interval:
                click.echo(
                    f"{stream}: {window_n / (now - last):.1f} items/s, "
                    f"{window_bytes / (now - last) / 1e6:.2f} MB/s, {n} items, "
                    f"last seq {remote.state.last_seq}"
                )
                window_n = window_bytes = 0
                last = now
            if count is not None and n >= count:
                break
        click.echo(f"{stream}: received {n} items, {nbytes / 1e6:.2f} MB")


if __name__ == "__main__":  # pragma: no cover
    main()
