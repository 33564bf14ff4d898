"""The hostile clients of docs/SECURITY.md, each against a fresh `ndrelay serve` on
127.0.0.1, with raw sockets (and curl where a user would use curl). Prints one line per
attack: the relay's RSS before and after (from /proc), the answers, the slowest /healthz
while it ran, and the log bytes it caused. Not part of the test suite (tests/e2e/
test_hostile.py asserts the same bounds); this is how the figures in docs/SECURITY.md
were measured.

    python benchmarks/attacks.py                      # every attack, ~4 minutes
    python benchmarks/attacks.py --only amplify,fds   # some of them

Every server it starts is stopped by its PID; every socket it opens is closed.
"""

from __future__ import annotations

import argparse
import json
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

MiB = 1 << 20
SRC = Path(__file__).resolve().parent.parent / "src"


# -- the relay ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """`ndrelay serve --port <free> <args>` (log level info); stopped by PID."""

    def __init__(self, *args: str, nofile: int | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(prefix="ndrelay-attack-", suffix=".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")}
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])

        def limit() -> None:
            if nofile is not None:  # as `ulimit -n N`: soft and hard
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        cmd = [sys.executable, "-m", "ndrelay", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "info", *args],
            stdout=subprocess.DEVNULL,
            stderr=self.log_file,
            env=env,
            preexec_fn=limit,
        )
        deadline = time.monotonic() + 30
        while healthz(self.port, 1.0) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ndrelay serve did not start: {self.log()[-2000:]}")
            time.sleep(0.1)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_bytes(self) -> int:
        return os.path.getsize(self.log_file.name)

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


@contextmanager
def serve(*args: str, nofile: int | None = None) -> Iterator[Serve]:
    server = Serve(*args, nofile=nofile)
    try:
        yield server
    finally:
        server.stop()


# -- raw HTTP -----------------------------------------------------------------------------


def healthz(port: int, timeout: float) -> float | None:
    """Seconds a fresh connection took to get /healthz answered 200, or None."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(max(0.01, timeout - (time.monotonic() - start)))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
    except OSError:
        return None
    return time.monotonic() - start if answer.startswith(b"HTTP/1.1 200") else None


class Watch:
    """Asks /healthz every 0.2 s (timeout 5 s) while an attack runs."""

    def __init__(self, port: int) -> None:
        self.port, self.times = port, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(healthz(self.port, 5.0))
            self._stop.wait(0.2)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        failed = sum(t is None for t in self.times)
        ok = [t for t in self.times if t is not None]
        ok.sort()
        worst = f"{ok[-1] * 1000:.0f} ms" if ok else "-"
        median = f"{ok[len(ok) // 2] * 1000:.0f} ms" if ok else "-"
        over = sum(t > 1.0 for t in ok)
        return (
            f"/healthz {len(self.times)} checks: median {median}, slowest {worst}, "
            f"{over} over 1 s, {failed} failed"
        )


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def post_head(name: str, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /streams/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/x-msgpack\r\n{framing}\r\n\r\n"
    ).encode()


def read_answer(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """(status, first bytes of the body) of one answer; (0, b"") if none came."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 1:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data:
                time.sleep(0.05)
                sock.setblocking(False)
                try:
                    data += sock.recv(65536)
                except OSError:
                    pass
                break
    except OSError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return 0, b""
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def upload(port: int, name: str, body: bytes) -> tuple[int, bytes]:
    with connect(port) as sock:
        sock.sendall(post_head(name, len(body)) + body)
        return read_answer(sock, 120)


def _json(body: bytes) -> dict[str, Any]:
    """The JSON object in an answer's body (chunk sizes around it ignored)."""
    start, end = body.find(b"{"), body.rfind(b"}")
    return json.loads(body[start : end + 1]) if 0 <= start < end else {}


def curl(*args: str) -> str:
    """`curl -s -o /dev/null -w '%{http_code}' ARGS` (-s: no progress), the status."""
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout


def curl_body(*args: str) -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True, timeout=30
    )
    return out.stdout


