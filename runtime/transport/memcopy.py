"""Large host copies, on several threads where this host gains from it.

The copies a large message still pays -- the sender's copy into a pool slot
or ring record, the receiver's copy out of one when it may not read in place
-- are memory bound.  How best to make one depends on the host, on the size
and on what the process just did:

* on a 16-core H200 host one thread copies at 5.1 GB/s and torch's
  multi-threaded ``copy_`` at 64 GB/s (issue 8);
* on the shared 2-core CI machine (32 MiB of L3) a 16 MiB copy takes 0.75 ms
  on one thread and 0.64 ms on two -- it stays in the cache -- while a
  128 MiB copy takes 12.1 ms on one and 8.5 ms on two;
* right after a torch operation torch's OpenMP threads spin for a few
  milliseconds on the other cores, and two threads of ours then copy 128 MiB
  in 13 ms.

A one-off probe of one size therefore decides wrongly for the others (a
16 MiB probe kept one thread here and cost a 128 MiB echo 4-6 ms), and it
sees neither the peer nor torch's threads.  So the way is measured on the
copies themselves, per size class (a power of two: 4-8 MiB, 8-16 MiB, ...)
and process.  The ways (:data:`WAYS`): ``one`` (one ``memmove`` on the
calling thread), ``threads`` (page-aligned chunks of ``memmove`` over the
calling thread and helper threads, ``N`` in all: usable cores, at most
:data:`MAX_THREADS`) and ``torch`` (below).  The first copy of a class is
not timed (a fresh slot pays page faults); the next ones go round the ways
until each has been timed :data:`EXPLORE` times; the class then takes the
way of the lowest median -- ``one`` unless another beat it by the factor
:data:`GAIN` -- and measures again after :data:`REVISIT` copies, because the
load on the host changes.  ``RT_COPY_THREADS`` fixes ``N`` threads instead
(``1``: one ``memmove``), read once at the first large copy.

``torch``: ``copy_`` between two byte tensors over the addresses, on torch's
OpenMP threads -- in a process that has imported torch, lets it use several
threads, and has at least :data:`TORCH_MIN_CORES` usable cores.  It wins
where it is measured: right after a torch operation its threads are awake
(128 MiB in 8.0 ms here, against 12.1 on one thread and 13 on two of ours,
which fight the spinners), and a TEE sends right after computing.  But it
leaves them spinning for a few more milliseconds, and on two cores they spin
on the core the peer copies or computes on next: 128 MiB echoes with it on
the caller's side took 22.5-25.5 ms, against 20.4-22.4 ms with ``one`` there
and ``threads`` on the actor's (``docs/benchmarks.md``, "Copies measured per
size class").  A process cannot time that cost to its peer, so on two or
three cores ``torch`` is not a way; with more, the peer has cores of its own
(the H200 host's GPU worker barely uses the CPU) while one thread copies at
5.1 GB/s and torch's ``copy_`` at 64 GB/s (issue 8).

A way that raises (no new threads once the interpreter shuts down, say) is
dropped from its size class and the copy made with one ``memmove``.  A forked
child of a process that used torch's way drops it: OpenMP's threads do not
survive a fork, and a parallel torch operation in the child would hang.

``memmove`` and torch's ``copy_`` release the GIL.  Helper threads start at
the first copy that uses them, never before a fork (the zygote copies
nothing), and a forked child starts its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["EXPLORE", "GAIN", "PARALLEL_MIN", "REVISIT", "TORCH_MIN_CORES", "WAYS", "SizeClass",
           "copy_bytes", "measured", "threads"]

log = logging.getLogger(__name__)

PARALLEL_MIN = 4 << 20  # below this a thread hand-off (~20-50 us) is not worth it
MAX_THREADS = 8
WAYS = ("one", "threads", "torch")
TORCH_MIN_CORES = 4  # below this torch's spinning threads cost the peer (module docstring)
EXPLORE = 3  # timed copies of each way before a size class chooses
GAIN = 0.9  # another way must take under this fraction of one memmove's time
REVISIT = 256  # copies of a size class between two measurements
_CHUNK_ALIGN = 4096
_memmove = ctypes.memmove

_lock = threading.Lock()  # the configuration and the size classes
_pool_lock = threading.Lock()  # the helper threads
_configured = False
_threads: int | None = None  # a fixed count (RT_COPY_THREADS); None: measured per size class
_width = 1  # threads of a ``threads`` copy: usable cores, at most MAX_THREADS
_classes: dict[int, SizeClass] = {}
_pool: ThreadPoolExecutor | None = None
_torch_used = False  # this process has run the torch way (its OpenMP team exists)
_no_torch = False  # a forked child of such a process: libgomp's team is gone, copy_ would hang


def _after_fork_in_child() -> None:
    global _pool, _lock, _pool_lock, _no_torch
    _pool = None  # the parent's threads do not exist here
    _lock = threading.Lock()  # another thread of the parent may have held them
    _pool_lock = threading.Lock()
    if _torch_used:
        _no_torch = True
        for c in _classes.values():
            c.drop("torch")


os.register_at_fork(after_in_child=_after_fork_in_child)


class SizeClass:
    """How copies of one size class are made, measured on those copies.

    Not thread-safe on its own: the module calls it under its lock.
    """

    __slots__ = ("_left", "_samples", "_untimed", "last", "way", "ways")

    def __init__(self, ways: tuple[str, ...]) -> None:
        self.ways = ways  # "one" first
        self.way = "one"  # until measured
        self.last: dict[str, float] = {}  # median seconds per way, at the last measurement
        self._untimed = True
        self._samples: dict[str, list[float]] = {w: [] for w in ways}
        self._left = 0  # copies before measuring again

    @property
    def measuring(self) -> bool:
        return self._untimed or self._left <= 0

    def drop(self, way: str) -> None:
        """Stop using ``way`` (it failed, or cannot work in this process)."""
        if way == "one" or way not in self.ways:
            return
        self.ways = tuple(w for w in self.ways if w != way)
        self._samples.pop(way, None)
        self.last.pop(way, None)
        if self.way == way:
            self.way, self._left = "one", 0

    def pick(self) -> tuple[str, bool]:
        """The way of the next copy, and whether to time it for :meth:`record`.

        While measuring: the least timed way, timed.  Otherwise the chosen way.
        """
        if self._untimed:
            return "one", True
        if self._left > 0:
            self._left -= 1
            return self.way, False
        return min(self.ways, key=lambda w: len(self._samples[w])), True

    def record(self, way: str, seconds: float) -> None:
        """The time of a copy that :meth:`pick` said to time."""
        if self._untimed:
            self._untimed = False
            return
        if self._left > 0 or way not in self._samples:
            return
        self._samples[way].append(seconds)
        if all(len(s) >= EXPLORE for s in self._samples.values()):
            med = {w: statistics.median(s) for w, s in self._samples.items()}
            best = min(self.ways, key=med.__getitem__)
            self.way = best if med[best] < GAIN * med["one"] else "one"
            self.last = med
            self._left = REVISIT
            self._samples = {w: [] for w in self.ways}


def copy_bytes(dst: int, src: int, n: int) -> None:
    """Copy ``n`` bytes from address ``src`` to address ``dst`` (no overlap)."""
    if n < PARALLEL_MIN:
        _memmove(dst, src, n)
        return
    if not _configured:
        _configure()
    k = _threads
    if k is None:
        _measured_copy(dst, src, n)
    elif k <= 1:
        _memmove(dst, src, n)
    else:
        _parallel(dst, src, n, k)


def _measured_copy(dst: int, src: int, n: int) -> None:
    key = n.bit_length()
    with _lock:
        c = _classes.get(key)
        if c is None:
            c = _classes[key] = SizeClass(_ways())
        way, timing = c.pick()
    t0 = time.perf_counter() if timing else 0.0
    try:
        if way == "threads":
            _parallel(dst, src, n, _width)
        elif way == "torch":
            _torch_copy(dst, src, n)
        else:
            _memmove(dst, src, n)
    except Exception as exc:  # e.g. no new futures at interpreter shutdown
        if way == "one":
            raise
        log.debug("copy way %s failed (%s): one memmove instead", way, exc)
        with _lock:
            c.drop(way)
        _memmove(dst, src, n)
        return
    if timing:
        seconds = time.perf_counter() - t0
        with _lock:
            c.record(way, seconds)
            decided = not c.measuring and c.last
        if decided and log.isEnabledFor(logging.DEBUG):
            log.debug("copies of %d+ MiB: %s: using %s", 1 << (key - 21),
                      ", ".join(f"{w} {s * 1e3:.2f} ms" for w, s in c.last.items()), c.way)


def _ways() -> tuple[str, ...]:
    torch = sys.modules.get("torch")
    if torch is None or _no_torch or _width < TORCH_MIN_CORES:
        return WAYS[:2]
    if getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return WAYS[:2]  # another thread is still importing it
    try:
        return WAYS if torch.get_num_threads() > 1 else WAYS[:2]
    except Exception:  # noqa: BLE001 - no usable torch: not a way
        return WAYS[:2]


def _torch_copy(dst: int, src: int, n: int) -> None:
    """``copy_`` between byte tensors over the two addresses: torch's own threads."""
    global _torch_used
    torch = sys.modules["torch"]
    _torch_used = True
    d = torch.frombuffer((ctypes.c_char * n).from_address(dst), dtype=torch.uint8)
    s = torch.frombuffer((ctypes.c_char * n).from_address(src), dtype=torch.uint8)
    d.copy_(s)


