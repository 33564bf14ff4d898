"""Registries of named streams: the interface and its backends."""

from ._base import (
    CONSUMER_PATTERN,
    NAME_PATTERN,
    POLICIES,
    Consumer,
    Registry,
    ReplicaLeaving,
    Stream,
    StreamSpec,
    check_name,
)
from ._budget import MemoryBudget
from .memory import DEFAULT_LEASE, Block, MemoryConsumer, MemoryRegistry, MemoryStream

__all__ = [
    "CONSUMER_PATTERN",
    "DEFAULT_LEASE",
    "NAME_PATTERN",
    "POLICIES",
    "Block",
    "Consumer",
    "MemoryBudget",
    "MemoryConsumer",
    "MemoryRegistry",
    "MemoryStream",
    "Registry",
    "ReplicaLeaving",
    "Stream",
    "StreamSpec",
    "check_name",
]
