"""Raw-socket tools for attacking a real `ndrelay serve` (see `_sources.ServeProcess`):
requests written by hand, answers read by hand, the bodies of known attacks."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

MiB = 1024 * 1024


def healthz(port: int, timeout: float) -> float | None:
    """Seconds a fresh connection took to get `/healthz` answered 200, or None."""
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
    if not answer.startswith(b"HTTP/1.1 200"):
        return None
    return time.monotonic() - start


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def post_head(name: str, *, length: int | None = None) -> bytes:
    """The head of an upload to `name`: with Content-Length if given, else chunked."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /streams/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/x-msgpack\r\n{framing}\r\n\r\n"
    ).encode()


def read_answer(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer (Content-Length, chunked or close framing);
    (0, b"") if the connection closed without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except ConnectionResetError:
        pass
    if b"\r\n\r\n" not in data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    length = int(fields[b"content-length"]) if b"content-length" in fields else None
    chunked = fields.get(b"transfer-encoding") == b"chunked"
    try:
        while (length is not None and len(body) < length) or (chunked and b"0\r\n\r\n" not in body):
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    except (ConnectionResetError, TimeoutError):
        pass
    if chunked:
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        body = out
    return status, body


def upload_raw(port: int, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Upload `body` with Content-Length; (status, JSON answer)."""
    sock = connect(port)
    try:
        sock.sendall(post_head(name, length=len(body)) + body)
        status, answer = read_answer(sock, 120)
    finally:
        sock.close()
    return status, json.loads(answer) if answer else {}


def list_of_maps(n: int) -> bytes:
    """One frame `{"kind": "data", "seq": 0, "x": [{} * n]}`: n bytes that a plain
    msgpack decoder turns into n dicts."""
    pack = msgpack.packb
    head = b"\x83" + pack("kind") + pack("data") + pack("seq") + b"\x00" + pack("x")
    return head + b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def many_keys(n: int) -> bytes:
    """A data frame with `n` unknown string keys, `data` last."""
    pack = msgpack.packb
    keys = b"".join(pack(f"k{i}") + b"\x00" for i in range(n))
    head = b"\xdf" + (n + 3).to_bytes(4, "big") + pack("kind") + pack("data")
    return head + pack("seq") + b"\x00" + keys + pack("data") + pack(b"abc")


def declared_bytes_frame(nbytes: int) -> bytes:
    """The header of a bytes data frame announcing an `nbytes` payload (26 bytes)."""
    pack = msgpack.packb
    head = b"\x83" + pack("kind") + pack("data") + pack("seq") + b"\x00" + pack("data")
    return head + b"\xc6" + nbytes.to_bytes(4, "big")


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list to collect attack sockets in; all closed on exit."""
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for sock in held:
            sock.close()
