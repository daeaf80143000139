"""Damaged, hostile or unsupported checkpoints are refused with a ``ValueError``, early.

Found in review: malformed GGUF files escaped as IndexError, KeyError, ZeroDivisionError,
TypeError, RuntimeError or NotImplementedError (the examples catch ``ValueError``/``OSError``
to print one line); a claimed layer count of 2**31 exhausted memory while the names were
listed; a count below the blocks present loaded a truncated model; big-endian files and
quantised Hugging Face checkpoints (FP8, int8) loaded as garbage weights without a word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from actors import LlamaConfig
from actors.llama import CheckpointReader, load_weights, weight_shapes
from tests.unit import test_gguf as tg
from tests.unit.test_gguf import all_names, tiny, write_gguf

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
T = gguf.GGUFValueType
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _good(tmp_path: Path, name: str = "good.gguf") -> Path:
    c = tiny()
    return write_gguf(tmp_path / name, c, load_weights(c, all_names(c), seed=0))


def _set_block_count(path: Path, count: int) -> None:
    data = bytearray(path.read_bytes())
    f = gguf.GGUFReader(str(path)).fields["llama.block_count"]
    off = f.offset + sum(p.nbytes for p in f.parts[:-1])  # the value: a uint32
    data[off:off + 4] = count.to_bytes(4, "little")
    path.write_bytes(bytes(data))


# -- malformed GGUF files -------------------------------------------------------------------

def truncated_header(tmp_path: Path) -> Path:
    p = tmp_path / "trunc.gguf"
    p.write_bytes(_good(tmp_path).read_bytes()[:152])  # cut inside the metadata
    return p


def duplicate_key(tmp_path: Path) -> Path:
    w = gguf.GGUFWriter(str(tmp_path / "dup0.gguf"), "llama")
    w.add_block_count(2)
    w.add_key_value("llama.block_coun2", 7, T.UINT32)  # renamed below: the key given twice
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = tmp_path / "dup.gguf"
    p.write_bytes((tmp_path / "dup0.gguf").read_bytes().replace(b"llama.block_coun2",
                                                                 b"llama.block_count"))
    return p


def _patched_meta(tmp_path: Path, key: str, value, vtype) -> Path:
    """The good file with one metadata value replaced (GGUFWriter keeps one per key)."""
    r = gguf.GGUFReader(str(_good(tmp_path, "base.gguf")))
    out = tmp_path / "patched.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name == key:
            if vtype == T.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, vtype)
            continue
        w.add_key_value(f.name, f.contents(), f.types[0],
                        sub_type=f.types[-1] if f.types[0] == T.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _with_tensor(tmp_path: Path, drop: str, name: str, value: np.ndarray) -> Path:
    c = tiny()
    weights = load_weights(c, all_names(c), seed=0)
    del weights[drop]
    return write_gguf(tmp_path / "odd.gguf", c, weights, extra={name: value})


CASES = {
    "truncated_header": truncated_header,
    "duplicate_key": duplicate_key,
    "zero_heads": lambda p: _patched_meta(p, "llama.attention.head_count", 0, T.UINT32),
    "array_width": lambda p: _patched_meta(p, "llama.embedding_length", [64], T.ARRAY),
    "string_eps": lambda p: _patched_meta(p, "llama.attention.layer_norm_rms_epsilon",
                                          "tiny", T.STRING),
    "q_rows_not_per_head": lambda p: _with_tensor(
        p, "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight",
        np.ones((60, 64), np.float32)),
    "int32_tensor": lambda p: _with_tensor(p, "model.norm.weight", "output_norm.weight",
                                           np.ones(64, np.int32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_gguf_file_is_a_value_error(tmp_path, case):
    path = CASES[case](tmp_path)
    with pytest.raises(ValueError, match=r"GGUF|gguf"):
        LlamaConfig.from_pretrained(path)
        CheckpointReader(path)


def test_the_example_says_so_in_one_line(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import llama_generate
    finally:
        sys.path.remove(str(ROOT / "examples"))
    path = truncated_header(tmp_path)
    assert llama_generate.main(["--checkpoint", str(path), "--no-verify"]) == 2
    assert "cannot use checkpoint" in capsys.readouterr().out


# -- layer counts ---------------------------------------------------------------------------

def test_gguf_blocks_beyond_the_count_are_refused_not_dropped(tmp_path):
    path = _good(tmp_path)  # 2 blocks
    _set_block_count(path, 1)
    with pytest.raises(ValueError, match=r"block_count 1.*blocks 0\.\.1"):
        LlamaConfig.from_pretrained(path)


def test_a_hf_config_that_undercounts_its_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    c = tiny()
    save_file(load_weights(c, all_names(c), seed=0), str(tmp_path / "model.safetensors"))
    hf = c.to_hf_dict()
    hf["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = LlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers 0\.\.1.*num_hidden_layers 1"):
        load_weights(cfg, list(weight_shapes(cfg)), checkpoint=tmp_path)


CHILD = textwrap.dedent("""
    import json, resource, sys
    from safetensors.torch import save_file
    from tests.unit.test_checkpoint_refusals import _good, _set_block_count
    from tests.unit.test_gguf import all_names, tiny
    from actors import LlamaConfig, LlamaReference
    from actors.llama import CheckpointReader, load_weights
    from pathlib import Path
    # 3 GiB beyond what the imports mapped: a CUDA build of torch maps more than 3 GiB of
    # address space on import alone (torch 2.11+cu130, the device image's).
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 30), mapped + (3 << 30)))

    root = Path(sys.argv[1])
    path = _good(root)
    _set_block_count(path, 2**31)
    try:
        LlamaConfig.from_pretrained(path)
    except ValueError as e:
        print("GGUF REFUSED", e)
    c = tiny()
    folder = root / "hf"
    folder.mkdir()
    save_file(load_weights(c, all_names(c), seed=0), str(folder / "model.safetensors"))
    hf = c.to_hf_dict()
    hf["num_hidden_layers"] = 2**31
    (folder / "config.json").write_text(json.dumps(hf))
    cfg = LlamaConfig.from_pretrained(folder)
    print("parameters", cfg.num_parameters())  # what a CLI prints first
    for make in (lambda: CheckpointReader(folder, cfg), lambda: LlamaReference(cfg, folder)):
        try:  # what GPUWorker and TEEDriver open first; the reference forward
            make()
        except ValueError as e:
            print("HF REFUSED", e)
