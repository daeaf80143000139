"""The chunked (pipelined) prefill with an in-process worker: the same logits as unchunked.

An in-process worker runs every call synchronously, so these tests check the wavefront's
arithmetic, ordering and accounting cheaply; the overlap itself, with a worker actor, is in
``tests/integration/test_llama_actors.py``.  Tolerances as in
``test_llama_split_inprocess.py``: 1e-4 absolute in float32, 4 % of the largest reference
logit with a bfloat16 wire.
"""

from __future__ import annotations

import json

import pytest
import torch

from actors import GPUWorker, LlamaReference, TEEDriver, VerificationError
from actors.tee_driver import AUTO_MAX_CHUNKS, AUTO_MIN_ROWS, WORKER_OPS, auto_chunk_rows
from actors.trace import split_tag
from tests.tampering_workers import TamperingWorker
from tests.unit.conftest import ids_for

TOL_F32 = 1e-4
BF16_REL = 0.04
LINEAR = ("qkv", "o_proj", "gate_up", "down")


@pytest.mark.parametrize("attention", ["tee", "worker"])
@pytest.mark.parametrize("private_io", [True, False])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("chunk_rows", [7, 32])
def test_chunked_equals_unchunked_and_the_reference(config, worker, reference, attention,
                                                    private_io, verify, chunk_rows):
    ids = ids_for(config, 70, seed=3)
    want = reference.forward(ids, all_logits=True)
    options = {"attention": attention, "private_io": private_io, "verify": verify}
    whole = TEEDriver(config, worker, seed=0, chunk_rows=0, **options)
    chunked = TEEDriver(config, worker, seed=0, chunk_rows=chunk_rows, **options)
    got = chunked.prefill(ids, all_logits=True)
    assert (got - want).abs().max().item() < TOL_F32
    assert (got - whole.prefill(ids, all_logits=True)).abs().max().item() < TOL_F32
    assert (chunked.prefill(ids) - want[-1]).abs().max().item() < TOL_F32
    s = chunked.last_prefill_stats()
    n = -(-70 // chunk_rows)
    assert s["chunks"] == n
    assert s["chunk_rows"] == chunk_rows
    assert s["ops"]["qkv"]["calls"] == n * config.num_hidden_layers
    if verify:  # every offloaded result checked, chunk by chunk
        assert s["verify"]["checks"] == s["calls"]
        assert s["verify"]["lifetime"]["failures"] == 0


@pytest.mark.parametrize("attention", ["tee", "worker"])
def test_chunked_bfloat16_wire(config, worker, reference, attention):
    ids = ids_for(config, 64, seed=5)
    want = reference.forward(ids, all_logits=True)
    drv = TEEDriver(config, worker, seed=0, wire_dtype=torch.bfloat16, attention=attention,
                    chunk_rows=24)
    got = drv.prefill(ids, all_logits=True)
    err = (got - want).abs().max().item()
    assert err < BF16_REL * want.abs().max().item()
    all_bf16 = LlamaReference(config, seed=0, dtype=torch.bfloat16)
    assert err <= (all_bf16.forward(ids, all_logits=True) - want).abs().max().item()


def test_per_op_table_chunked_as_unchunked(config, worker):
    """Bytes of every linear op are the same chunked; calls scale with the chunks."""
    ids = ids_for(config, 96)
    whole = TEEDriver(config, worker, seed=0, chunk_rows=0, private_io=False)
    chunked = TEEDriver(config, worker, seed=0, chunk_rows=25, private_io=False)
    whole.prefill(ids)
    chunked.prefill(ids)
    a, b = whole.last_prefill_stats()["ops"], chunked.last_prefill_stats()["ops"]
    for op in LINEAR:
        assert b[op]["calls"] == 4 * a[op]["calls"], op
        assert (b[op]["bytes_out"], b[op]["bytes_in"]) == (a[op]["bytes_out"],
                                                           a[op]["bytes_in"]), op
        assert b[op]["checks"] == b[op]["calls"]
        assert b[op]["worker_s"] > 0
    for op in ("embedding", "lm_head"):  # once per prefill either way
        assert {k: b[op][k] for k in ("calls", "bytes_out", "bytes_in")} == \
            {k: a[op][k] for k in ("calls", "bytes_out", "bytes_in")}, op
    assert b["attention"]["calls"] == 4 * a["attention"]["calls"]


def test_generation_with_a_chunked_prefill(config, worker):
    ids = ids_for(config, 40, seed=9)
    want = TEEDriver(config, worker, seed=0, chunk_rows=0).generate(ids, 12)
    drv = TEEDriver(config, worker, seed=0, chunk_rows=16)
    assert drv.generate(ids, 12).tolist() == want.tolist()
    stats = drv.last_generate_stats()
    assert stats["prefill"]["chunks"] == 3
    assert stats["decode"]["calls"] == 4 * config.num_hidden_layers * stats["steps"]


@pytest.mark.parametrize(("lie", "target", "attention"), [
    ("one_element", "batch_linear", "tee"), ("stale", "batch_linear", "tee"),
    ("nan", "matmul", "worker")])
def test_a_lie_in_any_chunk_is_caught(config, lie, target, attention):
    liar = TamperingWorker(config, lie, target, seed=0, device="cpu")
    drv = TEEDriver(config, liar, seed=0, attention=attention, chunk_rows=10)
    with pytest.raises(VerificationError, match="Freivalds"):
        drv.prefill(ids_for(config, 40))
    assert liar.lies_told >= 1


def test_the_automatic_rule():
    cuda = {"worker_device": "cuda", "cores": 16, "tee_threads": 16, "worker_threads": 16}
    # A short prompt is never cut: every chunk costs a call per offloaded op.
    for t in (1, 7, AUTO_MIN_ROWS, 2 * AUTO_MIN_ROWS - 1):
        assert auto_chunk_rows(t, **cuda) == t
    assert auto_chunk_rows(2 * AUTO_MIN_ROWS, **cuda) == AUTO_MIN_ROWS
    assert auto_chunk_rows(1024, **cuda) == 1024 // min(AUTO_MAX_CHUNKS, 1024 // AUTO_MIN_ROWS)
    assert auto_chunk_rows(100_000, **cuda) == -(-100_000 // AUTO_MAX_CHUNKS)
    # A CPU worker sharing the TEE's cores takes turns with it: nothing to overlap.
    cpu = {"worker_device": "cpu", "cores": 2, "tee_threads": 2, "worker_threads": 2}
    assert auto_chunk_rows(1024, **cpu) == 1024
    cpu_many = {"worker_device": "cpu", "cores": 16, "tee_threads": 8, "worker_threads": 8}
    assert auto_chunk_rows(1024, **cpu_many) == auto_chunk_rows(1024, **cuda)


class _HandleLike:
    """A worker that answers ``.remote`` like an actor handle, synchronously."""

    def __init__(self, worker, device_type):
        self._worker, self._type = worker, device_type

    def device_info(self):
        return {**self._worker.device_info(), "type": self._type, "threads": 1}

    def __getattr__(self, name):
        fn = getattr(self._worker, name)

        class _Method:
            def __call__(self, *a, **kw):
                return fn(*a, **kw)

            def remote(self, *a, **kw):
                from concurrent.futures import Future

                fut = Future()
                fut.set_result(fn(*a, **kw))
                fut.wire = ["shm", 0, "shm", 0]
                return fut

        return _Method()


def test_chunk_plan(config, worker, reference):
    assert TEEDriver(config, worker, seed=0).chunk_plan(1024) == [(0, 1024)]  # in-process
    assert TEEDriver(config, worker, seed=0, chunk_rows=0).chunk_plan(9) == [(0, 9)]
    assert TEEDriver(config, worker, seed=0, chunk_rows=4).chunk_plan(9) == [
        (0, 4), (4, 8), (8, 9)]
    with pytest.raises(ValueError, match="chunk_rows"):
        TEEDriver(config, worker, seed=0, chunk_rows=-1)
    handle = _HandleLike(worker, "cuda")
    drv = TEEDriver(config, handle, seed=0, attention="tee")
    assert drv.chunk_plan(100) == [(0, 100)]  # short: one chunk
    assert len(drv.chunk_plan(1024)) == min(AUTO_MAX_CHUNKS, 1024 // AUTO_MIN_ROWS)
    # Futures all the way (the pipelined path), still the reference's logits.
    ids = ids_for(config, 2 * AUTO_MIN_ROWS + 3, seed=4)
    got = drv.prefill(ids, all_logits=True)
    assert (got - reference.forward(ids, all_logits=True)).abs().max().item() < TOL_F32
    s = drv.last_prefill_stats()
    assert s["chunks"] == 2
    assert s["routes"] is None  # not an actor: no channel counters
    assert s["ops"]["qkv"]["routes"]["shm"]["messages"] == 2 * s["ops"]["qkv"]["calls"]


def test_worker_compute_is_per_driver(config):
    """Two drivers sharing one worker: each counts only its own calls' compute."""
    gpu = GPUWorker(config, seed=0, device="cpu")
    a = TEEDriver(config, gpu, seed=0, chunk_rows=8)
    b = TEEDriver(config, gpu, seed=0)
    a.prefill(ids_for(config, 32))
    b.prefill(ids_for(config, 32))
    a.prefill(ids_for(config, 32))
    per_tag = gpu.compute_stats()
    for drv, n in ((a, 2 * 4), (b, 1)):  # chunks x prefills
        tags = {op: t for op, t in drv._tags.items() if t in per_tag}
        assert {split_tag(t)[0] for t in tags.values()} == set(LINEAR)
        assert all(per_tag[t]["calls"] == n * config.num_hidden_layers for t in tags.values())
    s = a.last_prefill_stats()["ops"]
    assert all(s[op]["worker_s"] > 0 for op in LINEAR)
    assert all(op in WORKER_OPS for op in LINEAR)


def test_trace_in_process(config, worker, tmp_path):
    drv = TEEDriver(config, worker, seed=0, chunk_rows=16)
    with pytest.raises(RuntimeError, match="traced"):
        drv.last_trace()
    drv.prefill(ids_for(config, 48), trace=True)
    trace = json.loads(json.dumps(drv.last_trace()))
    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["cat"] for e in spans} >= {"prefill", "tee", "call", "worker"}
    worker_spans = [e for e in spans if e["cat"] == "worker"]
    assert len(worker_spans) == 3 * 4 * config.num_hidden_layers  # chunks x ops x layers
    assert {e["name"] for e in worker_spans} == set(LINEAR)
    assert trace["otherData"]["chunks"] == 3
    # Tracing is per prefill: the next one, untraced, leaves the last trace alone.
    drv.prefill(ids_for(config, 8))
    assert drv.last_trace()["otherData"]["tokens"] == 48
