"""Split LLaMA prefill: two actor processes against one process, side by side in one run.

    python benchmarks/bench_llama.py                                  # seed-bench T=1024, 1b T=128
    python benchmarks/bench_llama.py --presets seed-bench --tokens 1024 --repeats 5
    python benchmarks/bench_llama.py --presets llama-3.2-1b --tokens 128 --json out.json
    python benchmarks/bench_llama.py --presets seed-bench --trace prefill.json  # + a timeline

For each preset (random weights, float32) it times, as the median of ``--repeats`` rounds after
a warm-up round, the methods interleaved within each round (a noisy neighbour then slows all
alike):

* ``reference``  — :class:`actors.LlamaReference`, the same maths in this process;
* ``hf-eager``, ``hf-sdpa`` — transformers ``LlamaForCausalLM`` (``attn_implementation``
  ``"eager"`` and ``"sdpa"``) holding the very same weight tensors (no copy on the CPU),
  computing the last position's logits only (``logits_to_keep=1``), as the split does: a
  full ``[T, vocab]`` lm_head would flatter the split.  They run on ``--hf-device`` (default:
  the worker's device), so a GPU split is compared with transformers on that GPU, where
  ``hf-sdpa-bf16`` (the same model in bfloat16) is timed too (``--hf-bf16``);
* ``split-local`` — ``TEEDriver`` with a plain in-process ``GPUWorker``: the split's own cost
  without transport (skipped when a second copy of the weights would not fit);
* ``split``      — ``TEEDriver`` and ``GPUWorker`` as two actor processes (timed from here),
  with the driver's defaults: ``private_io=True`` (embedding and lm_head in the TEE),
  ``verify=True`` (every offloaded result checked) and the prefill pipelined in row chunks
  (``chunk_rows`` automatic, or ``--chunk-rows``);
* ``split-unchunked`` — the same, one chunk (``chunk_rows=0``): no overlap;
* ``split-open``, ``split-open-unchunked`` — the same worker and drivers with
  ``private_io=False, verify=False``: the old placement unchecked, the baseline of the trust
  boundary's cost (issue 9);
* ``split-checked`` — ``private_io=False, verify=True`` (chunked): the checks alone
  (``--no-trust`` skips these three).

``--split-threads N`` gives every split actor ``N`` intra-op threads (transformers and the
reference keep this process's): with a CPU worker the automatic chunk rule pipelines only when
the host has cores for both sides (see ``actors.tee_driver.auto_chunk_rows``).

and for the actor split: the bytes that crossed (payload, both directions; messages per route),
the transport time, and a memcpy floor for those bytes.  Floor model: every byte is copied
once by the sender into the channel (ring slot or ZeroMQ frame) and once by the receiver out of
it, so floor = 2 x bytes / memcpy bandwidth, the bandwidth measured here with numpy on buffers
of the mean message size.  Ratios against transformers are medians of the per-round ratios
(the methods run back to back in each round).

Start-up: every actor that needs weights draws them from the seed, ~10 s per process for
llama-3.2-1b on one core, and ``spawn`` waits for each.  For models of ``--share-gb`` or more
the weights are drawn once here, written to a safetensors folder (``/dev/shm`` when it has
room) and every actor reads that checkpoint instead: the same tensors, the page cache shared.

Memory: llama-3.2-1b is 1.24 B parameters, ~4.9 GB in float32.  This process holds one copy
(shared by the reference and HF) and the worker actor another, ~10 GB together; ``split-local``
would need a third, so it is skipped for models above ``--local-max-gb``.  On a 24 GiB machine
with 2 cores use ``--tokens 128`` for it (the default for that preset).
"""

from __future__ import annotations

import os

# The TEE and the worker take turns on the same cores.  libgomp's default makes OpenMP threads
# spin after every parallel region, stealing the core the other process is about to use: on
# 2 cores a seed-bench prefill at T=128 took 145-940 ms that way, 63 ms with passive waiting.
# libgomp reads this once, when torch loads; the actor processes inherit it from here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors import GPUWorker, LlamaConfig, LlamaReference, TEEDriver
from actors.gpu_worker import resolve_dtype
from actors.llama import LM_HEAD, PRESETS, load_weights, weight_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import interleaved

MIB = 1024 * 1024
DEFAULT_TOKENS = {"tiny": 1024, "seed-bench": 1024, "llama-3.2-1b": 128}


