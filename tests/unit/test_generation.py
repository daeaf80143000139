"""TEEDriver.generate with an in-process GPUWorker: against transformers, against prefill,
sampling, eos, limits, the start/step API and the stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.generation import GenerationOptions, KVCache, Sampler
from actors.llama import load_weights

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny(**changes) -> LlamaConfig:
    return dataclasses.replace(LlamaConfig.preset("tiny"), **changes)


def ids_for(config: LlamaConfig, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))


def save_hf(config: LlamaConfig, path: Path, seed: int = 0):
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict(load_weights(config, list(model.state_dict()), seed=seed))
    model.save_pretrained(path)
    return model


def hf_greedy(model, ids: torch.Tensor, n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, ids.numel():].tolist()


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return tiny()


@pytest.fixture(scope="module")
def driver(config) -> TEEDriver:
    return TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)


# -- against transformers -----------------------------------------------------------------------

@pytest.mark.parametrize(("tied", "scaling", "t"), [
    (False, None, 1), (True, None, 37), (False, LLAMA3, 200), (True, LLAMA3, 5)])
def test_greedy_equals_transformers(tmp_path, tied, scaling, t):
    config = tiny(tie_word_embeddings=tied, rope_scaling=scaling, max_position_embeddings=256)
    model = save_hf(config, tmp_path, seed=3)
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded == config
    drv = TEEDriver(loaded, GPUWorker(loaded, tmp_path, device="cpu"), tmp_path)
    ids = ids_for(config, t, seed=t)
    n = 24
    got = drv.generate(ids, n)
    assert got.dtype == torch.int64
    assert got.dim() == 1
    assert got.tolist() == hf_greedy(model, ids, n)
    # Not a degenerate sequence that any bug would reproduce.
    assert len(set(got.tolist())) > 3


def test_cache_equals_prefill_on_the_growing_sequence(config, driver):
    ids = ids_for(config, 9, seed=1)
    got = driver.generate(ids, 16).tolist()
    seq = ids.tolist()
    for tok in got:
        assert int(torch.argmax(driver.prefill(seq))) == tok
        seq.append(tok)


def test_cache_with_the_worker_attention_policy(config):
    # The prefill's attention is offloaded; the decode steps' stays in the TEE.
    drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0, attention="worker")
    ids = ids_for(config, 20, seed=2)
    got = drv.generate(ids, 12).tolist()
    seq = ids.tolist()
    for tok in got:
        assert int(torch.argmax(drv.prefill(seq))) == tok
        seq.append(tok)
    stats = drv.last_generate_stats()
    assert stats["prefill"]["ops"]["scores"]["where"] == "worker"
    assert stats["decode"]["ops"]["scores"]["where"] == "tee"
    assert stats["decode"]["ops"]["scores"]["bytes_out"] == 0


def test_same_prompt_same_tokens(config, driver):
    ids = ids_for(config, 30, seed=4)
    first = driver.generate(ids, 10)
    driver.generate(ids_for(config, 50, seed=5), 7)  # another generation in between
    assert torch.equal(driver.generate(ids, 10), first)
    assert torch.equal(driver.generate(ids.tolist(), 10), first)


# -- sampling, eos, limits ----------------------------------------------------------------------

def test_sampling_is_reproducible_by_seed(config, driver):
    ids = ids_for(config, 12, seed=6)
    a = driver.generate(ids, 20, temperature=1.0, seed=7)
    b = driver.generate(ids, 20, temperature=1.0, seed=7)
    c = driver.generate(ids, 20, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, driver.generate(ids, 20))  # sampling is not greedy here
    # top_k=1, or a vanishing top_p, leaves only the most likely token: greedy again.
    greedy = driver.generate(ids, 20)
    assert torch.equal(driver.generate(ids, 20, temperature=0.7, top_k=1, seed=1), greedy)
    assert torch.equal(driver.generate(ids, 20, temperature=0.7, top_p=1e-6, seed=1), greedy)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.6)])
def test_sampler_masks_as_transformers_does(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = Sampler(GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=0)).scores(logits)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(want)
    assert torch.allclose(got[kept], want[kept])


def test_sampler_draws_only_kept_tokens_with_their_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -5.0])
    sampler = Sampler(GenerationOptions(temperature=1.0, top_k=3, seed=0))
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(3000)]), minlength=5)
    assert counts[3:].sum() == 0
    p = torch.softmax(logits[:3], -1)
    assert torch.allclose(counts[:3] / 3000, p, atol=0.04)


def test_eos_stops_generation(config, driver):
    ids = ids_for(config, 15, seed=9)
    free = driver.generate(ids, 20).tolist()
    k = next(i for i in range(3, 20) if free[i] not in free[:i])  # first time it appears
    got = driver.generate(ids, 20, eos_token_id=free[k])
    assert got.tolist() == free[:k + 1]
    stats = driver.last_generate_stats()
    assert stats["stop"] == "eos"
    assert stats["new_tokens"] == k + 1
    assert stats["steps"] == k  # the first token comes from the prefill
    other = next(i for i in range(config.vocab_size) if i not in free[:k + 1])
    several = driver.generate(ids, 20, eos_token_id=[other, free[k]])
    assert several.tolist() == free[:k + 1]
    assert driver.generate(ids, 20).tolist() == free
    assert driver.last_generate_stats()["stop"] == "max_new_tokens"


def test_too_long_is_refused_before_any_work():
    config = tiny(max_position_embeddings=128)
    worker = GPUWorker(config, seed=0, device="cpu")
    drv = TEEDriver(config, worker, seed=0)
    limit = config.max_position_embeddings
    worker.compute_stats(reset=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        drv.generate(ids_for(config, 100), limit - 99)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        drv.generate_start(ids_for(config, limit + 1), 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        drv.generate_start(ids_for(config, limit), 1)
    assert worker.compute_stats() == {}
    assert drv.generate(ids_for(config, 100), limit - 100, eos_token_id=None).numel() > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"seed": 1.5}, "seed"), ({"eos_token_id": 256}, "eos_token_id"),
    ({"eos_token_id": [1, -1]}, "eos_token_id")])
def test_bad_options(config, driver, kwargs, match):
    with pytest.raises(ValueError, match=match):
        driver.generate(ids_for(config, 4), 4, **kwargs)


def test_bad_inputs(config, driver):
    with pytest.raises(ValueError, match="max_new_tokens"):
        driver.generate(ids_for(config, 4), -1)
    with pytest.raises(ValueError, match="input_ids"):
        driver.generate([], 4)
    with pytest.raises(ValueError, match="input_ids"):
        driver.generate([0, config.vocab_size], 4)
    assert driver.generate(ids_for(config, 4), 0).tolist() == []


# -- the streaming API and the stats -------------------------------------------------------------

def test_start_and_step(config):
    drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    with pytest.raises(RuntimeError, match="generate_start"):
        drv.generate_step()
    ids = ids_for(config, 10, seed=11)
    want = drv.generate(ids, 9).tolist()
    drv.generate_start(ids, 9)
    got = []
    while step := drv.generate_step():
        assert len(step) == 1
        got.extend(step)
    assert got == want
    assert drv.generate_step() == []
    drv.generate_start(ids, 9)
    assert drv.generate_step(4) == want[:4]
    assert drv.last_generate_stats()["finished"] is False
    assert drv.generate_step(100) == want[4:]
    assert drv.last_generate_stats()["finished"] is True
    with pytest.raises(ValueError, match="n must be"):
        drv.generate_step(0)


def test_generate_stats(config, driver):
    ids = ids_for(config, 1, seed=12)
    driver.prefill(ids)
    prefill_stats = driver.last_prefill_stats()
    n = 8
    driver.generate(ids, n)
    s = driver.last_generate_stats()
    layers = config.num_hidden_layers
    assert s["prompt_tokens"] == 1
    assert s["new_tokens"] == n
    assert s["steps"] == n - 1
    # 4 per layer, plus embedding and lm_head when they are not private (in the TEE)
    per = 4 * layers + (0 if driver.private_io else 2)
    assert s["calls_per_token"] == per
    assert s["decode"]["calls"] == (n - 1) * per
    # A decode step offloads exactly what a one-token prefill offloads.
    assert s["decode"]["bytes_out"] == (n - 1) * prefill_stats["bytes_out"]
    assert s["decode"]["bytes_in"] == (n - 1) * prefill_stats["bytes_in"]
    for op in ("scores", "softmax", "context", "kv_cache", "sample"):
        assert s["decode"]["ops"][op]["where"] == "tee"
        assert s["decode"]["ops"][op]["bytes_out"] == 0
    assert s["ms_per_token"] > 0
    assert s["tokens_per_s"] > 0
    assert s["worker_ms_per_token"] > 0
    assert s["transport_ms_per_token"] is not None
    assert s["kv_cache_bytes"] == 2 * layers * config.kv_size * n * 4
    assert s["prefill"]["tokens"] == 1


def test_kv_cache_bounds():
    cache = KVCache(layers=1, kv_heads=2, head_dim=4, capacity=3, dtype=torch.float32)
    k = torch.randn(2, 2, 4)
    keys, values = cache.append(0, k, -k)
    assert torch.equal(keys, k)
    assert torch.equal(values, -k)
    cache.advance(2)
    keys, _ = cache.append(0, k[:, :1], k[:, :1])
    assert keys.shape == (2, 3, 4)
    cache.advance(1)
    with pytest.raises(ValueError, match="full"):
        cache.append(0, k[:, :1], k[:, :1])


def test_several_rows_against_the_cache(config, driver):
    # _layers with a cache at start > 0 and more than one row (the masked path of
    # _attention_step) equals a prefill of the whole sequence.
    ids = ids_for(config, 13, seed=13)
    want = driver.prefill(ids, all_logits=True)
    cache = KVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                    13, torch.float32)
    driver._rows = driver._new_rows(decode=True)
    with torch.no_grad():
        driver._layers(driver._embed(ids[:9]), 0, cache)
        h = driver._layers(driver._embed(ids[9:]), 9, cache)
        got = driver._logits(driver._norm(h, "model.norm.weight"))
    assert cache.length == 13
    assert (got - want[9:]).abs().max().item() < 1e-4


# -- the decode step's lm_head threads ----------------------------------------------------------

@pytest.fixture
def two_threads():
    """The process offers two intra-op threads (a decode step runs on one, and may widen)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize(("one_s", "many_s", "want"), [
    (0.010, 0.004, 2),    # the threads pay: taken
    (0.010, 0.0095, 1),   # less than LM_THREADS_GAIN faster: one thread
    (0.004, 0.010, 1)])   # slower: one thread
