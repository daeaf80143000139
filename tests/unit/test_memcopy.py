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


def _slow_helpers(monkeypatch, main: int, *, caller_raises: bool = False) -> dict[str, list]:
    """Helpers whose chunks take 0.2 s; records which chunks started and finished."""
    log: dict[str, list] = {"started": [], "done": []}
    real = memcopy._memmove

    def memmove(dst: int, src: int, n: int) -> int:
        if threading.get_ident() == main:
            if caller_raises:
                raise KeyboardInterrupt  # as if Ctrl-C arrived during the caller's chunk
            return real(dst, src, n)
        log["started"].append(n)
        threading.Event().wait(0.2)
        out = real(dst, src, n)
        log["done"].append(n)
        return out

    monkeypatch.setattr(memcopy, "_memmove", memmove)
    return log


def test_an_interrupted_copy_raises_only_once_no_helper_writes(monkeypatch, fixed):
    """Ctrl-C during the calling thread's chunk while helpers copy theirs: the interrupt
    must wait for every chunk a helper started -- the caller frees the destination as soon
    as the exception reaches it, and a helper writing on would write into freed memory --
    and no helper may start one after."""
    fixed(3)
    log = _slow_helpers(monkeypatch, threading.get_ident(), caller_raises=True)
    n = 3 * memcopy.PARALLEL_MIN
    src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)
    threading.Event().wait(0.05)
    with pytest.raises(KeyboardInterrupt):
        memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, n)
    assert log["done"] == log["started"]  # every started chunk finished before the raise
    seen = list(log["done"])
    threading.Event().wait(0.5)
    assert log["started"] == seen  # and none started after it


@pytest.mark.parametrize("at", [1, 2])
def test_an_interrupt_inside_submit_loses_no_running_helper(monkeypatch, fixed, at):
    """Ctrl-C while the chunks are being handed out (inside ``submit``, after the work was
    queued: its future is lost): the caller still waits for every chunk being copied."""
    fixed(4)
    log = _slow_helpers(monkeypatch, threading.get_ident())
    pool = memcopy._executor()
    real_submit, calls = pool.submit, []

    def submit(*a, **k):
        calls.append(1)
        f = real_submit(*a, **k)  # queued...
        if len(calls) == at:
            raise KeyboardInterrupt  # ...and the interrupt lands before the future is returned
        return f

    monkeypatch.setattr(pool, "submit", submit)
    n = 4 * memcopy.PARALLEL_MIN
    src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, n)
    assert log["done"] == log["started"]
    seen = list(log["started"])
    threading.Event().wait(0.5)
    assert log["started"] == seen


def test_a_copy_without_helper_threads_is_made_alone(monkeypatch, fixed):
    """After the interpreter began to shut down no thread can be started: the caller copies
    every chunk itself, exactly, instead of failing."""
    fixed(3)
    pool = memcopy._executor()

    def refuse(*a, **k):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(pool, "submit", refuse)
    n = 3 * memcopy.PARALLEL_MIN + 12345
    src = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, n)
    assert np.array_equal(dst, src)


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


def test_a_way_that_fails_is_dropped_and_the_copy_still_made(fixed, monkeypatch):
    import torch

    fixed(None, width=memcopy.TORCH_MIN_CORES)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def broken(dst: int, src: int, n: int) -> None:
        raise RuntimeError("no torch threads here")

    monkeypatch.setattr(memcopy, "_torch_copy", broken)
    n = memcopy.PARALLEL_MIN + 99
    src = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    for _ in range(1 + len(memcopy.WAYS) * memcopy.EXPLORE + 3):
        dst = np.zeros(n, np.uint8)
        memcopy.copy_bytes(dst.ctypes.data, src.ctypes.data, n)
        assert np.array_equal(dst, src)
    c = memcopy._classes[n.bit_length()]
    assert c.ways == ("one", "threads") and not c.measuring  # decided without it
    assert set(memcopy.measured()["classes"][1 << (n.bit_length() - 1)]["seconds"]) == {
        "one", "threads"}


def test_torch_is_not_a_way_while_it_is_being_imported_or_unusable(fixed, monkeypatch):
    import types

    fixed(None, width=memcopy.TORCH_MIN_CORES)
    half = types.ModuleType("torch")  # another thread is importing it: nothing defined yet
    half.__spec__ = types.SimpleNamespace(_initializing=True)
    monkeypatch.setitem(sys.modules, "torch", half)
    assert memcopy._ways() == ("one", "threads")
    half.__spec__ = None  # imported, but without get_num_threads
    assert memcopy._ways() == ("one", "threads")


def test_threads_reports_torchs_count_for_the_torch_way(fixed):
    import torch

    fixed(None, width=memcopy.TORCH_MIN_CORES)
    c = memcopy._classes[memcopy.PARALLEL_MIN.bit_length()] = memcopy.SizeClass(memcopy.WAYS)
    c.way = "torch"
    assert memcopy.threads(memcopy.PARALLEL_MIN) == torch.get_num_threads()
    c.way = "threads"
    assert memcopy.threads(memcopy.PARALLEL_MIN) == memcopy.TORCH_MIN_CORES
    c.way = "one"
    assert memcopy.threads(memcopy.PARALLEL_MIN) == 1


_FORK_SCRIPT = r"""
import os, signal, sys, threading
import numpy as np
import torch
from runtime.transport import memcopy as m

m._configure()
m._threads, m._width = None, m.TORCH_MIN_CORES
n = m.PARALLEL_MIN
src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)
key = n.bit_length()
c = m._classes[key] = m.SizeClass(m.WAYS)
c._untimed, c.way, c._left = False, "torch", 10 ** 9
m.copy_bytes(dst.ctypes.data, src.ctypes.data, n)   # torch's threads now exist here
m._parallel(dst.ctypes.data, src.ctypes.data, n, 2)  # and ours
# A thread holds memcopy's lock at the moment of the fork.
inside, release = threading.Event(), threading.Event()
def hold():
    with m._lock:
        inside.set()
        release.wait()
t = threading.Thread(target=hold)
t.start()
inside.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hang ends the child with SIGALRM
    ok = "torch" not in m._classes[key].ways and "torch" not in m._ways()
    for copy in (m.copy_bytes, lambda d, s, n: m._parallel(d, s, n, 2)):
        dst[:] = 0
        copy(dst.ctypes.data, src.ctypes.data, n)
        ok = ok and bool(dst.all())
    os._exit(0 if ok else 3)
release.set()
t.join()
_, status = os.waitpid(pid, 0)
sys.exit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else
         f"child status {status}")
"""


def test_a_forked_child_copies_without_the_parents_locks_threads_or_torch_way():
    """A fork while another thread holds memcopy's lock, after the parent started helper
    threads and used torch's (which do not survive a fork): the child copies, and no
    longer picks torch's way."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], cwd=root, timeout=120,
                       env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
