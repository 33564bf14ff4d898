"""The client-side commands' connection to a relay: `--url`/`--token` options, and HTTP
calls whose failures become one-line errors (exit status 1)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import httpx

from ._errors import TOKEN_HELP, relay_url

__all__ = ["Api", "relay_options"]

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_URL = "http://127.0.0.1:8000"


def relay_options(func: F) -> F:
    """`--url` (`NDRELAY_URL`) and `--token` (`NDRELAY_TOKEN`), passed as `api`."""
    func = click.option("--token", envvar="NDRELAY_TOKEN", help=TOKEN_HELP)(func)
    func = click.option(
        "--url",
        envvar="NDRELAY_URL",
        default=DEFAULT_URL,
        show_default=True,
        callback=relay_url,
        help="The relay: [http(s)://]host:port, or unix:///path/to.sock.",
    )(func)
    return func


class Api:
    """HTTP calls to the relay at `url`; every failure raises `click.ClickException`
    with one line saying what went wrong (exit status 1)."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # reads of a stream wait as long as it is open (heartbeats keep them alive)
        timeouts = httpx.Timeout(timeout, read=None)
        if self.url.startswith("unix://"):
            path = self.url[len("unix://") :]
            if not path:
                raise click.BadParameter(f"{url!r} names no socket path", param_hint="--url")
            transport = httpx.HTTPTransport(uds=path)
            base = "http://localhost"
        elif self.url.startswith(("http://", "https://")):
            transport, base = None, self.url
        else:
            raise click.BadParameter(
                f"{url!r} is not an http://, https:// or unix:// URL", param_hint="--url"
            )
        self.client = httpx.Client(
            base_url=base, headers=headers, timeout=timeouts, transport=transport
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, response: httpx.Response, name: str | None) -> click.ClickException:
        status = response.status_code
        try:
            response.read()
            body = response.json()
            message = body.get("message") or body.get("detail") or response.text
        except (ValueError, httpx.HTTPError, AttributeError):
            message = response.text
        if isinstance(message, list | dict):
            message = json.dumps(message)
        if status == 401:
            return click.ClickException(
                f"the relay at {self.url} refused the token (401): "
                "pass --token or set NDRELAY_TOKEN"
            )
        if status == 404 and name is not None:
            return click.ClickException(f"no stream {name!r} on the relay at {self.url}")
        return click.ClickException(f"the relay answered {status}: {message}")

    def _transport(self, exc: httpx.HTTPError) -> click.ClickException:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return click.ClickException(f"cannot reach the relay at {self.url}: {reason}")
        return click.ClickException(f"connection to the relay at {self.url} failed: {reason}")

    def call(self, method: str, path: str, name: str | None = None, **kwargs: Any) -> Any:
        """A request whose answer is read whole: its JSON (or `None` for 204)."""
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport(exc) from None
        if response.status_code >= 400:
            raise self._fail(response, name)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    @contextmanager
    def stream(
        self, method: str, path: str, name: str | None = None, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """A streaming request; the response is open inside the `with` block. Errors
        while reading it become one-line `ClickException`s too."""
        try:
            with self.client.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    raise self._fail(response, name)
                yield response
        except httpx.HTTPError as exc:
            raise self._transport(exc) from None
