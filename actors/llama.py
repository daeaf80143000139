"""LLaMA for split prefill: configuration, weights, the shared maths and a reference forward.

Three things live here, used by both halves of the split and by the tests:

* :class:`LlamaConfig` — the model's shape with Hugging Face field names, presets, and
  :meth:`LlamaConfig.from_pretrained` for a checkpoint folder's ``config.json``.
* Weights by checkpoint name (``model.layers.3.self_attn.q_proj.weight`` ...), loaded per side:
  :func:`load_weights` reads only the requested tensors from ``*.safetensors`` (sharded or
  not), or draws each one from ``(seed, name)`` alone, so the GPU worker and the TEE each
  materialise only their own part and still agree on one model.
* The non-linear maths (:func:`rms_norm`, :func:`rope_cos_sin`, :func:`apply_rope`,
  :func:`causal_softmax`, :func:`silu_mul`) and :class:`LlamaReference`, a plain one-process
  forward that materialises the attention scores exactly as the TEE's softmax needs them.

Which side holds what (:func:`weight_side`):

=========  ==========================================================================
side       tensors
=========  ==========================================================================
``gpu``    embed_tokens, q/k/v/o_proj, gate/up/down_proj of every layer, lm_head
``tee``    input_layernorm, post_attention_layernorm of every layer, model.norm
=========  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

__all__ = [
    "PRESETS",
    "CheckpointReader",
    "LlamaConfig",
    "LlamaReference",
    "apply_rope",
    "causal_softmax",
    "gpu_weight_names",
    "load_weights",
    "random_weight",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "silu_mul",
    "tee_weight_names",
    "weight_shapes",
    "weight_side",
]

logger = logging.getLogger(__name__)

_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a LLaMA model, with the Hugging Face ``config.json`` field names.

    ``head_dim=None`` means ``hidden_size // num_attention_heads``; ``num_key_value_heads=None``
    means as many as the attention heads.  ``rope_scaling`` is ``None`` (plain RoPE) or a dict
    with ``rope_type`` ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``) or ``"linear"`` (``factor``); it is normalised at
    construction (``type`` is accepted for ``rope_type``).  Invalid values raise ``ValueError``
    naming the field.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be an int >= 1, got {value!r}")
        heads = self.num_attention_heads
        kv = heads if self.num_key_value_heads is None else self.num_key_value_heads
        if not _is_int(kv) or kv < 1:
            raise ValueError(f"LlamaConfig.num_key_value_heads must be an int >= 1, got {kv!r}")
        if heads % kv:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv}) for grouped-query attention")
        head_dim = self.head_dim
        if head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                    f"num_attention_heads ({heads}); give head_dim explicitly")
            head_dim = self.hidden_size // heads
        if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim must be an even int >= 2 (RoPE rotates pairs), "
                f"got {head_dim!r}")
        if not _is_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be a number > 0, "
                             f"got {self.rms_norm_eps!r}")
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta must be a number > 0, "
                             f"got {self.rope_theta!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_word_embeddings must be a bool, "
                             f"got {self.tie_word_embeddings!r}")
        object.__setattr__(self, "num_key_value_heads", kv)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rope_scaling",
                           _normalise_rope_scaling(self.rope_scaling,
                                                   self.max_position_embeddings))

    # -- derived sizes ----------------------------------------------------------------------

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads  # type: ignore[operator]

    @property
    def q_size(self) -> int:
        """Width of the query projection (heads x head_dim)."""
        return self.num_attention_heads * self.head_dim  # type: ignore[operator]

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.num_key_value_heads * self.head_dim  # type: ignore[operator]

    def num_parameters(self) -> int:
        """Parameter count of the whole model (a tied lm_head counted once).

        Counted from one layer's shapes, not by listing every tensor: a config read from a
        file may claim billions of layers, and this is what a CLI prints first.
        """
        layer = sum(math.prod(shape(self)) for _, shape in _LINEARS.values()) \
            + len(norm_names(0)) * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size \
            + self.num_hidden_layers * layer

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """A named shape: ``"tiny"`` (CI), ``"seed-bench"``, ``"llama-3.2-1b"``."""
        try:
            fields = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown LlamaConfig preset {name!r}; "
                             f"choose one of {', '.join(sorted(PRESETS))}") from None
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in fields.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict, either RoPE layout.

        Classic: ``rope_theta`` and ``rope_scaling`` at the top level.  Recent transformers:
        one ``rope_parameters`` dict holding ``rope_theta``, ``rope_type`` and the scaling
        fields.  Unknown keys are ignored; features this implementation lacks are refused.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a LLaMA config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in (None, "llama"):
            logger.warning("config model_type is %r, not 'llama'; reading it as LLaMA",
                           model_type)
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (LLaMA uses 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise ValueError(f"{flag}=true is not supported: LLaMA projections have no bias")
        quant = data.get("quantization_config")
        if quant:  # FP8, bitsandbytes, GPTQ, AWQ ...: same names and shapes, other meaning
            method = quant.get("quant_method") if isinstance(quant, Mapping) else None
            raise ValueError(f"quantised checkpoints are not supported (quantization_config, "
                             f"quant_method {method!r}); use a float16, bfloat16 or float32 "
                             f"one, or a GGUF file")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"config is missing required field(s): {', '.join(missing)}")

        rope_theta = data.get("rope_theta")
        rope_scaling = data.get("rope_scaling")
        params = data.get("rope_parameters")
        if params is not None:
            if not isinstance(params, Mapping):
                raise ValueError(f"rope_parameters must be an object, got {params!r}")
            if params and all(isinstance(v, Mapping) or v is None for v in params.values()):
                raise ValueError("per-layer-type rope_parameters are not supported for LLaMA")
            params = dict(params)
            if "rope_theta" in params:
                rope_theta = params.pop("rope_theta")
            params.pop("partial_rotary_factor", None)
            rope_type = params.get("rope_type", params.get("type", "default"))
            rope_scaling = None if rope_type == "default" else params
        kwargs: dict[str, Any] = {
            k: data[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "vocab_size")}
        for k in ("num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
                  "max_position_embeddings"):
            if data.get(k) is not None:
                kwargs[k] = data[k]
        if rope_theta is not None:
            kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = rope_scaling
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LlamaConfig:
        """Read a checkpoint's config: a Hugging Face folder's ``config.json`` or GGUF metadata.

        ``directory`` may be a GGUF file, or a folder holding one GGUF file and no
        ``config.json`` (see :mod:`actors.gguf_checkpoint`).
        """
        path = Path(directory)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        from actors.gguf_checkpoint import find_gguf, gguf_config_dict

        gguf = find_gguf(path)
        if gguf is not None:
            data = gguf_config_dict(gguf)
            try:
                return cls.from_dict(data)
            except ValueError as e:
                raise ValueError(f"{str(gguf)!r}: {e}") from e
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(path)!r} is neither a folder nor a "
                                    f"GGUF file")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"checkpoint folder {str(path)!r} has no config.json")
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {str(cfg)!r} as JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{str(cfg)!r}: {e}") from e

    def to_hf_dict(self, layout: str = "rope_parameters") -> dict[str, Any]:
        """The ``config.json`` dict; ``layout`` is ``"rope_parameters"`` or ``"classic"``."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False, "mlp_bias": False,
        }
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        if layout == "classic":
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = scaling
        elif layout == "rope_parameters":
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                      **(scaling or {})}
        else:
            raise ValueError(f"layout must be 'rope_parameters' or 'classic', got {layout!r}")
        return out