def threads(n: int = PARALLEL_MIN) -> int:
    """Threads this process's next copy of ``n`` bytes would use (1 until measured)."""
    if n < PARALLEL_MIN:
        return 1
    if not _configured:
        _configure()
    if _threads is not None:
        return _threads
    c = _classes.get(n.bit_length())
    if c is None or c.way == "one":
        return 1
    return _width if c.way == "threads" else sys.modules["torch"].get_num_threads()


def measured() -> dict[str, object]:
    """What the choices rest on, for stats and logs.

    ``width``: threads of a ``threads`` copy; ``fixed``: ``RT_COPY_THREADS`` (or None);
    ``classes``: per size class, keyed by its lower bound in bytes, the way it uses and
    the median seconds per way at its last measurement (none yet: ``{}``).
    """
    if not _configured:
        _configure()
    with _lock:
        classes = {1 << (key - 1): {"way": c.way, "seconds": dict(c.last)}
                   for key, c in sorted(_classes.items())}
    return {"width": _width, "fixed": _threads, "classes": classes}


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


class _Job:
    """The chunks of one parallel copy, taken one at a time by the caller and helpers.

    Every chunk is taken under the lock, and a helper counts the chunk it copies,
    so the caller can always stop the job: :meth:`settle` lets no helper start
    another chunk and waits for those being copied.  That holds wherever an
    interrupt lands in the caller -- even inside ``submit``, where a future may
    be lost after its work was queued.
    """

    __slots__ = ("chunks", "cond", "error", "running", "stopped")

    def __init__(self, chunks: list[tuple[int, int, int]]) -> None:
        self.chunks = chunks
        self.cond = threading.Condition(threading.Lock())
        self.running = 0  # chunks a helper is copying now
        self.stopped = False
        self.error: BaseException | None = None

    def take(self) -> tuple[int, int, int] | None:
        with self.cond:
            if self.stopped or not self.chunks:
                return None
            return self.chunks.pop()

    def help(self) -> None:
        """A helper thread's part: copy chunks until none is left."""
        while True:
            with self.cond:
                if self.stopped or not self.chunks:
                    return
                d, s, n = self.chunks.pop()
                self.running += 1
            try:
                _memmove(d, s, n)
            except BaseException as exc:  # noqa: BLE001 - the caller raises it
                self.error = self.error or exc
            finally:
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()

    def settle(self) -> BaseException | None:
        """Stop the job and wait until no helper copies; an interrupt meanwhile is returned."""
        interrupted: BaseException | None = None
        while True:
            try:
                with self.cond:
                    self.stopped = True
                    while self.running:
                        self.cond.wait()
                return interrupted
            except BaseException as exc:  # noqa: BLE001 - returned to be re-raised
                interrupted = interrupted or exc


