"""What the unit tests share: a private directory for channel files, and the tiny LLaMA of
the split's tests (a module may define its own)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference


@pytest.fixture
def private_dir():
    """A fresh directory for doorbells and ZeroMQ sockets, emptied and removed after."""
    d = tempfile.mkdtemp(prefix="rtp")  # short: ipc:// paths are limited to 107 bytes
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.preset("tiny")


@pytest.fixture(scope="module")
def worker(config) -> GPUWorker:
    return GPUWorker(config, seed=0, device="cpu")


@pytest.fixture(scope="module")
def reference(config) -> LlamaReference:
    return LlamaReference(config, seed=0)


def ids_for(config: LlamaConfig, t: int, seed: int = 0) -> torch.Tensor:
    """``t`` random token ids of ``config``'s vocabulary, reproducible by ``seed``."""
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))
