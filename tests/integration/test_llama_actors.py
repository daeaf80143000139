"""The split prefill through real actor processes equals the in-process reference.

Tolerances as in ``tests/unit/test_llama_split_inprocess.py``: 1e-4 absolute in float32;
with a bfloat16 wire, 4 % of the largest reference logit.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver, VerificationError
from runtime import ActorSystem, RemoteError

TOL_F32 = 1e-4
BF16_REL = 0.04
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.preset("tiny")


@pytest.fixture(scope="module")
def reference(config) -> LlamaReference:
    return LlamaReference(config, seed=0)


def ids_for(config: LlamaConfig, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["tee", "worker"])
def test_actor_split_equals_reference(config, reference, attention):
    ids = ids_for(config, 80)
    want = reference.forward(ids, all_logits=True)
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0, attention=attention)
        got = drv.prefill(ids, all_logits=True)
        assert got.shape == want.shape
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() < TOL_F32
        last = drv.prefill(ids)
        assert (last - want[-1]).abs().max().item() < TOL_F32
        stats = drv.last_prefill_stats()
        assert stats["policy"] == attention
        assert stats["routes"] is not None
        assert stats["routes"]["shm"]["messages"] > 0
        assert stats["ops"]["qkv"]["routes"]["shm"]["messages"] >= config.num_hidden_layers
        bf = system.spawn(TEEDriver, config, gpu, seed=0, wire_dtype=torch.bfloat16,
                          attention=attention)
        got16 = bf.prefill(ids, all_logits=True)
        assert (got16 - want).abs().max().item() < BF16_REL * want.abs().max().item()
        assert bf.last_prefill_stats()["wire_dtype"] == "bfloat16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("threshold", [None, MIB // 4], ids=["ring", "pool"])
def test_a_cuda_worker_copies_straight_between_records_and_the_device(config, reference,
                                                                     threshold):
    """On CUDA the worker registers its transport mappings and stages nothing: inputs
    borrowed from the record go host-to-device, results device-to-host into the reply."""
    ids = ids_for(config, 512, seed=2)
    want = reference.forward(ids, all_logits=True)
    opts = {} if threshold is None else {"shm_threshold": threshold}
    with ActorSystem(**opts) as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cuda")
        drv = system.spawn(TEEDriver, config, gpu, seed=0, private_io=False)
        got = drv.prefill(ids, all_logits=True)
        assert (got - want).abs().max().item() < TOL_F32
        info = gpu.device_info()
        assert info["type"] == "cuda"
        assert info["host_memory"]["registered"] >= 2 and info["host_memory"]["failures"] == 0


@pytest.mark.parametrize(("attention", "threshold"), [("worker", 1 * MIB), ("tee", MIB // 4)])
def test_both_routes_carry_traffic(config, reference, attention, threshold):
    # T=512 on tiny: the score matrices are [2, 1024, 512] float32 = 4 MiB, gate/up replies
    # 512 KiB, q/k/v inputs 128 KiB: some messages sit above the threshold, some below.
    ids = ids_for(config, 512, seed=1)
    want = reference.forward(ids)
    with ActorSystem(shm_threshold=threshold) as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0, attention=attention)
        got = drv.prefill(ids)
        stats = drv.last_prefill_stats()
    assert (got - want).abs().max().item() < TOL_F32
    routes = stats["routes"]
    assert routes["shm"]["messages"] > 0
    assert routes["zmq"]["messages"] > 0
    assert routes["zmq"]["bytes"] > threshold
    big = "scores" if attention == "worker" else "gate_up"
    assert stats["ops"][big]["routes"]["zmq"]["messages"] >= config.num_hidden_layers
    assert stats["ops"]["qkv"]["routes"]["shm"]["messages"] > 0
    assert stats["transport_s"] is not None
    assert stats["worker_s"] > 0


def test_driver_in_this_process_with_a_worker_handle(config, reference):
    ids = ids_for(config, 33)
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        assert gpu.pid != os.getpid()
        drv = TEEDriver(config, gpu, seed=0)  # plain object, talking to the worker actor
        got = drv.prefill(ids)
        stats = drv.last_prefill_stats()
    assert (got - reference.forward(ids)).abs().max().item() < TOL_F32
    assert stats["routes"]["shm"]["messages"] > 0
    assert stats["worker_device"]["type"] == "cpu"


def test_worker_errors_reach_the_driver(config):
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        # An untrusted actor's exceptions are not unpickled: a RemoteError naming the type.
        with pytest.raises(RemoteError, match="layer must be") as info:
            gpu.batch_linear(99, ("q",), torch.zeros(1, config.hidden_size))
        assert "ValueError" in info.value.remote_type
        # Results of the untrusted worker are plain values: tensors, tuples, dicts of numbers.
        q, _k, v = gpu.batch_linear(0, ("q", "k", "v"), torch.zeros(2, config.hidden_size))
        assert q.shape == (2, config.q_size)
        assert v.shape == (2, config.kv_size)
        assert gpu.compute_stats()["batch_linear:q+k+v"]["calls"] == 1


def _load_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "llama_prefill.py"
    spec = importlib.util.spec_from_file_location("llama_prefill_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_runs_and_verifies(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the example sets; undone after
    example = _load_example()
    out = tmp_path / "result.json"
    trace = tmp_path / "trace.json"
    assert example.main(["--tokens", "48", "--attention", "worker", "--threshold", "65536",
                         "--chunk-rows", "16", "--trace", str(trace),
                         "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit error" in printed
    assert "OK" in printed
    assert "transport" in printed
    assert "3 chunk(s) of 16 rows" in printed
    result = json.loads(out.read_text())
    assert result["ok"]
    assert result["max_abs_error"] <= result["tolerance"]
    assert result["stats"]["policy"] == "worker"
    assert result["stats"]["tokens"] == 48
    events = json.loads(trace.read_text())["traceEvents"]
    assert len({e["pid"] for e in events}) == 2
    assert {"scores", "context", "qkv"} <= {e["name"] for e in events if e.get("cat") == "worker"}
    # A tolerance nobody can meet makes the example fail.
    assert example.main(["--tokens", "8", "--tolerance", "-1"]) == 1


def test_example_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the example sets; undone after
    transformers = pytest.importorskip("transformers")
    from actors.llama import load_weights

    config = LlamaConfig.preset("tiny")
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager"))
    model.load_state_dict(load_weights(config, list(model.state_dict()), seed=7))
    model.save_pretrained(tmp_path / "ckpt")
    example = _load_example()
    assert example.main(["--checkpoint", str(tmp_path / "ckpt"), "--tokens", "24",
                         "--wire-dtype", "bfloat16"]) == 0
    assert "checkpoint" in capsys.readouterr().out


# -- the trust boundary with real actor processes (issue 9, parts 2 and 3) --------------------

@pytest.mark.parametrize(("lie", "target", "attention"), [
    ("one_element", "batch_linear", "tee"), ("swap", "batch_linear", "worker"),
    ("stale", "matmul", "worker"), ("nan", "matmul", "worker")])
def test_a_lying_worker_actor_is_caught(config, lie, target, attention):
    from tests.tampering_workers import TamperingWorker

    ids = ids_for(config, 40)
    with ActorSystem() as system:
        gpu = system.spawn(TamperingWorker, config, lie, target, seed=0, device="cpu")
        # A driver in this process gets the error itself...
        drv = TEEDriver(config, gpu, seed=0, attention=attention)
        with pytest.raises(VerificationError, match="Freivalds"):
            drv.prefill(ids)
        # ...and a driver actor's caller gets it through the runtime, type kept.
        drv_actor = system.spawn(TEEDriver, config, gpu, seed=0, attention=attention)
        with pytest.raises(RemoteError) as info:
            drv_actor.prefill(ids)
        assert isinstance(info.value, VerificationError) \
            or "VerificationError" in getattr(info.value, "remote_type", ""), repr(info.value)
        assert gpu.told() >= 2


def test_spy_worker_actor_sees_no_token_id(config, reference):
    from tests.tampering_workers import SpyWorker

    ids = ids_for(config, 50)
    with ActorSystem() as system:
        spy = system.spawn(SpyWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, spy, seed=0, attention="worker")
        got = drv.prefill(ids, all_logits=True)
        seen = spy.seen()
        stats = drv.last_prefill_stats()
    assert (got - reference.forward(ids, all_logits=True)).abs().max().item() < TOL_F32
    assert {m for m, _ in seen} == {"device_info", "batch_linear", "matmul"}
    assert {d for _, ds in seen for d in ds if d.startswith("tensor")} == {"tensor[float32]"}
    assert stats["verify"]["checks"] == stats["calls"] == 6 * config.num_hidden_layers
    assert stats["verify"]["lifetime"]["failures"] == 0


# -- the pipelined prefill through actors (issue 8, items 5 and 7) -------------------------------

def _routes(handle) -> dict[str, tuple[int, int]]:
    r = handle.stats()["routes"]
    return {k: (v["messages"], v["bytes"]) for k, v in r.items()}


class _Forwarding:
    """A worker handle behind a wrapper: methods (with ``.remote``) and ``stats()``, but no
    per-call record (``call_with_wire``)."""

    def __init__(self, handle):
        self._handle = handle

    def stats(self):
        return self._handle.stats()

    def __getattr__(self, name):
        method = getattr(self._handle, name)

        def forward(*a, **k):
            return method(*a, **k)

        forward.remote = method.remote
        return forward


def test_a_worker_handle_without_call_records_is_counted_from_its_channel(config):
    """Review V: blocking calls through a handle that keeps no per-call record were counted
    as no message at all, while ``stats()`` said the routes were known.  They are counted
    from the channel's counters around each call, as before per-call records."""
    ids = ids_for(config, 24, seed=3)
    with ActorSystem(shm_threshold=48 * 1024) as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = TEEDriver(config, _Forwarding(gpu), seed=0, private_io=False, chunk_rows=0)
        drv.prefill(ids)  # warm-up: the worker now knows this driver's tags
        before = _routes(gpu)
        drv.prefill(ids)
        after = _routes(gpu)
        gpu.compute_stats()
        extra = _routes(gpu)
        s = drv.last_prefill_stats()
        for route in ("shm", "zmq"):
            one = [extra[route][i] - after[route][i] for i in (0, 1)]
            channel = [after[route][i] - before[route][i] - 2 * one[i] for i in (0, 1)]
            assert [s["routes"][route]["messages"], s["routes"][route]["bytes"]] == channel
        assert s["routes"]["shm"]["messages"] == 2 * s["calls"]


