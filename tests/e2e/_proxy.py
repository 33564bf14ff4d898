"""A TCP proxy on 127.0.0.1 that cuts connections on demand: the network failing under a
client (a reset, a load balancer dropping it), for fault tests and `benchmarks/faults.py`.

```python
with CuttingProxy(relay_port) as proxy:     # clients use proxy.url
    proxy.arm(200_000)     # the next connection to carry 200 kB towards the relay is cut
    proxy.cut_all()        # every open connection is reset now
```

A cut closes both sides with a TCP reset (SO_LINGER 0). Threads only; `close()` stops
every one of them (all loops are bounded by socket timeouts and a stop flag).
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Self

_LINGER_RESET = struct.pack("ii", 1, 0)


class CuttingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._armed: int | None = None  # cut the next connection past this many bytes up
        self.cuts = 0  # connections cut so far
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def arm(self, after_bytes: int) -> None:
        """Cut the first connection (open now or later) whose bytes towards the relay
        pass `after_bytes`; once."""
        with self._lock:
            self._armed = after_bytes

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._armed is not None

    def cut_all(self) -> int:
        """Reset every open connection now; how many there were."""
        with self._lock:
            pairs = [p for p in self._pairs if not p.closed]
        for pair in pairs:
            self._cut(pair)
        return len(pairs)

    def _cut(self, pair: _Pair) -> None:
        if pair.close(reset=True):
            with self._lock:
                self.cuts += 1

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the relay is down: the client sees its connection end
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs = [p for p in self._pairs if not p.closed] + [pair]
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(
                    target=self._pump, args=(pair, src, dst, up), name="proxy-pump", daemon=True
                )
                t.start()
                self._threads.append(t)
            self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            self._forward(pair, src, dst, up)
        except (OSError, ValueError):  # the other side was closed (or cut) meanwhile
            pass
        pair.close(reset=False)

    def _forward(self, pair: _Pair, src: socket.socket, dst: socket.socket, up: bool) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set() and not pair.closed:
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            if not data:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                return
            if up:
                with self._lock:
                    pair.up += len(data)
                    cut = self._armed is not None and pair.up >= self._armed
                    if cut:
                        self._armed = None
                if cut:
                    # forward part of it, then reset: the relay sees a body cut mid-frame
                    dst.sendall(data[: len(data) // 2])
                    self._cut(pair)
                    return
            dst.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._accepter.join(5)
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close(reset=False)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pair:
    """A client connection and its connection to the relay."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.up = 0  # bytes client -> relay
        self.closed = False
        self._lock = threading.Lock()

    def close(self, reset: bool) -> bool:
        """Close both sides (with a TCP reset if `reset`); False if already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
        for sock in (self.client, self.upstream):
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.close()
            except OSError:
                pass
        return True