def _normalise_rope_scaling(scaling: Any, max_positions: int) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"LlamaConfig.rope_scaling must be None or a dict, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return None
    factor = scaling.get("factor")
    if not _is_number(factor) or factor <= 0:
        raise ValueError(f"rope_scaling.factor must be a number > 0, got {factor!r}")
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    low = scaling.get("low_freq_factor")
    high = scaling.get("high_freq_factor")
    original = scaling.get("original_max_position_embeddings", max_positions)
    if not _is_number(low) or low <= 0:
        raise ValueError(f"rope_scaling.low_freq_factor must be a number > 0, got {low!r}")
    if not _is_number(high) or high <= low:
        raise ValueError(f"rope_scaling.high_freq_factor must be a number > low_freq_factor "
                         f"({low!r}), got {high!r}")
    if not _is_int(original) or original < 1:
        raise ValueError(f"rope_scaling.original_max_position_embeddings must be an int >= 1, "
                         f"got {original!r}")
    return {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": original}


PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: a prefill of a few hundred tokens takes milliseconds.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    # Big enough for transport to matter, small enough for two CPU cores.
    "seed-bench": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "max_position_embeddings": 4096},
    # The shapes of meta-llama/Llama-3.2-1B.
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192},
                     "tie_word_embeddings": True, "max_position_embeddings": 131072},
}


