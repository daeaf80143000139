"""The application: split LLaMA prefill between a TEE driver and an untrusted GPU worker."""

from __future__ import annotations

from actors.errors import VerificationError, WorkerResultError
from actors.gpu_worker import GPUWorker
from actors.llama import LlamaConfig, LlamaReference
from actors.tee_driver import TEEDriver

__all__ = ["GPUWorker", "LlamaConfig", "LlamaReference", "TEEDriver", "VerificationError",
           "WorkerResultError"]
