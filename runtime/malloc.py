"""Keep large freed blocks in glibc's heap, so big messages do not page-fault.

Receiving a 128 MiB message into fresh memory costs one page fault per 4 KiB
(32,768 of them): measured here, a 128 MiB ZeroMQ echo took 225 ms with
glibc's defaults and 62 ms once freed blocks were kept and reused (faults per
echo: 32,769 -> ~3,000).  glibc returns blocks above ``M_MMAP_THRESHOLD``
(at most 32 MiB) to the kernel on ``free``, and each thread that allocates gets
its own arena, where blocks above 64 MiB are always fresh mappings.  So:

* ``mmap_max=0``: large blocks come from the heap, not from fresh mappings;
* ``trim_threshold=2 GiB``: free memory at the top of the heap is kept;
* ``arena_max=1``: ZeroMQ's I/O thread allocates from the same heap.

Actor processes get these as ``GLIBC_TUNABLES`` at exec (before any thread
exists); the driver gets them through ``mallopt`` when an ``ActorSystem``
starts, which covers threads created later (ZeroMQ's I/O thread).  The price:
a process keeps up to 2 GiB of freed heap instead of returning it.  Set
``RT_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["TUNABLES", "child_environment", "enabled", "tune_current_process"]

TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:"
            "glibc.malloc.arena_max=1")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def enabled(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("RT_MALLOC_TUNING", "1") != "0" and platform.libc_ver()[0] == "glibc"


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` plus the tunables, for a process about to be exec'd."""
    if not enabled(environ):
        return environ
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(p for p in (env.get("GLIBC_TUNABLES"), TUNABLES) if p)
    return env


def tune_current_process() -> bool:
    """Apply the same settings with ``mallopt``; True if glibc accepted them."""
    if not enabled():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)
