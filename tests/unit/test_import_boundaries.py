"""The lower layers import without the HTTP stack (STYLE.md §2), checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("httpx", "starlette", "fastapi", "uvicorn")


def modules_after(statement: str) -> list[str]:
    """The heavy modules (and their submodules) loaded by `statement` in a new interpreter."""
    code = (
        "import json, sys\n"
        f"{statement}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import ndrelay._codec",
        "import ndrelay._frames, ndrelay._exceptions",
        "import ndrelay",
        "import ndrelay; ndrelay.FrameDecoder().feed(ndrelay.encode_frame(ndrelay.EndFrame(0)))",
        "from ndrelay import DataFrame, RemoteError, encode_frame_parts",
    ],
)
def test_no_http_stack_on_import(statement: str) -> None:
    assert modules_after(statement) == []


def test_the_check_itself_sees_heavy_imports() -> None:
    """Guard against a vacuous pass: the same probe does notice httpx when it is imported."""
    assert "httpx" in modules_after("import httpx")


def test_imported_from_this_checkout() -> None:
    code = "import ndrelay, sys; print(ndrelay.__file__)"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(SRC)
