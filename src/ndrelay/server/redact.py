"""Secrets out of the logs: the bearer token (and any `?token=`) is masked in every log
record made while the relay runs: uvicorn's access and error logs, ndrelay's own,
and the text of logged exceptions."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

__all__ = ["MASK", "SecretRedactor"]

MASK = "***"

# `?token=...` / `&token=...` in a logged URL (browsers' EventSource must send it so),
# and `Bearer ...` in a logged header; whatever the value, right or wrong.
_QUERY = re.compile(r"(?i)([?&]token=)[^&\s\"']*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


class SecretRedactor:
    """Masks the token in log records, through `logging`'s record factory, so that every
    logger and handler of the process is covered (those set up later included).

    Args:
        secret: returns the current token (`None`: only `?token=` values are masked).
    """

    def __init__(self, secret: Callable[[], str | None]) -> None:
        self._secret = secret
        self._previous: Callable[..., logging.LogRecord] | None = None
        self._factory: Callable[..., logging.LogRecord] | None = None

    def redact(self, text: str) -> str:
        """`text` with the token and every `token=`/`Bearer` value masked."""
        text = _BEARER.sub(r"\1" + MASK, _QUERY.sub(r"\1" + MASK, text))
        secret = self._secret()
        if secret:
            text = text.replace(secret, MASK)
        return text

    def _value(self, value: Any) -> Any:
        return self.redact(value) if isinstance(value, str) else value

    def _clean(self, record: logging.LogRecord) -> logging.LogRecord:
        # The arguments one by one first: formatters that use them (uvicorn's access
        # log does) keep working. If the message they make still shows a secret (a
        # "Bearer %s", say), it is masked whole and the arguments dropped.
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._value(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: self._value(v) for k, v in args.items()}
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: logging reports it as usual
            text = None
        if text is not None:
            masked = self.redact(text)
            if masked != text:
                record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            # rendered now, masked, and kept: formatters use `exc_text` when it is set
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return record

    def install(self) -> None:
        """Mask from now on (idempotent)."""
        if self._factory is not None:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return self._clean(previous(*args, **kwargs))

        self._previous, self._factory = previous, factory
        logging.setLogRecordFactory(factory)

    def uninstall(self) -> None:
        """Stop masking; puts the previous record factory back if none replaced ours."""
        if self._factory is None:
            return
        if logging.getLogRecordFactory() is self._factory and self._previous is not None:
            logging.setLogRecordFactory(self._previous)
        else:  # another factory wraps ours: keep it working, as a pass-through
            self._secret = lambda: None
        self._factory = None
