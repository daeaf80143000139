"""The host memory the transport maps, announced to whoever must know: CUDA, say.

A GPU worker copies its arguments host-to-device straight out of the ring records and
pool slots they arrived in, and its results device-to-host straight into the reply
record reserved for them (``codec.DeviceBuffer``).  Those copies run at DMA speed only
from page-locked memory that CUDA knows of: measured on an H200 host, 53.5 GB/s
host-to-device from a registered ``/dev/shm`` mapping against 17 GB/s from pageable
memory, where CUDA also stages every copy through a buffer of its own.  Registering
(``cudaHostRegister``) costs ~5 ms per 64 MiB, so it is done once per mapping, when the
mapping is made: rings live as long as their channel, and pool slots are reused.

Every mapping the transport makes or drops in this process is announced here
(:func:`mapped`, :func:`unmapping`; ``Segment`` and the pool's receive side call them).
A :class:`Registrar` installed with :func:`install` hears of each -- including those
already live -- and is told before a mapping goes.  Nothing is installed by default: the
transport itself never touches CUDA.

Announcements are serialised, registrars' calls included: a registrar hears of a mapping's
end only after it heard of its start, so it never keeps a registration of memory that is
gone.  Such a stale registration is silent corruption in waiting: the next mapping at that
address would be taken as registered already, while CUDA holds the old range's pages.  A
mapping announced over one still listed -- its predecessor went without
:func:`unmapping`, a bug elsewhere -- therefore first unregisters that one, with a warning.
(Found by a review; ``Channel.create``/``attach`` had left rings to GC when their
constructor failed.)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = ["CudaRegistrar", "Registrar", "cuda_registrar", "install", "live", "mapped",
           "uninstall", "unmapping"]

log = logging.getLogger(__name__)

CUDA_HOST_REGISTER_PORTABLE = 1  # registered for every CUDA context, not just the current
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712

# Held across the registrars' calls (see the module docstring); re-entrant, since a signal
# handler that shuts channels down may run inside an announcement on the same thread.
_lock = threading.RLock()
_live: dict[int, int] = {}  # address -> size of every transport mapping of this process
_registrars: list[Registrar] = []


def _after_fork_in_child() -> None:
    """A forked child starts with a free lock and no registrars.

    The lock is held across registrations (milliseconds each), so a fork from another
    thread may copy it held by a thread the child lacks, and the child's first mapping
    would wait for ever.  And the child must not call CUDA at all: the parent's context
    does not survive a fork.  Its inherited mappings stay listed (they are still mapped).
    """
    global _lock, _process_registrar, _registrar_lock
    _lock = threading.RLock()
    _registrars.clear()
    _process_registrar = None
    _registrar_lock = threading.Lock()


class Registrar(Protocol):
    """Told of every transport mapping: ``register`` when made, ``unregister`` before it goes."""

    def register(self, address: int, size: int) -> None: ...

    def unregister(self, address: int, size: int) -> None: ...


def mapped(address: int, size: int) -> None:
    """A mapping of ``size`` bytes at ``address`` was made."""
    with _lock:
        # Any live entry the new range overlaps went without being announced: the kernel
        # reuses a freed range anywhere inside it (a smaller mapping lands at the top of a
        # larger hole), not only at its start.
        for old, n in [(a, n) for a, n in _live.items() if a < address + size
                       and address < a + n]:
            log.warning("a %d-byte transport mapping at %#x went without being announced; "
                        "unregistering it before the new %d-byte one at %#x", n, old, size,
                        address)
            del _live[old]
            for r in _registrars:
                r.unregister(old, n)
        _live[address] = size
        for r in _registrars:
            r.register(address, size)


def unmapping(address: int) -> None:
    """The mapping at ``address`` is about to go (idempotent)."""
    with _lock:
        size = _live.pop(address, None)
        if size is not None:
            for r in _registrars:
                r.unregister(address, size)


def live() -> dict[int, int]:
    """The transport's live mappings: address -> size."""
    with _lock:
        return dict(_live)


def install(registrar: Registrar) -> None:
    """Announce every mapping, from now on and those already live, to ``registrar``."""
    with _lock:
        _registrars.append(registrar)
        for address, size in list(_live.items()):
            registrar.register(address, size)


def uninstall(registrar: Registrar) -> None:
    """Stop announcing to ``registrar``; it unregisters every live mapping first."""
    with _lock:
        if registrar not in _registrars:
            return
        _registrars.remove(registrar)
        for address, size in list(_live.items()):
            registrar.unregister(address, size)


