"""The benchmarks' interleaving: no method always follows the same one."""

from __future__ import annotations

from benchmarks.common import interleaved


def test_interleaved_rounds_rotate_so_every_method_takes_every_place():
    calls: list[str] = []

    def method(name: str):
        def run() -> str:
            calls.append(name)
            return name
        return run

    names = ["a", "b", "c", "d"]
    out = interleaved({n: method(n) for n in names}, repeats=8)
    assert calls[:4] == names  # the warm-up round, in the given order
    rounds = [calls[4 + 4 * r:8 + 4 * r] for r in range(8)]
    assert all(sorted(r) == names for r in rounds)  # each round times each method once
    for place in range(4):  # two full rotations: each method twice in each place
        assert sorted(r[place] for r in rounds) == sorted(names * 2)
    for n in names:
        median, times, last = out[n]
        assert len(times) == 8 and last == n and min(times) <= median <= max(times)
