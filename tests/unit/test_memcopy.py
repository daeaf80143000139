"""Large host copies on several threads where that was measured faster (``memcopy.py``)."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from runtime.transport import memcopy


@pytest.fixture
def fixed(monkeypatch):
    """Fix the thread count as ``RT_COPY_THREADS`` would."""
    def fix(k: int | None, width: int = 2) -> None:
        monkeypatch.setattr(memcopy, "_configured", True)
        monkeypatch.setattr(memcopy, "_threads", k)
        monkeypatch.setattr(memcopy, "_width", width)
        monkeypatch.setattr(memcopy, "_classes", {})
    return fix


@pytest.mark.parametrize("n", [0, 1, 4095, memcopy.PARALLEL_MIN, 3 * memcopy.PARALLEL_MIN + 5])
@pytest.mark.parametrize("threads", [1, 3, None])
def test_memcopy_copies_exactly(fixed, n, threads):
    fixed(threads)
    src = np.random.default_rng(n).integers(0, 256, n + 64, dtype=np.uint8)
    dst = np.zeros(n + 64, np.uint8)
    for _ in range(1 + 2 * memcopy.EXPLORE + 1 if threads is None else 1):  # both ways
        dst[:] = 0
        memcopy.copy_bytes(dst.ctypes.data + 32, src.ctypes.data + 32, n)
        assert np.array_equal(dst[32:32 + n], src[32:32 + n])
        assert not dst[:32].any() and not dst[32 + n:].any()


def _feed(c: memcopy.SizeClass, seconds: dict[str, float]) -> list[str]:
    """Run ``c`` through one measurement with the given time per way; the ways it picked."""
    picked = []
    while True:
        way, timed = c.pick()
        assert timed
        picked.append(way)
        c.record(way, seconds[way])
        if not c.measuring:
            return picked


def test_a_size_class_times_each_way_then_keeps_the_faster():
    c = memcopy.SizeClass(("one", "threads"))
    assert c.way == "one" and c.measuring
    picked = _feed(c, {"one": 10.0, "threads": 7.0})
    # the first copy is not timed (a fresh slot's page faults); then the ways alternate
    assert picked[0] == "one"
    assert picked[1:].count("one") == picked[1:].count("threads") == memcopy.EXPLORE
    assert c.way == "threads" and c.last == {"one": 10.0, "threads": 7.0}
    assert not c.measuring
    # it keeps that way for REVISIT copies, ignoring what they would say...
    for _ in range(memcopy.REVISIT):
        assert c.pick() == ("threads", False)
    assert c.way == "threads" and c.measuring
    # ...and then measures again: the host's load changed, one thread wins now
    picked = _feed(c, {"one": 10.0, "threads": 9.5})  # within GAIN: not worth threads
    assert picked.count("one") == picked.count("threads") == memcopy.EXPLORE
    assert c.way == "one"


def test_a_size_class_judges_by_the_median():
    c = memcopy.SizeClass(("one", "threads"))
    c.record(c.pick()[0], 99.0)  # untimed
    times = {"one": iter([10.0, 10.0, 10.0]), "threads": iter([1000.0, 5.0, 5.0])}
    while c.measuring:
        way, _ = c.pick()
        c.record(way, next(times[way]))
    assert c.way == "threads"  # one preempted copy does not decide


@pytest.mark.parametrize("seconds,way", [
    ({"one": 10.0, "threads": 8.0, "torch": 5.0}, "torch"),
    ({"one": 10.0, "threads": 6.0, "torch": 8.0}, "threads"),
    ({"one": 10.0, "threads": 9.5, "torch": 9.2}, "one"),  # neither beats one by GAIN
])
def test_a_size_class_of_three_ways_takes_the_fastest(seconds, way):
    c = memcopy.SizeClass(memcopy.WAYS)
    picked = _feed(c, seconds)
    assert all(picked[1:].count(w) == memcopy.EXPLORE for w in memcopy.WAYS)
    assert c.way == way and c.last == seconds


def test_torch_copies_only_where_the_peer_has_cores_of_its_own(fixed, monkeypatch):
    import torch

    fixed(None, width=2)
    assert memcopy._ways() == ("one", "threads")  # two cores: its spinners cost the peer
    fixed(None, width=memcopy.TORCH_MIN_CORES)
    assert memcopy._ways() == memcopy.WAYS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert memcopy._ways() == ("one", "threads")
    monkeypatch.delitem(sys.modules, "torch")  # a process without torch
    assert memcopy._ways() == ("one", "threads")


def test_each_way_copies_exactly(fixed, monkeypatch):
    import torch

    fixed(None, width=memcopy.TORCH_MIN_CORES)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the gate, on any runner
    n = memcopy.PARALLEL_MIN + 4097
    src = np.random.default_rng(7).integers(0, 256, n + 64, dtype=np.uint8)
    dst = np.zeros(n + 64, np.uint8)
    for _ in range(1 + len(memcopy.WAYS) * memcopy.EXPLORE + 2):
        dst[:] = 0
        memcopy.copy_bytes(dst.ctypes.data + 32, src.ctypes.data + 32, n)
        assert np.array_equal(dst[32:32 + n], src[32:32 + n])
        assert not dst[:32].any() and not dst[32 + n:].any()
    c = memcopy.measured()["classes"][1 << (n.bit_length() - 1)]
    assert set(c["seconds"]) == set(memcopy.WAYS)  # every way was timed on these copies
    assert memcopy.threads(n) >= 1


def test_copies_of_each_size_class_are_measured_on_themselves(fixed, monkeypatch):
    fixed(None, width=3)
    parallel = []
    real = memcopy._parallel
    monkeypatch.setattr(memcopy, "_parallel",
                        lambda d, s, n, k: (parallel.append((n, k)), real(d, s, n, k)))
    small, large = memcopy.PARALLEL_MIN, 4 * memcopy.PARALLEL_MIN
    src, dst = np.ones(large, np.uint8), np.zeros(large, np.uint8)
    for _ in range(1 + 2 * memcopy.EXPLORE):
        memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, small)
    m = memcopy.measured()
    assert m["width"] == 3 and m["fixed"] is None
    assert list(m["classes"]) == [small]  # one class; the large one is not measured yet
    assert set(m["classes"][small]["seconds"]) == {"one", "threads"}
    assert parallel == [(small, 3)] * memcopy.EXPLORE
    assert memcopy.threads(small) == (3 if m["classes"][small]["way"] == "threads" else 1)
    assert memcopy.threads(large) == 1  # unmeasured
    # the class's choice is what its next copies use
    memcopy._classes[small.bit_length()].way = "threads"
    parallel.clear()
    memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, small + 5)
    memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, small - 1)  # below: one memmove
    assert parallel == [(small + 5, 3)]
    assert dst[:small + 5].all()


def test_rt_copy_threads_fixes_the_count(monkeypatch):
    monkeypatch.setattr(memcopy, "_configured", False)
    monkeypatch.setattr(memcopy, "_threads", None)
    monkeypatch.setattr(memcopy, "_classes", {})
    monkeypatch.setenv("RT_COPY_THREADS", "3")
    assert memcopy.threads(1 << 30) == 3 and memcopy.measured()["fixed"] == 3
    monkeypatch.setattr(memcopy, "_configured", False)
    monkeypatch.setattr(memcopy, "_threads", None)
    monkeypatch.setenv("RT_COPY_THREADS", "lots")
    assert memcopy.measured()["fixed"] is None or len(os.sched_getaffinity(0)) == 1


def test_memcopy_threads_are_shared_safely(fixed):
    fixed(2)
    n = 2 * memcopy.PARALLEL_MIN
    src = [np.full(n, i, np.uint8) for i in range(4)]
    dst = [np.zeros(n, np.uint8) for _ in range(4)]
    ths = [threading.Thread(target=lambda i=i: [memcopy.copy_bytes(
        dst[i].ctypes.data, src[i].ctypes.data, n) for _ in range(5)]) for i in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert all(np.array_equal(d, s) for d, s in zip(dst, src, strict=True))


def test_an_interrupted_copy_raises_only_once_every_helper_is_done(monkeypatch, fixed):
    """Ctrl-C during the calling thread's chunk: the helpers' chunks are still being copied.
    The interrupt must wait for them -- the caller frees the destination as soon as the
    exception reaches it, and a helper writing on would write into freed memory."""
    fixed(3)
    main = threading.get_ident()
    done: list[int] = []
    real = memcopy._memmove

    def slow_or_interrupted(dst: int, src: int, n: int) -> int:
        if threading.get_ident() == main:
            raise KeyboardInterrupt  # as if Ctrl-C arrived right after the first chunk
        threading.Event().wait(0.2)  # the helpers are slow
        out = real(dst, src, n)
        done.append(n)
        return out

    monkeypatch.setattr(memcopy, "_memmove", slow_or_interrupted)
    n = 3 * memcopy.PARALLEL_MIN
    src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, n)
    assert len(done) == 2  # both helper chunks finished before the interrupt came out
    assert dst[n // 3:].all()


def test_large_ring_buffers_are_copied_as_measured_both_ways(monkeypatch, fixed, private_dir):
    """Below the threshold too: a 6 MiB tensor written into the ring and copied out of it
    goes through memcopy, on the threads this host was measured to gain from."""
    import time

    import torch

    from tests.unit.test_transport import make_pair

    fixed(3)
    calls = []
    real = memcopy._parallel
    monkeypatch.setattr(memcopy, "_parallel", lambda d, s, n, k: (calls.append((n, k)),
                                                                   real(d, s, n, k)))
    caller, callee, bell = make_pair(private_dir, 10 << 20)
    try:
        t = torch.randn(6 << 18)  # 6 MiB
        assert caller.send(t) == "shm"
        assert torch.equal(callee.recv(deadline=time.monotonic() + 10), t)
        assert calls == [(6 << 20, 3), (6 << 20, 3)]  # into the record, out of it
    finally:
        caller.close()
        callee.close()
        bell.close()
