"""`ndrelay ls | info | rm | cat`: look at a relay's streams from a terminal."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ._connect import Api, relay_options

__all__ = ["cat", "info", "ls", "rm"]

_COLUMNS = [
    ("name", "left"),
    ("mode", "left"),
    ("state", "left"),
    ("depth/size", "right"),
    ("produced", "right"),
    ("consumers", "right"),
    ("items/s", "right"),
    ("MB/s", "right"),
    ("dropped", "right"),
]


def _rate(value: Any, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.2f}"


def _row(s: dict[str, Any]) -> list[str]:
    return [
        s["name"],
        s["mode"],
        s["state"],
        f"{s['depth']}/{s['size']}",
        str(s["produced"]),
        str(s["consumers"]),
        _rate(s.get("items_per_s")),
        _rate(s.get("bytes_per_s"), 1e6),
        str(s.get("dropped", 0)),
    ]


@click.command()
@relay_options
@click.option("--json", "as_json", is_flag=True, help="The relay's JSON list, as GET /streams.")
def ls(url: str, token: str | None, as_json: bool) -> None:
    """List the streams: mode, state, depth, counters and recent rates."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    with Api(url, token) as api:
        streams = api.call("GET", "/streams")
    if as_json:
        click.echo(json.dumps(streams, indent=2))
        return
    if not streams:
        click.echo(f"no streams on {url}", err=True)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for title, justify in _COLUMNS:
        table.add_column(title, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in streams:
        table.add_row(*_row(s))
    Console(highlight=False, width=200 if not sys.stdout.isatty() else None).print(table)


@click.command()
@relay_options
@click.argument("name")
@click.option(
    "--json", "as_json", is_flag=True, help="The relay's JSON, as GET /streams/NAME/info."
)
def info(url: str, token: str | None, name: str, as_json: bool) -> None:
    """Show one stream's definition, state, counters and rates."""
    with Api(url, token) as api:
        got = api.call("GET", f"/streams/{name}/info", name=name)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    width = max(len(k) for k in got)
    for key, value in got.items():
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")


@click.command()
@relay_options
@click.argument("name")
def rm(url: str, token: str | None, name: str) -> None:
    """Delete stream NAME; its readers get a `relay` error frame."""
    with Api(url, token) as api:
        api.call("DELETE", f"/streams/{name}", name=name)
    click.echo(f"deleted {name}", err=True)


@click.command()
@relay_options
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "msgpack"]),
    default="ndjson",
    show_default=True,
    help="ndjson: one JSON frame a line (pipe to jq); msgpack: the raw stream body.",
)
@click.option("-n", "count", type=click.IntRange(min=1), help="Stop after N items.")
@click.option(
    "--stats", is_flag=True, help="Print only a rate line to stderr every second, no frames."
)
@click.option(
    "--policy",
    type=click.Choice(["block", "drop_oldest", "latest"]),
    help="Fanout streams: what to do when this reader falls behind.",
)
def cat(
    url: str,
    token: str | None,
    name: str,
    fmt: str,
    count: int | None,
    stats: bool,
    policy: str | None,
) -> None:
    """Write the frames of stream NAME to stdout until its end.

    Data frames, then the `end` (exit 0) or `error` frame (exit 1). Heartbeats are
    left out. A queue stream's items are consumed: each goes to one reader.
    """
    params = {"policy": policy} if policy else {}
    with Api(url, token) as api:
        try:
            if stats:
                _stats(api, name, params, count)
            elif fmt == "ndjson":
                _cat_ndjson(api, name, params, count)
            else:
                _cat_msgpack(api, name, params, count)
        except BrokenPipeError:  # `ndrelay cat x | head`: the reader left, fine
            sys.stderr.close()
        except KeyboardInterrupt:
            raise SystemExit(130) from None


def _failed(name: str, error: dict[str, Any]) -> click.ClickException:
    return click.ClickException(
        f"stream {name!r} failed ({error.get('origin')}): "
        f"{error.get('type')}: {error.get('message')}"
    )


def _failed_frame(name: str, frame: Any) -> click.ClickException:
    return _failed(name, {"origin": frame.origin, "type": frame.type, "message": frame.message})


def _cat_ndjson(api: Api, name: str, params: dict[str, str], count: int | None) -> None:
    out = sys.stdout.buffer
    seen = 0
    with api.stream(
        "GET", f"/streams/{name}", name=name, params={**params, "format": "ndjson"}
    ) as resp:
        for line in resp.iter_lines():
            if not line:
                continue
            frame = json.loads(line)
            kind = frame.get("kind")
            if kind == "heartbeat":
                continue
            out.write(line.encode() + b"\n")
            out.flush()
            if kind == "data":
                seen += frame.get("count") or 1
                if count is not None and seen >= count:
                    return
            elif kind == "end":
                return
            elif kind == "error":
                raise _failed(name, frame)
    raise click.ClickException(f"stream {name!r}: the relay's response stopped before the end")


def _cat_msgpack(api: Api, name: str, params: dict[str, str], count: int | None) -> None:
    from .._codec import encode_frame_parts
    from .._frames import DataFrame, ErrorFrame
    from ._reading import item_count, read_response

    out = sys.stdout.buffer
    seen = 0
    with api.stream("GET", f"/streams/{name}", name=name, params=params) as resp:
        for frame in read_response(resp, f"stream {name!r}"):
            out.write(b"".join(encode_frame_parts(frame)))
            out.flush()
            if isinstance(frame, DataFrame):
                seen += item_count(frame)
                if count is not None and seen >= count:
                    return
            elif isinstance(frame, ErrorFrame):
                raise _failed(
                    name, {"origin": frame.origin, "type": frame.type, "message": frame.message}
                )


def _stats(api: Api, name: str, params: dict[str, str], count: int | None) -> None:
    from .._frames import DataFrame, ErrorFrame
    from ._progress import Meter
    from ._reading import item_count, payload_bytes, read_response

    meter = Meter(f"{name}", lines=True)
    try:
        with api.stream("GET", f"/streams/{name}", name=name, params=params) as resp:
            for frame in read_response(resp, f"stream {name!r}"):
                if isinstance(frame, DataFrame):
                    meter.add(item_count(frame), payload_bytes(frame))
                    if count is not None and meter.items >= count:
                        break
                elif isinstance(frame, ErrorFrame):
                    raise _failed_frame(name, frame)
    finally:
        elapsed = time.monotonic() - meter.start
        meter.close(f"{name}: {meter.items} items, {meter.bytes / 1e6:.2f} MB in {elapsed:.1f} s")
