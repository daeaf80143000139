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


def test_the_benchmarks_checkpoint_writer_round_trips_through_safetensors(tmp_path):
    """bench_llama writes the drawn weights once for every actor to read (its own writer:
    safetensors' builds the whole file in memory first)."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.bench_llama import write_safetensors

    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(),
          "t": torch.randn(4, 6).t(), "h": torch.randn(2, 3).half(), "e": torch.zeros(0, 4)}
    write_safetensors(str(tmp_path / "m.safetensors"), ts)
    got = load_file(str(tmp_path / "m.safetensors"))
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
