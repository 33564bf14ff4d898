"""How client-side commands report the relay's errors: one line, exit status 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

__all__ = ["relay_errors"]


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
