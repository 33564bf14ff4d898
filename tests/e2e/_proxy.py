"""A TCP proxy on 127.0.0.1 that cuts connections on demand: the network failing under a
client (a reset, a load balancer dropping it), for fault tests and `benchmarks/faults.py`.

```python
with CuttingProxy(relay_port) as proxy:     # clients use proxy.url
    proxy.arm(200_000)     # the next connection to carry 200 kB towards the relay is cut
    proxy.cut_all()        # every open connection is reset now
    proxy.lose_reply(b"XREADGROUP")  # the next request with it arrives; its answer never
    proxy.drop_request(b"EVALSHA")   # the next request with it never arrives: a cut
    proxy.refuse(3.0)      # the network is down for 3 s: every connection cut, none let in
```

A cut closes both sides with a TCP reset (SO_LINGER 0). Threads only; `close()` stops
every one of them (all loops are bounded by socket timeouts and a stop flag).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
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
        self._reply_marker: bytes | None = None  # cut after a request with it, no answer
        self._drop_marker: bytes | None = None  # cut before a request with it
        self._refuse_until = 0.0  # connections are cut as they come until then
        self.cuts = 0  # connections cut so far
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def arm(self, after_bytes: int) -> None:
        """Cut the first connection (open now or later) whose bytes towards the relay
        pass `after_bytes`; once."""
        with self._lock:
            self._armed = after_bytes

    def lose_reply(self, marker: bytes) -> None:
        """The next request (bytes towards the target) that contains `marker` is passed
        on whole, and its connection is then cut before the answer comes back: the
        target did what was asked, the client never hears so. Once."""
        with self._lock:
            self._reply_marker = marker

    def drop_request(self, marker: bytes) -> None:
        """The next request (bytes towards the target) that contains `marker` never
        arrives: its connection is cut instead. Once."""
        with self._lock:
            self._drop_marker = marker

    def refuse(self, seconds: float) -> None:
        """The network goes down for `seconds`: every open connection is reset now, and
        every new one as it comes, until then."""
        with self._lock:
            self._refuse_until = time.monotonic() + seconds
        self.cut_all()

    @property
    def armed(self) -> bool:
        with self._lock:
            return not (self._armed is self._reply_marker is self._drop_marker is None)

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
            with self._lock:
                down = time.monotonic() < self._refuse_until
            if down:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                client.close()
                with self._lock:
                    self.cuts += 1
                continue
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
            if not up:
                if not pair.mute:
                    dst.sendall(data)
                continue
            with self._lock:
                pair.up += len(data)
                cut = self._armed is not None and pair.up >= self._armed
                if cut:
                    self._armed = None
                mute = drop = False
                if self._reply_marker is not None or self._drop_marker is not None:
                    seen = pair.tail + data
                    mute = self._reply_marker is not None and self._reply_marker in seen
                    if mute:
                        self._reply_marker = None
                        pair.mute = True  # the answer is dropped from now on
                    drop = self._drop_marker is not None and self._drop_marker in seen
                    if drop:
                        self._drop_marker = None
                pair.tail = data[-64:]
            if drop:
                self._cut(pair)
                return
            if cut:
                # forward part of it, then reset: the relay sees a body cut mid-frame
                dst.sendall(data[: len(data) // 2])
                self._cut(pair)
                return
            dst.sendall(data)
            if mute:
                time.sleep(0.3)  # the target runs it (its answer is dropped), then: cut
                self._cut(pair)
                return

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
        self.mute = False  # bytes from the relay are dropped, not passed on
        self.tail = b""  # the last bytes up (a marker split between two reads)
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