# -- weights ---------------------------------------------------------------------------------

_LINEARS = {  # short name -> (checkpoint suffix, out size, in size) as functions of config
    "q": ("self_attn.q_proj", lambda c: (c.q_size, c.hidden_size)),
    "k": ("self_attn.k_proj", lambda c: (c.kv_size, c.hidden_size)),
    "v": ("self_attn.v_proj", lambda c: (c.kv_size, c.hidden_size)),
    "o": ("self_attn.o_proj", lambda c: (c.hidden_size, c.q_size)),
    "gate": ("mlp.gate_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "up": ("mlp.up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "down": ("mlp.down_proj", lambda c: (c.hidden_size, c.intermediate_size)),
}
LINEAR_NAMES = tuple(_LINEARS)
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


def linear_name(layer: int, short: str) -> str:
    """Checkpoint name of a layer's projection, e.g. ``(0, "q")`` → ``model.layers.0....``."""
    return f"model.layers.{layer}.{_LINEARS[short][0]}.weight"


def norm_names(layer: int) -> tuple[str, str]:
    """Checkpoint names of a layer's input and post-attention RMSNorm weights."""
    return (f"model.layers.{layer}.input_layernorm.weight",
            f"model.layers.{layer}.post_attention_layernorm.weight")


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint by name, in a stable order (no lm_head when tied)."""
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, config.hidden_size)}
    for i in range(config.num_hidden_layers):
        for short, (_, shape) in _LINEARS.items():
            shapes[linear_name(i, short)] = shape(config)
        for n in norm_names(i):
            shapes[n] = (config.hidden_size,)
    shapes[FINAL_NORM] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, config.hidden_size)
    return shapes


def weight_side(name: str) -> str:
    """``"tee"`` for RMSNorm weights, ``"gpu"`` for everything else."""
    return "tee" if name.endswith("norm.weight") else "gpu"


def gpu_weight_names(config: LlamaConfig) -> list[str]:
    """The tensors the GPU worker holds."""
    return [n for n in weight_shapes(config) if weight_side(n) == "gpu"]


def tee_weight_names(config: LlamaConfig) -> list[str]:
    """The tensors the TEE driver holds."""
    return [n for n in weight_shapes(config) if weight_side(n) == "tee"]


def _name_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def random_weight(config: LlamaConfig, name: str, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``name`` drawn from ``(seed, name)`` alone, independent of every other.

    Scale: a weight of shape ``[out, in]`` is normal with std ``1/sqrt(in)``, so a projection
    of a unit-RMS input (what RMSNorm hands it) has unit-variance outputs: attention scores are
    of order one and the softmax is far from uniform, logits are of order one, and that holds
    through any depth.  (Hugging Face's 0.02 would give scores of ~0.01 and near-uniform
    attention at these widths, which would hide mask or RoPE mistakes.)  The embedding is
    scaled the same way so a tied lm_head gives order-one logits.  Norm weights are
    ``1 + 0.1·N(0,1)`` so that a mistake in applying them shows.
    """
    shapes = weight_shapes(config)
    if name == LM_HEAD and config.tie_word_embeddings:
        name = EMBED
    if name not in shapes:
        raise ValueError(f"{name!r} is not a weight of this LLaMA config")
    shape = shapes[name]
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        t.mul_(0.1).add_(1.0)
    else:
        t.mul_(1.0 / math.sqrt(shape[1]))
    return t.to(dtype)


def _open_safetensors(path: Path) -> Any:
    """``safe_open`` of ``path``, a damaged or missing file refused with ``ValueError``.

    safetensors raises its own ``SafetensorError`` (not a ``ValueError``) for a truncated
    or garbage header; callers, and the examples' one-line "cannot use checkpoint", rely on
    ``ValueError``/``OSError``.
    """
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {str(path)!r} as safetensors: {e}") from e


_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointReader:
    """Lazy reader of a checkpoint: ``*.safetensors`` files (one or shards), or GGUF.

    The name → file map comes from ``model.safetensors.index.json`` when present, else from
    the files' headers; tensors are read only when asked for.  Build one and pass it to
    :func:`load_weights` to load a model in several steps without re-reading the map.  A GGUF
    checkpoint is read through its float32 conversion in the user's cache, made on first use
    (:func:`actors.gguf_checkpoint.cached_conversion`); ``source`` is what was asked for,
    ``path`` the folder actually read.  With ``config``, the checkpoint's layers are checked
    against it at once (:meth:`check_layers`), before anything is sized by its layer count.
    """

    def __init__(self, directory: str | Path, config: LlamaConfig | None = None) -> None:
        self.source = Path(directory)
        if not self.source.exists():
            raise FileNotFoundError(f"checkpoint {str(self.source)!r} does not exist")
        from actors.gguf_checkpoint import cached_conversion, find_gguf

        gguf = find_gguf(self.source)
        self.path = cached_conversion(gguf) if gguf is not None else self.source
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} is neither a folder nor a "
                                    f"GGUF file")
        self.where: dict[str, Path] = {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                self.where = {str(k): self.path / v for k, v in weight_map.items()}
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"cannot read {str(index)!r}: not a safetensors index "
                                 f"({type(e).__name__}: {e})") from e
        else:
            for f in sorted(self.path.glob("*.safetensors")):
                with _open_safetensors(f) as st:
                    for k in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        self.where[k] = f
        if not self.where:
            raise FileNotFoundError(f"checkpoint folder {str(self.path)!r} has no "
                                    f"*.safetensors files")
        if config is not None:
            self.check_layers(config)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def check_layers(self, config: LlamaConfig) -> None:
        """``ValueError`` unless the checkpoint holds exactly layers ``0 … n-1`` of ``config``.

        Called before anything is sized by the config's layer count: a ``config.json`` that
        claims 2**31 layers would otherwise build that many names, and one that claims fewer
        layers than the checkpoint holds would load a truncated model without a word.
        """
        held = {int(m.group(1)) for n in self.where if (m := _LAYER_NAME.match(n))}
        n = config.num_hidden_layers
        if len(held) != n or (held and max(held) >= n):  # held == range(n)
            have = f"layers 0..{max(held)} ({len(held)} of them)" if held else "no layers"
            raise ValueError(f"checkpoint {str(self.path)!r} holds {have}; its config says "
                             f"num_hidden_layers {n}")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise ValueError(f"checkpoint {str(self.path)!r} has no tensor {n!r}")
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with _open_safetensors(f) as st:
                for n in ns:
                    try:
                        t = st.get_tensor(n)
                    except Exception as e:  # safetensors' own error type: a damaged file
                        raise ValueError(f"cannot read tensor {n!r} from {str(f)!r}: "
                                         f"{e}") from e
                    if t.dtype not in _FLOAT_WEIGHTS:  # codes of a quantised checkpoint
                        raise ValueError(f"checkpoint tensor {n!r} is {t.dtype}; only "
                                         f"float16, bfloat16, float32 and float64 weights "
                                         f"are read (quantised checkpoints are not supported)")
                    out[n] = t
        return out


