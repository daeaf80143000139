"""The Freivalds checks on honest workers: tolerance margins and cost, per op and wire dtype.

    python benchmarks/bench_verify.py                      # tiny and 2-layer seed-bench
    python benchmarks/bench_verify.py --tokens 1,64,1024 --json out.json

Runs in-process prefills with every op offloaded (``private_io=False``) under both attention
policies and both wires (float32, bfloat16), and reports per op: checks, the median and largest
tolerance as a fraction of the row norm (what an error must exceed to be caught with certainty)
and the largest honest |residual| / tolerance (1.0 would be a false alarm).  These are the
figures of the tolerance table in docs/design.md.  (The recording computes every row norm, so
this is no measure of the checks' cost: ``bench_llama.py`` measures that.)  Each check's
figures come from every row (``Verifier.full_margins``), the decisions being the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from actors import GPUWorker, LlamaConfig, TEEDriver

PRESETS = {"tiny": LlamaConfig.preset("tiny"),
           "seed-bench-2l": dataclasses.replace(LlamaConfig.preset("seed-bench"),
                                                num_hidden_layers=2)}


class _Recorder:
    """A Verifier observer: each check's margins, per wire dtype and op."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: {"rel": [], "rel_max": [], "ratio": []})
        self.wire = ""

    def __call__(self, what: str, res: torch.Tensor, tol: torch.Tensor,
                 ynorm: torch.Tensor) -> None:
        op = what.split(" ", 1)[0]
        row = self.rows[(self.wire, op)]
        row["ratio"].append(float((res / tol).max()))
        if op != "embedding":  # a lookup: no product, nothing to compare with
            rel = tol / ynorm.clamp_min(1e-30)
            row["rel"].append(float(rel.median()))
            row["rel_max"].append(float(rel.max()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,seed-bench-2l",
                   help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--tokens", default="1,7,64,512,1024", help="prompt lengths")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rec = _Recorder()
    for name in args.presets.split(","):
        config = PRESETS[name]
        worker = GPUWorker(config, seed=1, device="cpu")
        for wire in (torch.float32, torch.bfloat16):
            for attention in ("tee", "worker"):
                drv = TEEDriver(config, worker, seed=1, wire_dtype=wire, attention=attention,
                                private_io=False)
                drv._verifier.full_margins = True  # every row's whole tolerance
                drv._verifier.observer = rec
                rec.wire = str(wire).removeprefix("torch.")
                for t in (int(s) for s in args.tokens.split(",")):
                    ids = torch.randint(0, config.vocab_size, (t,),
                                        generator=torch.Generator().manual_seed(t))
                    drv.prefill(ids, all_logits=t <= 64)
    out = []
    print(f"{'wire':<9} {'op':<10} {'checks':>6} {'tol/|y| med':>11} {'tol/|y| max':>11} "
          f"{'worst r/tol':>11}")
    for key in sorted(rec.rows):
        r = rec.rows[key]
        row = {"wire": key[0], "op": key[1], "checks": len(r["ratio"]),
               "tol_rel_median": statistics.median(r["rel"]) if r["rel"] else None,
               "tol_rel_max": max(r["rel_max"]) if r["rel"] else None,
               "worst_ratio": max(r["ratio"])}
        out.append(row)
        rel = (f"{row['tol_rel_median']:>11.2e} {row['tol_rel_max']:>11.2e}"
               if row["tol_rel_median"] is not None else f"{'-':>11} {'-':>11}")
        print(f"{key[0]:<9} {key[1]:<10} {row['checks']:>6} {rel} {row['worst_ratio']:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": out}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
