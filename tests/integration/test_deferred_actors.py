"""Results computed straight into the reply (``codec.DeferredTensor``) through real actors,
and the CPU ``GPUWorker`` that uses them: the same values as in-process, on every route."""

from __future__ import annotations

import threading

import pytest
import torch

from actors import GPUWorker, LlamaConfig
from runtime import ActorSystem, RemoteError, actor
from runtime.actor import serving
from runtime.codec import DeferredTensor

MIB = 1 << 20


@actor(borrow_args=True)
class Scaler:
    """Returns ``x * k`` computed into the reply when serving a remote call."""

    def scaled(self, x: torch.Tensor, k: float):
        if not serving(self, Scaler.scaled):
            return x * k
        # x is a view of the received record: the fill reads it after this method returned.
        return DeferredTensor(x.shape, x.dtype, lambda out: torch.mul(x, k, out=out))

    def twice_scaled(self, x: torch.Tensor, k: float):
        return self.scaled(x, k) * 2  # scaled is not what the serve loop called: a tensor

    def failing(self, n: int, exc: type[BaseException] = ZeroDivisionError):
        def fill(out):
            raise exc("the product failed")
        return DeferredTensor((n,), torch.float32, fill)

    def where(self):
        other = []
        t = threading.Thread(target=lambda: other.append(serving(self, Scaler.where)))
        t.start()
        t.join()
        return {"me": serving(self, Scaler.where), "stranger": serving(Scaler(), Scaler.where),
                "thread": other[0], "other method": serving(self, Scaler.scaled)}


class Cancelled(BaseException):
    """Not an ``Exception``: what a method may raise and its caller still hear about."""


@pytest.fixture
def scaler():
    with ActorSystem(shm_threshold=MIB) as system:
        yield system.spawn(Scaler)


@pytest.mark.parametrize("numel", [1000, 2 * MIB], ids=["ring", "pool"])
def test_a_deferred_result_computed_from_borrowed_arguments(scaler, numel):
    """(That the record outlives the method is tested on the serve loop itself, in
    tests/unit/test_deferred.py.)"""
    x = torch.randn(numel)
    got = scaler.scaled(x, 3.0)
    assert type(got) is torch.Tensor and torch.equal(got, x * 3.0)
    assert torch.equal(scaler.twice_scaled(x, 3.0), x * 6.0)
    assert torch.equal(Scaler().scaled(x, 3.0), x * 3.0)  # in-process: a real tensor


@pytest.mark.parametrize("exc", [ZeroDivisionError, Cancelled])
def test_a_fill_that_fails_is_that_calls_error_and_the_actor_goes_on(scaler, exc):
    for n in (100, 4 * MIB):
        with pytest.raises(RemoteError, match="the product failed") as info:
            scaler.failing(n, exc)
        assert exc.__name__ in info.value.remote_type  # as when the method itself raises
    assert torch.equal(scaler.scaled(torch.ones(4), 2.0), torch.full((4,), 2.0))


def test_serving_names_only_the_served_instance_and_method_on_its_thread(scaler):
    assert scaler.where() == {"me": True, "stranger": False, "thread": False,
                              "other method": False}


# -- the CPU worker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.preset("tiny")


@pytest.mark.parametrize("threshold", [MIB, MIB // 16], ids=["ring", "pool"])
def test_a_cpu_workers_deferred_results_equal_its_in_process_ones(config, threshold):
    local = GPUWorker(config, seed=0, device="cpu")
    x = torch.randn(300, config.hidden_size)
    a = torch.randn(4, 300, config.head_dim)
    b = torch.randn(2, 1, 300, config.head_dim)
    ids = torch.arange(300) % config.vocab_size
    with ActorSystem(shm_threshold=threshold) as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu", defer_min_bytes=0)
        for names in (("q", "k", "v"), ("k", "v"), ("q",), ("gate", "up"), ("up",)):
            got = gpu.batch_linear(1, names, x, tag="t")
            want = local.batch_linear(1, names, x)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert type(g) is torch.Tensor and torch.allclose(g, w, atol=1e-5)
        y = gpu.batch_linear(0, ("down",), torch.randn(2, 150, config.intermediate_size))[0]
        assert y.shape == (2, 150, config.hidden_size)
        for transpose_b, bb in ((True, b), (False, b.transpose(-1, -2))):
            got = gpu.matmul(a.view(2, 2, 300, -1), bb, transpose_b=transpose_b)  # broadcast
            want = local.matmul(a.view(2, 2, 300, -1), bb, transpose_b=transpose_b)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(gpu.lm_head(x), local.lm_head(x), atol=1e-5)
        assert torch.equal(gpu.embedding(ids), local.embedding(ids))
        assert gpu.lm_head(x[:0]).shape == (0, config.vocab_size)  # empty: nothing to fill
        # Computed into the reply (9 results of 5 calls tagged "t"), counted as their work.
        stats = gpu.compute_stats()
        assert stats["t"]["calls"] == 5 and stats["t"]["deferred"] == 9
        assert stats["t"]["seconds"] > 0
        assert stats["lm_head"]["deferred"] == 1 and stats["embedding"]["deferred"] == 1
        spans = gpu.trace_events()["events"]
        assert all(end >= start for _, start, end, _ in spans)
        # A result in another dtype than the worker's is computed, then converted: as before.
        got16 = gpu.batch_linear(1, ("q",), x.bfloat16())[0]
        assert got16.dtype == torch.bfloat16
        assert torch.allclose(got16.float(), local.batch_linear(1, ("q",), x)[0], atol=0.1)
        # Errors found before any deferral still come back as the call's error.
        with pytest.raises(RemoteError, match="layer must be"):
            gpu.batch_linear(9, ("q",), x)


def test_defer_min_bytes_is_checked(config):
    with pytest.raises(ValueError, match="defer_min_bytes"):
        GPUWorker(config, seed=0, device="cpu", defer_min_bytes=-1)


class PlainWorker(GPUWorker):
    """A subclass that overrides nothing (spawnable: ``@actor``'s mark is inherited)."""


@pytest.mark.parametrize("defer", [None, 0])
def test_a_worker_subclass_gets_tensors_from_super(config, defer):
    """An override calling ``super().batch_linear`` is served, but ``batch_linear`` is not
    what the serve loop called: its results must be tensors to work on (found in review:
    a ``TamperingWorker`` failed on ``.clone()`` of a DeferredTensor)."""
    from tests.tampering_workers import TamperingWorker

    x = torch.randn(512, config.hidden_size)
    with ActorSystem() as system:
        gpu = system.spawn(TamperingWorker, config, "zeros", "batch_linear", seed=0,
                           device="cpu", defer_min_bytes=defer)
        (q,) = gpu.batch_linear(0, ("q",), x)
        assert torch.equal(q, torch.zeros(512, config.q_size))
        assert gpu.compute_stats()["batch_linear:q"]["deferred"] == 0
        # A subclass that overrides nothing still defers.
        plain = system.spawn(PlainWorker, config, seed=0, device="cpu", defer_min_bytes=defer)
        assert plain.lm_head(x).shape == (512, config.vocab_size)
        assert plain.compute_stats()["lm_head"]["deferred"] == (0 if defer is None else 1)
