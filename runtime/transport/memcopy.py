"""Large host copies, on several threads where this host gains from it.

The copies a large message still pays -- the sender's copy into a pool slot,
the receiver's copy out of one when it may not read in place -- are memory
bound.  Whether a second thread helps depends on the host: on a 16-core H200
host one thread copies at 5.1 GB/s and torch's multi-threaded ``copy_`` at
64 GB/s (issue 8); on the shared 2-core CI machine 1 and 2 threads of
``memmove`` both copy 16 MiB in 0.8 ms (21 GB/s), while torch's ``copy_``
took 8 ms (its pool threads had to be woken while the peer spun).  So the
choice is measured, once per process and lazily (the first copy of at least
:data:`PARALLEL_MIN` bytes): a 16 MiB copy on one thread against the same
copy cut into page-aligned chunks over ``N`` threads (``N`` = usable cores,
at most :data:`MAX_THREADS`), best of three each, interleaved; ``N`` threads
are used when they are at least 25 % faster.  ``RT_COPY_THREADS`` fixes the
count instead (``1`` turns threads off), read once at that first copy.

Each chunk is a ``ctypes.memmove``, which releases the GIL; helper threads
start at the first parallel copy, never before a fork (the zygote copies
nothing), and a forked child starts its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

__all__ = ["PARALLEL_MIN", "copy_bytes", "measured", "threads"]

log = logging.getLogger(__name__)

PARALLEL_MIN = 4 << 20  # below this a thread hand-off (~20-50 us) is not worth it
MAX_THREADS = 8
_PROBE = 16 << 20
_CHUNK_ALIGN = 4096
_memmove = ctypes.memmove

_lock = threading.Lock()  # the decision
_pool_lock = threading.Lock()  # the helper threads
_threads: int | None = None  # decided at the first large copy
_pool: ThreadPoolExecutor | None = None
_measured: dict[str, float] = {}


def _after_fork_in_child() -> None:
    global _pool
    _pool = None  # the parent's threads do not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)


def copy_bytes(dst: int, src: int, n: int) -> None:
    """Copy ``n`` bytes from address ``src`` to address ``dst`` (no overlap)."""
    if n < PARALLEL_MIN:
        _memmove(dst, src, n)
        return
    k = _threads if _threads is not None else threads()
    if k <= 1:
        _memmove(dst, src, n)
        return
    _parallel(dst, src, n, k)


def threads() -> int:
    """Threads a large copy uses in this process (measured at the first call)."""
    global _threads
    if _threads is None:
        with _lock:
            if _threads is None:
                _threads = _decide()
    return _threads


def measured() -> dict[str, float]:
    """What the decision was based on (seconds per 16 MiB copy), for stats and logs."""
    threads()
    return dict(_measured)


def _executor() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=MAX_THREADS - 1,
                                           thread_name_prefix="rt-copy")
            pool = _pool
    return pool


def _parallel(dst: int, src: int, n: int, k: int) -> None:
    step = (n // k + _CHUNK_ALIGN - 1) & ~(_CHUNK_ALIGN - 1)
    pool = _executor()
    futures = [pool.submit(_memmove, dst + off, src + off, min(step, n - off))
               for off in range(step, n, step)]
    interrupted: BaseException | None = None
    try:
        _memmove(dst, src, min(step, n))  # the first chunk on this thread
    except BaseException as exc:  # noqa: BLE001 - re-raised below, once the helpers are done
        interrupted = exc
    # Every chunk must be done before this returns *or raises*: the caller may free ``dst``
    # or ``src`` as soon as it has control back, and a helper still copying would write
    # into freed memory.  An interrupt (Ctrl-C) therefore waits for them, then goes on.
    for f in futures:
        while not f.done():
            try:
                wait([f])
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    for f in futures:
        f.result()


def _decide() -> int:
    env = os.environ.get("RT_COPY_THREADS", "").strip()
    if env:
        try:
            return max(1, min(MAX_THREADS, int(env)))
        except ValueError:
            log.warning("RT_COPY_THREADS=%r is not a number: measuring instead", env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    k = min(cores, MAX_THREADS)
    if k <= 1:
        _measured["one_thread_s"] = _measured["n_threads_s"] = 0.0
        return 1
    src = np.ones(_PROBE, np.uint8)  # touched: no page fault is timed
    dst = np.ones(_PROBE, np.uint8)
    s, d = src.ctypes.data, dst.ctypes.data
    one, many = [], []
    _parallel(d, s, _PROBE, k)  # start the helper threads outside the timing
    for _ in range(3):
        t0 = time.perf_counter()
        _memmove(d, s, _PROBE)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _parallel(d, s, _PROBE, k)
        many.append(time.perf_counter() - t0)
    t1, tk = min(one), min(many)
    _measured.update(one_thread_s=t1, n_threads_s=tk, n=k)
    chosen = k if tk < 0.75 * t1 else 1
    log.debug("copy of 16 MiB: 1 thread %.2f ms, %d threads %.2f ms: using %d", t1 * 1e3, k,
              tk * 1e3, chosen)
    return chosen
