"""GGUF checkpoints (llama.cpp's one-file format) read as Hugging Face folders.

A GGUF file holds the model's hyper-parameters as metadata and its tensors, usually quantised,
under llama.cpp's names.  Everything else in :mod:`actors` reads a Hugging Face folder
(``config.json`` + ``*.safetensors``), so a GGUF file is converted once into such a folder
under the user's cache and read from there afterwards:

``$XDG_CACHE_HOME/tee-actors/gguf/<stem>-<key>/`` (``~/.cache/...`` when the variable is
unset), holding ``config.json``, ``model.safetensors`` (float32) and ``source.json``; ``key``
hashes the file's absolute path, size and modification time, so a changed file converts
again.  The folder is written under a temporary name and renamed into place: two processes
converting at once (the GPU worker and the TEE driver both loading their halves) each finish
with a complete folder, and an interrupted conversion leaves no half-written one.

What the conversion undoes:

* **Quantisation** — every tensor is dequantised to float32 with the ``gguf`` package
  (``gguf.quants.dequantize``: Q4_0/Q4_1/Q8_0/K-quants/F16/BF16 ...).
* **Names** — ``token_embd`` → ``model.embed_tokens``, ``blk.N.attn_q`` →
  ``model.layers.N.self_attn.q_proj`` and so on (:data:`GGUF_NAMES`).
* **The q/k row permutation** — llama.cpp's converter reorders the rows of every head of
  ``q_proj`` and ``k_proj`` from Hugging Face's "rotate half" RoPE layout to interleaved pairs
  (``reshape(heads, 2, d/2, in).swapaxes(1, 2)``); :func:`unpermute_qk` puts them back, so
  the folder equals the Hugging Face checkpoint the file was made from (up to quantisation).

Metadata → ``config.json`` (:func:`gguf_config_dict`): ``llama.embedding_length`` →
``hidden_size``, ``feed_forward_length``, ``block_count``, ``attention.head_count(_kv)``,
``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``context_length`` →
``max_position_embeddings``, ``rope.scaling.type`` ``linear`` with ``rope.scaling.factor``;
``tie_word_embeddings`` when the file has no ``output.weight``; ``tokenizer.ggml.bos_token_id``
→ ``bos_token_id``, and the eos, end-of-turn and end-of-message ids → ``eos_token_id`` (a list
when several: an answer ends at any of them).  Refused with a
``ValueError``: architectures other than ``llama``, YaRN scaling, and Llama-3 RoPE factors
stored as a ``rope_freqs`` tensor (their parameters cannot be recovered from the tensor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["GGUF_NAMES", "cache_root", "cached_conversion", "conversion_dir", "find_gguf",
           "gguf_config_dict", "gguf_special_token_ids", "is_gguf", "permute_qk",
           "read_gguf_tensors", "unpermute_qk"]

logger = logging.getLogger(__name__)

CONVERSION_VERSION = 2  # bump when the folder's content changes: old conversions are redone
_MAGIC = b"GGUF"

# llama.cpp name -> Hugging Face name; "{i}" is the layer.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_IGNORED = ("rope_freqs.weight",)  # handled (refused) by the config reader


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a dependency in setup.cfg; say what to do if it is missing
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    return gguf


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with p.open("rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``*.gguf`` file in a folder.

    ``None`` for a Hugging Face folder (``config.json`` present: it wins over any GGUF file
    beside it) or a folder without GGUF files.  A folder with several GGUF files and no
    ``config.json`` is ambiguous: ``ValueError`` listing them.
    """
    p = Path(path)
    if p.is_file():
        return p if is_gguf(p) else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f for f in p.glob("*.gguf") if is_gguf(f))
    if len(found) > 1:
        raise ValueError(f"folder {str(p)!r} holds several GGUF files "
                         f"({', '.join(f.name for f in found)}); name one")
    return found[0] if found else None


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/tee-actors``, or ``~/.cache/tee-actors``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tee-actors"


def conversion_dir(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives (whether or not it exists yet)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(
        f"{CONVERSION_VERSION}:{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    return root / f"{p.stem}-{key}"


# -- metadata ---------------------------------------------------------------------------------

def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (AttributeError, IndexError, ValueError):  # older gguf: decode by hand
        return f.parts[f.data[0]].tolist()[0] if f.data else default


def _f32(v: float) -> float:
    """A float32 read back as the shortest decimal (9.99999974e-06 → 1e-05)."""
    return float(str(np.float32(v)))


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _meta_int(v: Any, key: str, where: str, lo: int = 1) -> int:
    """``v`` (the value of metadata ``key``) as an int >= ``lo``, else ``ValueError``.

    A hostile or damaged file can put any type under any key (an array, a string, a
    float, zero heads); that must be a clear refusal, not a ``TypeError`` from ``int()`` or a
    ``ZeroDivisionError`` further on.
    """
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{where}: GGUF metadata {key} must be an integer >= {lo}, "
                         f"got {_short(v)}")
    return int(v)


def _meta_float(v: Any, key: str, where: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)) \
            or not np.isfinite(v) or v <= 0:
        raise ValueError(f"{where}: GGUF metadata {key} must be a number > 0, got {_short(v)}")
    return _f32(v)


