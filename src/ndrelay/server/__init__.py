"""The relay server: `Relay` (in-process registry and producers) and `create_app`."""

from .app import create_app
from .protocol import VectoredHttpProtocol, uvicorn_config
from .relay import Relay, Settings

__all__ = ["Relay", "Settings", "VectoredHttpProtocol", "create_app", "uvicorn_config"]
