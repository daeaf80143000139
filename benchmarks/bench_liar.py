"""How often a worker that repeats one small lie gets through the Freivalds checks.

    python benchmarks/bench_liar.py                        # d = 0.2, 0.01, 0.001 of the row
    python benchmarks/bench_liar.py --rel 0.01 --runs 8 --json out.json
    python benchmarks/bench_liar.py --junk                 # junk the TEE drops, bf16 wire

The liar (an adversarial review's ``TwoElementLiar``) computes honestly except layer 0's
``down``, where it adds ``d`` (a fraction ``--rel`` of the row's norm) to two elements of the
first row, every time.  Each run builds a fresh driver (fresh secret pools) and counts the
prefills, of ``--prefills``, that end without ``VerificationError``.  A lie of two equal
elements is what ±1 vectors are blind to half of the time, whatever its size, and a pool
keeps that half for hundreds of checks (docs/design.md, *Verified offload*); the figure is
the detection the TEE gets against it.  In-process, ``tiny`` preset, float32.

``--junk``: the lie that raised its own tolerance (docs/design.md, *Trusted norms*): ``H``
(a multiple of the row's norm) added to two elements of a row of a ``down`` result, bf16
wire, checked by one ``Verifier`` whose pool is never redrawn; passes out of ``--checks``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from actors import GPUWorker, LlamaConfig, TEEDriver, VerificationError
from actors.verify import GROUPS, Verifier


class TwoElementLiar(GPUWorker):
    """Honest, but for ``+d`` in two elements of row 0 of layer 0's ``down``, every call."""

    def __init__(self, config: LlamaConfig, rel: float, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.rel = rel

    def batch_linear(self, layer, names, x, tag=None):
        out = super().batch_linear(layer, names, x, tag=tag)
        if layer != 0 or tuple(names) != ("down",):
            return out
        y = out[0].clone()
        d = self.rel * float(y[0].norm())
        y[0, 0] += d
        y[0, 1] += d
        return (y, *out[1:])


def undetected(config: LlamaConfig, rel: float, prefills: int, pool_size: int) -> int:
    """Prefills of ``prefills`` (8 tokens each) that the lie got through, with fresh pools."""
    drv = TEEDriver(config, TwoElementLiar(config, rel, seed=0, device="cpu"), seed=0)
    drv._verifier = type(drv._verifier)(  # the same ops, with the pool size asked for
        config, list(drv._verifier._pools), seed=0, dtype=drv.dtype, wire_dtype=drv.wire_dtype,
        pool_size=pool_size)
    passed = 0
    for s in range(prefills):
        ids = torch.randint(0, config.vocab_size, (8,), generator=torch.Generator().manual_seed(s))
        try:
            drv.prefill(ids)
            passed += 1
        except VerificationError:
            pass
    return passed


def junk_passes(h: float, checks: int, rows: int = 64) -> int:
    """Checks of ``checks`` passed by junk ``h`` x the row's norm in two elements (bf16)."""
    mid = dataclasses.replace(LlamaConfig.preset("seed-bench"), num_hidden_layers=1,
                              vocab_size=1024)
    worker = GPUWorker(mid, seed=0, device="cpu")
    ver = Verifier(mid, [("down", 0)], seed=0, wire_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(rows, mid.intermediate_size, generator=gen).to(torch.bfloat16)
    (honest,) = worker.batch_linear(0, GROUPS["down"], x)
    passed = 0
    for _ in range(checks):
        i = int(torch.randint(rows, (1,), generator=gen))
        a, b = (int(j) for j in torch.randperm(mid.hidden_size, generator=gen)[:2])
        y = honest.float()
        d = h * float(y[i].norm())
        y[i, a] += d
        y[i, b] += d
        try:
            ver.check_linear("down", 0, x, [y.to(torch.bfloat16)])
            passed += 1
        except VerificationError:
            pass
        for p in ver._pools.values():  # a liar never caught keeps its pool
            p.stale = False
    return passed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rel", default="0.2,0.01,0.001",
                   help="the lie's size d, as fractions of the row's norm (comma-separated)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--prefills", type=int, default=40)
    p.add_argument("--pool-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--junk", action="store_true", help="the junk experiment instead")
    p.add_argument("--checks", type=int, default=400)
    args = p.parse_args(argv)
    if args.junk:
        rows = []
        print(f"{'H / |row|':>10} {'passed':>14}")
        for h in (0.05, 0.2, 0.5, 1.0, 2.0, 1000.0):
            n = junk_passes(h, args.checks)
            rows.append({"h": h, "passed": n, "checks": args.checks})
            print(f"{h:>10g} {n:>7} / {args.checks}")
        if args.json:
            args.json.write_text(json.dumps({"junk": rows}, indent=2))
        return 0
    config = LlamaConfig.preset("tiny")
    results = []
    print(f"{'d / |row|':>10} {'undetected per run':>28} {'mean share':>11}")
    for rel in (float(r) for r in args.rel.split(",")):
        counts = [undetected(config, rel, args.prefills, args.pool_size)
                  for _ in range(args.runs)]
        share = statistics.mean(counts) / args.prefills
        results.append({"rel": rel, "undetected": counts, "prefills": args.prefills,
                        "share": share, "pool_size": args.pool_size})
        print(f"{rel:>10g} {counts!s:>28} {share:>10.1%}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
