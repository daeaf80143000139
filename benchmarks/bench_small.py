"""Small messages: this tree against another revision, alternated in one run.

The per-message cost of the call path is a few microseconds, and this VM's drift between
runs (10-40 %) is larger than any change to it.  So both trees are measured in one run, in
alternating rounds, each round in a fresh interpreter with that tree first on its path;
the figures are medians of per-round p50s, and the ratio is taken round by round.

Measured per tree (p50 of many round trips):

* ``ping_none``: a channel round trip of ``None`` between two processes (header-only
  messages: the codec, the message layer, framing, the ring, the spin wait);
* ``ping_8KiB``: the same with an 8 KiB tensor each way (buffers: framing's size table,
  the copy into the record and out of it);
* ``actor_noop`` and ``actor_echo_8KiB``: the same through an actor (the call layer on top);
* ``ping_after_5ms`` and ``actor_noop_after_5ms``: a round trip after 5 ms of silence, when
  the peer has stopped spinning and sleeps on its doorbell (the wake-up);
* ``actor_remote_result``: ``.remote().result()`` (a future, its reader driven by the wait);
* ``actor_callback_chain``: a step of a chain of ``.remote()`` calls each issued by the
  previous one's done-callback (where callbacks run, and the hand-off to that thread);
* ``actor_to_actor_call`` and ``actor_to_actor_remote_result``: a call (blocking, or
  ``.remote().result()``) from an actor's serving thread to another actor, timed inside
  the calling actor (a blocked serving thread leaves a wait note: runtime/waits.py).

Usage::

    python benchmarks/bench_small.py --against 73bd7e6 --rounds 5 --json small.json

Without ``--against`` only this tree is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child interpreter whose first path entry is the tree under test.  It must work
# against older trees too: before the message layer, the channel encoded objects itself.
_CHILD = r'''
import json, os, statistics, subprocess, sys, tempfile, time, uuid
import torch
from runtime.transport.channel import Channel
from runtime.transport.doorbell import Doorbell
try:
    from runtime.messages import MessageChannel
except ImportError:  # an older tree: the channel speaks objects itself
    MessageChannel = lambda c: c

PONG = """
import json, sys
from runtime.transport.channel import Channel, ChannelSpec
from runtime.transport.doorbell import Doorbell
try:
    from runtime.messages import MessageChannel
except ImportError:
    MessageChannel = lambda c: c
spec = ChannelSpec.from_dict(json.loads(sys.argv[1]))
fds = [int(fd) for fd in sys.argv[3].split(",")]
ch = MessageChannel(Channel.attach(spec, fds=fds, own_bell=Doorbell(sys.argv[2]), safe=False,
                                   name="pong", shm_dir="/dev/shm"))
print("ready", flush=True)
while True:
    x = ch.recv(spin_s=300e-6)
    if isinstance(x, str):
        break
    ch.send(x)
