"""RoPE and the causal mask: every scaling type against transformers, and by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from actors import LlamaConfig, LlamaReference
from actors.llama import _ROPE_TYPES, apply_rope, causal_softmax, rope_cos_sin, rope_inv_freq

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


def tiny(**changes) -> LlamaConfig:
    return dataclasses.replace(LlamaConfig.preset("tiny"), **changes)


def test_every_accepted_type_is_covered():
    assert set(SCALINGS) == set(_ROPE_TYPES)


# -- against transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_tables_match_transformers(kind, theta):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny(rope_theta=theta, rope_scaling=SCALINGS[kind], max_position_embeddings=512)
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**config.to_hf_dict()))
    ours = rope_inv_freq(config)
    assert torch.allclose(ours, rotary.inv_freq.float(), rtol=1e-6, atol=0)
    positions = torch.arange(0, 400, 7)
    want_cos, want_sin = rotary(torch.zeros(1, 1, dtype=torch.float32), positions[None])
    cos, sin = rope_cos_sin(config, positions)
    assert torch.allclose(cos, want_cos[0], atol=1e-5)
    assert torch.allclose(sin, want_sin[0], atol=1e-5)
    if kind != "default":  # the scaling changes the tables: the comparison can fail
        plain = rope_inv_freq(tiny(rope_theta=theta))
        assert not torch.allclose(ours, plain)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_reference_logits_match_transformers_for_every_scaling(kind):
    transformers = pytest.importorskip("transformers")
    from actors.llama import load_weights

    config = tiny(rope_scaling=SCALINGS[kind], max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager")).eval()
    model.load_state_dict(load_weights(config, list(model.state_dict()), seed=2))
    ids = torch.randint(0, config.vocab_size, (120,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    got = LlamaReference(config, seed=2).forward(ids, all_logits=True)
    assert (got - want).abs().max().item() < 1e-4


# -- by hand, without transformers ---------------------------------------------------------------

def test_inverse_frequencies_by_hand():
    # head_dim 8: theta^(-0/8), theta^(-2/8), theta^(-4/8), theta^(-6/8).
    plain = tiny(hidden_size=32, head_dim=8, rope_theta=100.0)
    assert plain.head_dim == 8
    f = [1.0, 100 ** -0.25, 0.1, 100 ** -0.75]
    assert torch.allclose(rope_inv_freq(plain), torch.tensor(f), rtol=1e-6)

    linear = dataclasses.replace(plain, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert torch.allclose(rope_inv_freq(linear), torch.tensor(f) / 4, rtol=1e-6)

    # Llama 3: wavelengths 2*pi/f = 6.3, 19.9, 62.8, 198.7 against high_wavelen 32/4 = 8 and
    # low_wavelen 32/1 = 32: the first is kept, the last two slowed 8x, the second blended.
    llama3 = dataclasses.replace(plain, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    smooth = (32 / (2 * math.pi / f[1]) - 1) / (4 - 1)
    blended = (1 - smooth) * f[1] / 8 + smooth * f[1]
    want = [f[0], blended, f[2] / 8, f[3] / 8]
    assert torch.allclose(rope_inv_freq(llama3), torch.tensor(want), rtol=1e-6)


def test_cos_sin_and_rotation_by_hand():
    config = tiny(hidden_size=16, head_dim=4, rope_theta=100.0)
    assert config.head_dim == 4
    f = [1.0, 0.1]  # 100^(-0/4), 100^(-2/4)
    cos, sin = rope_cos_sin(config, torch.tensor([0, 3, 10]))
    for row, p in enumerate((0, 3, 10)):
        want_cos = [math.cos(p * f[0]), math.cos(p * f[1])] * 2
        want_sin = [math.sin(p * f[0]), math.sin(p * f[1])] * 2
        assert torch.allclose(cos[row], torch.tensor(want_cos), atol=1e-6)
        assert torch.allclose(sin[row], torch.tensor(want_sin), atol=1e-6)
    # "Rotate half": pairs are (x0, x2) and (x1, x3), rotated by p*f0 and p*f1.
    a, b, c, d = 0.3, -1.2, 2.0, 0.7
    x = torch.tensor([[a, b, c, d]])
    p = 3
    out = apply_rope(x, cos[1:2], sin[1:2])[0]
    c0, s0, c1, s1 = math.cos(p * f[0]), math.sin(p * f[0]), math.cos(p * f[1]), math.sin(p * f[1])
    want = [a * c0 - c * s0, b * c1 - d * s1, c * c0 + a * s0, d * c1 + b * s1]
    assert torch.allclose(out, torch.tensor(want), atol=1e-6)
    # A rotation: lengths are kept, and position 0 is the identity.
    assert torch.allclose(out.norm(), x.norm())
    assert torch.allclose(apply_rope(x, cos[:1], sin[:1]), x)


@pytest.mark.parametrize(("tq", "tk"), [(5, 5), (1, 6), (3, 7)])
def test_causal_mask_by_hand(tq, tk):
    # Equal scores: each query spreads evenly over the keys it may see, and nothing else.
    probs = causal_softmax(torch.zeros(2, tq, tk), scale=1.0)
    for i in range(tq):
        seen = tk - tq + i + 1  # query i sits at position tk - tq + i
        want = torch.tensor([1 / seen] * seen + [0.0] * (tk - seen))
        assert torch.allclose(probs[0, i], want)
        assert torch.allclose(probs[1, i], want)
    # A huge score on a future key changes nothing: masked means exactly zero.
    scores = torch.zeros(1, tq, tk)
    scores[..., -1] = 1e4
    probs = causal_softmax(scores, scale=1.0)
    for i in range(tq - 1):
        assert probs[0, i, -1].item() == 0.0
    assert probs[0, -1, -1].item() == pytest.approx(1.0)