class CudaRegistrar:
    """Page-locks every transport mapping of this process with ``cudaHostRegister``.

    ``cudart``: the CUDA runtime bindings (``torch.cuda.cudart()`` by default; tests pass a
    stand-in).  A registration that fails (locked-memory limits, a sandbox or a driver that
    refuses) is logged once and skipped: copies from that mapping go at pageable speed.

    A failed runtime call also leaves its error as the calling thread's *last error*, which
    stays until ``cudaGetLastError`` reads it -- and PyTorch reads it after every kernel
    launch, so the worker's next, unrelated kernel would raise it.  Each failure is
    therefore cleared at once (:meth:`_clear_error`).  Registration is per process: use
    :func:`cuda_registrar`, not a registrar per worker (a second one's every registration
    fails with ``cudaErrorHostMemoryAlreadyRegistered``, which is not counted as a failure).

    ``device``: the CUDA device index the registrations are made on (None: the calling
    thread's current device).  The runtime creates a device's primary context at a thread's
    first call, and mappings are announced from any thread (the actor's control thread
    attaches channels), none of which chose a device: without it a worker on ``cuda:1``
    also made a context -- hundreds of MiB -- on GPU 0.  ``device_guard`` (tests): what
    makes a device current for a block, ``torch.cuda.device`` by default.
    """

    def __init__(self, cudart: Any = None, *, flags: int = CUDA_HOST_REGISTER_PORTABLE,
                 clear_error: Callable[[], object] | None = None, device: int | None = None,
                 device_guard: Callable[[int], AbstractContextManager] | None = None) -> None:
        if cudart is None:
            import torch  # only a process that uses CUDA gets here

            cudart = torch.cuda.cudart()
        self.cudart = cudart
        self.flags = flags
        self.device = device
        self._device_guard = device_guard
        self.registered: dict[int, int] = {}
        self.failures = 0
        self._lock = threading.RLock()  # re-entrant: see hostmem's own lock
        self._clear_error = clear_error or _error_clearer(cudart)

    def _on_device(self) -> AbstractContextManager:
        if self.device is None:
            return contextlib.nullcontext()
        guard = self._device_guard
        if guard is None:
            import torch

            guard = torch.cuda.device
        return guard(self.device)

    def register(self, address: int, size: int) -> None:
        with self._lock, self._on_device():
            if address in self.registered:  # announced twice: hostmem never does
                return
            err = int(self.cudart.cudaHostRegister(address, size, self.flags))
            if err:
                self._clear_error()
                if err == CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED:
                    log.debug("a %d-byte transport mapping is registered already", size)
                    return  # by someone else, who owns it: copies from it go at DMA speed
                self.failures += 1
                if self.failures == 1:
                    log.warning("cudaHostRegister of a %d-byte transport mapping failed (CUDA "
                                "error %d): copies to and from it go at pageable speed", size,
                                err)
                return
            self.registered[address] = size

    def unregister(self, address: int, size: int) -> None:
        with self._lock, self._on_device():
            if self.registered.pop(address, None) is None:
                return
            err = int(self.cudart.cudaHostUnregister(address))
            if err:
                self._clear_error()
                log.warning("cudaHostUnregister of a %d-byte mapping failed (CUDA error %d)",
                            size, err)

    def covers(self, address: int, nbytes: int) -> bool:
        """True if ``[address, address + nbytes)`` lies in one registered mapping."""
        with self._lock:
            return any(a <= address and address + nbytes <= a + n
                       for a, n in self.registered.items())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"registered": len(self.registered),
                    "registered_bytes": sum(self.registered.values()),
                    "failures": self.failures}


def _error_clearer(cudart: Any) -> Callable[[], object]:
    """A function that reads (so clears) this thread's CUDA last error.

    ``torch.cuda.cudart()`` has no ``cudaGetLastError``; the CUDA runtime library torch
    loaded has (the same copy: each copy of the runtime keeps its own error state), found
    among the process's mappings.  Failing that, a one-element kernel: PyTorch's launch
    check reads the error, and raises it, here, where it is expected.
    """
    get = getattr(cudart, "cudaGetLastError", None)
    if callable(get):
        return get
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
        # torch's own copy (each copy keeps its own error state): the pip wheel's, under
        # site-packages, before a system CUDA's.
        for path in sorted(paths, key=lambda p: ("site-packages" not in p, p)):
            fn = ctypes.CDLL(path).cudaGetLastError
            fn.restype = ctypes.c_int
            return fn
    except (OSError, AttributeError):
        pass

    def launch() -> None:
        import torch

        try:
            torch.empty(1, device="cuda").zero_()
        except Exception:  # noqa: BLE001 - the error being cleared, or no CUDA at all
            pass
    return launch


_process_registrar: CudaRegistrar | None = None
_registrar_lock = threading.Lock()  # not _lock: install() takes that one
os.register_at_fork(after_in_child=_after_fork_in_child)


def cuda_registrar(cudart: Any = None, *, device: int | None = None) -> CudaRegistrar:
    """The process's one :class:`CudaRegistrar`, made and installed on first use.

    ``cudart`` and ``device``: the first call's registrar's (tests pass a stand-in
    ``cudart``); the device is the first CUDA worker's, registrations being valid for every
    device anyway (``cudaHostRegisterPortable``).
    """
    global _process_registrar
    with _registrar_lock:
        if _process_registrar is None:
            r = CudaRegistrar(cudart, device=device)
            install(r)
            _process_registrar = r
        return _process_registrar