def memcpy_seconds(nbytes: int, chunk: int) -> tuple[float, float]:
    """Seconds to copy ``nbytes`` with numpy in ``chunk``-sized pieces, and the bandwidth.

    The pieces walk through a buffer as large as the traffic (up to 256 MiB, then scaled),
    so the copies are not served from a cache-hot few hundred KiB.
    """
    size = int(min(max(nbytes, 1), 256 * MIB))
    chunk = int(min(max(chunk, 64 * 1024), size))
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros_like(src)  # both touched: no page faults in the timed copies
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for lo in range(0, size, chunk):
            np.copyto(dst[lo:lo + chunk], src[lo:lo + chunk])
        best = min(best, time.perf_counter() - t0)
    return best * nbytes / size, size / best


def hf_model(config: LlamaConfig, weights: dict[str, torch.Tensor],
             attn: str = "eager") -> torch.nn.Module:
    """transformers' LlamaForCausalLM (``attn`` attention) around our tensors, without copies."""
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation=attn)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    state = {n: weights[n] for n in model.state_dict()}
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (the RoPE frequencies) were built on the meta device: rebuild.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()


def hf_methods(config: LlamaConfig, weights: dict[str, torch.Tensor], ids: torch.Tensor,
               device: torch.device, bf16: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """transformers' eager and sdpa forwards (and sdpa in bfloat16 with ``bf16``) on ``device``.

    Each returns the last position's logits as float32 on the CPU: on a GPU that waits for
    the forward, so the time is the forward's.
    """
    ids_dev = ids[None].to(device)
    on_device = weights if device.type == "cpu" else {
        n: t.to(device) for n, t in weights.items()}  # one copy; tied weights stay tied
    models = {f"hf-{attn}": hf_model(config, on_device, attn) for attn in ("eager", "sdpa")}
    if bf16:
        models["hf-sdpa-bf16"] = hf_model(config, on_device, "sdpa").to(torch.bfloat16)
    out = {}
    for name, model in models.items():
        @torch.no_grad()
        def forward(model: torch.nn.Module = model) -> torch.Tensor:
            # The last position's logits only, as the split computes them.
            return model(ids_dev, logits_to_keep=1).logits[0, -1].float().cpu()

        out[name] = forward
    return out


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` in the safetensors format, each straight from its memory.

    ``safetensors.torch.save_file`` builds the whole file in memory first: 12 s for
    llama-3.2-1b's 4.9 GB here, against a few seconds for the copies themselves.
    """
    header: dict[str, Any] = {}
    pos = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))


@contextlib.contextmanager
def shared_checkpoint(weights: dict[str, torch.Tensor], config: LlamaConfig,
                      nbytes: int) -> Any:
    """A safetensors folder of ``weights`` (tied ones once), removed on exit.

    In ``/dev/shm`` when it has room for it twice over (a container's may be 64 MiB), else
    in the temporary directory.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and \
        shutil.disk_usage("/dev/shm").free > 2 * nbytes else None
    folder = tempfile.mkdtemp(prefix="rt_bench_weights_", dir=base)
    try:
        own = {n: t for n, t in weights.items() if n in weight_shapes(config)}
        t0 = time.perf_counter()
        write_safetensors(os.path.join(folder, "model.safetensors"), own)
        print(f"   weights written to {folder} in {time.perf_counter() - t0:.1f} s: every "
              f"actor reads them there", flush=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def available_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 1e9
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def bench_preset(name: str, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    config = LlamaConfig.preset(name)
    model_gb = config.num_parameters() * 4 / 1e9
    print(f"\n== {name}: {config.num_parameters() / 1e6:.0f} M parameters "
          f"({model_gb:.2f} GB float32), T={tokens}, {available_gb():.1f} GB available",
          flush=True)
    if 2.2 * model_gb > available_gb():
        print(f"   skipped: needs ~{2.2 * model_gb:.1f} GB (this process + the worker)")
        return {"preset": name, "tokens": tokens, "skipped": "memory"}
    wire = resolve_dtype(args.wire_dtype, torch.float32)
    ids = torch.randint(0, config.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(args.seed))
    names = list(weight_shapes(config)) + ([LM_HEAD] if config.tie_word_embeddings else [])
    t0 = time.perf_counter()
    weights = load_weights(config, names, seed=args.seed)
    print(f"   weights drawn in {time.perf_counter() - t0:.1f} s", flush=True)

    ref = LlamaReference(config, weights=weights)
    methods: dict[str, Callable[[], torch.Tensor]] = {"reference": lambda: ref.forward(ids)}
    worker_device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                                 else "cpu" if args.device == "auto" else args.device)
    hf_device = worker_device if args.hf_device is None else torch.device(args.hf_device)
    if not args.no_hf:
        bf16 = hf_device.type == "cuda" if args.hf_bf16 is None else args.hf_bf16
        methods.update(hf_methods(config, weights, ids, hf_device, bf16))
    result: dict[str, Any] = {"preset": name, "tokens": tokens, "config": config.to_hf_dict(),
                              "wire_dtype": str(wire).removeprefix("torch."),
                              "repeats": args.repeats, "hf_device": str(hf_device),
                              "worker_device": str(worker_device)}
    with contextlib.ExitStack() as stack:
        # Where the actors' weights come from: the seed (each draws them), or one checkpoint.
        source: dict[str, Any] = {"seed": args.seed}
        if model_gb >= args.share_gb:
            source["checkpoint"] = stack.enter_context(
                shared_checkpoint(weights, config, int(model_gb * 1e9)))
        if not args.no_local and model_gb <= args.local_max_gb:
            local_drv = TEEDriver(config, GPUWorker(config, device=args.device, **source),
                                  wire_dtype=wire, attention=args.attention, **source)
            methods["split-local"] = lambda: local_drv.prefill(ids)
        try:
            from runtime import ActorSystem
        except ImportError:
            print("   split: skipped, runtime.ActorSystem is not available")
        else:
            options = {} if args.threshold is None else {"shm_threshold": args.threshold}
            system = stack.enter_context(ActorSystem(**options))
            t0 = time.perf_counter()
            threads = {"threads": args.split_threads}
            gpu = system.spawn(GPUWorker, config, device=args.device, **source, **threads)
            drv = system.spawn(TEEDriver, config, gpu, wire_dtype=wire,
                               attention=args.attention, chunk_rows=args.chunk_rows,
                               **source, **threads)
            result["spawn_s"] = time.perf_counter() - t0
            methods["split"] = lambda: drv.prefill(ids)
            others: dict[str, Any] = {}
            variants = [] if args.no_unchunked else [("split-unchunked", {"chunk_rows": 0})]
            if not args.no_trust:
                variants += [
                    ("split-open", {"private_io": False, "verify": False}),
                    ("split-open-unchunked", {"private_io": False, "verify": False,
                                              "chunk_rows": 0}),
                    ("split-checked", {"private_io": False})]
            for method, options in variants:
                if args.no_unchunked and options.get("chunk_rows") == 0:
                    continue
                options = {"chunk_rows": args.chunk_rows, **threads, **options}
                others[method] = system.spawn(TEEDriver, config, gpu, wire_dtype=wire,
                                              attention=args.attention, **source, **options)
                methods[method] = functools.partial(others[method].prefill, ids)
        if "spawn_s" in result:
            print(f"   actors started in {result['spawn_s']:.1f} s", flush=True)
        print(f"   timing {', '.join(methods)}: {args.repeats} interleaved rounds after a "
              f"warm-up", flush=True)

        def progress(r: int, times: dict[str, float]) -> None:
            print(f"   round {r + 1}: " + ", ".join(f"{m} {1e3 * t:.1f}"
                                                   for m, t in times.items()) + " ms",
                  flush=True)

        timings = interleaved(methods, args.repeats, progress)
        if "split" in methods:
            stats = drv.last_prefill_stats()
            trust_stats = {m: d.last_prefill_stats() for m, d in others.items()}
            if args.trace:
                drv.prefill(ids, trace=True)
                args.trace.write_text(json.dumps(drv.last_trace()))
                result["trace"] = str(args.trace)
                print(f"   wrote the timeline of one 'split' prefill to {args.trace} "
                      f"(open it in ui.perfetto.dev)", flush=True)
    want = timings["reference"][2]
    rows = {}
    for method, (med, times, out) in timings.items():
        rows[method] = {"median_s": med, "times_s": times,
                        "max_abs_err": (out - want).abs().max().item()}
    if "split-local" in rows:
        rows["split-local"]["stats"] = local_drv.last_prefill_stats()
    result["rows"] = rows
    if "split" not in rows:
        return result
    rows["split"]["stats"] = stats
    for method, st in trust_stats.items():
        rows[method]["stats"] = st
    paired = {}
    for method in ("split", "split-unchunked", "split-open", "split-open-unchunked"):
        for hf in ("hf-eager", "hf-sdpa", "hf-sdpa-bf16"):
            if method in rows and hf in rows:
                paired[f"{method}/{hf}"] = statistics.median(
                    a / b for a, b in zip(rows[method]["times_s"], rows[hf]["times_s"],
                                          strict=True))
    for chunked, whole in (("split", "split-unchunked"), ("split-open", "split-open-unchunked")):
        if chunked in rows and whole in rows:
            paired[f"{chunked}/{whole}"] = statistics.median(
                a / b for a, b in zip(rows[chunked]["times_s"], rows[whole]["times_s"],
                                      strict=True))
    result["paired"] = paired
    if "split-open" in rows and "split-checked" in rows:
        base = rows["split-open"]["median_s"]
        result["trust"] = {
            "open_s": base, "default_s": rows["split"]["median_s"],
            "checked_s": rows["split-checked"]["median_s"],
            "default_vs_open": rows["split"]["median_s"] / base,
            "checked_vs_open": rows["split-checked"]["median_s"] / base,
            # Per round (the methods run back to back in each): steadier on a shared machine.
            "default_vs_open_paired": statistics.median(
                a / b for a, b in zip(rows["split"]["times_s"], rows["split-open"]["times_s"],
                                      strict=True)),
            "checked_vs_open_paired": statistics.median(
                a / b for a, b in zip(rows["split-checked"]["times_s"],
                                      rows["split-open"]["times_s"], strict=True)),
            "verify_checks": stats["verify"]["checks"], "verify_s": stats["verify"]["seconds"],
            "checked_verify_s": trust_stats["split-checked"]["verify"]["seconds"],
            "worst_ratio": stats["verify"]["lifetime"]["worst_ratio"]}
    moved = stats["bytes_out"] + stats["bytes_in"]
    routes = stats["routes"] or {}
    messages = sum(r["messages"] for r in routes.values()) or 1
    copy_s, bandwidth = memcpy_seconds(moved, moved // messages)
    result["transport"] = {
        "bytes": moved, "routes": routes, "transport_s": stats["transport_s"],
        "memcpy_bandwidth_Bps": bandwidth, "floor_s": 2 * copy_s,
        "tee_s": stats["tee_s"], "worker_s": stats["worker_s"], "wait_s": stats["wait_s"],
        "in_flight_s": stats["in_flight_s"], "hidden_s": stats["hidden_s"],
        "chunks": stats["chunks"], "chunk_rows": stats["chunk_rows"],
        "total_s": stats["total_s"], "policy": stats["policy"],
        "tee_copies": stats.get("copies")}  # how the TEE's process copies, per size
    return result


def copies_line(measured: dict[str, Any]) -> str:
    """``memcopy.measured()`` in one line: each size class's way and its timings."""
    if measured.get("fixed") is not None:
        return f"RT_COPY_THREADS={measured['fixed']}"
    parts = []
    for low, c in measured["classes"].items():
        timed = ", ".join(f"{w} {1e3 * t:.2f}" for w, t in c["seconds"].items())
        parts.append(f"{int(low) / MIB:g} MiB+ {c['way']}"  # int(): keys read back from JSON
                     + (f" ({timed} ms)" if timed else ""))
    return "; ".join(parts) or "no copy of 4 MiB or more"


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'preset':<13} {'T':>5} {'method':<20} {'median s':>9} {'vs ref':>7} {'max|err|':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for res in results:
        if res.get("skipped"):
            print(f"{res['preset']:<13} {res['tokens']:>5} skipped ({res['skipped']})")
            continue
        ref_s = res["rows"]["reference"]["median_s"]
        for method, row in res["rows"].items():
            print(f"{res['preset']:<13} {res['tokens']:>5} {method:<20} {row['median_s']:>9.3f} "
                  f"{row['median_s'] / ref_s:>6.2f}x {row['max_abs_err']:>9.2e}")
        tr = res.get("transport")
        if tr:
            r = tr["routes"]
            shm, zmq = r.get("shm", {}), r.get("zmq", {})
            print(f"{'':<19} crossed {tr['bytes'] / MIB:.1f} MiB "
                  f"(shm {shm.get('messages', 0)} msgs {shm.get('bytes', 0) / MIB:.1f} MiB, "
                  f"zmq {zmq.get('messages', 0)} msgs {zmq.get('bytes', 0) / MIB:.1f} MiB), "
                  f"attention '{tr['policy']}'")
            transport = tr["transport_s"] or 0.0
            print(f"{'':<19} transport {1e3 * transport:.1f} ms vs memcpy floor "
                  f"{1e3 * tr['floor_s']:.1f} ms (2 copies at "
                  f"{tr['memcpy_bandwidth_Bps'] / 1e9:.1f} GB/s) = "
                  f"{transport / tr['floor_s'] if tr['floor_s'] else float('nan'):.1f}x floor")
            if tr.get("tee_copies"):
                print(f"{'':<19} TEE copies ({tr['tee_copies']['width']} threads at most): "
                      f"{copies_line(tr['tee_copies'])}")
            print(f"{'':<19} split prefill {1e3 * tr['total_s']:.1f} ms in {tr['chunks']} "
                  f"chunk(s) of {tr['chunk_rows']} rows: TEE compute {1e3 * tr['tee_s']:.1f}, "
                  f"waiting {1e3 * tr['wait_s']:.1f}; offloads in flight "
                  f"{1e3 * tr['in_flight_s']:.1f} = worker compute "
                  f"{1e3 * (tr['worker_s'] or 0):.1f} + transport {1e3 * transport:.1f}, "
                  f"{1e3 * tr['hidden_s']:.1f} hidden behind TEE compute")
        for name, ratio in res.get("paired", {}).items():
            print(f"{'':<19} {name:<32} {ratio:.3f}x (median of per-round ratios)")
        tr = res.get("trust")
        if tr:
            print(f"{'':<19} trust boundary: defaults (private_io, verify) "
                  f"{tr['default_vs_open']:.3f}x (paired per round "
                  f"{tr['default_vs_open_paired']:.3f}x), checks alone "
                  f"{tr['checked_vs_open']:.3f}x ({tr['checked_vs_open_paired']:.3f}x) of "
                  f"private_io=False, verify=False; {tr['verify_checks']} checks "
                  f"{1e3 * tr['verify_s']:.1f} ms in the last prefill")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="seed-bench,llama-3.2-1b",
                   help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--tokens", type=int, default=None,
                   help="prompt length (default: 1024; 128 for llama-3.2-1b)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--attention", default="auto", choices=["auto", "worker", "tee"])
    p.add_argument("--wire-dtype", default=None, help="e.g. bfloat16 (default: float32)")
    p.add_argument("--threshold", type=int, default=None, help="shm_threshold in bytes")
    p.add_argument("--device", default="auto", help="worker device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-device", default=None,
                   help="where transformers runs (default: the worker's device)")
    p.add_argument("--hf-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also time transformers sdpa in bfloat16 (default: on a GPU)")
    p.add_argument("--share-gb", type=float, default=1.0,
                   help="models of this many GB (float32) or more: actors read one "
                        "checkpoint written here instead of each drawing the weights")
    p.add_argument("--no-local", action="store_true", help="skip the in-process split")
    p.add_argument("--no-trust", action="store_true",
                   help="skip split-open* and split-checked (the trust boundary's cost)")
    p.add_argument("--no-unchunked", action="store_true",
                   help="skip the unchunked split-*-unchunked methods")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk of the pipelined prefill (default: automatic; 0: one "
                        "chunk)")
    p.add_argument("--trace", type=Path, default=None,
                   help="write a Chrome trace (Perfetto) of one 'split' prefill here")
    p.add_argument("--split-threads", type=int, default=None,
                   help="intra-op threads of each split actor (default: torch's); e.g. 1 on "
                        "2 cores gives the TEE and a CPU worker a core each")
    p.add_argument("--local-max-gb", type=float, default=2.0,
                   help="largest model (GB) the in-process split is run for")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    args = p.parse_args(argv)
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = [s for s in presets if s not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    results = []
    for name in presets:
        results.append(bench_preset(name, args.tokens or DEFAULT_TOKENS.get(name, 1024), args))
        print_table(results[-1:])
        if args.json:  # after each preset: a run cut short keeps what it finished
            args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": results},
                                            indent=2))
    if len(results) > 1:
        print_table(results)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
