"""How client-side commands take a relay's address and report its errors: one line,
exit status 1, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

__all__ = ["TOKEN_HELP", "relay_errors", "relay_url"]

#: `--token` of the client-side commands.
TOKEN_HELP = "Bearer token of the relay (its --token); default: none."


def relay_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Report the relay's errors (refused connection, unknown stream, shutdown, ...) as
    one line and exit status 1, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from .._exceptions import NDRelayError

        try:
            func(*args, **kwargs)
        except NDRelayError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def relay_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback for a relay URL argument or option: `http://` is assumed without
    a scheme (`localhost:8000`); anything else unusable is a one-line usage error."""
    if value is None:
        return None
    from .._client import relay_url as normalise

    try:
        return normalise(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