def list_of_maps(n: int) -> bytes:
    pack = msgpack.packb
    head = b"\x83" + pack("kind") + pack("data") + pack("seq") + b"\x00" + pack("x")
    return head + b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def many_keys(n: int) -> bytes:
    pack = msgpack.packb
    keys = b"".join(pack(f"k{i}") + b"\x00" for i in range(n))
    head = b"\xdf" + (n + 3).to_bytes(4, "big") + pack("kind") + pack("data")
    return head + pack("seq") + b"\x00" + keys + pack("data") + pack(b"abc")


def declared_bytes_frame(nbytes: int) -> bytes:
    pack = msgpack.packb
    head = b"\x83" + pack("kind") + pack("data") + pack("seq") + b"\x00" + pack("data")
    return head + b"\xc6" + nbytes.to_bytes(4, "big")


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def report(name: str, text: str) -> None:
    print(f"- **{name}**: {text}", flush=True)


# -- the attacks --------------------------------------------------------------------------


def attack_memory() -> None:
    """Four producers upload 24 x 8 MiB each (768 MiB in all) into four streams with no
    consumer, at --max-memory 256MiB; then four consumers drain them."""
    from ndrelay import RelayClient

    with serve("--max-memory", "256MiB") as server:
        before = server.rss()
        count, size, names = 24, 8 * MiB, [f"cam{i}" for i in range(4)]
        results: dict[str, Any] = {}

        def produce(k: int, name: str) -> None:
            items = (np.full(size, (k * 31 + i) % 256, np.uint8) for i in range(count))
            with RelayClient(server.url, read_timeout=120) as client:
                results[name] = client.publish(name, items)

        threads = [
            threading.Thread(target=produce, args=(k, n), daemon=True) for k, n in enumerate(names)
        ]
        with Watch(server.port) as watch:
            for t in threads:
                t.start()
            peak, used = 0, 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = subprocess.run(
                    ["curl", "-s", "-D", "-", "-o", "/dev/null", f"{server.url}/streams"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout
                for line in status.splitlines():
                    if line.lower().startswith("ndrelay-memory-bytes:"):
                        used = int(line.split(":")[1])
                peak = max(peak, server.rss())
                if used >= 256 * MiB - size:
                    break
                time.sleep(0.2)
            for _ in range(30):  # 6 s at the bound, producers pushing
                peak = max(peak, server.rss())
                time.sleep(0.2)
            waiting = sum(t.is_alive() for t in threads)
        got: dict[str, list[int]] = {}

        def consume(name: str) -> None:
            with RelayClient(server.url, read_timeout=120) as client:
                got[name] = [int(a[0]) for a in client.stream(name)]

        readers = [threading.Thread(target=consume, args=(n,), daemon=True) for n in names]
        for t in readers:
            t.start()
        for t in readers + threads:
            t.join(300)
        complete = all(
            got.get(n) == [(k * 31 + i) % 256 for i in range(count)] for k, n in enumerate(names)
        )
        after = server.rss()
        report(
            "memory bound (--max-memory 256MiB; 4 producers x 24 x 8 MiB, no consumer)",
            f"RSS {mib(before)} before, peak {mib(peak)} while {waiting} of 4 producers "
            f"waited at the bound (buffered {mib(used)}); drained: "
            f"{sum(len(v) for v in got.values())} of {4 * count} items delivered in order "
            f"({'all' if complete else 'NOT all'}), RSS {mib(after)} after; {watch.summary()}",
        )


def attack_amplify() -> None:
    with serve() as server:
        before = server.rss()
        with Watch(server.port) as watch:
            lines = []
            for label, body in (
                ("8 MiB of empty maps", list_of_maps(8 * MiB)),
                ("16 MiB of empty maps", list_of_maps(16 * MiB)),
                ("10^6 unknown keys", many_keys(10**6)),
            ):
                status, answer = upload(server.port, "amp", body)
                key = _json(answer).get("key")
                lines.append(f"{label}: {status} (key {key}), RSS {mib(server.rss())}")
        report(
            "object amplification",
            f"RSS {mib(before)} before; " + "; ".join(lines) + f"; {watch.summary()}",
        )


def attack_headers(n: int = 100) -> None:
    with serve() as server:
        before = server.rss()
        peak = 0
        socks: list[socket.socket] = []
        statuses: dict[int, int] = {}
        with Watch(server.port) as watch:
            try:
                for _ in range(n):
                    sock = connect(server.port)
                    socks.append(sock)
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ")
                junk = b"a" * 16384
                for _ in range(16):  # 256 KiB per connection, never a line end
                    for sock in socks:
                        try:
                            sock.sendall(junk)
                        except OSError:
                            pass
                    peak = max(peak, server.rss())
                for sock in socks:
                    status = read_answer(sock, 10)[0]
                    statuses[status] = statuses.get(status, 0) + 1
                peak = max(peak, server.rss())
            finally:
                for sock in socks:
                    sock.close()
        report(
            f"{n} connections each sending an endless header line",
            f"RSS {mib(before)} before, peak {mib(peak)}, {mib(server.rss())} after; "
            f"answers {statuses}; {watch.summary()}",
        )


def attack_fds(n: int = 260, seconds: float = 30) -> None:
    with serve(nofile=256) as server:
        before, log0 = server.rss(), server.log_bytes()
        socks: list[socket.socket] = []
        refused = 0
        with Watch(server.port) as watch:
            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    # keep n idle connections open: reopen those the relay closed
                    alive = []
                    for sock in socks:
                        try:
                            sock.setblocking(False)
                            gone = sock.recv(1, socket.MSG_PEEK) == b""
                        except BlockingIOError:
                            gone = False
                        except OSError:
                            gone = True
                        if gone:
                            sock.close()
                        else:
                            alive.append(sock)
                    socks = alive
                    while len(socks) < n:
                        try:
                            socks.append(connect(server.port))
                        except OSError:
                            refused += 1
                            break
                    time.sleep(0.5)
            finally:
                for sock in socks:
                    sock.close()
        grown = server.log_bytes() - log0
        report(
            f"{n} idle connections kept open for {seconds:g} s, open-files limit 256",
            f"RSS {mib(before)} before, {mib(server.rss())} after; {refused} connects "
            f"failed; log {grown} bytes, {server.log().count('out of system resource')} "
            f"failed accepts (EMFILE); {watch.summary()}",
        )


def attack_slow(seconds: int = 20) -> None:
    frame = msgpack.packb({"kind": "data", "seq": 0, "data": b"abc"})
    with serve("--upload-idle-timeout", "5") as server:
        before = server.rss()
        with Watch(server.port) as watch, connect(server.port) as sock:
            sock.sendall(post_head("slow") + b"%x\r\n" % (len(frame) + 1))
            # a byte per second: the chunk's frame and then one byte of the next frame
            payload = frame + b"\x81"
            held = True
            for i in range(seconds):
                try:
                    sock.sendall(payload[i : i + 1] if i < len(payload) else b"")
                except OSError:
                    held = False
                    break
                time.sleep(1)
        report(
            f"an upload sending a byte per second for {seconds} s (--upload-idle-timeout 5)",
            f"connection {'still held (not idle)' if held else 'closed'}; RSS {mib(before)} "
            f"before, {mib(server.rss())} after; {watch.summary()}",
        )
        with connect(server.port) as sock:
            start = time.monotonic()
            sock.sendall(post_head("idle") + b"%x\r\n%s\r\n" % (len(frame), frame))
            status, body = read_answer(sock, 30)
            took = time.monotonic() - start
        produced = json.loads(curl_body(f"{server.url}/streams/idle/info"))["produced"]
        report(
            "an upload that stops sending after one frame (--upload-idle-timeout 5)",
            f"{status} after {took:.1f} s, its frame kept (produced {produced})",
        )


def attack_declared(n: int = 4) -> None:
    with serve() as server:
        before = server.rss()
        body = declared_bytes_frame(250 * MiB) + b"x" * 64
        with Watch(server.port) as watch:
            socks = []
            try:
                for i in range(n):
                    sock = connect(server.port)
                    socks.append(sock)
                    sock.sendall(post_head(f"big{i}", 250 * MiB + 26) + body)
                time.sleep(3)
                held = server.rss()
                listed = len(json.loads(curl_body(f"{server.url}/streams")))
            finally:
                for sock in socks:
                    sock.close()
        time.sleep(1)
        left = json.loads(curl_body(f"{server.url}/streams"))
        report(
            f"{n} connections each sending {len(body)} bytes of a 250 MiB bytes frame, idle",
            f"RSS {mib(before)} before, {mib(held)} while held ({listed} uploads open); "
            f"after they closed: {len(left)} streams left; {watch.summary()}",
        )


def attack_slots() -> None:
    with serve("--max-streams", "20") as server:
        url = server.url
        for i in range(20):
            curl("-X", "PUT", f"{url}/streams/s{i}", "-H", "content-type: application/json",
                 "-d", '{"size": 4}')  # fmt: skip
        deleted = curl("-X", "DELETE", f"{url}/streams/s0")
        garbage = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-",
             "-H", "content-type: application/x-msgpack", f"{url}/streams/garbage"],
            input=b"\xc1", capture_output=True, timeout=30,
        ).stdout.decode()  # fmt: skip
        count = len(json.loads(curl_body(f"{url}/streams")))
        again = curl("-X", "PUT", f"{url}/streams/legit", "-H", "content-type: application/json",
                     "-d", '{"size": 4}')  # fmt: skip
        report(
            "a garbage POST at --max-streams 20 after one DELETE",
            f"DELETE {deleted}, POST \\xc1 {garbage}, {count} streams after it, next PUT {again}",
        )
    with serve("--stream-ttl", "2") as server:
        url = server.url
        end = msgpack.packb({"kind": "end", "seq": 0})
        posted = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-",
             f"{url}/streams/done"],
            input=end, capture_output=True, timeout=30,
        ).stdout.decode()  # fmt: skip
        info = json.loads(curl_body(f"{url}/streams/done/info"))
        time.sleep(3)
        status = curl(f"{url}/streams/done/info")
        report(
            "a finished stream at --stream-ttl 2",
            f"POST end {posted}; info ttl {info['ttl']} expires_in {info['expires_in']:.1f}; "
            f"3 s later: info {status}",
        )