def _block_indices(names: Any) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _LAYER.match(n))}


def _config_from_reader(reader: Any, where: str) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def need(key: str, default: Any = None) -> Any:
        v = _field(reader, f"llama.{key}", default)
        if v is None:
            raise ValueError(f"{where}: GGUF metadata lacks llama.{key}")
        return v

    def need_int(key: str, default: Any = None) -> int:
        return _meta_int(need(key, default), f"llama.{key}", where)

    def need_float(key: str, default: float) -> float:
        return _meta_float(need(key, default), f"llama.{key}", where)

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = need_int("embedding_length"), need_int("attention.head_count")
    kv = need_int("attention.head_count_kv", heads)
    head_dim = need_int("attention.key_length", max(hidden // heads, 1))
    rot = _field(reader, "llama.rope.dimension_count")
    if rot is not None and _meta_int(rot, "llama.rope.dimension_count", where) != head_dim:
        raise ValueError(f"{where}: partial RoPE (rope.dimension_count {rot} of head_dim "
                         f"{head_dim}) is not supported")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        embd = tensors.get("token_embd.weight")
        if embd is None:
            raise ValueError(f"{where}: GGUF file has no token_embd.weight")
        vocab = int(embd.shape[-1])  # ggml shapes are [in, out]
    blocks = need_int("block_count")
    # The block count is checked against the tensors before anything is sized by it: a
    # count of 2**31 over a file of two blocks would otherwise build 2**31 layers' names
    # (memory exhausted), and a count below the blocks present would drop some silently.
    held = _block_indices(tensors)
    if len(held) != blocks or (held and max(held) >= blocks):  # held == range(blocks)
        have = f"blocks 0..{max(held)} ({len(held)} of them)" if held else "no blocks"
        raise ValueError(f"{where}: GGUF metadata says llama.block_count {blocks}, but the "
                         f"file holds tensors of {have}")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": need_int("feed_forward_length"),
        "num_hidden_layers": blocks, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": _meta_int(vocab, "llama.vocab_size", where),
        "rms_norm_eps": need_float("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": need_float("rope.freq_base", 10000.0),
        "max_position_embeddings": need_int("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
    }
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": need_float("rope.scaling.factor", None)}
    elif scaling not in ("none", None):
        raise ValueError(f"{where}: GGUF RoPE scaling {scaling!r} is not supported "
                         f"(none or linear)")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{where}: GGUF file stores Llama-3 RoPE factors as a rope_freqs "
                         f"tensor; converting those back to rope_scaling is not supported")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = _meta_int(bos, "tokenizer.ggml.bos_token_id", where, lo=0)
    # What ends an answer: llama.cpp stops at any end-of-generation token, and a chat model
    # ends its turn with end-of-turn (Llama-3 Instruct's <|eot_id|>), not with its eos.
    # Several ids are a list, as in Llama-3.1's own config.json.
    ends: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        v = _field(reader, key)
        if v is not None and (i := _meta_int(v, key, where, lo=0)) not in ends:
            ends.append(i)
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return config


def _reader(path: Path) -> Any:
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # any parse failure of foreign bytes is a refusal
        # A damaged file makes the reader fail in many ways (IndexError when cut inside the
        # metadata, KeyError for a key given twice, struct and numpy errors ...); callers
        # (and the examples' "cannot use checkpoint" line) rely on one type.
        raise ValueError(f"cannot read {str(path)!r} as GGUF: "
                         f"{type(e).__name__}: {e}") from e


# The tokenizer's special tokens, as a GGUF file names them (``tokenizer.ggml.*``).
SPECIAL_TOKEN_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "unk": "tokenizer.ggml.unknown_token_id",
                      "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: str | Path) -> dict[str, int]:
    """``{"bos": id, "eos": id, "unk": id, "pad": id}``: those the GGUF file at ``path`` names.

    What a tokenizer built from the file must say (``actors.tokenizer.load_tokenizer``
    checks it): transformers' conversion has not always got them right.  Reads the file's
    metadata (its whole vocabulary: seconds for a large one); ``ValueError`` for a file that
    is not GGUF.  A value that is no id is left out, with a warning: llama.cpp writes -1
    for "no such token" (a pad or unk, typically), and such files loaded before.
    """
    p = Path(path)
    reader = _reader(p)
    out: dict[str, int] = {}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        v = _field(reader, key)
        if v is None:
            continue
        try:
            out[name] = _meta_int(v, key, str(p), lo=0)
        except ValueError as e:
            logger.warning("%s; its tokenizer keeps the %s token it converts to", e, name)
    return out


def gguf_config_dict(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` dict of the GGUF file ``path`` (metadata only; no tensor read).

    Taken from the cached conversion when there is one: parsing a GGUF file's metadata reads
    its whole vocabulary (2.5 s for SmolLM2's 49152 tokens and merges).
    """
    p = Path(path)
    cached = conversion_dir(p)
    if _complete(cached):
        try:
            return json.loads((cached / "config.json").read_text())
        except (OSError, ValueError):
            pass  # read the file itself
    return _config_from_reader(_reader(p), str(p))


# -- tensors ----------------------------------------------------------------------------------

def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order from Hugging Face's: pairs interleaved within each head."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: Hugging Face's "rotate half" row order back."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    m = _LAYER.match(name)
    if m:
        pattern = GGUF_NAMES.get("blk.{i}." + m.group(2))
        if pattern:
            return pattern.format(i=m.group(1))
    return None


def read_gguf_tensors(path: str | Path, names: list[str] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Dequantised float32 tensors of ``path`` by Hugging Face name (all, or ``names``).

    q_proj and k_proj rows are un-permuted (see the module docstring).  Unknown tensor names
    raise ``ValueError``.
    """
    p = Path(path)
    reader = _reader(p)
    return _read_tensors(reader, _config_from_reader(reader, str(p)), str(p), names)


def _read_tensors(reader: Any, config: dict[str, Any], where: str,
                  names: list[str] | None = None) -> dict[str, torch.Tensor]:
    gguf = _gguf()
    wanted = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        hf = _hf_name(t.name)
        if hf is None:
            raise ValueError(f"{where!r}: unknown GGUF tensor {t.name!r}")
        if wanted is not None and hf not in wanted:
            continue
        data = _dequantize(gguf, reader, t, where)
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists [in, out]
        if data.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{where!r}: GGUF tensor {t.name!r} holds {data.size} values "
                             f"for shape {shape}")
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy
        heads = None
        if hf.endswith("self_attn.q_proj.weight"):
            heads = config["num_attention_heads"]
        elif hf.endswith("self_attn.k_proj.weight"):
            heads = config["num_key_value_heads"]
        if heads is not None:
            if w.dim() != 2 or w.shape[0] % (2 * heads):
                raise ValueError(f"{where!r}: GGUF tensor {t.name!r} of shape {shape} is not "
                                 f"{heads} heads of an even number of rows each")
            w = unpermute_qk(w, heads)
        out[hf] = w.contiguous()
    if wanted is not None and wanted - set(out):
        missing = sorted(wanted - set(out))
        raise ValueError(f"{where!r} has no tensor {missing[0]!r}")
    return out


def _dequantize(gguf: Any, reader: Any, t: Any, where: str) -> np.ndarray:
    """``t``'s values as a flat-able float array, or ``ValueError`` for what cannot be read.

    A big-endian file (llama.cpp's ``--bigendian``) hands float tensors out as byte-swapped
    arrays that ``gguf.quants.dequantize`` would view as native: they are converted first,
    and its quantised blocks (whose scales are swapped inside each block) are refused.
    """
    q = gguf.GGMLQuantizationType
    data = t.data
    if getattr(reader, "byte_order", "I") == "S":
        if t.tensor_type not in (q.F32, q.F16):
            raise ValueError(f"{where!r}: GGUF tensor {t.name!r} is {t.tensor_type.name} in "
                             f"a big-endian file; only F32 and F16 are read from those")
        data = np.asarray(data).astype(data.dtype.newbyteorder("="))
    if t.tensor_type.name.startswith("I"):  # I8 ... I64: no float weights
        raise ValueError(f"{where!r}: GGUF tensor {t.name!r} has integer type "
                         f"{t.tensor_type.name}")
    try:
        return np.asarray(gguf.quants.dequantize(data, t.tensor_type))
    except NotImplementedError as e:
        raise ValueError(f"{where!r}: GGUF tensor {t.name!r} has type {t.tensor_type.name}, "
                         f"which cannot be dequantised here: {e}") from e


# -- conversion -------------------------------------------------------------------------------

def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and (folder / "source.json").is_file()


def cached_conversion(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder converted from ``gguf_path``, converting it on first use.

    ``cache_dir`` overrides ``$XDG_CACHE_HOME/tee-actors/gguf``.  Returns at once when the
    conversion exists.
    """
    from safetensors.torch import save_file

    src = Path(gguf_path).resolve()
    if not is_gguf(src):
        raise ValueError(f"{str(src)!r} is not a GGUF file")
    final = conversion_dir(src, cache_dir)
    if _complete(final):
        return final
    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        reader = _reader(src)
        config = _config_from_reader(reader, str(src))
        tensors = _read_tensors(reader, config, str(src))
        del reader
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "source.json").write_text(json.dumps({
            "gguf": str(src), "size": src.stat().st_size, "version": CONVERSION_VERSION}))
        if final.exists() and not _complete(final):  # a folder someone else mangled
            shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s", src, final, time.perf_counter() - t0)
    return final
