"""Actor-call benchmark: calls through runtime actors against IPC baselines.

One run, side by side on the same machine:

* ``actor``: ``handle.echo(x)`` through ``ActorSystem`` (ring below 10 MiB,
  ZeroMQ above; codec, dispatch and futures included);
* ``pyzmq``: raw pyzmq ``ipc://`` PAIR echo, ``copy=False``;
* ``pipe``: ``multiprocessing.Pipe`` echo (its pickler carries torch's
  reductions, so tensors too travel as shared memory plus a descriptor);
* ``tmq``: ``torch.multiprocessing`` Queue echo (tensors moved to shared
  memory and handed over by file descriptor: no copy of the payload back).

Every call sends a freshly made tensor (made outside the timed region): the
shared-memory baselines cache a storage they have shared once, so resending
one tensor would time nothing.  ``actor np`` echoes a fresh numpy array
instead, from 8 MiB: Ray's figures (7.3 ms at 32 MiB, 20.4 ms at 128 MiB,
issue 8) are for its zero-copy numpy path, and a fresh torch tensor costs a
large echo more than the transport does -- filling it wakes torch's OpenMP
threads, which then spin on the other core through the caller's copy (22.6-
24.6 ms against 14.9-21.2 ms at 128 MiB in alternating runs here).  Sizes
from 4 MiB are warmed up with :data:`LARGE_WARMUP` calls: each process
times its first copies of a size to choose how to copy it
(``runtime/transport/memcopy.py``), and what is reported is the steady state.

Plus: a no-op call after 5 ms of silence; the CPU an idle actor and a driver
waiting on a long call burn; and a ~200 ms all-core matmul called through an
actor against the same matmul in-process (what a waiting caller costs the
callee).  ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    SIZES,
    bench_pyzmq,
    cpu_seconds,
    iterations,
    machine,
    summary,
    timed,
    write_json,
)
from runtime import ActorSystem, actor
from runtime.transport import memcopy


@actor
class Bench:
    def noop(self):
        return None

    def echo(self, x):
        return x

    def sleep(self, s):
        time.sleep(s)

    def load(self, a, b):
        self.a, self.b = a, b

    def matmul(self, reps):
        for _ in range(reps):
            c = self.a @ self.b
        return float(c[0, 0])


def pipe_server(conn):
    while True:
        msg = conn.recv()
        if isinstance(msg, str) and msg == "stop":
            return
        conn.send(msg)


def tmq_server(q_in, q_out):
    while True:
        msg = q_in.get()
        if isinstance(msg, str) and msg == "stop":
            return
        q_out.put(msg)


def tensor(n):
    return torch.ones(n // 4) if n else None


def array(n):
    return np.ones(n // 4, np.float32)


LARGE_WARMUP = 3 + 1 + len(memcopy.WAYS) * memcopy.EXPLORE  # past each side's measurement
NUMPY_MIN = 8 << 20


def warmup(n: int) -> int:
    return LARGE_WARMUP if n >= memcopy.PARALLEL_MIN else 3


def bench_actor(sizes):
    out = {}
    with ActorSystem() as system:
        b = system.spawn(Bench)
        out["noop"] = summary(timed(b.noop, 3000, warmup=200))
        print(f"  actor noop: {out['noop']['p50_us']:.1f} us p50", flush=True)
        samples = []
        for _ in range(60):
            time.sleep(0.005)
            t0 = time.perf_counter()
            b.noop()
            samples.append(time.perf_counter() - t0)
        out["noop_after_5ms_silence"] = summary(samples)
        for label, n in sizes.items():
            out[label] = summary(timed(b.echo, iterations(n), warmup=warmup(n),
                                       setup=lambda n=n: tensor(n)), n)
            print(f"  actor {label:>7}: {out[label]['p50_us']:10.1f} us p50", flush=True)
        for label, n in sizes.items():
            if n >= NUMPY_MIN:
                out[f"{label}_numpy"] = summary(timed(b.echo, iterations(n), warmup=warmup(n),
                                                      setup=lambda n=n: array(n)), n)
                print(f"  actor {label:>7} numpy: {out[f'{label}_numpy']['p50_us']:10.1f} us p50",
                      flush=True)
        time.sleep(0.2)
        c0 = cpu_seconds(b.pid)
        time.sleep(2.0)
        out["idle_actor_cpu_percent"] = (cpu_seconds(b.pid) - c0) / 2 * 100
        c0 = cpu_seconds(os.getpid())
        b.sleep(2.0)
        out["waiting_driver_cpu_percent"] = (cpu_seconds(os.getpid()) - c0) / 2 * 100
        out["compute"] = bench_compute(b)
    return out


def bench_compute(b):
    n = 1024
    a, m = torch.randn(n, n), torch.randn(n, n)
    t0 = time.perf_counter()
    reps = 1
    while time.perf_counter() - t0 < 0.2:
        _ = a @ m
        reps += 1
    b.load(a, m)  # the operands live in the actor: this measures waiting, not transport
    local, remote = [], []
    for _ in range(7):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ m
        float(c[0, 0])
        local.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b.matmul(reps)
        remote.append(time.perf_counter() - t0)
    lm, rm = statistics.median(local), statistics.median(remote)
    print(f"  compute: in-process {lm * 1e3:.1f} ms, through an actor {rm * 1e3:.1f} ms "
          f"({rm / lm:.3f}x)", flush=True)
    return {"in_process_ms": lm * 1e3, "actor_ms": rm * 1e3, "ratio": rm / lm, "reps": reps}


def bench_pipe(sizes):
    a, b = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=pipe_server, args=(b,))
    proc.start()
    out = {"noop": summary(timed(lambda: (a.send(None), a.recv()), 3000, warmup=200))}
    for label, n in sizes.items():
        out[label] = summary(timed(lambda x: (a.send(x), a.recv()), iterations(n),
                                   setup=lambda n=n: tensor(n)), n)
    a.send("stop")
    proc.join(10)
    print(f"  pipe noop: {out['noop']['p50_us']:.1f} us p50", flush=True)
    return out


def bench_tmq(sizes):
    ctx = torch.multiprocessing.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=tmq_server, args=(q_in, q_out))
    proc.start()
    out = {"noop": summary(timed(lambda: (q_in.put(None), q_out.get()), 2000, warmup=100))}
    for label, n in sizes.items():
        if n == 0:
            continue

        def rt(x):
            q_in.put(x)
            return q_out.get()
        out[label] = summary(timed(rt, iterations(n), setup=lambda n=n: tensor(n)), n)
    q_in.put("stop")
    proc.join(10)
    print(f"  tmq noop: {out['noop']['p50_us']:.1f} us p50", flush=True)
    return out


@actor
class Empty:
    def ping(self):
        return None


def bench_spawn(zygote: bool, rounds: int = 10, many: int = 32) -> dict:
    """Spawn and restart times and idle memory, with the zygote on or off (``RT_ZYGOTE``)."""
    import psutil

    old = os.environ.get("RT_ZYGOTE")
    os.environ["RT_ZYGOTE"] = "1" if zygote else "0"
    try:
        with ActorSystem() as system:
            system.spawn(Empty).ping()  # the first spawn waits for the zygote's imports
            spawn = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                system.spawn(Empty)
                spawn.append(time.perf_counter() - t0)
            h = system.spawn(Empty, max_restarts=rounds)
            restart = []
            for _ in range(rounds // 2):
                h.ping()
                t0 = time.perf_counter()
                os.kill(h.pid, 9)
                while True:
                    try:
                        h.ping()
                        break
                    except Exception:  # noqa: BLE001 - ActorDiedError until it is back
                        time.sleep(0.002)
                restart.append(time.perf_counter() - t0)
        with ActorSystem() as system:
            system.spawn(Empty).ping()
            t0 = time.perf_counter()
            hs = [system.spawn(Empty) for _ in range(many)]
            for x in hs:
                x.ping()
            many_s = time.perf_counter() - t0
            time.sleep(0.5)
            uss = [psutil.Process(x.pid).memory_full_info().uss for x in hs]
    finally:
        if old is None:
            os.environ.pop("RT_ZYGOTE", None)
        else:
            os.environ["RT_ZYGOTE"] = old
    out = {"spawn_p50_s": statistics.median(spawn), "restart_p50_s": statistics.median(restart),
           f"spawn_{many}_s": many_s, "idle_uss_mib": statistics.median(uss) / 2**20}
    print(f"  zygote {'on ' if zygote else 'off'}: spawn {out['spawn_p50_s'] * 1e3:7.1f} ms p50, "
          f"restart after kill -9 {out['restart_p50_s'] * 1e3:7.1f} ms p50, {many} actors "
          f"{many_s:5.2f} s, idle USS {out['idle_uss_mib']:5.1f} MiB", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--sizes", default=",".join(k for k in SIZES if k != "empty"),
                    help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--spawn-only", action="store_true", help="only the spawn/restart figures")
    ap.add_argument("--no-spawn", action="store_true", help="skip the spawn/restart figures")
    args = ap.parse_args(argv)
    unknown = [k for k in args.sizes.split(",") if k not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    spawn = None
    if not args.no_spawn:
        print("spawn (targets: 0.3 s p50, restart 0.5 s, 32 actors 10 s, 60 MiB USS):")
        spawn = {"zygote": bench_spawn(True), "fresh_interpreter": bench_spawn(False)}
    if args.spawn_only:
        write_json(args.json, {"machine": machine(), "spawn": spawn})
        return
    sizes = {k: SIZES[k] for k in args.sizes.split(",")}
    private_dir = tempfile.mkdtemp(prefix="rtb")
    try:
        print("actors (ours):")
        ours = bench_actor(sizes)
        print("baselines:")
        raw = bench_pyzmq(sizes, private_dir)
        pipe = bench_pipe(sizes)
        tmq = bench_tmq(sizes)
    finally:
        for f in os.listdir(private_dir):
            os.unlink(os.path.join(private_dir, f))
        os.rmdir(private_dir)
    rows = ["noop", *sizes]
    print(f"\n{'payload':>8} | {'actor p50':>10} {'p99':>9} | {'actor np':>10} | {'pyzmq':>9} | "
          f"{'Pipe':>9} | {'tmp Queue':>9} | best baseline / actor")
    for r in rows:
        base = {k: v[r]["p50_us"] for k, v in (("pyzmq", raw), ("pipe", pipe), ("tmq", tmq))
                if r in v}
        best = min(base.values())
        np_us = ours.get(f"{r}_numpy", {}).get("p50_us")
        np_cell = f"{np_us:8.1f}us" if np_us is not None else f"{'-':>10}"
        print(f"{r:>8} | {ours[r]['p50_us']:8.1f}us {ours[r]['p99_us']:7.0f}us | {np_cell} | "
              + " | ".join(f"{base.get(k, float('nan')):7.1f}us" for k in ("pyzmq", "pipe", "tmq"))
              + f" | {best / ours[r]['p50_us']:.2f}x")
    print(f"no-op after 5 ms silence: {ours['noop_after_5ms_silence']['p50_us']:.0f} us p50")
    print(f"idle actor CPU {ours['idle_actor_cpu_percent']:.2f} %, waiting driver CPU "
          f"{ours['waiting_driver_cpu_percent']:.2f} % of a core")
    write_json(args.json, {"machine": machine(), "actor": ours, "pyzmq": raw, "pipe": pipe,
                           "torch_mp_queue": tmq, "spawn": spawn})


if __name__ == "__main__":
    main()
