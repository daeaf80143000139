"""TEEDriver with a plain in-process GPUWorker against the reference forward.

bfloat16 wire tolerance.  bf16 keeps 8 significant bits: every cast rounds by up to 2^-9 of
the value (0.2 %).  With ``wire_dtype=bfloat16`` the activations are rounded about six times a
layer and the logits come back from lm_head in bf16 (at |logit| ≈ 4 the bf16 spacing is 2^-5,
so ±0.016 from that cast alone).  Measured on these shapes: max |error| 0.05-0.09 with max |logit|
4-5 (1-2 % of the logit scale), while a model computed wholly in bf16 errs by 0.09-0.14 on the
same inputs.  The test asks for both: within 4 % of the largest reference logit, and no worse
than the all-bf16 model — bf16 on the wire alone must not cost more than bf16 everywhere.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver
from actors.llama import gpu_weight_names, load_weights, tee_weight_names
from actors.tee_driver import OPS, WorkerResultError
from tests.unit.conftest import ids_for

TOL_F32 = 1e-4
BF16_REL = 0.04


@pytest.mark.parametrize("attention", ["tee", "worker"])
@pytest.mark.parametrize("t", [1, 7, 96])
def test_float32_split_equals_reference(config, worker, reference, attention, t):
    drv = TEEDriver(config, worker, seed=0, attention=attention)
    ids = ids_for(config, t, seed=t)
    want = reference.forward(ids, all_logits=True)
    got_all = drv.prefill(ids, all_logits=True)
    assert got_all.shape == (t, config.vocab_size)
    assert got_all.dtype == torch.float32
    assert (got_all - want).abs().max().item() < TOL_F32
    got_last = drv.prefill(ids.tolist())  # a list works as well as a tensor
    assert got_last.shape == (config.vocab_size,)
    assert got_last.dtype == torch.float32
    assert (got_last - want[-1]).abs().max().item() < TOL_F32


def test_tied_embeddings_and_scaled_rope():
    config = dataclasses.replace(
        LlamaConfig.preset("tiny"), tie_word_embeddings=True, num_hidden_layers=3,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    gpu = GPUWorker(config, seed=9, device="cpu")
    ids = ids_for(config, 40)
    want = LlamaReference(config, seed=9).forward(ids, all_logits=True)
    for attention in ("tee", "worker"):
        got = TEEDriver(config, gpu, seed=9, attention=attention).prefill(ids, all_logits=True)
        assert (got - want).abs().max().item() < TOL_F32


@pytest.mark.parametrize("attention", ["tee", "worker"])
def test_bfloat16_wire_within_tolerance(config, worker, reference, attention):
    drv = TEEDriver(config, worker, seed=0, wire_dtype=torch.bfloat16, attention=attention)
    all_bf16 = LlamaReference(config, seed=0, dtype=torch.bfloat16)
    for seed in range(3):
        ids = ids_for(config, 64, seed)
        want = reference.forward(ids, all_logits=True)
        got = drv.prefill(ids, all_logits=True)
        err = (got - want).abs().max().item()
        assert err < BF16_REL * want.abs().max().item()
        assert err <= (all_bf16.forward(ids, all_logits=True) - want).abs().max().item()
    stats = drv.last_prefill_stats()
    assert stats["wire_dtype"] == "bfloat16"
    from runtime.transport import memcopy

    assert stats["copies"] == memcopy.measured()  # how this (the TEE's) process copies
    f32 = TEEDriver(config, worker, seed=0, attention=attention)
    f32.prefill(ids, all_logits=True)
    # Half the bytes each way: with private_io nothing but activations crosses.
    assert stats["bytes_out"] == f32.last_prefill_stats()["bytes_out"] / 2
    assert stats["bytes_in"] == f32.last_prefill_stats()["bytes_in"] / 2
    # Today's placement: the token ids (int64) go out, and lm_head's logits come back in
    # float32 whatever the wire (issue 8, item 6).
    old16 = TEEDriver(config, worker, seed=0, wire_dtype=torch.bfloat16, attention=attention,
                      private_io=False)
    old32 = TEEDriver(config, worker, seed=0, attention=attention, private_io=False)
    got16 = old16.prefill(ids, all_logits=True)
    old32.prefill(ids, all_logits=True)
    assert (got16 - want).abs().max().item() < BF16_REL * want.abs().max().item()
    s16, s32 = old16.last_prefill_stats(), old32.last_prefill_stats()
    ids_bytes = ids.numel() * 8
    logits_bytes = ids.numel() * config.vocab_size * 4
    assert s16["ops"]["lm_head"]["bytes_in"] == s32["ops"]["lm_head"]["bytes_in"] == logits_bytes
    assert s16["bytes_out"] - ids_bytes == (s32["bytes_out"] - ids_bytes) / 2
    assert s16["bytes_in"] - logits_bytes == (s32["bytes_in"] - logits_bytes) / 2


def test_the_workers_lm_head_returns_float32_unless_asked_otherwise(config, worker):
    """Issue 8, item 6, for any caller of the worker, not only the driver (it returned the
    input's dtype by default: an API review)."""
    x = torch.randn(3, config.hidden_size)
    want = worker.lm_head(x)
    for wire in (torch.float32, torch.bfloat16, torch.float16):
        assert worker.lm_head(x.to(wire)).dtype == torch.float32
        assert worker.lm_head(x.to(wire), dtype=None).dtype == torch.float32
        assert worker.lm_head(x.to(wire), dtype=wire).dtype == wire
    assert want.dtype == torch.float32 and want.shape == (3, config.vocab_size)


def test_causal_mask_matters(config, worker):
    drv = TEEDriver(config, worker, seed=0, attention="worker")
    ids = ids_for(config, 32)
    changed = ids.clone()
    changed[20] = (changed[20] + 1) % config.vocab_size
    a = drv.prefill(ids, all_logits=True)
    b = drv.prefill(changed, all_logits=True)
    assert torch.allclose(a[:20], b[:20], atol=1e-6, rtol=0)  # earlier positions cannot see it
    assert (a[20:] - b[20:]).abs().amax(dim=-1).min().item() > 1e-4  # later ones all do


def test_stats(config, worker):
    drv = TEEDriver(config, worker, seed=0, private_io=False)  # the old placement's table
    assert drv.attention == "tee"  # auto on a CPU worker
    with pytest.raises(RuntimeError, match="no prefill"):
        drv.last_prefill_stats()
    t = 24
    drv.prefill(ids_for(config, t))
    s = drv.last_prefill_stats()
    assert s["policy"] == "tee"
    assert s["tokens"] == t
    assert s["layers"] == config.num_hidden_layers
    assert s["routes"] is None  # an in-process worker has no transport
    assert set(s["ops"]) == set(OPS)
    n = config.num_hidden_layers
    ops = s["ops"]
    assert {op: ops[op]["calls"] for op in ("embedding", "qkv", "o_proj", "gate_up", "down",
                                            "lm_head")} == {
        "embedding": 1, "qkv": n, "o_proj": n, "gate_up": n, "down": n, "lm_head": 1}
    # The fused kernel: no score matrix, no separate softmax.
    assert ops["attention"]["where"] == "tee"
    assert ops["attention"]["calls"] == n
    assert ops["attention"]["bytes_out"] == 0
    assert ops["scores"]["calls"] == ops["softmax"]["calls"] == ops["context"]["calls"] == 0
    # Only the last row goes to lm_head.
    assert ops["lm_head"]["bytes_out"] == config.hidden_size * 4
    assert ops["lm_head"]["bytes_in"] == config.vocab_size * 4
    assert ops["qkv"]["bytes_out"] == n * t * config.hidden_size * 4
    assert ops["qkv"]["bytes_in"] == n * t * (config.q_size + 2 * config.kv_size) * 4
    assert s["calls"] == 2 + 4 * n
    assert s["total_s"] >= s["tee_s"]
    assert s["total_s"] >= s["wait_s"] >= s["worker_s"] >= 0
    assert all(ops[op]["worker_s"] > 0 for op in ("embedding", "qkv", "down", "lm_head"))
    # Every offloaded result was checked, and the checks are part of the TEE's time.
    assert {op: ops[op]["checks"] for op in ("embedding", "qkv", "o_proj", "gate_up", "down",
                                             "lm_head")} == {
        "embedding": 1, "qkv": n, "o_proj": n, "gate_up": n, "down": n, "lm_head": 1}
    assert s["verify"]["checks"] == s["calls"]
    assert 0 < s["verify"]["seconds"] <= s["tee_s"]
    assert all(0 < ops[op]["verify_s"] <= ops[op]["tee_s"] for op in ("qkv", "lm_head"))
    assert s["verify"]["lifetime"]["failures"] == 0
    assert s["private_io"] is False

    # The defaults: embedding and lm_head in the TEE, nothing but activations crosses.
    drv_p = TEEDriver(config, worker, seed=0)
    drv_p.prefill(ids_for(config, t))
    sp = drv_p.last_prefill_stats()
    assert sp["private_io"] is True
    assert sp["ops"]["embedding"]["where"] == sp["ops"]["lm_head"]["where"] == "tee"
    assert sp["ops"]["embedding"]["calls"] == sp["ops"]["lm_head"]["calls"] == 1
    assert sp["ops"]["embedding"]["bytes_out"] == sp["ops"]["lm_head"]["bytes_in"] == 0
    assert sp["ops"]["embedding"]["checks"] == sp["ops"]["lm_head"]["checks"] == 0
    assert sp["calls"] == sp["verify"]["checks"] == 4 * n
    assert sp["bytes_out"] == s["bytes_out"] - t * 8 - config.hidden_size * 4
    # verify=False: no checks, no verify entry.
    drv_n = TEEDriver(config, worker, seed=0, private_io=False, verify=False)
    drv_n.prefill(ids_for(config, t))
    assert drv_n.last_prefill_stats()["verify"] is None
    assert all(r["checks"] == 0 for r in drv_n.last_prefill_stats()["ops"].values())

    drv_w = TEEDriver(config, worker, seed=0, attention="worker")
    drv_w.prefill(ids_for(config, t))
    ops = drv_w.last_prefill_stats()["ops"]
    assert ops["scores"]["checks"] == ops["context"]["checks"] == n
    assert ops["attention"]["calls"] == 0
    g, kv, d = config.num_key_value_groups, config.num_key_value_heads, config.head_dim
    # Grouped, not expanded: q [kv, g*T, d] and k [kv, T, d] out, [kv, g*T, T] back.
    assert ops["scores"]["bytes_out"] == n * (kv * g * t * d + kv * t * d) * 4
    assert ops["scores"]["bytes_in"] == n * kv * g * t * t * 4
    assert ops["context"]["bytes_out"] == n * (kv * g * t * t + kv * t * d) * 4


def test_sides_hold_disjoint_weights(config, worker):
    drv = TEEDriver(config, worker, seed=0, private_io=False)
    assert set(drv._norms) == set(tee_weight_names(config))
    assert not drv._io  # the verifier keeps vectors, no weight
    pools = drv._verifier._pools.values()
    size = drv._verifier.pool_size
    assert size == 16  # four let a repeated spread lie through 72 % of the time (design.md)
    assert all(p.u.shape[0] == p.v.shape[0] == size and p.u.dim() == 2 for p in pools)
    # With private_io the TEE holds the embedding and lm_head too, in float32.
    drv_p = TEEDriver(config, worker, seed=0, dtype=torch.bfloat16)
    assert set(drv_p._io) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(w.dtype == torch.float32 for w in drv_p._io.values())
    held = {id(t) for t in [worker._embed, worker._lm_head]
            + [w for layer in worker._fused for w in layer.values()]}
    assert not config.tie_word_embeddings
    assert len(held) == 2 + 4 * config.num_hidden_layers  # embed, lm_head, 4 fused per layer
    assert not set(gpu_weight_names(config)) & set(tee_weight_names(config))
    # The fused qkv rows are exactly q, k, v from the seed.
    w = load_weights(config, gpu_weight_names(config), seed=0)
    qkv = worker._fused[1][("q", "k", "v")]
    assert torch.equal(qkv[: config.q_size], w["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(qkv[config.q_size + config.kv_size:],
                       w["model.layers.1.self_attn.v_proj.weight"])


def test_worker_batch_linear_subsets(config, worker):
    x = torch.randn(5, config.hidden_size)
    q, k, v = worker.batch_linear(0, ("q", "k", "v"), x)
    k2, v2 = worker.batch_linear(0, ["k", "v"], x)
    (q2,) = worker.batch_linear(0, ("q",), x)
    v3, q3 = worker.batch_linear(0, ("v", "q"), x)
    for a, b in ((k, k2), (v, v2), (q, q2), (v, v3), (q, q3)):
        assert torch.allclose(a, b, atol=1e-6)
    xb = x.to(torch.bfloat16)
    out = worker.batch_linear(0, ("gate", "up"), xb)
    assert [o.dtype for o in out] == [torch.bfloat16] * 2
    assert [tuple(o.shape) for o in out] == [(5, config.intermediate_size)] * 2
    y = worker.matmul(torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.randn(2, 5, 4),
                      transpose_b=True)
    assert y.shape == (2, 3, 5)
    assert y.dtype == torch.bfloat16
    e = worker.embedding(torch.tensor([1, 2]), dtype="bfloat16")
    assert e.dtype == torch.bfloat16
    assert e.shape == (2, config.hidden_size)
    stats = worker.compute_stats()
    assert stats["batch_linear:q+k+v"]["calls"] >= 1
    assert stats["matmul"]["seconds"] > 0
    info = worker.device_info()
    assert info["type"] == "cpu"
    assert info["dtype"] == "float32"


@pytest.mark.parametrize(("call", "match"), [
    (lambda w, c: w.batch_linear(c.num_hidden_layers, ("q",), torch.zeros(1, 64)), "layer"),
    (lambda w, c: w.batch_linear(0, ("q", "x"), torch.zeros(1, 64)), "unknown"),
    (lambda w, c: w.batch_linear(0, "q", torch.zeros(1, 64)), "names"),
    (lambda w, c: w.batch_linear(0, ("o",), torch.zeros(1, 63)), "width"),
    (lambda w, c: w.matmul(torch.zeros(2, 3, 4), torch.zeros(2, 5, 6)), "do not match"),
    (lambda w, c: w.embedding(torch.tensor([c.vocab_size])), "token ids"),
    (lambda w, c: w.lm_head(torch.zeros(1, 3)), "hidden"),
])
def test_worker_rejects_bad_calls(config, worker, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(worker, config)


def test_driver_rejects_bad_input(config, worker):
    drv = TEEDriver(config, worker, seed=0)
    with pytest.raises(ValueError, match=r"shape \[T\]"):
        drv.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[T\]"):
        drv.prefill([])
    with pytest.raises(ValueError, match="lie in"):
        drv.prefill([0, config.vocab_size])
    with pytest.raises(ValueError, match="attention"):
        TEEDriver(config, worker, attention="gpu")


class _LyingWorker(GPUWorker):
    """Returns a q projection one row short: the TEE must notice."""

    def batch_linear(self, layer, names, x, tag=None):
        out = super().batch_linear(layer, names, x, tag=tag)
        return (out[0][:-1], *out[1:])


def test_driver_checks_worker_results(config):
    drv = TEEDriver(config, _LyingWorker(config, seed=0, device="cpu"), seed=0)
    with pytest.raises(WorkerResultError, match="qkv"):
        drv.prefill(ids_for(config, 8))


def test_progress_logging(config, worker, caplog):
    # No logging configured for INFO (as in an actor process): log_every still shows progress.
    drv = TEEDriver(config, worker, seed=0)
    drv.prefill(ids_for(config, 8), log_every=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "actors.tee_driver"]
    assert [m.split(": ")[1].split(",")[0] for m in messages] == [
        f"layer {i + 1}/{config.num_hidden_layers} done" for i in range(config.num_hidden_layers)]
    caplog.clear()
    drv.prefill(ids_for(config, 8))
    assert not [r for r in caplog.records if r.name == "actors.tee_driver"]


class _CudaLookingWorker(GPUWorker):
    """Says it computes on CUDA, so that ``attention="auto"`` runs its probe."""

    def device_info(self):
        return {**super().device_info(), "type": "cuda", "device": "cuda:0"}


def test_auto_policy_probe_on_a_cuda_worker(config, reference):
    cpu_drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    assert cpu_drv.policy_probe()["policy"] == "tee"
    assert "CPU worker" in cpu_drv.policy_probe()["reason"]
    drv = TEEDriver(config, _CudaLookingWorker(config, seed=0, device="cpu"), seed=0)
    probe = drv.policy_probe()
    assert probe["policy"] == probe["choice"] == drv.attention
    assert drv.attention in ("tee", "worker")
    assert probe["tee_s"] > 0
    assert probe["worker_s"] > 0
    assert probe["reason"].startswith("measured at T=256")
    ids = ids_for(config, 20)
    assert (drv.prefill(ids) - reference.forward(ids)).abs().max().item() < TOL_F32
    assert drv.last_prefill_stats()["policy_reason"] == probe["reason"]


def test_split_from_a_checkpoint_reads_only_each_sides_tensors(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from actors.llama import CheckpointReader, weight_shapes

    config = dataclasses.replace(LlamaConfig.preset("tiny"), tie_word_embeddings=True)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict(load_weights(config, list(model.state_dict()), seed=4))
    model.save_pretrained(tmp_path, max_shard_size="40KB")

    read: list[str] = []
    original = CheckpointReader.read

    def recording(self, names):
        names = list(names)
        read.extend(names)
        return original(self, names)

    monkeypatch.setattr(CheckpointReader, "read", recording)
    loaded = LlamaConfig.from_pretrained(tmp_path)
    gpu = GPUWorker(loaded, checkpoint=tmp_path, device="cpu")
    gpu_read, read[:] = set(read), []
    drv = TEEDriver(loaded, gpu, checkpoint=str(tmp_path), attention="worker",
                    private_io=False, verify=False)
    tee_read, read[:] = set(read), []
    assert gpu_read == set(gpu_weight_names(config))  # lm_head is tied: not in the files
    assert tee_read == set(tee_weight_names(config))
    assert gpu_read | tee_read == set(weight_shapes(config))
    ids = ids_for(config, 30)
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    assert (drv.prefill(ids, all_logits=True) - want).abs().max().item() < TOL_F32
    # The defaults read every tensor, each exactly once (the verifier one at a time), and
    # the tied embedding serves the embedding lookup and lm_head alike.
    for private_io in (True, False):
        drv = TEEDriver(loaded, gpu, checkpoint=str(tmp_path), attention="worker",
                        private_io=private_io)
        assert sorted(read) == sorted(weight_shapes(config)), private_io
        read[:] = []
        assert (drv.prefill(ids, all_logits=True) - want).abs().max().item() < TOL_F32
        assert drv.last_prefill_stats()["verify"]["checks"] > 0
