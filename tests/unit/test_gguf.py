"""GGUF checkpoints: tiny files written with gguf.GGUFWriter, read back and compared.

The files are written the way llama.cpp's converter writes LLaMA: names from the ``gguf``
package's own tensor map, q/k rows permuted with the converter's ``permute`` (copied below, not
taken from the code under test), hyper-parameters as ``llama.*`` metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver
from actors import gguf_checkpoint as gc
from actors.llama import LM_HEAD, CheckpointReader, load_weights, weight_shapes

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

Q = gguf.GGMLQuantizationType


def tiny(**changes) -> LlamaConfig:
    return dataclasses.replace(LlamaConfig.preset("tiny"), max_position_embeddings=256,
                               **changes)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: Path, config: LlamaConfig, weights: dict[str, torch.Tensor], *,
               quantise: dict[str, Q] | None = None, arch: str = "llama",
               scaling: str | None = None, factor: float = 1.0, tokenizer: bool = False,
               extra: dict[str, np.ndarray] | None = None, eot: int | None = None,
               pad: int | None = None) -> Path:
    c = config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling))
        w.add_rope_scaling_factor(factor)
    if tokenizer:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        chars = bytes_to_unicode()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        merges = ["h e", "l l", "he ll", "Ġ w"]  # the vocabulary: 256 bytes + 4 merged
        tokens = [chars[i] for i in range(256)] + ["he", "ll", "hell", "Ġw"]
        assert c.vocab_size == len(tokens)
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        if eot is not None:
            w.add_eot_token_id(eot)
        if pad is not None:  # signed: llama.cpp writes -1 for "no such token"
            w.add_int32("tokenizer.ggml.padding_token_id", pad)
        w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in weights.items():
        if name == LM_HEAD and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        target = names.get_name(name, try_suffixes=(".weight",))
        qtype = (quantise or {}).get(name)
        if qtype is None:
            w.add_tensor(target, np.ascontiguousarray(a))
        else:
            w.add_tensor(target, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for target, a in (extra or {}).items():
        w.add_tensor(target, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def all_names(config: LlamaConfig) -> list[str]:
    return list(weight_shapes(config))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache folder, through XDG_CACHE_HOME."""
    root = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "tee-actors" / "gguf"


def hf_model(config: LlamaConfig, seed: int):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="eager")).eval()
    model.load_state_dict(load_weights(config, list(model.state_dict()), seed=seed))
    return model


def ids_for(config: LlamaConfig, t: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("tied", [False, True])
def test_float32_gguf_equals_the_source(tmp_path, cache, tied):
    config = tiny(tie_word_embeddings=tied)
    source = load_weights(config, all_names(config), seed=4)
    path = write_gguf(tmp_path / "tiny.gguf", config, source)
    assert gc.is_gguf(path)
    assert LlamaConfig.from_pretrained(path) == config
    got = load_weights(config, all_names(config), checkpoint=path)
    for name, t in source.items():
        assert torch.equal(got[name], t), name  # float32 in, float32 out, rows un-permuted
    assert list(cache.iterdir())  # converted under $XDG_CACHE_HOME/tee-actors/gguf

    model = hf_model(config, seed=4)
    ids = ids_for(config, 50)
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    assert (LlamaReference(config, checkpoint=path).forward(ids, all_logits=True)
            - want).abs().max().item() < 1e-4
    drv = TEEDriver(config, GPUWorker(config, path, device="cpu"), path)
    with torch.no_grad():
        hf = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None],
                            max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert drv.generate(ids, 10).tolist() == hf[0, ids.numel():].tolist()


