"""Split generation against transformers' generate, on a real model, in one run.

    python benchmarks/bench_generate.py                       # SmolLM2-135M from the cache
    python benchmarks/bench_generate.py --new-tokens 32 --repeats 5 --json out.json
    python benchmarks/bench_generate.py --checkpoint model.gguf
    python benchmarks/bench_generate.py --preset llama-3.2-1b --wire-dtype bfloat16  # GPU host

SmolLM2-135M-Instruct comes from the user's cache, where ``make demo`` (or
``examples/llama_generate.py``) puts it; without it the benchmark says so and exits 0.  A
chat-formatted question is the prompt; every method makes exactly ``--new-tokens`` greedy
tokens (no eos stop), in float32, and the tokens are compared.  Methods, interleaved within
each of ``--repeats`` rounds after a warm-up round (a noisy neighbour slows all alike):

* ``hf``          — transformers ``LlamaForCausalLM.generate(do_sample=False)`` in this
  process (its default attention), on the same float32 weights: the like-for-like baseline;
* ``hf-bf16``     — the same in bfloat16, the dtype transformers picks when it loads SmolLM2
  from the Hub (its checkpoint's ``torch_dtype``): what a user gets by default;
* ``split-local`` — ``TEEDriver.generate`` with a plain in-process ``GPUWorker`` (the split's
  own cost, without transport);
* ``split``       — ``TEEDriver`` and ``GPUWorker`` as two actor processes, timed from here.

Per method: the median time of the whole call, and the decode time per new token,
``(t(N new tokens) - t(1 new token)) / (N - 1)``, both measured the same way for every
method; for the split also the driver's own accounting (``last_generate_stats``): ms/token,
calls/token, and the TEE / worker / transport split.
"""

from __future__ import annotations

import os

