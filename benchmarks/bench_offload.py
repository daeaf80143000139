"""Offload calls with and without borrowed arguments, side by side in one run.

Two untrusted actors with the same methods, one ``@actor(borrow_args=True)`` (arguments are
views of the received message: no copy on the actor's side; what the GPU worker is), one
not (ring arguments are copied out first).  Payloads are activations of the split's shapes:
``[1024, 512]`` float32 (2 MiB, seed-bench's hidden states), ``[1024, 2048]`` (8 MiB,
Llama-3.2-1B's) and ``[1024, 4096]`` (16 MiB: above the threshold, through the pool, where
both read in place).  Per payload, three calls, interleaved between the two actors round by
round: ``inbound`` (the activation in, a float back), ``outbound`` (a tiny argument in, a
6 MiB result back: a qkv-sized reply) and ``echo`` (the activation in and back).

Run: ``python benchmarks/bench_offload.py --json out.json``.  Medians over the rounds, and the
median of per-round ratios (borrowed / copied).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, write_json
from runtime import ActorSystem, actor

SHAPES = {"2MiB": (1024, 512), "8MiB": (1024, 2048), "16MiB": (1024, 4096)}


class _Ops:
    def __init__(self) -> None:
        self.out = torch.randn(1024, 1536)  # 6 MiB, a qkv result at seed-bench's width

    def inbound(self, x: torch.Tensor) -> float:
        return float(x[0, 0])

    def outbound(self, x: torch.Tensor) -> torch.Tensor:
        return self.out

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@actor(untrusted=True, borrow_args=True)
class Borrowing(_Ops):
    pass


@actor(untrusted=True)
class Copying(_Ops):
    pass


def _time(fn, arg) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    results: dict = {"machine": machine(), "rounds": args.rounds, "payloads": {}}
    with ActorSystem() as system:
        actors = {"borrowed": system.spawn(Borrowing), "copied": system.spawn(Copying)}
        print(f"{'payload':>8} {'call':>9} | {'borrowed ms':>11} {'copied ms':>10} | ratio")
        for label, shape in SHAPES.items():
            x = torch.randn(*shape)
            out: dict = {}
            for call in ("inbound", "outbound", "echo"):
                arg = x[:1].clone() if call == "outbound" else x
                times: dict[str, list[float]] = {k: [] for k in actors}
                for r in range(args.rounds + 3):
                    for name, h in (actors.items() if r % 2 else reversed(actors.items())):
                        t = _time(getattr(h, call), arg)
                        if r >= 3:  # warm-up rounds
                            times[name].append(t)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                ratio = statistics.median(b / c for b, c in zip(times["borrowed"],
                                                                 times["copied"], strict=True))
                out[call] = {"borrowed_ms": med["borrowed"], "copied_ms": med["copied"],
                             "ratio": ratio}
                print(f"{label:>8} {call:>9} | {med['borrowed']:11.3f} {med['copied']:10.3f} | "
                      f"{ratio:.3f}", flush=True)
            results["payloads"][label] = out
    write_json(args.json, results)


if __name__ == "__main__":
    main()
