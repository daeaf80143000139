"""A Ray-free actor runtime: actors as processes, calls over shared memory and ZeroMQ."""

from __future__ import annotations

from runtime.actor import actor
from runtime.errors import (
    ActorDiedError,
    ActorRuntimeError,
    ActorStartError,
    CallTimeoutError,
    ProtocolError,
    RemoteError,
    TransportError,
)

__all__ = [
    "ActorDiedError",
    "ActorRuntimeError",
    "ActorStartError",
    "CallTimeoutError",
    "ProtocolError",
    "RemoteError",
    "TransportError",
    "actor",
]
