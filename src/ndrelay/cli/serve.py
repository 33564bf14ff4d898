"""`ndrelay serve`: run the relay server in this process."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from .._version import __version__

__all__ = ["serve"]

#: The signals that stop the server gracefully.
_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _load_source(spec: str) -> Any:
    """The function `spec` (`module:function`) names. Its module is looked for in the
    current directory first, then on `sys.path`, as `uvicorn module:app` does."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise click.BadParameter(
            f"{spec!r} is not of the form module:function", param_hint="--source"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            # the module itself is missing (not something it imports): say where we looked
            looked = "\n  ".join(p or cwd for p in sys.path)
            raise click.BadParameter(
                f"cannot import {module_name!r}: no {exc.name.replace('.', '/')}.py or "
                f"package {exc.name!r} in the current directory ({cwd}) or on the Python "
                f"path; looked in:\n  {looked}",
                param_hint="--source",
            ) from None
        raise click.BadParameter(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}", param_hint="--source"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise click.BadParameter(
            f"{module_name!r} ({getattr(module, '__file__', None) or module_name}) has no "
            f"function {func_name!r}",
            param_hint="--source",
        )
    return func


def _size(text: str | None, what: str) -> int | None:
    from .._sizes import parse_size

    if text is None:
        return None
    try:
        return parse_size(text, what)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
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
    "--uds",
    envvar="NDRELAY_UDS",
    type=click.Path(dir_okay=False),
    help="Serve on this Unix socket instead of TCP (same-host clients: unix:///PATH).",
)
@click.option(
    "--token", envvar="NDRELAY_TOKEN", help="Bearer token every endpoint but /healthz requires."
)
@click.option(
    "--public-docs",
    is_flag=True,
    envvar="NDRELAY_PUBLIC_DOCS",
    help="Serve /docs and /openapi.json without the token (other endpoints keep it).",
)
@click.option(
    "--demo",
    is_flag=True,
    envvar="NDRELAY_DEMO",
    help="Add demo streams 'radar', 'camera' and 'count'.",
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
    "--max-memory",
    envvar="NDRELAY_MAX_MEMORY",
    callback=lambda ctx, param, value: _size(value, "--max-memory"),
    help="Most payload bytes buffered over all streams together, e.g. 256MiB, 1GiB or "
    "plain bytes; producers wait beyond it [default: half the memory the process may use].",
)
@click.option(
    "--heartbeat",
    type=float,
    envvar="NDRELAY_HEARTBEAT",
    help="Seconds between heartbeats on idle streams [default: 15].",
)
@click.option(
    "--backend",
    envvar="NDRELAY_BACKEND",
    help="Where streams live: 'memory' (this process) or redis://host:port/db, or "
    "unix:///path/redis.sock?db=N (shared by every relay replica on that Redis; needs the "
    "'redis' extra) [default: memory].",
)
@click.option(
    "--lease",
    type=float,
    envvar="NDRELAY_LEASE",
    help="Seconds a departed queue consumer's unacknowledged items wait for it to "
    "reconnect before they go back to the queue [default: 10].",
)
@click.option(
    "--sse-retry",
    type=click.FloatRange(min=0, min_open=True),
    envvar="NDRELAY_SSE_RETRY",
    help="Seconds a browser's EventSource waits before it reconnects (sent as `retry:` "
    "at the start of every SSE response) [default: 3].",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Origin whose pages may read and write streams from a browser, e.g. "
    "http://localhost:3000 (repeatable; '*' for any) [env NDRELAY_CORS_ORIGINS, "
    "comma-separated; default: none].",
)
@click.option(
    "--allowed-hosts",
    "allowed_hosts",
    multiple=True,
    help="Host header value to serve, e.g. relay.lab or *.lab.example (repeatable or "
    "comma-separated; others get 400; /healthz answers any) [env NDRELAY_ALLOWED_HOSTS; "
    "default: any].",
)
@click.option(
    "--max-connections",
    type=int,
    envvar="NDRELAY_MAX_CONNECTIONS",
    help="Most open connections; past it the oldest one still waiting for a request is "
    "closed, or the newcomer answered 503 [default: 1024, less if the open-files limit "
    "is lower].",
)
@click.option(
    "--max-header-bytes",
    type=int,
    envvar="NDRELAY_MAX_HEADER_BYTES",
    help="Largest request head (request line and headers); 431 beyond [default: 65536].",
)
@click.option(
    "--header-timeout",
    type=float,
    envvar="NDRELAY_HEADER_TIMEOUT",
    help="Seconds a connection has to send a complete request head; 408 after [default: 10].",
)
@click.option(
    "--upload-idle-timeout",
    type=float,
    envvar="NDRELAY_UPLOAD_IDLE_TIMEOUT",
    help="Seconds an upload may send no byte before it is ended with 408 (frames before "
    "it are kept; 0: never) [default: 60].",
)
@click.option(
    "--stream-ttl",
    type=float,
    envvar="NDRELAY_STREAM_TTL",
    help="Seconds after which a finished stream, or an empty one nobody produces to or "
    "reads, is removed (0: never) [default: 3600].",
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
    uds: str | None,
    token: str | None,
    public_docs: bool,
    demo: bool,
    sources: tuple[str, ...],
    max_frame_bytes: int | None,
    max_streams: int | None,
    max_memory: int | None,
    heartbeat: float | None,
    backend: str | None,
    lease: float | None,
    sse_retry: float | None,
    cors_origins: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    max_connections: int | None,
    max_header_bytes: int | None,
    header_timeout: float | None,
    upload_idle_timeout: float | None,
    stream_ttl: float | None,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    """Run the relay server (one worker: streams live in this process's memory)."""
    from .._sizes import format_size
    from ..server import Relay, Settings, create_app, uvicorn_config
    from ..server.limits import (
        accept_backlog,
        connection_limit,
        guarded_protocol,
        raise_open_files,
    )
    from ..server.logs import limit_logs
    from ..server.relay import check_origin
    from .demo import publish_demo

    settings = Settings.from_env()
    if token:
        settings.token = token
    if public_docs:
        settings.public_docs = True
    if max_frame_bytes is not None:
        settings.max_frame_bytes = max_frame_bytes
    if max_streams is not None:
        settings.max_streams = max_streams
    if max_memory is not None:
        settings.max_memory = max_memory
    if heartbeat is not None:
        settings.heartbeat_interval = heartbeat
    if backend:
        settings.backend = backend
    if lease is not None:
        if not 0 <= lease <= 86400:
            raise click.BadParameter("must be from 0 to 86400 seconds", param_hint="--lease")
        settings.lease = lease
    if sse_retry is not None:
        settings.sse_retry = sse_retry
    if cors_origins:
        settings.cors_origins = list(cors_origins)
    for origin in settings.cors_origins:
        try:
            check_origin(origin)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--cors-origin") from None
    if allowed_hosts:
        settings.allowed_hosts = [h.strip() for v in allowed_hosts for h in v.split(",") if h]
    for name, value in (
        ("max_connections", max_connections),
        ("max_header_bytes", max_header_bytes),
        ("header_timeout", header_timeout),
        ("upload_idle_timeout", upload_idle_timeout),
        ("stream_ttl", stream_ttl),
    ):
        if value is not None:
            if value < 0 or (value == 0 and name in ("max_connections", "max_header_bytes")):
                flag = "--" + name.replace("_", "-")
                raise click.BadParameter(f"must be positive, got {value}", param_hint=flag)
            setattr(settings, name, value)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    old_files, open_files = raise_open_files()
    if open_files != old_files:
        logging.getLogger("ndrelay.server").info(
            "open-files limit raised from %d to %d", old_files, open_files
        )
    connections = connection_limit(settings.max_connections)
    if settings.max_connections is not None and connections < settings.max_connections:
        logging.getLogger("ndrelay.server").warning(
            "--max-connections %d is over what the open-files limit (%d) allows: using %d",
            settings.max_connections,
            open_files,
            connections,
        )
    try:
        relay = Relay(settings=settings)
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--backend") from None
    if demo:
        publish_demo(relay)
    for spec in sources:
        _load_source(spec)(relay)
    app = create_app(relay)
    where: dict[str, Any] = {"uds": uds} if uds else {"host": host, "port": port}
    config = uvicorn_config(
        app,
        workers=1,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        http=guarded_protocol(connections, settings.max_header_bytes, settings.header_timeout),
        backlog=accept_backlog(),
        **where,
    )
    limit_logs()  # after uvicorn configured its loggers
    server = _server(config, relay)
    names = ", ".join(relay.published) or "none yet"
    click.echo(
        f"ndrelay {__version__}: {f'unix://{uds}' if uds else f'http://{host}:{port}'} "
        f"(1 worker, {relay.registry.description}; auth {'on' if settings.token else 'off'}; "
        f"max memory {format_size(settings.max_memory)}; at most {connections} "
        f"connections; streams: {names})",
        err=True,
    )
    try:
        server.run()
    finally:
        if uds and server.started:
            _remove_socket(uds)
    if not server.started:
        sys.exit(1)


def _remove_socket(path: str) -> None:
    """Remove the Unix socket file the server listened on (not any other file)."""
    import os
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


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

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # SIGINT and SIGTERM start the graceful shutdown, and the process then exits
            # normally (status 0): uvicorn's own version raises the signal again once it
            # is done, and the process would die of it (SIGTERM: status 143; SIGINT:
            # click's "Aborted!", status 1).
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in _EXIT_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)
