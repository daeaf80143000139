"""What the trust boundary costs per decode step: private_io and verify, on and off.

Four ``TEEDriver`` actors share one ``GPUWorker`` actor and generate in turn (interleaved
rounds, so a noisy neighbour slows them alike); per setting the median over rounds of
ms/token and of its TEE / worker / transport split.  Default model: SmolLM2-135M-Instruct
from the demo's cache (run ``make demo`` once); ``--preset`` uses random weights instead.
``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.gguf_checkpoint import cache_root, cached_conversion, find_gguf
from benchmarks.common import machine, write_json
from runtime import ActorSystem

MODES = [(True, True), (True, False), (False, True), (False, False)]
KEYS = ("ms_per_token", "tee_ms_per_token", "worker_ms_per_token", "transport_ms_per_token",
        "calls_per_token")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="GGUF file or HF folder (default: the demo's model)")
    ap.add_argument("--preset", help="random weights of this shape instead")
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.preset:
        config, ckpt = LlamaConfig.preset(args.preset), None
    else:
        path = args.checkpoint or find_gguf(cache_root() / "models")
        if path is None:
            print("no checkpoint: run `make demo` once, or pass --checkpoint / --preset")
            return 1
        ckpt = str(cached_conversion(path)) if str(path).endswith(".gguf") else str(path)
        config = LlamaConfig.from_pretrained(ckpt)
    ids = torch.randint(0, config.vocab_size, (args.prompt_tokens,),
                        generator=torch.Generator().manual_seed(0))
    rows: dict[tuple[bool, bool], list[dict]] = {m: [] for m in MODES}
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, ckpt, device="cpu")
        drivers = {m: system.spawn(TEEDriver, config, gpu, ckpt, private_io=m[0], verify=m[1])
                   for m in MODES}
        for d in drivers.values():
            d.generate(ids, 4)  # warm-up
        for _ in range(args.repeats):
            for m, d in drivers.items():
                d.generate(ids, args.new_tokens)
                rows[m].append(d.last_generate_stats())
    out = {}
    print(f"{'private_io':>10} {'verify':>6} | {'ms/token':>8} {'TEE':>6} {'worker':>6} "
          f"{'transport':>9} {'calls':>5}")
    for m, stats in rows.items():
        med = {k: statistics.median(s[k] for s in stats) for k in KEYS}
        out[f"private_io={m[0]},verify={m[1]}"] = med
        print(f"{m[0]!s:>10} {m[1]!s:>6} | {med['ms_per_token']:8.1f} "
              f"{med['tee_ms_per_token']:6.1f} {med['worker_ms_per_token']:6.1f} "
              f"{med['transport_ms_per_token']:9.1f} {med['calls_per_token']:5.0f}")
    base = out["private_io=False,verify=False"]["ms_per_token"]
    for v in out.values():
        v["vs_open"] = v["ms_per_token"] / base
    write_json(args.json, {"machine": machine(), "modes": out, "new_tokens": args.new_tokens,
                           "repeats": args.repeats})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
