"""The errors the TEE driver raises about what the untrusted GPU worker returned."""

from __future__ import annotations

__all__ = ["VerificationError", "WorkerResultError"]


class WorkerResultError(RuntimeError):
    """The GPU worker returned something other than the tensor the driver asked for."""


class VerificationError(WorkerResultError):
    """A worker result of the right type and shape failed its Freivalds check."""
