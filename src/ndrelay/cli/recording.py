"""`ndrelay record | play | push`: a stream to a file and back, and arrays from files.

A recording is a stream body: the stream's msgpack frames, heartbeats left out, so
`curl` writes and uploads the same files. `record` also writes `FILE.times`, one line per
frame of FILE: seconds since the recording started, which `play --realtime` replays.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ._connect import Api, relay_options
from ._progress import Meter

__all__ = ["play", "push", "record"]


def times_path(path: Path) -> Path:
    return path.with_name(path.name + ".times")


class _Stop(Exception):
    """`--duration` ran out."""


@click.command()
@relay_options
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("-n", "count", type=click.IntRange(min=1), help="Stop after N items.")
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds."
)
@click.option(
    "--policy",
    type=click.Choice(["block", "drop_oldest", "latest"]),
    help="Fanout streams: what to do when the recorder falls behind [default: block].",
)
def record(
    url: str,
    token: str | None,
    name: str,
    file: Path,
    count: int | None,
    duration: float | None,
    policy: str | None,
) -> None:
    """Save stream NAME to FILE, until its end frame, -n, --duration or Ctrl-C.

    FILE always ends on a whole frame; FILE.times holds each frame's time. A queue
    stream's items are consumed by the recording.
    """
    from .._codec import encode_frame_parts
    from .._frames import DataFrame, EndFrame, ErrorFrame
    from ._reading import item_count, payload_bytes, read_response

    params = {"policy": policy} if policy else {}
    times: list[float] = []
    good = 0  # bytes of whole frames written
    why = "stopped"
    failed: ErrorFrame | None = None
    meter: Meter | None = None
    previous = None
    if duration is not None:

        def alarm(signum: int, frame: Any) -> None:
            raise _Stop

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, duration)
    try:
        with (
            Api(url, token) as api,
            api.stream("GET", f"/streams/{name}", name=name, params=params) as resp,
            file.open("wb") as out,
        ):
            meter = Meter(f"recording {name} -> {file}")
            start = time.monotonic()
            try:
                for frame in read_response(resp, f"stream {name!r}"):
                    t = time.monotonic() - start
                    out.write(b"".join(encode_frame_parts(frame)))
                    good = out.tell()
                    times.append(t)
                    if isinstance(frame, DataFrame):
                        meter.add(item_count(frame), payload_bytes(frame))
                        if count is not None and meter.items >= count:
                            why = f"{count} items"
                            break
                    elif isinstance(frame, EndFrame):
                        why = "end of stream"
                        break
                    elif isinstance(frame, ErrorFrame):
                        why, failed = "stream failed", frame
                        break
            finally:
                # a frame interrupted half-written is cut off: the file ends on a whole one
                if out.tell() != good:
                    out.truncate(good)
    except _Stop:
        why = f"{duration} s"
    except KeyboardInterrupt:
        why = "Ctrl-C"
    finally:
        if duration is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if meter is not None:
            times_path(file).write_text("".join(f"{t:.6f}\n" for t in times))
            meter.close(
                f"recorded {meter.items} items ({len(times)} frames, {good / 1e6:.2f} MB) "
                f"of {name} to {file} in {time.monotonic() - meter.start:.1f} s: {why}"
            )
    if meter is None:  # stopped before the relay answered
        raise SystemExit(130 if why == "Ctrl-C" else 1)
    if failed is not None:
        raise click.ClickException(
            f"stream {name!r} failed ({failed.origin}): {failed.type}: {failed.message} "
            "(recorded, error frame included)"
        )


def _upload(api: Api, name: str, frames: Iterator[Any], meter: Any) -> dict[str, Any]:
    """POST the frames as one streamed body; the relay's answer."""
    from .._codec import encode_frame_parts
    from .._frames import DataFrame
    from ._reading import item_count, payload_bytes

    def body() -> Iterator[bytes]:
        for frame in frames:
            yield b"".join(encode_frame_parts(frame))
            if isinstance(frame, DataFrame):
                meter.add(item_count(frame), payload_bytes(frame))

    answer = api.call("POST", f"/streams/{name}", name=None, content=body())
    return answer if isinstance(answer, dict) else {}