def test_quantised_tensors_are_dequantised(tmp_path):
    config = tiny()
    source = load_weights(config, all_names(config), seed=1)
    quantise = {"model.embed_tokens.weight": Q.Q8_0,
                "model.layers.0.self_attn.q_proj.weight": Q.Q4_1,
                "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
                "model.layers.1.mlp.down_proj.weight": Q.Q4_0}
    path = write_gguf(tmp_path / "q.gguf", config, source, quantise=quantise)
    got = load_weights(config, all_names(config), checkpoint=path)
    for name, qtype in quantise.items():
        src = source[name]
        # What llama.cpp would compute from these bytes: the gguf package's own dequantiser,
        # on the permuted layout, permuted back by the converter's inverse.
        a = src.numpy()
        heads = {"q_proj": (config.num_attention_heads,) * 2,
                 "k_proj": (config.num_attention_heads, config.num_key_value_heads)}
        kind = next((k for k in heads if k in name), None)
        if kind:
            a = llama_cpp_permute(a, *heads[kind])
        back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        if kind:
            n = heads[kind][1] if kind == "k_proj" else heads[kind][0]
            back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2) \
                .reshape(back.shape)
        assert torch.equal(got[name], torch.from_numpy(np.ascontiguousarray(back))), name
        step = 0.2 if qtype in (Q.Q4_0, Q.Q4_1) else 0.02
        assert (got[name] - src).abs().max().item() < step * src.abs().max().item(), name
        assert not torch.equal(got[name], src)
    for name in set(source) - set(quantise):
        assert torch.equal(got[name], source[name])


def test_permutation_round_trip():
    w = torch.randn(6 * 8, 5)
    for heads in (6, 3, 1):
        p = gc.permute_qk(w, heads)
        assert torch.equal(p, torch.from_numpy(llama_cpp_permute(w.numpy(), heads, None)))
        assert torch.equal(gc.unpermute_qk(p, heads), w)
        assert not torch.equal(p, w)


def test_linear_scaling_from_metadata(tmp_path):
    config = tiny(rope_scaling={"rope_type": "linear", "factor": 4.0})
    source = load_weights(config, all_names(config), seed=2)
    path = write_gguf(tmp_path / "lin.gguf", config, source, scaling="linear", factor=4.0)
    loaded = LlamaConfig.from_pretrained(path)
    assert loaded.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert loaded == config
    ids = ids_for(config, 90)
    with torch.no_grad():
        want = hf_model(config, seed=2)(ids[None]).logits[0]
    got = LlamaReference(loaded, checkpoint=path).forward(ids, all_logits=True)
    assert (got - want).abs().max().item() < 1e-4


