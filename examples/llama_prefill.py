"""Split LLaMA prefill: a TEE driver and an untrusted GPU worker as two actor processes.

    python examples/llama_prefill.py                       # tiny preset, random weights
    python examples/llama_prefill.py --preset seed-bench --tokens 1024 --threshold 1048576
    python examples/llama_prefill.py --checkpoint ~/models/Llama-3.2-1B --tokens 128
    python examples/llama_prefill.py --preset seed-bench --tokens 1024 --trace prefill.json

Spawns a ``GPUWorker`` and a ``TEEDriver`` in an ``ActorSystem``, runs one prefill, checks the
logits against the in-process reference forward (exit status 1 above tolerance), and prints
the per-op transport table and the split of the total time.  ``--trace PATH`` writes the timed
prefill's timeline as a Chrome trace (open it in ui.perfetto.dev): TEE compute, sends and
waits, each offload in flight, and the worker's compute, one track per process.
"""

from __future__ import annotations

import os

# The TEE and the worker take turns on the same cores.  libgomp's default makes OpenMP threads
# spin after every parallel region, stealing the core the other process is about to use: on
# 2 cores a seed-bench prefill at T=128 took 145-940 ms that way, 63 ms with passive waiting.
# libgomp reads this once, when torch loads; the actor processes inherit it from here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver
from actors.gpu_worker import resolve_dtype
from actors.llama import PRESETS
from actors.report import op_table, time_split
from runtime import ActorSystem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Hugging Face style folder (config.json + *.safetensors), or a GGUF "
                        "file or a folder holding one; overrides --preset")
    p.add_argument("--tokens", type=int, default=64, help="prompt length T")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    p.add_argument("--dtype", default="float32", help="compute dtype of both sides")
    p.add_argument("--wire-dtype", default=None, help="dtype activations cross in "
                   "(default: --dtype; bfloat16 halves the bytes)")
    p.add_argument("--threshold", type=int, default=None,
                   help="shm_threshold in bytes: messages at or above it go through ZeroMQ "
                        "(default: the runtime's, 10 MiB)")
    p.add_argument("--device", default="auto", help="worker device: auto, cpu, cuda[:n]")
    p.add_argument("--attention", default="auto", choices=["auto", "worker", "tee"],
                   help="where the attention matmuls run")
    p.add_argument("--progress", type=int, default=None,
                   help="log every N layers (default: every layer on long runs)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit error allowed (default: 1e-4 x logit scale for "
                        "float32, 4%% of it for 16-bit)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed prefills first (a fresh process pays one-time setup)")
    p.add_argument("--no-verify", action="store_true", help="skip the reference check")
    p.add_argument("--public-io", action="store_true",
                   help="private_io=False: send token ids to the worker and let it run lm_head")
    p.add_argument("--no-checks", action="store_true",
                   help="verify=False: use the worker's results without Freivalds checks")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk of the pipelined prefill (default: automatic; 0: one "
                        "chunk, no overlap)")
    p.add_argument("--trace", type=Path, default=None,
                   help="write a Chrome trace (JSON, opens in Perfetto) of the timed prefill")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    if args.chunk_rows is not None and args.chunk_rows < 0:
        p.error("--chunk-rows must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    try:  # the user's own input: a bad one is theirs to see, in a line
        config = (LlamaConfig.from_pretrained(args.checkpoint) if args.checkpoint
                  else LlamaConfig.preset(args.preset))
        dtype = resolve_dtype(args.dtype)
        wire = resolve_dtype(args.wire_dtype, dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 2
    if args.tokens > config.max_position_embeddings:
        print(f"error: --tokens {args.tokens} exceeds the model's max_position_embeddings "
              f"{config.max_position_embeddings}")
        return 2
    checkpoint = str(args.checkpoint) if args.checkpoint else None
    progress = args.progress
    if progress is None:  # every layer when a prefill takes more than a moment
        work = args.tokens * config.num_parameters()
        progress = 1 if work > 2e10 else 0
    ids = torch.randint(0, config.vocab_size, (args.tokens,),
                        generator=torch.Generator().manual_seed(args.seed))
    source = f"checkpoint {checkpoint}" if checkpoint else f"preset {args.preset}, random weights"
    print(f"LLaMA {source}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_parameters() / 1e6:.1f} M parameters; T={args.tokens}, "
          f"dtype {args.dtype}, wire {str(wire).removeprefix('torch.')}")

    options = {} if args.threshold is None else {"shm_threshold": args.threshold}
    with ActorSystem(**options) as system:
        t0 = time.perf_counter()
        gpu = system.spawn(GPUWorker, config, checkpoint, seed=args.seed, device=args.device,
                           dtype=dtype)
        drv = system.spawn(TEEDriver, config, gpu, checkpoint, seed=args.seed, dtype=dtype,
                           wire_dtype=wire, attention=args.attention,
                           private_io=not args.public_io, verify=not args.no_checks,
                           chunk_rows=args.chunk_rows)
        spawn_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            drv.prefill(ids)
        t0 = time.perf_counter()
        logits = drv.prefill(ids, log_every=progress, trace=args.trace is not None)
        call_s = time.perf_counter() - t0
        stats = drv.last_prefill_stats()
        trace = drv.last_trace() if args.trace is not None else None

    device = stats["worker_device"]
    print(f"\nworker on {device.get('device')} ({device.get('name')}), spawned in "
          f"{spawn_s:.2f} s; attention policy '{stats['policy']}' ({stats['policy_reason']})\n")
    print(op_table(stats))
    print("\n" + time_split(stats))
    checks = stats["verify"]
    print("token ids and logits " + ("stayed in the TEE" if stats["private_io"] else
                                     "crossed to the worker") + "; " + (
        f"{checks['checks']} worker results verified in {1e3 * checks['seconds']:.2f} ms"
        if checks else "worker results NOT verified"))
    print(f"{stats['chunks']} chunk(s) of {stats['chunk_rows']} rows; call from here "
          f"{1e3 * call_s:.1f} ms")
    if trace is not None:
        args.trace.write_text(json.dumps(trace))
        print(f"wrote the timeline to {args.trace} ({len(trace['traceEvents'])} events; open it "
              f"in ui.perfetto.dev)")

    result: dict[str, Any] = {
        "config": dataclasses.asdict(config), "tokens": args.tokens, "seed": args.seed,
        "checkpoint": checkpoint, "threshold": args.threshold, "spawn_s": spawn_s,
        "call_s": call_s, "stats": stats}
    status = 0
    if not args.no_verify:
        ref = LlamaReference(config, checkpoint, seed=args.seed, dtype=torch.float32)
        want = ref.forward(ids)
        err = (logits - want).abs().max().item()
        scale = want.abs().max().item()
        sixteen = torch.finfo(wire).bits <= 16 or torch.finfo(dtype).bits <= 16
        tol = args.tolerance if args.tolerance is not None else (
            0.04 * scale if sixteen else 1e-4 * max(1.0, scale))
        ok = err <= tol
        print(f"max abs logit error vs reference: {err:.3g} (tolerance {tol:.3g}, "
              f"logit scale {scale:.3g}) {'OK' if ok else 'FAILED'}")
        result.update(max_abs_error=err, tolerance=tol, ok=ok)
        status = 0 if ok else 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