def test_chunked_prefill_accounting_is_exact(config, reference):
    """Per call, not by diffing the channel around each call: with several calls in flight
    the per-op table is what an unchunked prefill reports (calls times the chunks), and its
    totals are the channel's own counters."""
    ids = ids_for(config, 240, seed=2)
    want = reference.forward(ids)
    tables = {}
    with ActorSystem(shm_threshold=48 * 1024) as system:  # gate_up replies go by ZeroMQ
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        for rows in (0, 60):
            drv = TEEDriver(config, gpu, seed=0, private_io=False, chunk_rows=rows)
            drv.prefill(ids)  # warm-up: the worker now knows this driver's tags
            before = _routes(gpu)
            got = drv.prefill(ids)
            after = _routes(gpu)
            gpu.compute_stats()  # one more bookkeeping call, as the driver makes two per prefill
            extra = _routes(gpu)
            s = drv.last_prefill_stats()
            assert (got - want).abs().max().item() < TOL_F32
            for route in ("shm", "zmq"):
                one = [extra[route][i] - after[route][i] for i in (0, 1)]
                channel = [after[route][i] - before[route][i] - 2 * one[i] for i in (0, 1)]
                assert [s["routes"][route]["messages"], s["routes"][route]["bytes"]] == \
                    channel, (rows, route)
            assert s["routes"]["zmq"]["messages"] > 0 and s["routes"]["shm"]["messages"] > 0
            tables[rows] = s
    whole, chunked = tables[0], tables[60]
    assert chunked["chunks"] == 4 and whole["chunks"] == 1
    for op in ("qkv", "o_proj", "gate_up", "down"):
        a, b = whole["ops"][op], chunked["ops"][op]
        assert b["calls"] == 4 * a["calls"]
        assert (b["bytes_out"], b["bytes_in"]) == (a["bytes_out"], a["bytes_in"])
        assert b["routes"]["shm"]["messages"] + b["routes"]["zmq"]["messages"] == 2 * b["calls"]
        assert b["checks"] == b["calls"]
        assert b["worker_s"] > 0
    for op in ("embedding", "lm_head"):  # blocking calls, once per prefill either way
        w, c = whole["ops"][op]["routes"], chunked["ops"][op]["routes"]
        assert {r: v["messages"] for r, v in w.items()} == \
            {r: v["messages"] for r, v in c.items()}
        # The same bytes but for the call's tag, which names its driver ("pid.n"): one more
        # digit when the process's driver count passes 10, 100... (the full suite: 2068/2069).
        assert all(abs(w[r]["bytes"] - c[r]["bytes"]) <= 2 for r in w), (w, c)
    assert chunked["in_flight_s"] > 0
    assert chunked["wait_s"] <= chunked["total_s"]


