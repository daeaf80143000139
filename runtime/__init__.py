"""A Ray-free actor runtime: actors as processes, calls over shared memory and ZeroMQ.

``ActorSystem`` and ``ActorHandle`` are imported on first use, so that the
supervisor process (which imports this package) stays free of torch.
"""

from __future__ import annotations

from typing import Any

from runtime.actor import ActorHandle, actor
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
    "ActorHandle",
    "ActorRuntimeError",
    "ActorStartError",
    "ActorSystem",
    "CallTimeoutError",
    "ProtocolError",
    "RemoteError",
    "TransportError",
    "actor",
]


def __getattr__(name: str) -> Any:
    if name == "ActorSystem":
        from runtime.system import ActorSystem

        return ActorSystem
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
