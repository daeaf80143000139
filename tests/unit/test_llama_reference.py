"""The reference forward against Hugging Face LlamaForCausalLM; config and weight loading."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from actors import LlamaConfig, LlamaReference
from actors.llama import (
    EMBED,
    LM_HEAD,
    PRESETS,
    gpu_weight_names,
    load_weights,
    random_weight,
    rope_inv_freq,
    tee_weight_names,
    weight_shapes,
)

transformers = pytest.importorskip("transformers")

TOL_F32 = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny(**changes) -> LlamaConfig:
    return dataclasses.replace(LlamaConfig.preset("tiny"), **changes)


def save_hf(config: LlamaConfig, path: Path, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    """A HF model holding our seeded weights, saved as a safetensors checkpoint in ``path``."""
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager")
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    names = list(model.state_dict())
    weights = load_weights(config, names, seed=seed)
    missing, unexpected = model.load_state_dict(weights, strict=True)
    assert not missing
    assert not unexpected
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def ids_for(config: LlamaConfig, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))


def rewrite_classic(path: Path) -> dict:
    """Turn a ``rope_parameters`` config.json into the classic rope_theta/rope_scaling one."""
    data = json.loads((path / "config.json").read_text())
    params = dict(data.pop("rope_parameters"))
    data["rope_theta"] = params.pop("rope_theta")
    data["rope_scaling"] = None if params.get("rope_type") == "default" else params
    (path / "config.json").write_text(json.dumps(data))
    return data


# -- against Hugging Face ---------------------------------------------------------------------

@pytest.mark.parametrize(("tied", "scaling"), [(False, None), (True, None), (False, LLAMA3),
                                               (True, LLAMA3)])
def test_reference_matches_hf(tmp_path, tied, scaling):
    config = tiny(tie_word_embeddings=tied, rope_scaling=scaling, max_position_embeddings=128)
    model = save_hf(config, tmp_path)
    assert (json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"]) is tied
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded == config
    ref = LlamaReference(loaded, checkpoint=tmp_path)
    ids = ids_for(config, 64)
    expected = hf_logits(model, ids)
    got = ref.forward(ids, all_logits=True)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL_F32
    last = ref.forward(ids)
    assert last.shape == (config.vocab_size,)
    assert (last - expected[-1]).abs().max().item() < TOL_F32
    # The comparison is meaningful: logits are of order one, not near zero.
    assert 0.3 < expected.std().item() < 5


def test_llama3_scaling_changes_the_model():
    plain, scaled = tiny(), tiny(rope_scaling=LLAMA3)
    assert not torch.equal(rope_inv_freq(plain), rope_inv_freq(scaled))
    ids = ids_for(plain, 48)
    a = LlamaReference(plain).forward(ids)
    b = LlamaReference(scaled).forward(ids)
    assert (a - b).abs().max().item() > 1e-3


def test_classic_config_layout_loads_the_same(tmp_path):
    config = tiny(rope_scaling=LLAMA3, max_position_embeddings=128)
    model = save_hf(config, tmp_path)
    data = rewrite_classic(tmp_path)
    assert "rope_parameters" not in data
    assert data["rope_scaling"]["rope_type"] == "llama3"
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded == config
    ids = ids_for(config, 40)
    got = LlamaReference(loaded, checkpoint=tmp_path).forward(ids, all_logits=True)
    assert (got - hf_logits(model, ids)).abs().max().item() < TOL_F32


def test_old_style_type_key_and_missing_head_dim(tmp_path):
    data = tiny(rope_scaling=LLAMA3).to_hf_dict(layout="classic")
    del data["head_dim"]
    scaling = dict(data["rope_scaling"])
    scaling["type"] = scaling.pop("rope_type")
    data["rope_scaling"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded.head_dim == 64 // 4
    assert loaded.rope_scaling == LLAMA3


def test_default_rope_parameters_mean_no_scaling():
    data = tiny().to_hf_dict()
    assert data["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert LlamaConfig.from_dict(data) == tiny()


@pytest.mark.parametrize("drop_index", [False, True])
def test_sharded_checkpoint(tmp_path, drop_index):
    config = tiny()
    model = save_hf(config, tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2
    if drop_index:  # a folder of shards without the index still loads (keys are scanned)
        (tmp_path / "model.safetensors.index.json").unlink()
    ids = ids_for(config, 32)
    got = LlamaReference(LlamaConfig.from_pretrained(tmp_path), checkpoint=tmp_path).forward(ids)
    assert (got - hf_logits(model, ids)[-1]).abs().max().item() < TOL_F32


def test_side_loads_read_only_their_tensors(tmp_path):
    config = tiny(tie_word_embeddings=True)
    save_hf(config, tmp_path, seed=5)
    tee = load_weights(config, tee_weight_names(config), checkpoint=tmp_path)
    assert set(tee) == set(tee_weight_names(config))
    gpu = load_weights(config, [EMBED, LM_HEAD], checkpoint=tmp_path)
    assert gpu[LM_HEAD] is gpu[EMBED]  # tied: lm_head.weight is absent and means the embedding
    assert torch.equal(gpu[EMBED], random_weight(config, EMBED, seed=5))


# -- errors -----------------------------------------------------------------------------------

def test_from_pretrained_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        LlamaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("change", "match"), [
    ({"num_attention_heads": 5}, "multiple of"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"vocab_size": "many"}, "vocab_size"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"head_dim": 15}, "head_dim"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                          "low_freq_factor": 4.0, "high_freq_factor": 1.0}}, "high_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_from_pretrained_bad_values(tmp_path, change, match):
    data = tiny().to_hf_dict()
    data.update(change)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as info:
        LlamaConfig.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_missing_field_and_missing_tensor(tmp_path):
    data = tiny().to_hf_dict()
    del data["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_dict(data)
    save_hf(tiny(tie_word_embeddings=True), tmp_path)
    with pytest.raises(ValueError, match="lm_head"):  # an untied config needs lm_head.weight
        load_weights(tiny(), [LM_HEAD], checkpoint=tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_weights(tiny(vocab_size=300), [EMBED], checkpoint=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_weights(tiny(), [EMBED], checkpoint=empty)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        LlamaConfig.preset("llama-9000")


# -- presets and seeded weights -----------------------------------------------------------------

def test_preset_shapes():
    t = LlamaConfig.preset("tiny")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.head_dim) == (64, 2, 4, 2, 128, 256, 16)
    s = LlamaConfig.preset("seed-bench")
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
            s.intermediate_size, s.vocab_size) == (512, 4, 8, 4, 1408, 32000)
    b = LlamaConfig.preset("llama-3.2-1b")
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.num_key_value_heads,
            b.head_dim, b.intermediate_size, b.vocab_size) == (2048, 16, 32, 8, 64, 8192, 128256)
    assert b.rope_theta == 500000.0
    assert b.tie_word_embeddings
    assert b.rms_norm_eps == 1e-5
    assert b.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert b.num_parameters() == 1_235_814_400  # Llama-3.2-1B's published 1.24 B
    assert set(PRESETS) == {"tiny", "seed-bench", "llama-3.2-1b"}
    # Presets are independent copies: changing one's dict does not change the table.
    b.rope_scaling["factor"] = 1.0
    assert LlamaConfig.preset("llama-3.2-1b").rope_scaling["factor"] == 32.0


def test_hf_config_agrees_on_presets():
    for name in PRESETS:
        ours = LlamaConfig.preset(name)
        theirs = transformers.LlamaConfig(**ours.to_hf_dict())
        assert theirs.head_dim == ours.head_dim
        assert theirs.num_key_value_heads == ours.num_key_value_heads
        assert LlamaConfig.from_dict(theirs.to_dict()) == ours


def test_seeded_weights_are_deterministic_and_per_name():
    config = tiny()
    everything = load_weights(config, list(weight_shapes(config)), seed=3)
    gpu = load_weights(config, gpu_weight_names(config), seed=3)
    tee = load_weights(config, tee_weight_names(config), seed=3)
    assert not set(gpu) & set(tee)
    assert set(gpu) | set(tee) == set(everything)
    for name, tensor in {**gpu, **tee}.items():
        assert torch.equal(tensor, everything[name])  # a subset draws the same tensors
        assert tuple(tensor.shape) == weight_shapes(config)[name]
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(random_weight(config, q0, seed=3), everything[q0])
    assert not torch.equal(random_weight(config, q0, seed=4), everything[q0])
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(everything[q0], everything[q1])


def test_random_init_is_well_scaled():
    config = LlamaConfig.preset("seed-bench")
    q = random_weight(config, "model.layers.0.self_attn.q_proj.weight")
    assert abs(q.std().item() * math.sqrt(config.hidden_size) - 1) < 0.05
    norm = random_weight(config, "model.norm.weight")
    assert abs(norm.mean().item() - 1) < 0.05
    assert 0.05 < norm.std().item() < 0.2
    logits = LlamaReference(tiny(num_hidden_layers=6)).forward(ids_for(tiny(), 64),
                                                               all_logits=True)
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 5