def attack_definitions() -> None:
    with serve("--max-memory", "256MiB") as server:
        body = curl_body("-X", "PUT", f"{server.url}/streams/huge", "-w", " %{http_code}",
                         "-H", "content-type: application/json",
                         "-d", '{"size": 1000000, "max_bytes": 1e18}')  # fmt: skip
        report("PUT {size: 1000000, max_bytes: 1e18}", body)


def attack_origins() -> None:
    end = "@" + _end_file()
    with serve() as server:
        url = server.url
        text = ["-H", "content-type: text/plain", "--data-binary", end]
        cross = curl(*text, "-H", "origin: http://evil.example", f"{url}/streams/x")
        same = curl(*text, "-H", f"origin: {url}", f"{url}/streams/y")
        plain = curl(*text, f"{url}/streams/z")
        curl("-X", "PUT", f"{url}/streams/d", "-H", "content-type: application/json", "-d", "{}")
        delete = curl("-X", "DELETE", "-H", "origin: http://evil.example", f"{url}/streams/d")
        report(
            "writes from web pages, no token",
            f"cross-origin text/plain POST {cross}, cross-origin DELETE {delete}, "
            f"same-origin POST {same}, POST without Origin (curl) {plain}",
        )
    with serve("--allowed-hosts", "127.0.0.1,relay.lab") as server:
        url = server.url
        evil = curl("-H", "host: rebind.evil.example", f"{url}/streams")
        listed = curl("-H", "host: relay.lab:8000", f"{url}/streams")
        health = curl("-H", "host: rebind.evil.example", f"{url}/healthz")
        report(
            "--allowed-hosts 127.0.0.1,relay.lab",
            f"GET /streams with Host rebind.evil.example {evil}, with Host relay.lab {listed}; "
            f"/healthz with Host rebind.evil.example {health}",
        )


def _end_file() -> str:
    path = Path(tempfile.gettempdir()) / "ndrelay-attack-end.msgpack"
    path.write_bytes(msgpack.packb({"kind": "end", "seq": 0}))
    return str(path)


ATTACKS: dict[str, Callable[[], None]] = {
    "memory": attack_memory,
    "amplify": attack_amplify,
    "headers": attack_headers,
    "fds": attack_fds,
    "slow": attack_slow,
    "declared": attack_declared,
    "slots": attack_slots,
    "definitions": attack_definitions,
    "origins": attack_origins,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated: " + ",".join(ATTACKS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {','.join(ATTACKS)}")
    for name in names:
        ATTACKS[name]()


if __name__ == "__main__":
    main()
