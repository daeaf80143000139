"""The worker's bookkeeping replies are the adversary's too (found by an adversarial review).

``compute_stats``, ``device_info`` and ``trace_events`` are not results: nothing checks
them, and the TEE only uses them for its own accounting, chunk plan and timeline.  A
hostile value there crashed a prefill after every check had passed (``OverflowError``
from a 400-digit int, ``ValueError`` from ``int(nan)`` on every prefill, ``ValueError``
from a malformed trace).  Now such a value is ignored, with a warning where it matters.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver
from actors.gpu_worker import TRACE_CAPACITY
from runtime import codec
from tests.unit.test_prefill_pipeline import _HandleLike as _PipelineHandle


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.preset("tiny")


def _ids(config: LlamaConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (8,), generator=torch.Generator().manual_seed(0))


class _BigStats(GPUWorker):
    def compute_stats(self, reset=False):
        return {k: {**v, "seconds": 10 ** 400} for k, v in super().compute_stats(reset).items()}


class _BadTrace(GPUWorker):
    def trace_events(self, reset=True, since_ns=0):
        return {"pid": "x", "events": [["a", "b", "c", 1]]}


class _HandleLike(_PipelineHandle):
    """A worker answering ``.remote`` like an actor handle, with ``threads`` of our choice in
    its device_info (an actor worker's chunk plan reads it on every prefill)."""

    def __init__(self, worker, threads):
        super().__init__(worker, "cpu")
        self._threads = threads

    def device_info(self):
        return {**self._worker.device_info(), "threads": self._threads}


def test_a_huge_compute_stats_value_does_not_crash_a_prefill(config):
    drv = TEEDriver(config, _BigStats(config, seed=0, device="cpu"), seed=0)
    got = drv.prefill(_ids(config))
    want = LlamaReference(config, seed=0).forward(_ids(config))
    assert (got - want).abs().max().item() < 1e-4
    assert drv.last_prefill_stats()["worker_s"] is None  # unknown, not made up


def test_a_malformed_trace_costs_the_worker_track_only(config, caplog):
    drv = TEEDriver(config, _BadTrace(config, seed=0, device="cpu"), seed=0)
    drv.prefill(_ids(config), trace=True)
    trace = drv.last_trace()
    assert any(e.get("cat") == "tee" for e in trace["traceEvents"])
    assert not any(e.get("cat") == "worker" for e in trace["traceEvents"])
    assert "malformed" in caplog.text


@pytest.mark.parametrize("threads", [float("nan"), float("inf"), True, -3, 10 ** 30, "8"])
def test_a_bad_thread_count_in_device_info_is_ignored(config, threads, caplog):
    drv = TEEDriver(config, _HandleLike(GPUWorker(config, seed=0, device="cpu"), threads),
                    seed=0)
    assert "threads" not in drv.worker_device
    drv.prefill(_ids(config))
    drv.prefill(_ids(config))


class _TensorTrace(GPUWorker):
    def trace_events(self, reset=True, since_ns=0):
        return {"pid": 1, "events": [["batch_linear", torch.zeros(2), torch.zeros(2), 1]]}


class _TensorRows(GPUWorker):
    def trace_events(self, reset=True, since_ns=0):
        now = time.monotonic_ns()
        return {"pid": 1, "events": [["batch_linear", now - 10 ** 6, now, torch.zeros(3)]]}


@pytest.mark.parametrize("worker", [_TensorTrace, _TensorRows], ids=["times", "rows"])
def test_a_trace_with_tensors_in_it_costs_the_worker_track_only(config, worker):
    """Found in a second review: tensors for a span's times raised RuntimeError (not among
    the errors first caught), and a tensor for its rows went into the trace, which then
    could not be written as JSON.  The reply is now validated field by field."""
    drv = TEEDriver(config, worker(config, seed=0, device="cpu"), seed=0)
    drv.prefill(_ids(config), trace=True)
    trace = drv.last_trace()
    assert not any(e.get("cat") == "worker" for e in trace["traceEvents"])
    json.dumps(trace)


def test_a_huge_int_in_device_info_does_not_crash_every_prefill(config):
    """A 5000-digit int as the device's type made every prefill of an actor worker raise
    ValueError in str() (Python's int-to-string limit)."""

    class HugeType(_HandleLike):
        def device_info(self):
            return {**self._worker.device_info(), "type": 10 ** 5000}

    drv = TEEDriver(config, HugeType(GPUWorker(config, seed=0, device="cpu"), 1), seed=0)
    assert "type" not in drv.worker_device
    drv.prefill(_ids(config), trace=True)


def test_an_honest_workers_full_trace_reply_decodes_in_safe_mode():
    """The first cap on values per safe message (2^18) was below an honest worker's fullest
    trace reply: TRACE_CAPACITY spans of 5 values each."""
    worker = GPUWorker(LlamaConfig.preset("tiny"), seed=0, device="cpu")
    t0 = time.monotonic_ns()
    for _ in range(TRACE_CAPACITY):
        worker._account("batch_linear", t0, 16)
    enc = codec.encode((7, True, worker.trace_events(reset=False, since_ns=t0)), envelope=1)
    out = codec.decode(enc.header, enc.buffers, safe=True, envelope=1)
    assert len(out[2]["events"]) == TRACE_CAPACITY