def test_refused_files(tmp_path):
    config = tiny()
    source = load_weights(config, all_names(config), seed=0)
    gpt2 = write_gguf(tmp_path / "a.gguf", config, source, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        LlamaConfig.from_pretrained(gpt2)
    yarn = write_gguf(tmp_path / "b.gguf", config, source, scaling="yarn", factor=2.0)
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_pretrained(yarn)
    freqs = write_gguf(tmp_path / "c.gguf", config, source,
                       extra={"rope_freqs.weight": np.ones(config.head_dim // 2, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        CheckpointReader(freqs)
    not_gguf = tmp_path / "d.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(100))
    assert not gc.is_gguf(not_gguf)


def test_folders_holding_gguf_files(tmp_path):
    config = tiny()
    source = load_weights(config, all_names(config), seed=3)
    one = tmp_path / "one"
    one.mkdir()
    write_gguf(one / "m.gguf", config, source)
    assert gc.find_gguf(one) == one / "m.gguf"
    assert LlamaConfig.from_pretrained(one) == config
    got = load_weights(config, ["model.norm.weight"], checkpoint=one)
    assert torch.equal(got["model.norm.weight"], source["model.norm.weight"])
    write_gguf(one / "n.gguf", config, source)
    with pytest.raises(ValueError, match="several GGUF"):
        LlamaConfig.from_pretrained(one)
    # A Hugging Face folder wins over a GGUF file beside it.
    (one / "config.json").write_text('{"not": "read by find_gguf"}')
    assert gc.find_gguf(one) is None


def test_conversion_is_cached(tmp_path, cache, monkeypatch):
    config = tiny()
    source = load_weights(config, all_names(config), seed=5)
    path = write_gguf(tmp_path / "c.gguf", config, source)
    first = gc.cached_conversion(path)
    assert first.parent == cache
    assert {p.name for p in first.iterdir()} >= {"config.json", "model.safetensors"}
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gc, "_read_tensors", boom)
    monkeypatch.setattr(gc, "_reader", boom)  # the config comes from the cache, too
    assert gc.cached_conversion(path) == first
    assert CheckpointReader(path).path == first
    assert LlamaConfig.from_pretrained(path) == config
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent.parent))
    # A changed file converts again, into a folder of its own.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = gc.cached_conversion(path)
    assert second != first
    assert second.parent == cache


def test_tokenizer_from_gguf(tmp_path, cache):
    pytest.importorskip("transformers")
    from actors.tokenizer import StreamDecoder, chat_ids, eos_token_ids, load_tokenizer

    config = tiny(vocab_size=260)
    source = load_weights(config, all_names(config), seed=0)
    path = write_gguf(tmp_path / "t.gguf", config, source, tokenizer=True)
    tok = load_tokenizer(path)
    assert tok("hello world")["input_ids"] == [258, ord("o"), 259, ord("o"), ord("r"),
                                               ord("l"), ord("d")]  # the merges apply
    ids = tok("héllo")["input_ids"]
    assert tok.decode(ids) == "héllo"
    assert len(ids) == 5  # h, é as two bytes, ll, o
    assert eos_token_ids(tok) == [1]
    prompt = chat_ids(tok, "hi")
    assert tok.decode(prompt) == "<user>hi\n<assistant>"
    saved = [p for p in cache.iterdir() if p.name.endswith("-tokenizer")]
    assert len(saved) == 1
    assert load_tokenizer(path).decode(ids) == "héllo"  # from the cache this time
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["h", "", "é", "ll", "o"]  # é waits for its second byte
    assert stream.text() == "héllo"


def test_a_gguf_files_end_of_turn_token_ends_an_answer(tmp_path, cache):
    """A chat model's GGUF file names its end-of-turn token (Llama-3 Instruct's <|eot_id|>)
    beside its eos; an answer must stop at either, as llama.cpp's does.  Before, only the
    tokenizer's eos stopped it: the model's "end of turn" ran on into the next one."""
    pytest.importorskip("transformers")
    from actors.tokenizer import eos_token_ids, generation_eos_ids, load_tokenizer

    config = tiny(vocab_size=260)
    source = load_weights(config, all_names(config), seed=0)
    path = write_gguf(tmp_path / "t.gguf", config, source, tokenizer=True, eot=259)
    assert gc.gguf_config_dict(path)["eos_token_id"] == [1, 259]
    assert generation_eos_ids(path) == generation_eos_ids(tmp_path) == [1, 259]
    assert eos_token_ids(load_tokenizer(path), generation_eos_ids(path)) == [1, 259]
    (tmp_path / "p").mkdir()
    plain = write_gguf(tmp_path / "p" / "p.gguf", config, source, tokenizer=True)
    assert gc.gguf_config_dict(plain)["eos_token_id"] == 1
    assert generation_eos_ids(plain) == [1]


def _converting_like_transformers_5_17(monkeypatch):
    """Make transformers' GGUF conversion give the bos token as eos, as 5.17's did.

    Seen on the device image's transformers 5.17: SmolLM2's eos came out as <|im_start|>
    (id 1, its bos) instead of <|im_end|> (2), and its pad as None.  5.24 gets them right,
    so this stands in for 5.17 here.
    """
    import actors.tokenizer as at

    real = at._auto_tokenizer()

    class Auto:
        @staticmethod
        def from_pretrained(where, **kw):
            tok = real.from_pretrained(where, **kw)
            if "gguf_file" in kw:
                tok.eos_token = tok.bos_token
            return tok

    monkeypatch.setattr(at, "_auto_tokenizer", lambda: Auto)


def test_a_tokenizer_converted_with_a_wrong_eos_gets_the_files_own(tmp_path, cache, monkeypatch):
    """transformers 5.17 built a GGUF file's tokenizer with its bos as eos: an answer ran on
    past the model's eos (and stopped at its bos).  The file's own ids now win, when
    converted, from the cache, and over a cached folder saved without them."""
    pytest.importorskip("transformers")
    from actors.tokenizer import SPECIAL_IDS_FILE, eos_token_ids, load_tokenizer

    config = tiny(vocab_size=260)
    path = write_gguf(tmp_path / "t.gguf", config,
                      load_weights(config, all_names(config), seed=0), tokenizer=True)
    assert gc.gguf_special_token_ids(path) == {"bos": 0, "eos": 1}
    _converting_like_transformers_5_17(monkeypatch)
    tok = load_tokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_id, eos_token_ids(tok)) == (0, 1, [1])
    saved = next(p for p in cache.iterdir() if p.name.endswith("-tokenizer"))
    assert json.loads((saved / SPECIAL_IDS_FILE).read_text()) == {"bos": 0, "eos": 1}
    # From the cache, the ids are applied again: a folder whose eos went wrong is mended.
    wrong = load_tokenizer(path)
    wrong.eos_token = wrong.bos_token
    wrong.save_pretrained(str(saved))
    assert load_tokenizer(path).eos_token_id == 1
    # A folder an older version saved (the wrong eos, no ids beside it) is converted again,
    # and so is one whose ids file is damaged.
    for damage in (None, "", "[0, 1]", '{"eos": true}', '{"foo": 3}', '{"eos": "1"}'):
        if damage is None:
            (saved / SPECIAL_IDS_FILE).unlink()
        else:
            (saved / SPECIAL_IDS_FILE).write_text(damage)
        wrong.save_pretrained(str(saved))
        assert load_tokenizer(path).eos_token_id == 1, damage
        assert json.loads((saved / SPECIAL_IDS_FILE).read_text()) == {"bos": 0, "eos": 1}
        assert _loaded_afresh(saved).eos_token_id == 1, damage
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no tmp, stale

    # And a valid cache is used: no conversion at all.
    def no_conversion(*a, **kw):
        raise AssertionError("converted again")
    monkeypatch.setattr(gc, "_reader", no_conversion)
    assert load_tokenizer(path).eos_token_id == 1