@click.command()
@relay_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("name")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Items per second.")
@click.option("--realtime", is_flag=True, help="Keep the recorded spacing (from FILE.times).")
@click.option("--loop", is_flag=True, help="Play FILE again and again (Ctrl-C stops).")
@click.option(
    "--keep-open",
    is_flag=True,
    help="Do not end NAME when FILE is done (a recording's own end or error frame still goes).",
)
def play(
    url: str,
    token: str | None,
    file: Path,
    name: str,
    rate: float | None,
    realtime: bool,
    loop: bool,
    keep_open: bool,
) -> None:
    """Upload the recording FILE to stream NAME, as fast as the relay takes it, at
    --rate, or with the recorded timing (--realtime).

    The stream ends with the recording's own end or error frame; a recording without
    one (stopped by -n or Ctrl-C) is followed by an end, unless --keep-open. With
    --loop, terminal frames are left out and the data plays on until Ctrl-C.
    """
    from .._frames import DataFrame, EndFrame
    from ._progress import Meter
    from ._reading import read_file

    if rate is not None and realtime:
        raise click.UsageError("--rate and --realtime exclude each other")
    times: list[float] | None = None
    if realtime:
        tpath = times_path(file)
        try:
            times = [float(line) for line in tpath.read_text().split()]
        except (OSError, ValueError) as exc:
            raise click.ClickException(
                f"--realtime needs {tpath} (written by ndrelay record): {exc}"
            ) from None

    def frames() -> Iterator[Any]:
        start = time.monotonic()
        sent = 0  # data frames so far, over all loops
        offset = 0.0  # time at which the current loop started (realtime)
        while True:
            terminal = None
            last_t = 0.0
            for i, frame in enumerate(read_file(file)):
                if not isinstance(frame, DataFrame):
                    terminal = frame
                    break
                if times is not None:
                    last_t = times[i] if i < len(times) else last_t
                    wait = start + offset + last_t - time.monotonic()
                elif rate is not None:
                    wait = start + sent / rate - time.monotonic()
                else:
                    wait = 0.0
                if wait > 0:
                    time.sleep(wait)
                sent += 1
                yield frame
            if not loop:
                if terminal is not None:
                    yield terminal
                elif not keep_open:
                    yield EndFrame(seq=0)
                return
            offset += last_t + (1.0 / rate if rate else 0.0)

    meter = Meter(f"playing {file} -> {name}")
    why = "done"
    answer: dict[str, Any] = {}
    try:
        with Api(url, token) as api:
            answer = _upload(api, name, frames(), meter)
    except KeyboardInterrupt:
        why = "Ctrl-C"
    finally:
        meter.close(
            f"played {meter.items} items ({meter.bytes / 1e6:.2f} MB) from {file} to {name} "
            f"in {time.monotonic() - meter.start:.1f} s: {why}"
            + (f"; relay: {json.dumps(answer)}" if answer else "")
        )


def _items_of(path: Path) -> Iterator[Any]:
    """The items of one file: an `.npy` array, each array of an `.npz` (in archive
    order), or the file's bytes."""
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            yield np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    yield archive[key]
        else:
            yield path.read_bytes()
    except (ValueError, OSError) as exc:
        raise click.ClickException(
            f"{path}: cannot read it as {suffix or 'bytes'}: {exc}"
        ) from None


@click.command()
@relay_options
@click.argument("name")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--keep-open", is_flag=True, help="Do not end NAME after the last file.")
def push(url: str, token: str | None, name: str, files: tuple[Path, ...], keep_open: bool) -> None:
    """Upload FILES to stream NAME as items: `.npy` arrays, every array of an `.npz`,
    any other file as one bytes item; then end the stream (unless --keep-open)."""
    import numpy as np

    from .._codec import check_dtype
    from .._frames import DataFrame, EndFrame
    from ._progress import Meter

    def frames() -> Iterator[Any]:
        seq = 0
        for path in files:
            for item in _items_of(path):
                if isinstance(item, np.ndarray):
                    try:
                        check_dtype(item.dtype)
                    except Exception as exc:
                        raise click.ClickException(f"{path}: {exc}") from None
                    item = np.ascontiguousarray(item)
                yield DataFrame(seq, item)
                seq += 1
        if not keep_open:
            yield EndFrame(seq=seq)

    meter = Meter(f"pushing to {name}")
    with Api(url, token) as api:
        answer = _upload(api, name, frames(), meter)
    meter.close(
        f"pushed {meter.items} items ({meter.bytes / 1e6:.2f} MB) from {len(files)} files "
        f"to {name}; relay: {json.dumps(answer)}"
    )
