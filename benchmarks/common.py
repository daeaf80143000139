"""Helpers shared by the benchmarks: timing statistics, machine facts, JSON out."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
import zmq

SIZES = {"empty": 0, "4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "8MiB": 8 << 20,
         "32MiB": 32 << 20, "128MiB": 128 << 20}


def iterations(nbytes: int, budget_bytes: float = 4e9, lo: int = 15, hi: int = 3000) -> int:
    """How many round trips to time for a payload: more for small ones."""
    if nbytes == 0:
        return hi
    return int(max(lo, min(hi, budget_bytes // max(nbytes, 1) // 4)))


def timed(fn: Callable[..., Any], n: int, warmup: int = 3,
          setup: Callable[[], Any] | None = None) -> list[float]:
    """Time ``n`` calls of ``fn()``, or of ``fn(setup())`` with ``setup`` untimed.

    A fresh argument per call (``setup``) is what a caller really sends: a
    transport that caches what it saw (torch's shared-memory pickling does)
    would otherwise look free.
    """
    out = []
    for i in range(warmup + n):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        if setup is not None:
            fn(arg)
        else:
            fn()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float], nbytes: int = 0) -> dict[str, float]:
    s = sorted(samples)
    p50 = statistics.median(s)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    res = {"n": len(s), "p50_us": p50 * 1e6, "p99_us": p99 * 1e6}
    if nbytes:
        res["GBps"] = 2 * nbytes / p50 / 1e9  # payload there and back per round trip
    return res


def machine() -> dict[str, Any]:
    import torch
    import zmq

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_GiB": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {path}")


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _zmq_echo_server(endpoint: str) -> None:
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and frames[0].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close(0)


def bench_pyzmq(sizes: dict[str, int], private_dir: str) -> dict[str, Any]:
    """Raw pyzmq baseline: ipc:// PAIR echo, copy=False both ways, frames into tensors."""
    endpoint = f"ipc://{private_dir}/raw.zmq"
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.bind(endpoint)
    proc = mp.get_context("spawn").Process(target=_zmq_echo_server, args=(endpoint,))
    proc.start()
    out: dict[str, Any] = {}
    try:
        out["noop"] = summary(timed(lambda: (sock.send(b""), sock.recv()), 3000, warmup=200))
        for label, n in sizes.items():
            def rt(msg, n=n):
                sock.send(msg, copy=False)
                frame = sock.recv(copy=False)
                return torch.frombuffer(frame, dtype=torch.uint8) if n else None
            out[label] = summary(timed(rt, iterations(n),
                                       setup=lambda n=n: np.ones(n, dtype=np.uint8)), n)
            print(f"  pyzmq {label:>7}: {out[label]['p50_us']:10.1f} us p50", flush=True)
        samples = []
        for _ in range(60):
            time.sleep(0.005)
            t0 = time.perf_counter()
            sock.send(b"")
            sock.recv()
            samples.append(time.perf_counter() - t0)
        out["after_5ms_silence"] = summary(samples)
    finally:
        sock.send(b"stop")
        proc.join(10)
        sock.close(0)
    return out


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int,
                progress: Callable[[int, dict[str, float]], Any] | None = None,
                ) -> dict[str, tuple[float, list[float], Any]]:
    """Median seconds per method over ``repeats`` rounds, methods interleaved within each
    round (so a noisy neighbour slows them all alike), after one warm-up round.

    The order rotates from round to round, so that no method always follows the same one:
    in a fixed order, two identical configurations of the split measured 1.00x and 1.11x
    of transformers on 2 cores, by their place in the round alone (what runs just before
    taxes what comes next; likely causes, not measured apart: a torch call whose OpenMP
    threads still spin, an actor process that has gone to sleep).

    ``progress(round, {method: seconds})`` after each timed round: a run cut short (a time
    box on a lent machine) still shows what it measured.
    """
    last = {name: fn() for name, fn in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for r in range(repeats):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(r, {name: ts[-1] for name, ts in times.items()})
    return {name: (statistics.median(ts), ts, last[name]) for name, ts in times.items()}