def _loaded_afresh(folder):
    """The tokenizer saved in `folder`, read by transformers alone."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_an_id_the_tokenizer_cannot_take_is_left_as_converted(tmp_path, cache, monkeypatch,
                                                              caplog):
    """An id past the vocabulary, or a string the vocabulary holds twice (real GGUF files
    have such duplicates), cannot be set by its string: the conversion's token stays, and
    the log says why.  A refusal would fail a file that loaded before."""
    pytest.importorskip("transformers")
    import actors.tokenizer as at

    config = tiny(vocab_size=260)
    path = write_gguf(tmp_path / "t.gguf", config,
                      load_weights(config, all_names(config), seed=0), tokenizer=True)
    raw = at._auto_tokenizer().from_pretrained(str(tmp_path), gguf_file=path.name)
    monkeypatch.setattr(at, "gguf_special_token_ids",
                        lambda p: {"bos": 0, "eos": 1, "unk": 99999})
    with caplog.at_level("WARNING", logger="actors.tokenizer"):
        tok = at.load_tokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)  # the others are still set
    assert tok.unk_token == raw.unk_token
    assert "names unk token id 99999, which its tokenizer cannot take (no such token)" \
        in caplog.text


def test_a_token_set_by_a_string_that_lands_on_another_id_is_put_back(caplog):
    """A string the vocabulary holds at two ids names the other one when set: the converted
    token stays, and the log says why."""
    from actors.tokenizer import _match_special_tokens

    class Tok:  # what transformers' tokenizers offer here, with "</s>" at ids 5 and 7
        eos_token, eos_token_id = "<s>", 0

        def convert_ids_to_tokens(self, i):
            return "</s>" if i in (5, 7) else None

        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)
            if name == "eos_token":
                object.__setattr__(self, "eos_token_id", {"<s>": 0, "</s>": 7}[value])

    tok = Tok()
    with caplog.at_level("WARNING", logger="actors.tokenizer"):
        _match_special_tokens(tok, {"eos": 5}, Path("m.gguf"))
    assert (tok.eos_token, tok.eos_token_id) == ("<s>", 0)
    assert "'</s>' stands at another id too" in caplog.text
    _match_special_tokens(tok, {"eos": 7}, Path("m.gguf"))
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 7)


def test_a_pad_id_of_minus_one_leaves_the_pad_as_converted(tmp_path, cache, caplog):
    """llama.cpp writes -1 for "no such token"; such a file loaded before the special ids
    were checked, and still does."""
    pytest.importorskip("transformers")
    from actors.tokenizer import load_tokenizer

    config = tiny(vocab_size=260)
    path = write_gguf(tmp_path / "t.gguf", config,
                      load_weights(config, all_names(config), seed=0), tokenizer=True, pad=-1)
    with caplog.at_level("WARNING", logger="actors.gguf_checkpoint"):
        assert gc.gguf_special_token_ids(path) == {"bos": 0, "eos": 1}
    assert "padding_token_id must be an integer >= 0, got -1" in caplog.text
    assert load_tokenizer(path).eos_token_id == 1
