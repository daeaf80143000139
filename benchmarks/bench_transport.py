"""Transport benchmark: a Channel between two processes against raw pyzmq and memcpy.

For each payload (empty message, then tensors of 4 KiB ... 128 MiB) it times
an echo round trip through

* ``channel``: ``runtime.transport.Channel`` under the codec (``MessageChannel``;
  ring below the threshold, ZeroMQ at or above it; framing and codec included);
* ``pyzmq``: raw pyzmq, ``ipc://`` PAIR, ``copy=False`` both ways, with the
  echo server sending back the frames it received;
* ``memcpy``: four single-threaded copies in one process into preallocated
  buffers: the floor of an echo (copy in and out on each side).

Each side runs in its own client process: ours with the allocator settings
an ``ActorSystem`` applies (``runtime.malloc``), raw pyzmq with glibc's
defaults (fresh receive buffers), as a user of plain pyzmq gets them.

Also: the first message after 5 ms of silence, and the CPU an idle reader
burns over 2 s.  Writes JSON with ``--json``.  Run: ``make bench`` or
``python benchmarks/bench_transport.py --json out.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from multiprocessing.reduction import recv_handle, send_handle

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
from runtime import malloc
from runtime.messages import MessageChannel
from runtime.transport.channel import Channel
from runtime.transport.doorbell import Doorbell

THRESHOLD = 10 * 1024 * 1024


def channel_server(spec, conn, nfds, private_dir):
    malloc.tune_current_process()
    bell = Doorbell(os.path.join(private_dir, "server.bell"))
    # The rings have no name and the pool's socket pair is private: the
    # descriptors come over a Unix socket (SCM_RIGHTS), as in the runtime.
    fds = [recv_handle(conn) for _ in range(nfds)]
    ch = MessageChannel(Channel.attach(spec, fds=fds, own_bell=bell, safe=False, name="server",
                                       shm_dir="/dev/shm"))
    ch.send(bell.path)  # handshake: tells the client where to ring
    while True:
        msg = ch.recv(spin_s=300e-6)
        if isinstance(msg, str) and msg == "stop":
            break
        ch.send(msg)
    ch.close()
    bell.close()


def payload(nbytes):
    return torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0) if nbytes else None


def bench_channel(sizes, private_dir):
    malloc.tune_current_process()  # as ActorSystem() does in the driver
    client = MessageChannel(Channel.create(shm_dir="/dev/shm", private_dir=private_dir,
                                           name=f"rt_bench{os.getpid()}", threshold=THRESHOLD))
    ours, theirs = mp.Pipe()
    fds = client.peer_fds()
    proc = mp.get_context("spawn").Process(target=channel_server,
                                           args=(client.spec(), theirs, len(fds), private_dir))
    proc.start()
    for fd in fds:
        send_handle(ours, fd, proc.pid)
    client.attached(client.recv(deadline=time.monotonic() + 60))
    out = {}
    try:
        for label, n in sizes.items():
            msg = payload(n)

            def rt(msg=msg):
                client.send(msg)
                client.recv(spin_s=300e-6)
            out[label] = summary(timed(rt, iterations(n)), n)
            print(f"  channel {label:>7}: {out[label]['p50_us']:10.1f} us p50", flush=True)
        # first message after 5 ms of silence
        samples = []
        for _ in range(60):
            time.sleep(0.005)
            t0 = time.perf_counter()
            client.send(None)
            client.recv(spin_s=300e-6)
            samples.append(time.perf_counter() - t0)
        out["after_5ms_silence"] = summary(samples)
        # idle reader CPU: the server waits for a message that comes 2 s later
        time.sleep(0.1)
        c0 = cpu_seconds(proc.pid)
        time.sleep(2.0)
        out["idle_reader_cpu_percent"] = (cpu_seconds(proc.pid) - c0) / 2.0 * 100
    finally:
        client.send("stop")
        client.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return out


def _child(fn, args, queue):
    queue.put(fn(*args))


def in_subprocess(fn, *args):
    """Run ``fn(*args)`` in a fresh process: its allocator settings stay its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_memcpy(sizes):
    out = {}
    for label, n in sizes.items():
        if n == 0:
            continue
        bufs = [np.ones(n, dtype=np.uint8) for _ in range(5)]

        def four_copies(bufs=bufs):
            for i in range(4):
                np.copyto(bufs[i + 1], bufs[i])
        out[label] = summary(timed(four_copies, iterations(n)), n)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated labels")
    args = ap.parse_args(argv)
    sizes = {k: SIZES[k] for k in args.sizes.split(",")}
    private_dir = tempfile.mkdtemp(prefix="rtb")
    try:
        print("channel (ours):")
        ours = in_subprocess(bench_channel, sizes, private_dir)
        print("raw pyzmq:")
        raw = in_subprocess(bench_pyzmq, sizes, private_dir)
        floor = bench_memcpy(sizes)
    finally:
        for f in os.listdir(private_dir):
            os.unlink(os.path.join(private_dir, f))
        os.rmdir(private_dir)
    print(f"\n{'payload':>8} | {'channel p50':>12} {'p99':>9} {'GB/s':>6} | {'pyzmq p50':>10} "
          f"{'GB/s':>6} | {'memcpy x4':>10} | {'pyzmq/ours':>10}")
    for label in sizes:
        o, r, m = ours[label], raw[label], floor.get(label)
        print(f"{label:>8} | {o['p50_us']:10.1f}us {o['p99_us']:7.0f}us {o.get('GBps', 0):6.2f} | "
              f"{r['p50_us']:8.1f}us {r.get('GBps', 0):6.2f} | "
              f"{(m['p50_us'] if m else 0):8.1f}us | {r['p50_us'] / o['p50_us']:9.2f}x")
    print(f"first message after 5 ms silence: channel {ours['after_5ms_silence']['p50_us']:.0f} us"
          f", pyzmq {raw['after_5ms_silence']['p50_us']:.0f} us (p50)")
    print(f"idle reader CPU over 2 s: {ours['idle_reader_cpu_percent']:.2f} % of a core")
    write_json(args.json, {"machine": machine(), "threshold": THRESHOLD, "channel": ours,
                           "pyzmq": raw, "memcpy_x4": floor})


if __name__ == "__main__":
    main()