"""


def p50(fn, n, warmup=200, pause=0.0):
    ts = []
    for i in range(n + warmup):
        if pause:
            time.sleep(pause)  # the peer has gone to sleep: this times its wake-up
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def pings(n):
    d = tempfile.mkdtemp(prefix="rtsmall")
    caller = Channel.create(shm_dir="/dev/shm", private_dir=d,
                            name=f"rt_s{uuid.uuid4().hex[:8]}", threshold=10 << 20)
    bell = os.path.join(d, "pong.bell")
    fds = caller.peer_fds()
    child = subprocess.Popen([sys.executable, "-c", PONG, json.dumps(caller.spec().as_dict()),
                              bell, ",".join(map(str, fds))], pass_fds=fds,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        caller.attached(bell)
        ch = MessageChannel(caller)
        out = {}
        def once(msg=None):
            ch.send(msg)
            ch.recv(spin_s=300e-6)
        out["ping_none"] = p50(once, n)
        x = torch.ones(2048)
        out["ping_8KiB"] = p50(lambda: once(x), n)
        out["ping_after_5ms"] = p50(once, 150, warmup=5, pause=0.005)
        ch.send("stop")
        child.wait(10)
        return out
    finally:
        if child.poll() is None:
            child.kill()
        caller.close()


def actors(n):
    from runtime import ActorSystem, actor

    @actor
    class Echo:
        def noop(self):
            return None

        def echo(self, x):
            return x

    @actor
    class Relay:
        """Calls another actor from its serving thread (what leaves wait notes)."""

        def __init__(self, other):
            self.other = other

        def calls(self, k, remote):
            t0 = time.perf_counter()
            for _ in range(k):
                if remote:
                    self.other.noop.remote().result()
                else:
                    self.other.noop()
            return (time.perf_counter() - t0) / k * 1e6

    with ActorSystem() as system:
        e = system.spawn(Echo)
        r = system.spawn(Relay, e)
        x = torch.ones(2048)
        k = max(50, n // 10)
        r.calls(k, False)  # warm-up: opens the channel
        return {"actor_noop": p50(e.noop, n), "actor_echo_8KiB": p50(lambda: e.echo(x), n // 2),
                "actor_noop_after_5ms": p50(e.noop, 150, warmup=5, pause=0.005),
                "actor_remote_result": p50(lambda: e.noop.remote().result(), n // 2),
                "actor_callback_chain": statistics.median(
                    callback_chain(e, max(50, n // 20)) for _ in range(5)),
                "actor_to_actor_call": statistics.median(
                    r.calls(k, False) for _ in range(5)),
                "actor_to_actor_remote_result": statistics.median(
                    r.calls(k, True) for _ in range(5))}


def callback_chain(e, steps):
    """Microseconds a step of a chain of .remote() calls, each issued by the previous
    one's done-callback (wherever the runtime runs callbacks)."""
    import threading
    done, left = threading.Event(), [steps]

    def next_call(f):
        f.result()
        left[0] -= 1
        if left[0] == 0:
            done.set()
        else:
            e.noop.remote().add_done_callback(next_call)

    t0 = time.perf_counter()
    e.noop.remote().add_done_callback(next_call)
    assert done.wait(120), "the callback chain stopped"
    return (time.perf_counter() - t0) / steps * 1e6


n = int(sys.argv[1])
print(json.dumps({**pings(4 * n), **actors(n)}))
'''


def run_tree(tree: str, n: int) -> dict[str, float]:
    """One round in a fresh interpreter whose first path entry is ``tree``."""
    rest = os.environ.get("PYTHONPATH")  # e.g. where a device host's pyzmq was installed
    env = {**os.environ, "PYTHONPATH": tree + (os.pathsep + rest if rest else "")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"round in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", help="a git revision to compare with (checked out to a "
                                      "temporary worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000, help="actor calls per measure (pings: 4x)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    trees = {"this": HERE}
    tmp = None
    if args.against:
        tmp = tempfile.mkdtemp(prefix="rt_against")
        subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", tmp, args.against],
                       check=True, capture_output=True)
        trees[args.against] = tmp
    try:
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for r in range(args.rounds):
            # Alternate which tree goes first, so neither always gets the warmer machine.
            for label in (list(trees) if r % 2 == 0 else list(reversed(trees))):
                got = run_tree(trees[label], args.n)
                rounds[label].append(got)
                print(f"round {r + 1} {label:>10}: " +
                      "  ".join(f"{k} {v:6.1f} us" for k, v in got.items()), flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", tmp],
                           check=False, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    result: dict = {"rounds": rounds, "median_us": {}, "ratio_this_over_against": {}}
    keys = list(rounds["this"][0])
    for label, rs in rounds.items():
        result["median_us"][label] = {k: statistics.median(r[k] for r in rs) for k in keys}
    print("\nmedian p50 (us)   " + "".join(f"{label:>14}" for label in trees)
          + ("       ratio" if args.against else ""))
    for k in keys:
        row = f"{k:<18}" + "".join(f"{result['median_us'][label][k]:14.1f}" for label in trees)
        if args.against:
            ratio = statistics.median(a[k] / b[k] for a, b in
                                      zip(rounds["this"], rounds[args.against], strict=True))
            result["ratio_this_over_against"][k] = ratio
            row += f"{ratio:12.3f}x"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