def test_two_drivers_pipeline_on_one_worker(config, reference):
    ids = [ids_for(config, 200, seed=s) for s in (1, 2)]
    want = [reference.forward(i, all_logits=True) for i in ids]
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drivers = [system.spawn(TEEDriver, config, gpu, seed=0, chunk_rows=50, attention=att)
                   for att in ("tee", "worker")]
        for _ in range(2):  # concurrently, twice
            futures = [d.prefill.remote(i, all_logits=True) for d, i in zip(drivers, ids,
                                                                            strict=True)]
            for fut, w in zip(futures, want, strict=True):
                assert (fut.result(timeout=120) - w).abs().max().item() < TOL_F32
        per_tag = gpu.compute_stats()
        for d in drivers:
            s = d.last_prefill_stats()
            assert s["chunks"] == 4
            assert s["verify"]["lifetime"]["failures"] == 0
            # The worker's counters are keyed by this driver's tags: its own calls only.
            mine = {k: v for k, v in per_tag.items() if k.endswith(f"@{d.pid}.0")}
            assert mine["qkv@" + f"{d.pid}.0"]["calls"] == 2 * 4 * config.num_hidden_layers
            assert sum(v["calls"] for v in mine.values()) == 2 * s["calls"]


def test_trace_of_a_pipelined_prefill(config, tmp_path):
    ids = ids_for(config, 256, seed=3)
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0, chunk_rows=64)
        drv.prefill(ids)
        drv.prefill(ids, trace=True)
        trace = json.loads(json.dumps(drv.last_trace()))  # plain JSON all the way
        driver_pid, worker_pid = drv.pid, gpu.pid
    events = trace["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
    assert names == {(driver_pid, f"TEE driver (pid {driver_pid})"),
                     (worker_pid, f"GPU worker (pid {worker_pid})")}
    (total,) = [e for e in events if e["ph"] == "X" and e["name"] == "prefill"]
    end = total["dur"]
    spans = [e for e in events if e["ph"] == "X" and e is not total]
    assert {e["pid"] for e in spans} == {driver_pid, worker_pid}
    for e in spans:  # on the prefill's clock, inside it
        assert e["dur"] >= 0 and e["ts"] >= -1.0 and e["ts"] + e["dur"] <= end + 1.0, e

    def track(pid, tid):
        return sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                      if e["pid"] == pid and e["tid"] == tid)

    # One thread each: spans of a track follow each other.
    for pid, tid in ((driver_pid, 1), (driver_pid, 2), (worker_pid, 10)):
        t = track(pid, tid)
        assert t, (pid, tid)
        assert all(a[1] <= b[0] + 1.0 for a, b in itertools.pairwise(t)), (pid, tid)
    flights: dict[int, dict] = {}
    for e in events:
        if e["ph"] in "be":
            flights.setdefault(e["id"], {})[e["ph"]] = e
    assert len(flights) == 4 * 4 * config.num_hidden_layers
    intervals = [(f["b"]["name"], f["b"]["ts"], f["e"]["ts"]) for f in flights.values()]
    assert all(s <= e for _, s, e in intervals)
    # Overlap: several offloads were in flight at once.
    starts = sorted(s for _, s, _ in intervals)
    assert any(sum(s <= t < e for _, s, e in intervals) >= 2 for t in starts)
    # One clock for both processes: the worker computed each call between its send and
    # its reply (1 us of slack for rounding).
    worker_spans = [e for e in spans if e["pid"] == worker_pid]
    assert len(worker_spans) == len(flights)
    for w in worker_spans:
        assert any(op == w["name"] and s - 1.0 <= w["ts"] and w["ts"] + w["dur"] <= e + 1.0
                   for op, s, e in intervals), w


