"""Shared fixtures: a real uvicorn server on 127.0.0.1 running a `Relay`; `need(program)`;
a headless Chromium (`browser`)."""

from __future__ import annotations

import shutil
import socket
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

    def stop(self) -> None:
        self.relay.close("server shutting down", timeout=2)
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "test server did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerHandle]]:
    """Factory: `serve(relay=None, **settings)` starts a server; all stop at teardown."""
    handles: list[ServerHandle] = []

    def start(relay: Relay | None = None, **settings: Any) -> ServerHandle:
        if relay is None:
            relay = Relay(settings=Settings(**settings))
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
