"""Byte quantities: `256MiB` and friends, and how much memory this process may use."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["available_memory", "default_max_memory", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from `text`: plain bytes (`1048576`) or a number with a unit: `256MiB`,
    `1GiB`, `1.5GB`; `K`/`M`/`G`/`T` alone are binary (`1g` = 1 GiB), as in docker.

    Raises:
        ValueError: not a size; the message names `what` and the text.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{what} must be a number of bytes, optionally with a unit "
                f"(B, KiB, MiB, GiB, TiB, kB, MB, GB, TB), e.g. 256MiB; got {text!r}"
            )
        value = int(float(match.group(1)) * unit)
    if value < 1:
        raise ValueError(f"{what} must be at least 1 byte, got {text!r}")
    return value


def format_size(nbytes: int) -> str:
    """`nbytes` for people: `256 MiB`, `1.5 GiB`, `512 B`."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if size == int(size) else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def available_memory() -> int:
    """The memory this process may use: its cgroup's limit inside a container (v2 or
    v1), else the machine's physical memory, whichever is smaller."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [physical]
    for path in _cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))  # v1 says "no limit" with a huge number: min() skips it
    return min(limits)


def default_max_memory() -> int:
    """The default relay-wide bound on buffered bytes: half of `available_memory()`."""
    return max(1, available_memory() // 2)


def _cgroup_limit_files() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: the limit may sit on any ancestor
            here = root / rel
            while True:
                files.append(here / "memory.max")
                if here == root:
                    break
                here = here.parent
        elif "memory" in controllers.split(","):
            files.append(root / "memory" / rel / "memory.limit_in_bytes")
            files.append(root / "memory" / "memory.limit_in_bytes")
    files.append(root / "memory.max")
    return files