def load_weights(config: LlamaConfig, names: Sequence[str],
                 checkpoint: str | Path | CheckpointReader | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors ``names`` in ``dtype``: read from ``checkpoint`` or drawn from ``seed``.

    Only the named tensors are read or generated.  With tied embeddings ``lm_head.weight``
    is the embedding (the same tensor object when both are asked for).  Shapes are checked
    against ``config``.
    """
    ckpt = None
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, CheckpointReader) \
            else CheckpointReader(checkpoint)
        ckpt.check_layers(config)
    shapes = weight_shapes(config)
    tied = config.tie_word_embeddings
    wanted = []
    for n in names:
        if n == LM_HEAD and tied:
            n = EMBED
        if n not in shapes:
            raise ValueError(f"{n!r} is not a weight of this LLaMA config")
        if n not in wanted:
            wanted.append(n)
    if ckpt is None:
        raw = {n: random_weight(config, n, seed, dtype) for n in wanted}
    else:
        raw = ckpt.read(wanted)
        for n, t in raw.items():
            if tuple(t.shape) != shapes[n]:
                raise ValueError(f"checkpoint tensor {n!r} has shape {tuple(t.shape)}, "
                                 f"the config says {shapes[n]}")
            raw[n] = t.to(dtype)
    return {n: raw[EMBED if (n == LM_HEAD and tied) else n] for n in names}


# -- the shared maths ------------------------------------------------------------------------

_FUSED_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as LLaMA computes it: in float32, then back to ``x``'s dtype, then x weight."""
    if _FUSED_RMS_NORM and x.dtype == torch.float32 and weight.dtype == torch.float32:
        # The same maths in one op (no cast to round between): half the time of the six ops
        # below on a decode row, which runs it twice per layer.
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim/2]`` (float32), with Llama-3 or linear scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta
                      ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(config: LlamaConfig, positions: int | torch.Tensor,
                 dtype: torch.dtype = torch.float32,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` tables ``[T, head_dim]`` for positions ``0..T-1`` (or the given ones)."""
    if isinstance(positions, int):
        positions = torch.arange(positions)
    inv = rope_inv_freq(config) if inv_freq is None else inv_freq
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[..., T, head_dim]`` by position (the "rotate half" convention of HF LLaMA)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scores · scale)`` over the last axis, each query seeing keys up to itself.

    ``scores[..., Tq, Tk]`` with query ``i`` at position ``Tk - Tq + i`` (``Tq == Tk`` in a
    prefill).  Computed in float32; the result is in ``scores``' dtype.
    """
    tq, tk = scores.shape[-2], scores.shape[-1]
    mask = torch.ones(tq, tk, dtype=torch.bool).triu_(tk - tq + 1)
    s = scores.float() * scale
    s.masked_fill_(mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(scores.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate: ``silu(gate) · up``."""
    return F.silu(gate) * up


# -- reference forward ------------------------------------------------------------------------

class LlamaReference:
    """The whole model in one process, plain torch: the ground truth for the split.

    Weights come from ``weights`` (a name → tensor dict, e.g. shared with another model),
    else from ``checkpoint`` or ``seed`` like the split's sides.  Attention materialises the
    full ``[heads, T, T]`` score matrix and applies :func:`causal_softmax` to it, as the TEE
    does, with each key/value head repeated for its query heads (as Hugging Face does).
    """

    def __init__(self, config: LlamaConfig, checkpoint: str | Path | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        self.config = config
        self.dtype = dtype
        if weights is None and checkpoint is not None \
                and not isinstance(checkpoint, CheckpointReader):
            checkpoint = CheckpointReader(checkpoint, config)  # layers checked before sizing
        names = [*weight_shapes(config), LM_HEAD] if config.tie_word_embeddings else \
            list(weight_shapes(config))
        if weights is None:
            weights = load_weights(config, names, checkpoint, seed, dtype)
        else:
            weights = dict(weights)
            if config.tie_word_embeddings:
                weights.setdefault(LM_HEAD, weights[EMBED])
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(f"weights lack {len(missing)} tensor(s), e.g. {missing[0]!r}")
        self.w = {n: weights[n].to(dtype) for n in names}
        self.inv_freq = rope_inv_freq(config)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | Sequence[int],
                all_logits: bool = False) -> torch.Tensor:
        """Float32 logits ``[vocab]`` of the last position, or ``[T, vocab]``."""
        c, w = self.config, self.w
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"input_ids must have shape [T] with T >= 1, got {tuple(ids.shape)}")
        t = ids.numel()
        d, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        cos, sin = rope_cos_sin(c, t, self.dtype, self.inv_freq)
        h = F.embedding(ids, w[EMBED])
        for i in range(c.num_hidden_layers):
            in_norm, post_norm = norm_names(i)
            x = rms_norm(h, w[in_norm], c.rms_norm_eps)
            q = F.linear(x, w[linear_name(i, "q")]).view(t, nh, d).transpose(0, 1)
            k = F.linear(x, w[linear_name(i, "k")]).view(t, nkv, d).transpose(0, 1)
            v = F.linear(x, w[linear_name(i, "v")]).view(t, nkv, d).transpose(0, 1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(c.num_key_value_groups, dim=0)
            v = v.repeat_interleave(c.num_key_value_groups, dim=0)
            probs = causal_softmax(q @ k.transpose(1, 2), d ** -0.5)
            attn = (probs @ v).transpose(0, 1).reshape(t, nh * d)
            h = h + F.linear(attn, w[linear_name(i, "o")])
            x = rms_norm(h, w[post_norm], c.rms_norm_eps)
            gate = F.linear(x, w[linear_name(i, "gate")])
            up = F.linear(x, w[linear_name(i, "up")])
            h = h + F.linear(silu_mul(gate, up), w[linear_name(i, "down")])
        if not all_logits:
            h = h[-1:]
        logits = F.linear(rms_norm(h, w[FINAL_NORM], c.rms_norm_eps), w[LM_HEAD]).float()
        return logits if all_logits else logits[0]

    __call__ = forward
