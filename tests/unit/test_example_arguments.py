"""The examples answer bad input in one line, before any actor is spawned.

Found in review: ``--temperature -1`` or ``--max-new-tokens`` past the model's positions
spawned both actors and died with a two-part remote traceback; ``llama_prefill.py`` met a
missing checkpoint or an unknown dtype with a traceback; and the generation example stopped
only at the tokenizer's one eos, not at the ids ``generation_config.json`` lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.llama import load_weights
from actors.tokenizer import generation_eos_ids
from tests.unit.test_gguf import all_names, tiny, write_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,args,says", [
    ("llama_generate.py", ["--temperature", "-1"], "--temperature must be >= 0"),
    ("llama_generate.py", ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ("llama_generate.py", ["--dtype", "float33"], "unknown dtype"),
    ("llama_generate.py", ["--max-new-tokens", "5000"], "exceed the model's"),
    ("llama_prefill.py", ["--checkpoint", "/nonexistent/model"], "does not exist"),
    ("llama_prefill.py", ["--dtype", "float33"], "unknown dtype"),
    ("llama_prefill.py", ["--tokens", "100000"], "exceeds the model's"),
])
def test_a_bad_argument_is_one_line_not_a_traceback(script, args, says):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--preset", "tiny",
                           "--no-verify", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-1500:]
    assert "Traceback" not in out and says in out, out[-1500:]
    assert "spawned" not in out  # refused before the actors started


def test_the_generation_configs_eos_ids_end_an_answer(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import llama_generate
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from actors.tokenizer import load_tokenizer

    config = tiny(vocab_size=260)
    gguf_path = write_gguf(tmp_path / "t.gguf", config,
                           load_weights(config, all_names(config), seed=0), tokenizer=True)
    folder = tmp_path / "hf"
    load_tokenizer(gguf_path).save_pretrained(str(folder))  # its eos: id 1
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [1, 258]}))  # 258: the end of a chat turn
    assert transformers.GenerationConfig.from_pretrained(str(folder)).eos_token_id == [1, 258]
    assert generation_eos_ids(folder) == [1, 258]
    args = llama_generate.parse_args(["--checkpoint", str(folder), "--prompt", "hi"])
    assert llama_generate.prepare_real(args)["eos"] == [1, 258]


@pytest.mark.parametrize("content,want", [
    ('{"eos_token_id": 7}', [7]), ('{"eos_token_id": [7, true, -1, "x", 9]}', [7, 9]),
    ('{"bos_token_id": 0}', []), ("[1]", []),
])
def test_generation_eos_ids_reads_what_it_can(tmp_path, content, want):
    assert generation_eos_ids(tmp_path) == []  # no file
    (tmp_path / "generation_config.json").write_text(content)
    assert generation_eos_ids(tmp_path) == want


def test_a_generation_config_that_is_not_json_is_a_value_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("{eos")
    with pytest.raises(ValueError, match="as JSON"):
        generation_eos_ids(tmp_path)
