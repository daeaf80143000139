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
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

__all__ = ["CudaRegistrar", "Registrar", "install", "live", "mapped", "uninstall", "unmapping"]

log = logging.getLogger(__name__)

CUDA_HOST_REGISTER_PORTABLE = 1  # registered for every CUDA context, not just the current

_lock = threading.Lock()
_live: dict[int, int] = {}  # address -> size of every transport mapping of this process
_registrars: list[Registrar] = []


class Registrar(Protocol):
    """Told of every transport mapping: ``register`` when made, ``unregister`` before it goes."""

    def register(self, address: int, size: int) -> None: ...

    def unregister(self, address: int, size: int) -> None: ...


def mapped(address: int, size: int) -> None:
    """A mapping of ``size`` bytes at ``address`` was made."""
    with _lock:
        _live[address] = size
        registrars = list(_registrars)
    for r in registrars:
        r.register(address, size)


def unmapping(address: int) -> None:
    """The mapping at ``address`` is about to go (idempotent)."""
    with _lock:
        size = _live.pop(address, None)
        registrars = list(_registrars) if size is not None else []
    for r in registrars:
        r.unregister(address, size)


def live() -> dict[int, int]:
    """The transport's live mappings: address -> size."""
    with _lock:
        return dict(_live)


def install(registrar: Registrar) -> None:
    """Announce every mapping, from now on and those already live, to ``registrar``."""
    with _lock:
        _registrars.append(registrar)
        now = list(_live.items())
    for address, size in now:
        registrar.register(address, size)


def uninstall(registrar: Registrar) -> None:
    """Stop announcing to ``registrar``; it unregisters every live mapping first."""
    with _lock:
        if registrar not in _registrars:
            return
        _registrars.remove(registrar)
        now = list(_live.items())
    for address, size in now:
        registrar.unregister(address, size)


class CudaRegistrar:
    """Page-locks every transport mapping of this process with ``cudaHostRegister``.

    ``cudart``: the CUDA runtime bindings (``torch.cuda.cudart()`` by default; tests pass a
    stand-in).  A registration that fails (locked-memory limits, a driver that refuses)
    is logged once and skipped: copies from that mapping go at pageable speed, nothing
    else changes.
    """

    def __init__(self, cudart: Any = None, *, flags: int = CUDA_HOST_REGISTER_PORTABLE) -> None:
        if cudart is None:
            import torch  # only a process that uses CUDA gets here

            cudart = torch.cuda.cudart()
        self.cudart = cudart
        self.flags = flags
        self.registered: dict[int, int] = {}
        self.failures = 0
        self._lock = threading.Lock()

    def register(self, address: int, size: int) -> None:
        with self._lock:
            if address in self.registered:
                return
            err = int(self.cudart.cudaHostRegister(address, size, self.flags))
            if err:
                self.failures += 1
                if self.failures == 1:
                    log.warning("cudaHostRegister of a %d-byte transport mapping failed (CUDA "
                                "error %d): copies to and from it go at pageable speed", size,
                                err)
                return
            self.registered[address] = size

    def unregister(self, address: int, size: int) -> None:
        with self._lock:
            if self.registered.pop(address, None) is None:
                return
            err = int(self.cudart.cudaHostUnregister(address))
            if err:
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
