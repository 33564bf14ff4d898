"""Helpers for the client and CLI end-to-end tests.

- Stream sources for `ndrelay serve --source _sources:<function>` (run with
  `PYTHONPATH` pointing at this directory): each takes the server's `Relay`.
- `ServeProcess`: `ndrelay serve` in a subprocess on a free port, killed by its PID.
- `bounded(fn)`: run a call that might hang in a thread, with a deadline.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

HERE = Path(__file__).resolve().parent
#: the backend `ServeProcess` passes to `ndrelay serve --backend` (set by the `backend`
#: fixture of tests/conftest.py for the duration of a test)
BACKEND = "memory"
T = TypeVar("T")


# -- sources for `ndrelay serve --source` -----------------------------------------------


def endless_items() -> Iterator[np.ndarray]:
    """Small int64 arrays `[i, i*i]`, forever (the stream's bounded buffer paces it)."""
    i = 0
    while True:
        yield np.array([i, i * i], dtype=np.int64)
        i += 1


def endless(relay: Any) -> None:
    """Registers `endless`: an endless queue stream of `[i, i*i]` int64 arrays."""
    relay.publish("endless", endless_items(), size=16)


def endless_large(relay: Any) -> None:
    """Registers `endless-large`: an endless queue stream of 1 MiB uint8 arrays
    (item i filled with i % 256), so a cut can fall inside a frame's payload."""

    def items() -> Iterator[np.ndarray]:
        i = 0
        while True:
            yield np.full(1 << 20, i % 256, dtype=np.uint8)
            i += 1

    relay.publish("endless-large", items(), size=4)


def numbers(relay: Any) -> None:
    """Registers `numbers`: five float64 arrays `[i, i/2]`, then the end."""
    relay.publish("numbers", (np.array([i, i / 2]) for i in range(5)), size=8)


def numbered(relay: Any) -> None:
    """Registers `work`: 2000 int64 items `[i]` in queue mode (size 64), then the end."""
    relay.publish("work", (np.array([i], dtype=np.int64) for i in range(2000)), size=64)


# -- processes --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without `NDRELAY_*`, with this directory on `PYTHONPATH`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(HERE) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


def ndrelay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ndrelay", *args]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` from /proc, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _unix_listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket `path` (probed with a
    socket that is closed either way: httpcore leaks the one of a failed connect)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
        return True


class ServeProcess:
    """`ndrelay serve --port <free> <args>` in a subprocess; `stop()` kills it by PID.

    With `uds=PATH` it serves on that Unix socket instead (`--uds PATH`, or, with
    `uds_env=True`, `NDRELAY_UDS=PATH`), and `url` is `unix://PATH`. With `nofile=N`
    the process may have at most N open files (soft and hard limit, as `ulimit -n N`).
    Its stderr goes to a temporary file (`stderr_text()`), never to a pipe that could
    fill up and block the server.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        uds: str | None = None,
        uds_env: bool = False,
        nofile: int | None = None,
    ) -> None:
        self.port = free_port()
        self.uds = uds
        self.url = f"unix://{uds}" if uds else f"http://127.0.0.1:{self.port}"
        if uds and uds_env:
            env = dict(env if env is not None else clean_env(), NDRELAY_UDS=uds)
            where = []
        else:
            where = ["--uds", uds] if uds else ["--port", str(self.port)]
        backend = [] if BACKEND == "memory" else ["--backend", BACKEND]
        self.args = ["serve", *where, "--log-level", "warning", *backend, *args]
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._stdout = tempfile.TemporaryFile(mode="w+")

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            ndrelay_cmd(*self.args),
            env=env if env is not None else clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            preexec_fn=limits if nofile is not None else None,
        )
        self.pid = self.proc.pid
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll /healthz until it answers; fail if the process exits or the deadline passes."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.stderr_text()
                self.stop()
                raise RuntimeError(f"ndrelay serve exited with {self.proc.returncode}: {err}")
            try:
                if self.uds:
                    if not _unix_listening(self.uds):
                        raise httpx.ConnectError("not listening yet")
                    with httpx.Client(transport=httpx.HTTPTransport(uds=self.uds)) as client:
                        status = client.get("http://localhost/healthz", timeout=1.0).status_code
                else:
                    status = httpx.get(self.url + "/healthz", timeout=1.0).status_code
                if status == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ndrelay serve did not answer /healthz in time")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stdout_text(self) -> str:
        """What it printed on stdout (uvicorn's access log goes there)."""
        if self._stdout.closed:
            return ""
        self._stdout.flush()
        self._stdout.seek(0)
        return self._stdout.read()

    def stderr_text(self) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self) -> None:
        """Kill the process by its PID (if still running), reap it, close its stderr file."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self._stderr.close()
        self._stdout.close()


# -- bounded calls ----------------------------------------------------------------------


class Hung(AssertionError):
    """A bounded call did not return in time."""


def bounded(fn: Callable[[], T], timeout: float = 30.0) -> T:
    """`fn()` in a daemon thread: its result, or its exception re-raised here.

    Fails (instead of hanging the suite) if it takes longer than `timeout` seconds.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name="test-bounded", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Hung(f"call did not return within {timeout} s")
    if error:
        raise error[0]
    return result[0]


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def stream_threads() -> list[threading.Thread]:
    """Live reader threads of `RemoteStream`s."""
    return [t for t in threading.enumerate() if t.name.startswith("ndrelay-stream-")]


def poll(check: Callable[[], Any], what: str, deadline: float = 10.0) -> Any:
    """Call `check` until it returns something truthy; fail after `deadline` seconds."""
    until = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