def test_decode_lm_head_takes_the_threads_only_where_measured_faster(
        config, monkeypatch, two_threads, one_s, many_s, want):
    import actors.generation as gen
    import actors.tee_driver as td

    monkeypatch.setattr(td, "LM_THREADS_MIN_BYTES", 0)
    seen: list[int] = []
    # Each way, one run at the time asked and one three times slower, in the order that
    # makes the first run or the last one of each way give the other choice: the better
    # of the two decides.
    runs = {1: [one_s, 3 * one_s], 2: [3 * many_s, many_s], 3: [3 * many_s, many_s]}

    def timed(x, w, threads):
        seen.append(threads)
        return runs[threads][(seen.count(threads) - 1) % 2]

    monkeypatch.setattr(td, "_timed_linear", timed)
    drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    assert sorted(seen) == [1, 1, 2, 2]  # when the driver is made, for the process's count
    used: list[int] = []
    sampled: list[int] = []
    real_linear, real_sample = td.F.linear, gen.Sampler.__call__

    def linear(x, w, *a):
        if w is drv._io[td.LM_HEAD]:
            used.append(torch.get_num_threads())
        return real_linear(x, w, *a)

    def sample(self, logits):
        sampled.append(torch.get_num_threads())
        return real_sample(self, logits)

    monkeypatch.setattr(td.F, "linear", linear)
    monkeypatch.setattr(gen.Sampler, "__call__", sample)
    ids = ids_for(config, 5, seed=21)
    tokens = drv.generate(ids, 6).tolist()
    assert len(seen) == 4  # no generation measures again
    assert used[1:] == [want] * 5  # the prefill's lm_head, then the five decode steps
    assert sampled[1:] == [1] * 5  # back on one thread within the step
    s = drv.last_generate_stats()
    assert s["lm_head_threads"] == {"threads": want, "offered": 2, "one_ms": one_s * 1e3,
                                    "many_ms": many_s * 1e3}
    assert torch.get_num_threads() == 2  # restored after each step
    torch.set_num_threads(3)  # another count offered: measured for it, at its first step
    drv.generate(ids, 3)
    assert sorted(seen[4:]) == [1, 1, 3, 3]
    assert drv.last_generate_stats()["lm_head_threads"]["offered"] == 3
    torch.set_num_threads(2)
    drv.generate(ids, 3)
    assert len(seen) == 8  # each count is measured once
    monkeypatch.setattr(td.F, "linear", real_linear)
    torch.set_num_threads(1)  # one thread offered: nothing measured, nothing widened
    ref = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    assert ref.generate(ids, 6).tolist() == tokens
    assert ref.last_generate_stats()["lm_head_threads"] is None
    assert len(seen) == 8


def test_decode_lm_head_of_a_small_vocabulary_stays_on_one_thread(config, two_threads,
                                                                   monkeypatch):
    import actors.tee_driver as td

    monkeypatch.setattr(td, "_timed_linear", lambda *a: pytest.fail("measured"))
    drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    drv.generate(ids_for(config, 3, seed=22), 3)
    assert drv.last_generate_stats()["lm_head_threads"] == {
        "threads": 1, "offered": 2, "one_ms": None, "many_ms": None}
    worker_logits = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0,
                              private_io=False)
    worker_logits.generate(ids_for(config, 3, seed=22), 3)
    assert worker_logits.last_generate_stats()["lm_head_threads"] is None


def test_the_decode_summary_says_how_lm_head_was_threaded(config, driver):
    from actors.report import decode_split

    driver.generate(ids_for(config, 3, seed=23), 3)
    stats = driver.last_generate_stats()
    assert "lm_head" not in decode_split(stats)  # not measured: nothing to say
    stats["lm_head_threads"] = {"threads": 4, "offered": 4, "one_ms": 9.5, "many_ms": 2.25}
    assert decode_split(stats).endswith(
        "\nlm_head in the TEE on 4 thread(s): measured 9.50 ms on one, 2.25 ms on 4")