# The TEE and the worker take turns on the same cores; see examples/llama_prefill.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.gguf_checkpoint import cache_root, cached_conversion, find_gguf
from actors.gpu_worker import resolve_dtype
from actors.llama import LM_HEAD, PRESETS, load_weights, weight_shapes
from benchmarks.common import interleaved, machine, write_json

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France? Answer in two sentences."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"GGUF file or HF folder (default: {GGUF_NAME} in the cache)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="worker device")
    p.add_argument("--threshold", type=int, default=None, help="shm_threshold in bytes")
    p.add_argument("--no-local", action="store_true", help="skip the in-process split")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip transformers in bfloat16 (how it loads SmolLM2 from the Hub: its "
                        "checkpoint dtype; slow on CPUs without bf16 units)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="random weights of this shape instead of a checkpoint (e.g. "
                        "llama-3.2-1b on a GPU host)")
    p.add_argument("--prompt-tokens", type=int, default=42,
                   help="prompt length with --preset (random ids)")
    p.add_argument("--dtype", default="float32", help="compute dtype of the split's two sides")
    p.add_argument("--wire-dtype", default=None, help="dtype activations cross in")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    dtype = resolve_dtype(args.dtype)
    wire = resolve_dtype(args.wire_dtype, dtype)
    hf_device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                             else "cpu" if args.device == "auto" else args.device)
    if args.preset is not None:
        checkpoint = None
        config = LlamaConfig.preset(args.preset)
        ids = torch.randint(0, config.vocab_size, (args.prompt_tokens,),
                            generator=torch.Generator().manual_seed(0)).tolist()
        source = f"preset {args.preset}, random weights"
        names = [*weight_shapes(config), *([LM_HEAD] if config.tie_word_embeddings else [])]
        weights = load_weights(config, names)

        def load_hf(dt: torch.dtype) -> torch.nn.Module:
            from benchmarks.bench_llama import hf_model

            return hf_model(config, weights).to(hf_device, dt)
    else:
        checkpoint = args.checkpoint or cache_root() / "models" / GGUF_NAME
        if not checkpoint.exists():
            print(f"skipped: {checkpoint} is not there; run `make demo` (it downloads "
                  f"SmolLM2 into the cache) or pass --checkpoint or --preset")
            write_json(args.json, {"skipped": f"{checkpoint} absent", "machine": machine()})
            return 0
        from actors.tokenizer import chat_ids, load_tokenizer

        gguf = find_gguf(checkpoint)
        folder = cached_conversion(gguf) if gguf is not None else checkpoint
        config = LlamaConfig.from_pretrained(checkpoint)
        ids = chat_ids(load_tokenizer(checkpoint), PROMPT)
        source = checkpoint.name

        def load_hf(dt: torch.dtype) -> torch.nn.Module:
            return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=dt) \
                .to(hf_device)

    n = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
          f"cores; {source}: {config.num_parameters() / 1e6:.1f} M parameters; prompt "
          f"{len(ids)} tokens, {n} new greedy tokens; split {args.dtype}, wire "
          f"{str(wire).removeprefix('torch.')}", flush=True)

    prompt = torch.tensor([ids], device=hf_device)

    def hf_runner(dtype: torch.dtype) -> Callable[[int], list[int]]:
        model = load_hf(dtype).eval()
        # No eos stop: exactly n tokens (an unset eos in the call falls back to the model's).
        model.generation_config.eos_token_id = None
        configs = {k: transformers.GenerationConfig(do_sample=False, eos_token_id=None,
                                                    pad_token_id=0, max_new_tokens=k)
                   for k in (1, n)}

        def run(k: int) -> list[int]:
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     generation_config=configs[k])
            got = out[0, len(ids):].tolist()
            if len(got) != k:
                raise RuntimeError(f"transformers made {len(got)} tokens, not {k}")
            return got

        run.attn_implementation = model.config._attn_implementation  # type: ignore[attr-defined]
        return run

    hf = hf_runner(torch.float32)
    methods: dict[str, Callable[[], Any]] = {"hf": lambda: hf(n), "hf@1": lambda: hf(1)}
    if not args.no_bf16:
        hf16 = hf_runner(torch.bfloat16)
        methods["hf-bf16"] = lambda: hf16(n)
        methods["hf-bf16@1"] = lambda: hf16(1)
    result: dict[str, Any] = {"machine": machine(), "source": source,
                              "checkpoint": None if checkpoint is None else str(checkpoint),
                              "dtype": args.dtype, "wire_dtype": str(wire),
                              "prompt_tokens": len(ids), "new_tokens": n,
                              "repeats": args.repeats, "loadavg_before": os.getloadavg(),
                              "hf_attn_implementation": hf.attn_implementation}
    local = None
    if not args.no_local:
        local = TEEDriver(config, GPUWorker(config, checkpoint, device=args.device,
                                            dtype=dtype),
                          checkpoint, dtype=dtype, wire_dtype=wire)
        methods["split-local"] = lambda: local.generate(ids, n).tolist()
        methods["split-local@1"] = lambda: local.generate(ids, 1).tolist()

    from runtime import ActorSystem

    options = {} if args.threshold is None else {"shm_threshold": args.threshold}
    with ActorSystem(**options) as system:
        t0 = time.perf_counter()
        ckpt = None if checkpoint is None else str(checkpoint)
        gpu = system.spawn(GPUWorker, config, ckpt, device=args.device, dtype=dtype)
        drv = system.spawn(TEEDriver, config, gpu, ckpt, dtype=dtype, wire_dtype=wire)
        result["spawn_s"] = time.perf_counter() - t0
        split_stats: list[dict[str, Any]] = []

        def split_n() -> list[int]:
            out = drv.generate(ids, n).tolist()
            split_stats.append(drv.last_generate_stats())
            return out

        methods["split"] = split_n
        methods["split@1"] = lambda: drv.generate(ids, 1).tolist()
        print(f"timing {', '.join(methods)}: {args.repeats} interleaved rounds after a "
              f"warm-up", flush=True)
        timings = interleaved(methods, args.repeats)
    if local is not None:
        result["split_local_stats"] = local.last_generate_stats()

    want = timings["hf"][2]
    rows: dict[str, Any] = {}
    for name in [m for m in methods if "@" not in m]:
        med, times, tokens = timings[name]
        med1 = timings[f"{name}@1"][0]
        rows[name] = {"median_s": med, "times_s": times, "first_token_s": med1,
                      "decode_s_per_token": (med - med1) / (n - 1),
                      "s_per_new_token": med / n, "tokens_equal_hf": tokens == want}
    stats = split_stats[1:]  # the warm-up round's is left out
    if stats:
        def median(key: str) -> float | None:
            vals = [s[key] for s in stats if s[key] is not None]
            return statistics.median(vals) if vals else None

        rows["split"]["driver"] = {
            k: median(k) for k in ("ms_per_token", "tokens_per_s", "calls_per_token",
                                   "tee_ms_per_token", "worker_ms_per_token",
                                   "transport_ms_per_token")}
        rows["split"]["driver"]["prefill_ms"] = 1e3 * statistics.median(
            s["prefill"]["total_s"] for s in stats)
        result["split_stats"] = stats[-1]
    result["rows"] = rows
    result["loadavg_after"] = os.getloadavg()

    hf_row = rows["hf"]
    head = (f"{'method':<12} {'generate s':>10} {'s/new tok':>9} {'decode ms/tok':>13} "
            f"{'vs hf':>6} {'same tokens':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(f"{name:<12} {r['median_s']:>10.3f} {r['s_per_new_token']:>9.4f} "
              f"{1e3 * r['decode_s_per_token']:>13.1f} "
              f"{r['decode_s_per_token'] / hf_row['decode_s_per_token']:>5.2f}x "
              f"{'yes' if r['tokens_equal_hf'] else 'NO':>11}")
    d = rows["split"].get("driver")
    if d:
        print(f"\nsplit, the driver's accounting (median): prefill {d['prefill_ms']:.1f} ms; "
              f"decode {d['ms_per_token']:.1f} ms/token ({d['tokens_per_s']:.1f} tokens/s), "
              f"{d['calls_per_token']:.0f} calls/token = TEE {d['tee_ms_per_token']:.1f} + "
              f"worker {d['worker_ms_per_token'] or 0:.1f} + transport "
              f"{d['transport_ms_per_token'] or 0:.1f} ms/token (+ driver glue)")
    print(f"load average before {result['loadavg_before'][0]:.2f}, after "
          f"{result['loadavg_after'][0]:.2f} (other jobs share these cores)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