def test_bench_llama_compares_and_traces(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the benchmark sets; undone after
    pytest.importorskip("transformers")
    from benchmarks import bench_llama

    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    assert bench_llama.main(["--presets", "tiny", "--tokens", "96", "--repeats", "1",
                             "--no-local", "--chunk-rows", "32", "--trace", str(trace),
                             "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    rows = res["rows"]
    assert {"reference", "hf-eager", "hf-sdpa", "split", "split-unchunked", "split-open",
            "split-open-unchunked", "split-checked"} <= set(rows)
    assert all(r["max_abs_err"] < TOL_F32 for r in rows.values())
    assert rows["split"]["stats"]["chunks"] == 3
    assert rows["split-unchunked"]["stats"]["chunks"] == 1
    assert {"split/hf-eager", "split/hf-sdpa", "split/split-unchunked",
            "split-open/split-open-unchunked"} <= set(res["paired"])
    assert len({e["pid"] for e in json.loads(trace.read_text())["traceEvents"]}) == 2
    assert "split/hf-sdpa" in capsys.readouterr().out


def test_automatic_chunks_with_a_cpu_worker(config, reference):
    """A CPU worker is pipelined only when it has cores of its own beside the TEE's."""
    ids = ids_for(config, 600, seed=6)
    with ActorSystem() as system:
        shared = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, shared, seed=0)
        # torch's default: each side takes every core, so they take turns.
        assert drv.chunk_plan(1024) == [(0, 1024)]
        own = system.spawn(GPUWorker, config, seed=0, device="cpu", threads=1)
        assert own.device_info()["threads"] == 1
        split = system.spawn(TEEDriver, config, own, seed=0, threads=1)
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("one core: the two sides could not overlap")
        assert len(split.chunk_plan(1024)) == 4  # cores >= 1 + 1
        got = split.prefill(ids)
        assert split.last_prefill_stats()["chunks"] == 2
    assert (got - reference.forward(ids)).abs().max().item() < TOL_F32
    with pytest.raises(ValueError, match="threads"):
        GPUWorker(config, seed=0, device="cpu", threads=0)
