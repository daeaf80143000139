"""Large host copies on several threads where that was measured faster (``memcopy.py``)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from runtime.transport import memcopy


@pytest.mark.parametrize("n", [0, 1, 4095, memcopy.PARALLEL_MIN, 3 * memcopy.PARALLEL_MIN + 5])
@pytest.mark.parametrize("threads", [1, 3])
def test_memcopy_copies_exactly(monkeypatch, n, threads):
    monkeypatch.setattr(memcopy, "_threads", threads)
    src = np.random.default_rng(n).integers(0, 256, n + 64, dtype=np.uint8)
    dst = np.zeros(n + 64, np.uint8)
    memcopy.copy_bytes(dst.ctypes.data + 32, src.ctypes.data + 32, n)
    assert np.array_equal(dst[32:32 + n], src[32:32 + n])
    assert not dst[:32].any() and not dst[32 + n:].any()


def test_memcopy_decides_once_by_measuring(monkeypatch):
    monkeypatch.setattr(memcopy, "_threads", None)
    monkeypatch.setattr(memcopy, "_measured", {})
    monkeypatch.delenv("RT_COPY_THREADS", raising=False)
    k = memcopy.threads()
    m = memcopy.measured()
    assert k >= 1 and memcopy.threads() == k
    if len(os.sched_getaffinity(0)) > 1:
        assert m["one_thread_s"] > 0 and m["n_threads_s"] > 0
        assert (k > 1) == (m["n_threads_s"] < 0.75 * m["one_thread_s"])
    monkeypatch.setattr(memcopy, "_threads", None)
    monkeypatch.setenv("RT_COPY_THREADS", "3")
    assert memcopy.threads() == 3


def test_memcopy_threads_are_shared_safely(monkeypatch):
    monkeypatch.setattr(memcopy, "_threads", 2)
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


def test_an_interrupted_copy_raises_only_once_every_helper_is_done(monkeypatch):
    """Ctrl-C during the calling thread's chunk: the helpers' chunks are still being copied.
    The interrupt must wait for them -- the caller frees the destination as soon as the
    exception reaches it, and a helper writing on would write into freed memory."""
    monkeypatch.setattr(memcopy, "_threads", 3)
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


def test_large_ring_buffers_are_copied_as_measured_both_ways(monkeypatch, private_dir):
    """Below the threshold too: a 6 MiB tensor written into the ring and copied out of it
    goes through memcopy, on the threads this host was measured to gain from."""
    import time

    import torch

    from tests.unit.test_transport import make_pair

    monkeypatch.setattr(memcopy, "_threads", 3)
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