def _parallel(dst: int, src: int, n: int, k: int) -> None:
    step = (n // k + _CHUNK_ALIGN - 1) & ~(_CHUNK_ALIGN - 1)
    job = _Job([(dst + off, src + off, min(step, n - off)) for off in range(0, n, step)])
    # Every chunk must be done, or never started, before this returns *or raises*: the
    # caller may free ``dst`` or ``src`` as soon as it has control back, and a helper
    # still copying would write into freed memory.  So an interrupt (Ctrl-C) anywhere
    # here first settles the job.
    interrupted: BaseException | None = None
    try:
        pool = _executor()
        for _ in range(min(k, len(job.chunks)) - 1):
            try:
                pool.submit(job.help)
            except RuntimeError:  # no new threads at interpreter shutdown: copy alone
                break
        while (chunk := job.take()) is not None:
            _memmove(*chunk)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, once the job is settled
        interrupted = exc
    settled = job.settle()
    interrupted = interrupted or settled
    if interrupted is not None:
        raise interrupted
    if job.error is not None:
        raise job.error


def _configure() -> None:
    """Read ``RT_COPY_THREADS`` and the usable cores, once."""
    global _configured, _threads, _width
    bad = None
    with _lock:
        if _configured:
            return
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        _width = max(1, min(cores, MAX_THREADS))
        env = os.environ.get("RT_COPY_THREADS", "").strip()
        if env:
            try:
                _threads = max(1, min(MAX_THREADS, int(env)))
            except ValueError:
                bad = env
        if _threads is None and _width <= 1:
            _threads = 1  # one core: nothing to measure
        _configured = True
    if bad is not None:  # logged outside the lock: a handler may copy too
        log.warning("RT_COPY_THREADS=%r is not a number: measuring instead", bad)