""")


def test_an_absurd_layer_count_is_refused_before_anything_is_sized_by_it(tmp_path):
    """Run in a child given 3 GiB beyond its imports: before the fix it listed 2**31 layers'
    names until MemoryError (or, uncapped, until the machine ran out)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "GGUF REFUSED" in done.stdout and done.stdout.count("HF REFUSED") == 2, done.stdout


# -- what is not float weights ----------------------------------------------------------------

def _big_endian_gguf(path: Path, monkeypatch, **kw) -> tuple[Path, dict]:
    """A tiny model written as llama.cpp's ``--bigendian`` does; its source weights."""
    writer = gguf.GGUFWriter

    class BigEndian(writer):
        def __init__(self, *a, **k):
            super().__init__(*a, endianess=gguf.GGUFEndian.BIG, **k)

    config = tiny()
    source = load_weights(config, all_names(config), seed=0)
    with monkeypatch.context() as m:
        m.setattr(tg.gguf, "GGUFWriter", BigEndian)
        return write_gguf(path, config, source, **kw), source


def test_a_big_endian_gguf_reads_right(tmp_path, monkeypatch):
    config = tiny()
    path, source = _big_endian_gguf(tmp_path / "be.gguf", monkeypatch)
    assert gguf.GGUFReader(str(path)).byte_order == "S"
    assert LlamaConfig.from_pretrained(path) == config
    got = load_weights(config, all_names(config), checkpoint=path)
    for name, t in source.items():
        assert torch.equal(got[name], t), name


def test_a_quantised_block_in_a_big_endian_gguf_is_refused(tmp_path, monkeypatch):
    path, _ = _big_endian_gguf(tmp_path / "be.gguf", monkeypatch,
                               quantise={"model.layers.0.mlp.up_proj.weight": tg.Q.Q8_0})
    with pytest.raises(ValueError, match="big-endian"):
        CheckpointReader(path)


@pytest.mark.parametrize("dtype,quant", [
    (torch.float8_e4m3fn, {"quant_method": "fp8", "activation_scheme": "dynamic"}),
    (torch.int8, {"quant_method": "bitsandbytes", "load_in_8bit": True}),
])
def test_a_quantised_hf_checkpoint_is_refused(tmp_path, dtype, quant):
    from safetensors.torch import save_file

    config = tiny()
    tensors = {}
    for name, t in load_weights(config, all_names(config), seed=0).items():
        if t.dim() == 2:  # the projections, as such a checkpoint stores them
            scale = t.abs().amax() / 100
            tensors[name] = (t / scale).to(dtype)
            tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
        else:
            tensors[name] = t
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf = config.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps({**hf, "quantization_config": quant}))
    with pytest.raises(ValueError, match="quantised checkpoints are not supported"):
        LlamaConfig.from_pretrained(tmp_path)
    # Without the config's word, the tensors themselves are refused.
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=f"is {dtype}"):
        load_weights(config, all_names(config), checkpoint=tmp_path)


def test_damaged_safetensors_and_index_are_value_errors(tmp_path):
    c = tiny()
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="as safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="safetensors index"):
        CheckpointReader(tmp_path)
