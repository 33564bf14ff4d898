"""The relay server: `Relay` (in-process registry and producers) and `create_app`."""

from .app import create_app
from .relay import Relay, Settings

__all__ = ["Relay", "Settings", "create_app"]
