"""What a decode-sized offload costs beyond its compute, taken apart.

A split decode step makes ~120 small calls (SmolLM2-135M: 4 per layer, 30 layers), and
``bench_generate.py`` puts its transport at ~100 us a call.  This measures where that goes,
side by side in one run:

* **contents** -- a bare untrusted ``borrow_args`` actor (what the GPU worker is): a no-op,
  one ``[1, 1, hidden]`` tensor in and one back, the same with ``batch_linear``'s arguments
  (an int, a tuple of names, a tag), and three tensors back (qkv's).  p50 per call.
* **the worker** -- ``GPUWorker.batch_linear`` at decode shapes, random weights, the four
  calls of a layer in turn: one layer's weights (cache-hot), every layer in turn (the weights
  stream from memory, as in a real decode), and every layer called from an actor (as
  ``TEEDriver`` calls).  Mean round trip less the worker's own compute (``compute_stats``).

Run: ``python benchmarks/bench_decode_calls.py --json out.json`` (SmolLM2-135M's shapes by
default; ~10 s on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.gpu_worker import GPUWorker
from actors.llama import PRESETS, LlamaConfig
from benchmarks.common import machine, write_json
from runtime import ActorSystem, actor

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads, 30 layers.
SHAPES = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
          "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 1000}


@actor(untrusted=True, borrow_args=True)
class Bare:
    """Results made in advance: the call's cost by what it carries, no compute."""

    def __init__(self, hidden: int, kv: int) -> None:
        self.q = torch.randn(1, 1, hidden)
        self.k, self.v = torch.randn(1, 1, kv), torch.randn(1, 1, kv)

    def noop(self) -> None:
        return None

    def one(self, x: torch.Tensor) -> torch.Tensor:
        return self.q.clone()

    def args_one(self, layer: int, names: tuple, x: torch.Tensor,
                 tag: str | None = None) -> tuple:
        return (self.q.clone(),)

    def args_three(self, layer: int, names: tuple, x: torch.Tensor,
                   tag: str | None = None) -> tuple:
        return (self.q.clone(), self.k.clone(), self.v.clone())


def _steps(config: LlamaConfig) -> list[tuple[tuple[str, ...], int]]:
    h = config.hidden_size
    return [(("q", "k", "v"), h), (("o",), h), (("gate", "up"), h),
            (("down",), config.intermediate_size)]


def layer_loop(worker: Any, config: LlamaConfig, layers: int, calls: int) -> dict[str, float]:
    """``calls`` decode-shaped ``batch_linear`` calls over ``layers`` layers in turn."""
    steps = _steps(config)
    xs = {w: torch.randn(1, 1, w) for _, w in steps}

    def sweep() -> None:
        for layer in range(layers):
            for names, width in steps:
                worker.batch_linear(layer, names, xs[width], tag="bench")

    for _ in range(max(1, 120 // (4 * layers))):  # warm: every weight touched once
        sweep()
    worker.compute_stats(reset=True)
    times = []
    while len(times) < calls:
        for layer in range(layers):
            for names, width in steps:
                t0 = time.perf_counter_ns()
                worker.batch_linear(layer, names, xs[width], tag="bench")
                times.append((time.perf_counter_ns() - t0) / 1e3)
    stats = worker.compute_stats(reset=True)["bench"]
    compute = stats["seconds"] / stats["calls"] * 1e6
    trip = statistics.mean(times)
    return {"round_trip_us": trip, "worker_compute_us": compute, "beyond_us": trip - compute}


@actor
class Caller:
    """Drives the loop from an actor, as ``TEEDriver`` does."""

    def __init__(self, worker: Any, config: LlamaConfig) -> None:
        torch.set_num_threads(1)
        self.worker, self.config = worker, config

    def loop(self, layers: int, calls: int) -> dict[str, float]:
        return layer_loop(self.worker, self.config, layers, calls)


def p50(fn: Callable[[], Any], n: int, warmup: int = 300) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=3000, help="calls per contents measure")
    ap.add_argument("--calls", type=int, default=2400, help="calls per worker measure")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # decode-sized work runs on one thread in the split
    config = LlamaConfig(**{**PRESETS["tiny"], **SHAPES})
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    rounds: list[dict[str, float]] = []
    with ActorSystem() as system:
        bare = system.spawn(Bare, h, kv)
        worker = system.spawn(GPUWorker, config, device="cpu")
        caller = system.spawn(Caller, worker, config)
        x = torch.randn(1, 1, h)
        names = ("q", "k", "v")
        for r in range(args.rounds):
            row = {
                "noop": p50(bare.noop, args.n),
                "one_tensor_each_way": p50(lambda: bare.one(x), args.n),
                "with_batch_linear_args": p50(
                    lambda: bare.args_one(0, names, x, tag="qkv@1.0"), args.n),
                "three_results": p50(
                    lambda: bare.args_three(0, names, x, tag="qkv@1.0"), args.n),
            }
            hot = layer_loop(worker, config, 1, args.calls)
            streamed = layer_loop(worker, config, config.num_hidden_layers, args.calls)
            from_actor = caller.loop(config.num_hidden_layers, args.calls)
            for name, m in (("one_layer", hot), ("all_layers", streamed),
                            ("all_layers_from_actor", from_actor)):
                row[f"{name}_beyond_us"] = m["beyond_us"]
                row[f"{name}_compute_us"] = m["worker_compute_us"]
            rounds.append(row)
            print(f"round {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("\nmedian over rounds (us a call):")
    print(f"  contents (p50): no-op {medians['noop']:.1f}, one tensor each way "
          f"{medians['one_tensor_each_way']:.1f}, with batch_linear's arguments "
          f"{medians['with_batch_linear_args']:.1f}, three results "
          f"{medians['three_results']:.1f}")
    print(f"  batch_linear beyond the worker's compute (mean): one layer "
          f"{medians['one_layer_beyond_us']:.1f}, all {config.num_hidden_layers} layers "
          f"{medians['all_layers_beyond_us']:.1f}, all layers from an actor "
          f"{medians['all_layers_from_actor_beyond_us']:.1f}")
    write_json(args.json, {"machine": machine(), "shapes": SHAPES, "rounds": rounds,
                           "median": medians})


if __name__ == "__main__":
    main()
