"""`docker/smoke.sh --plan`: what the container smoke test would use, on this machine and
on a user's with Docker or podman and network access (no project build helper next to
the repository); `docker/smoke-scale.sh --plan` the same. The whole smoke tests
themselves run in `.ci/run`, after the suite."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "docker" / "smoke.sh"
SMOKE_SCALE = REPO / "docker" / "smoke-scale.sh"


def _prepare() -> Path:
    """Where the smoke scripts find the build helper: NDRELAY_SMOKE_PREPARE, next to the
    repository, or next to the local repository this clone was made from."""
    if "NDRELAY_SMOKE_PREPARE" in os.environ:
        return Path(os.environ["NDRELAY_SMOKE_PREPARE"])
    here = REPO.parent / "shared" / "container" / "prepare.sh"
    origin = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    there = Path(origin, "..", "shared", "container", "prepare.sh") if origin else here
    return here if here.exists() or not there.exists() else there


PREPARE = _prepare()


def plan(env: dict[str, str], script: Path = SMOKE) -> dict[str, str] | None:
    """What `script --plan` prints, or None where this machine lacks a tool the plan needs
    and no build helper could give it (a clone away from the helper): then the script must
    have said which tool is missing."""
    done = subprocess.run(
        ["bash", str(script), "--plan"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # the prepare script may install podman the first time
        check=False,
    )
    if done.returncode != 0 and not PREPARE.exists():
        assert re.search(r"is not installed|no container engine", done.stderr), done.stderr
        return None
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


def user_env() -> dict[str, str]:
    """This environment, plus the container tools a prepare script installed (a user
    installs podman-compose or docker compose their own way)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NDRELAY_", "BASE_IMAGE"))}
    if PREPARE.exists():
        exports = subprocess.run(
            ["bash", str(PREPARE)], capture_output=True, text=True, timeout=600, check=True
        ).stdout
        tools = re.search(r"^export CONTAINER_TOOLS=(\S+)$", exports, re.MULTILINE)
        if tools:
            env["PATH"] = f"{tools.group(1)}/bin{os.pathsep}{env['PATH']}"
    return env


def test_without_the_build_helper_it_uses_the_registry_base_image():
    env = user_env()
    env["NDRELAY_SMOKE_PREPARE"] = str(REPO / "no-such-prepare.sh")
    got = plan(env)
    if got is None:
        return
    assert got["prepare"] == "none"
    assert got["base image"] == "python:3.12-slim"  # the Dockerfile's default, pulled
    assert got["engine"] in ("docker", "podman")
    assert got["compose"] in ("docker compose", "docker-compose", "podman-compose")
    if got["engine"] == "docker":
        assert "--format" not in got["build options"]  # a podman-only flag


def test_an_engine_can_be_chosen():
    env = user_env()
    env["NDRELAY_SMOKE_PREPARE"] = str(REPO / "no-such-prepare.sh")
    env["NDRELAY_SMOKE_ENGINE"] = "nerdctl"
    done = subprocess.run(
        ["bash", str(SMOKE), "--plan"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "NDRELAY_SMOKE_ENGINE must be docker or podman" in done.stderr


@pytest.mark.slow
def test_where_the_build_helper_exists_it_uses_its_local_base_image():
    got = plan({k: v for k, v in os.environ.items() if not k.startswith("NDRELAY_")})
    if got is None:
        return
    if not PREPARE.exists():  # a user's clone: the registry's image, as above
        assert (got["prepare"], got["base image"]) == ("none", "python:3.12-slim")
        return
    assert Path(got["prepare"]).resolve() == PREPARE.resolve()
    assert got["engine"] == "podman"
    assert got["base image"].startswith("localhost/")
    assert "--format docker" in got["build options"]


def test_the_scale_smoke_test_picks_what_the_smoke_test_picks():
    env = user_env()
    env["NDRELAY_SMOKE_PREPARE"] = str(REPO / "no-such-prepare.sh")
    scale, full = plan(env, SMOKE_SCALE), plan(env)
    if scale is None or full is None:
        assert scale is full is None  # both scripts miss the same tool
    else:
        assert {k: full[k] for k in scale} == scale
        assert set(scale) == {"engine", "compose", "base image", "prepare"}
    env["NDRELAY_SMOKE_ENGINE"] = "nerdctl"
    done = subprocess.run(
        ["bash", str(SMOKE_SCALE), "--plan"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "NDRELAY_SMOKE_ENGINE must be docker or podman" in done.stderr
