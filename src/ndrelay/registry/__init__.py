"""Registries of named streams: the interface and its backends."""

from ._base import NAME_PATTERN, POLICIES, Consumer, Registry, Stream, StreamSpec, check_name
from .memory import Block, MemoryConsumer, MemoryRegistry, MemoryStream

__all__ = [
    "NAME_PATTERN",
    "POLICIES",
    "Block",
    "Consumer",
    "MemoryConsumer",
    "MemoryRegistry",
    "MemoryStream",
    "Registry",
    "Stream",
    "StreamSpec",
    "check_name",
]
