"""`ndrelay produce` and `ndrelay consume`: synthetic load and a rate meter, for trying a relay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import click
from click.core import ParameterSource

from ._connect import relay_options
from ._errors import relay_errors

__all__ = ["consume", "produce"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _url_and_stream(target: tuple[str, ...], url: str) -> tuple[str, str]:
    """`[URL] STREAM`: the relay is `--url`, or a URL given before the stream name."""
    if len(target) == 1:
        return url, target[0]
    if len(target) != 2:
        raise click.UsageError(f"expected [URL] STREAM, got {len(target)} arguments")
    from .._client import relay_url

    try:
        given = relay_url(target[0])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'URL'") from None
    ctx = click.get_current_context()
    if ctx.get_parameter_source("url") is not ParameterSource.DEFAULT and given != url:
        raise click.UsageError(f"two relay URLs: {target[0]} and --url {url}")
    return given, target[1]


def _dtype(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    from .._codec import parse_dtype

    try:
        return parse_dtype(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("target", nargs=-1, required=True, metavar="[URL] STREAM")
@relay_options
@click.option(
    "--rate", default=10.0, show_default=True, help="Frames per second (0: as fast as possible)."
)
@click.option("--shape", default="64,128", show_default=True, help="Array shape, comma-separated.")
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    callback=_dtype,
    help="numpy dtype: any name numpy knows (float32, <f4, uint8).",
)
@click.option(
    "--count",
    type=int,
    default=None,
    help="Frames to send, then end the stream [default: endless].",
)
@relay_errors
def produce(
    target: tuple[str, ...],
    url: str,
    token: str | None,
    rate: float,
    shape: str,
    dtype: Any,
    count: int | None,
) -> None:
    """Publish synthetic frames to STREAM.

    The relay is `--url` (NDRELAY_URL), or a URL given before STREAM:
    `localhost:8000` (http:// is assumed), `https://rig:8443` or `unix:///PATH`.
    """
    url, stream = _url_and_stream(target, url)
    import numpy as np

    from .._client import RelayClient

    dims = _shape(shape)
    rng = np.random.default_rng()
    template = rng.standard_normal(dims).astype(dtype)

    def frames() -> Iterator[Any]:
        t0 = time.monotonic()
        i = 0
        while count is None or i < count:
            yield template
            i += 1
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))

    with RelayClient(url, token=token) as client:
        click.echo(
            f"producing {'endless' if count is None else count} frames {dims} {dtype.str} "
            f"at {rate} Hz to {stream}",
            err=True,
        )
        result = client.publish(stream, frames())
    click.echo(f"done: {result}", err=True)


@click.command()
@click.argument("target", nargs=-1, required=True, metavar="[URL] STREAM")
@relay_options
@click.option(
    "--count", type=int, default=None, help="Stop after this many items [default: until the end]."
)
@click.option("--interval", default=1.0, show_default=True, help="Seconds between rate reports.")
@click.option("--policy", default=None, help="Fanout streams: block, drop_oldest or latest.")
@relay_errors
def consume(
    target: tuple[str, ...],
    url: str,
    token: str | None,
    count: int | None,
    interval: float,
    policy: str | None,
) -> None:
    """Read STREAM and report items/s and MB/s.

    The relay is `--url` (NDRELAY_URL), or a URL given before STREAM:
    `localhost:8000` (http:// is assumed), `https://rig:8443` or `unix:///PATH`.
    """
    url, stream = _url_and_stream(target, url)
    from .._client import RelayClient

    with RelayClient(url, token=token) as client, client.stream(stream, policy=policy) as remote:
        n = nbytes = 0
        window_n = window_bytes = 0
        last = time.monotonic()
        for item in remote:
            size = getattr(item, "nbytes", None) or len(item)
            n += 1
            nbytes += size
            window_n += 1
            window_bytes += size
            now = time.monotonic()
            if now - last >= interval:
                click.echo(
                    f"{stream}: {window_n / (now - last):.1f} items/s, "
                    f"{window_bytes / (now - last) / 1e6:.2f} MB/s, {n} items, "
                    f"last seq {remote.state.last_seq}"
                )
                window_n = window_bytes = 0
                last = now
            if count is not None and n >= count:
                break
        click.echo(f"{stream}: received {n} items, {nbytes / 1e6:.2f} MB")
