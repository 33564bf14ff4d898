"""Shared fixtures: a real uvicorn server on 127.0.0.1 running a `Relay`; `need(program)`;
a headless Chromium (`browser`); a `redis-server` of the session (`redis_server`).

Modules marked `pytest.mark.backends` run their server fixtures once per backend: the
`backend` fixture is `"memory"` or the URL of the session's Redis (flushed before each
test); `serve` and `ServeProcess` (tests/e2e/_sources.py) use it. A test about the memory
backend itself is marked `memory_only(reason)`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from ndrelay import Relay, create_app
from ndrelay.server import Settings, uvicorn_config


def need(program: str) -> str:
    """The path of `program`, or a test failure saying what to install: a test that
    needs a system program fails without it, never skips (`.ci/run` installs them)."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: it is needed by this test (see .ci/run)")
    return path


class ServerHandle:
    """A running relay: its `url`, its in-process `relay`, and `stop()`.

    `wrap(app)` may return an ASGI app around the relay's (to watch its requests)."""

    def __init__(
        self, relay: Relay, wrap: Callable[[Any], Any] | None = None, **config: Any
    ) -> None:
        self.relay = relay
        # protocol IPPROTO_TCP, so asyncio sets TCP_NODELAY on accepted connections
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # as `ndrelay serve` runs it: uvicorn with ndrelay's vectored-write protocol
        app = create_app(relay) if wrap is None else wrap(create_app(relay))
        cfg = uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=5, **config)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    def _http(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        token = self.relay.settings.token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=20, **kwargs)

    def info(self, name: str) -> dict[str, Any]:
        """`GET /streams/{name}/info` (over HTTP: the same on every backend)."""
        answer = self._http("GET", f"/streams/{name}/info")
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        """The names `GET /streams` lists."""
        return [s["name"] for s in self._http("GET", "/streams").json()]

    def create(self, name: str, **spec: Any) -> None:
        """`PUT /streams/{name}` (defaults: an existing default stream is fine)."""
        self._http("PUT", f"/streams/{name}", json=spec).raise_for_status()

    def delete(self, name: str) -> None:
        self._http("DELETE", f"/streams/{name}").raise_for_status()

    def stop(self) -> None:
        self.relay.close("server shutting down", timeout=2)
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "test server did not stop"


class RedisServer:
    """`redis-server` on a free 127.0.0.1 port (no persistence unless `args` ask for it),
    stopped by its PID. `url` is `redis://127.0.0.1:<port>/0`."""

    def __init__(self, *args: str, port: int | None = None, workdir: str | None = None) -> None:
        program = need("redis-server")
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.dir = workdir or tempfile.mkdtemp(prefix="ndrelay-redis-")
        self.args = args or ("--save", "", "--appendonly", "no")
        self._start(program)

    def _start(self, program: str) -> None:
        self.log = open(os.path.join(self.dir, "redis.log"), "a")
        self.proc = subprocess.Popen(
            [
                program,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start (log in {self.dir})")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        """One inline command, its raw reply (for FLUSHALL and the like)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return sock.recv(1 << 16)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (by PID), then start it again on the same port and dir."""
        self.stop(sig)
        self.start()

    def start(self) -> None:
        """Start it again after `stop`, on the same port and dir."""
        self._start(need("redis-server"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One `redis-server` for the session (tests that use it flush it first)."""
    server = RedisServer()
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    both = metafunc.definition.get_closest_marker("backends") is not None
    only = metafunc.definition.get_closest_marker("memory_only") is not None
    params = ["memory", "redis"] if both and not only else ["memory"]
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """`"memory"`, or the URL of the session's Redis, flushed (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).parent / "e2e"))
    import _sources

    kind = getattr(request, "param", "memory")
    if kind == "memory":
        url = "memory"
    else:
        redis = request.getfixturevalue("redis_server")
        redis.command("FLUSHALL")
        url = redis.url
    _sources.BACKEND = url
    try:
        yield url
    finally:
        _sources.BACKEND = "memory"


@pytest.fixture
def serve(backend: str) -> Iterator[Callable[..., ServerHandle]]:
    """Factory: `serve(relay=None, **settings)` starts a server; all stop at teardown."""
    handles: list[ServerHandle] = []

    def start(relay: Relay | None = None, **settings: Any) -> ServerHandle:
        if relay is None:
            relay = Relay(settings=Settings(**{"backend": backend, **settings}))
        elif settings:
            for key, value in settings.items():
                setattr(relay.settings, key, value)
        handle = ServerHandle(relay)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def server(serve: Callable[..., ServerHandle]) -> ServerHandle:
    """One running relay with default settings."""
    return serve()


# -- headless Chromium (Debian's chromium driven by Playwright; never a downloaded browser)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A Chromium context with a fresh profile; `browser.new_page()` opens a tab."""
    chromium = need("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 720},
        )
        try:
            yield context
        finally:
            context.close()
