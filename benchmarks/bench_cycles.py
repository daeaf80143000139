"""How long a call cycle takes to fail, by its length (runtime/waits.py).

A cycle of ``n`` actors: each, serving a call of the driver, makes a blocking call to
the next after a delay, the last call closing the ring.  Without ``call_timeout`` nothing
else ends it: the wait notes must find it.  Measured from the moment the closing call is
made (inside its actor) to the moment its failure is back in that actor, median of
``--repeats``; the closing wait is the latest, so it is the one that fails.  Two actors
need one look (the first comes 20 ms into the wait); longer cycles need their links
passed round the ring, a look a hop, at doubling intervals up to 0.25 s.

A long chain without a cycle (``n`` actors, the last working ``--work`` s) is timed too:
it must fail nothing, and cost nothing past the work.

Usage::

    python benchmarks/bench_cycles.py --sizes 2,3,4,6 --repeats 5 --json cycles.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import ActorSystem, actor


@actor
class Link:
    """One actor of the ring."""

    def __init__(self) -> None:
        self.next = None

    def set_next(self, handle) -> bool:
        self.next = handle
        return True

    def ping(self) -> int:
        return os.getpid()

    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    def call_next_after(self, delay: float) -> tuple[str, float]:
        """Sleep, then a blocking ping of the next actor: what it gave, and how long."""
        time.sleep(delay)
        t0 = time.perf_counter()
        try:
            out = f"pid {self.next.ping()}"
        except Exception as exc:  # noqa: BLE001 - the cycle's failure is the measure
            out = f"{type(exc).__name__}: {exc}"
        return out, time.perf_counter() - t0

    def chain(self, depth: int, seconds: float) -> int:
        """A blocking call down the chain; the last works ``seconds``."""
        if depth == 0:
            return self.work(seconds)
        return self.next.chain(depth - 1, seconds)


def one_cycle(links: list, step: float) -> tuple[float, int]:
    """Close a cycle once: the latest wait's time to fail, and how many waits failed."""
    futures = [h.call_next_after.remote(step * (k + 1)) for k, h in enumerate(links)]
    results = [f.result(timeout=60) for f in futures]
    failed = [r for r in results if r[0].startswith("ActorRuntimeError: call cycle")]
    return results[-1][1], len(failed)


def measure(n: int, repeats: int, step: float) -> dict:
    with ActorSystem() as system:
        links = [system.spawn(Link, name=f"l{i}") for i in range(n)]
        for i, h in enumerate(links):
            h.set_next(links[(i + 1) % n])
        for h in links:  # open every channel first: the ring's first calls pay for it
            h.call_next_after(0.0)
        times, failures = [], []
        for _ in range(repeats):
            t, k = one_cycle(links, step)
            times.append(t)
            failures.append(k)
        t0 = time.perf_counter()
        pid = links[0].chain(n - 1, 1.0)
        chain_s = time.perf_counter() - t0
    return {"actors": n, "fail_s_median": statistics.median(times), "fail_s": times,
            "waits_failed": failures, "chain_1s_work_s": chain_s, "chain_ok": pid > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2,3,4,6")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step", type=float, default=0.1, help="s between the ring's calls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [measure(int(n), args.repeats, args.step) for n in args.sizes.split(",")]
    print(f"{'actors':>6} {'to fail (median)':>17} {'runs':>28} {'failed':>12} "
          f"{'chain, 1 s work':>16}")
    for r in rows:
        runs = " ".join(f"{t * 1e3:.0f}" for t in r["fail_s"])
        print(f"{r['actors']:>6} {r['fail_s_median'] * 1e3:>14.0f} ms {runs:>25} ms "
              f"{r['waits_failed']!s:>12} {r['chain_1s_work_s']:>14.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "cycles", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
