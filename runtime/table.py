"""The actor table: one shared, anonymous memory region per session.

The supervisor is its only writer; every process of the session maps it and
reads an actor's state, incarnation and pid from it, so a caller blocked on a
dead actor notices the death with one memory load.  The region is a
``memfd`` inherited by file descriptor: it has no name in any directory, so
no crash can leak it.

Only the supervisor can write it.  The driver creates the memfd (with sealing
allowed) and hands it to the supervisor, which maps it writable and then seals
it with ``F_SEAL_FUTURE_WRITE`` (plus shrink, grow and seal): from then on no
process -- an untrusted actor that reopens ``/proc/self/fd/N`` included -- can
map it writable, ``mprotect`` a mapping to writable or ``write()`` to it, while
the supervisor's own mapping stays writable.  Everyone else maps it read-only,
so an actor cannot clear its own ``untrusted`` flag.

Entry layout (32 bytes, eight u32 words, entry ``i`` at ``32 * i``)::

    offset  size  field
    0       4     state        EMPTY / STARTING / ALIVE / RESTARTING / DEAD
    4       4     incarnation  0 for the first process, +1 per restart
    8       4     pid          of the current (or last) process
    12      4     exit         exit code of the last process, -N for signal N (i32)
    16      4     flags        bit 0: untrusted
    20      4     restarts     restarts so far

Writers store ``state`` last, so a reader that sees ALIVE sees the matching
incarnation and pid.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
from typing import NamedTuple

from runtime.errors import ActorRuntimeError
from runtime.transport.segment import memfd

__all__ = ["ActorTable", "Entry", "describe_exit"]

EMPTY, STARTING, ALIVE, RESTARTING, DEAD = range(5)
STATE_NAMES = ("empty", "starting", "alive", "restarting", "dead")
CAPACITY = 4096
ENTRY = 32
_WORDS = ENTRY // 4
FLAG_UNTRUSTED = 1
_STATE, _INCARNATION, _PID, _EXIT, _FLAGS, _RESTARTS = range(6)
# Linux >= 5.1; Python's fcntl module does not name it.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL


class Entry(NamedTuple):
    state: int
    incarnation: int
    pid: int
    exit: int
    flags: int
    restarts: int


class ActorTable:
    """A view of the session's actor table: read-only unless ``writable`` (the supervisor)."""

    def __init__(self, fd: int, *, writable: bool = False) -> None:
        self.fd = fd
        self.writable = writable
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mm: mmap.mmap | None = mmap.mmap(fd, CAPACITY * ENTRY, mmap.MAP_SHARED, prot)
        view = memoryview(self._mm)
        self._u32 = view.cast("I")  # state, incarnation, flags, restarts
        self._i32 = view.cast("i")  # pid, exit
        view.release()

    @classmethod
    def create(cls) -> int:
        """A new, unmapped, sealable table memfd for the supervisor to map and seal."""
        fd = memfd("rt_actor_table")
        os.ftruncate(fd, CAPACITY * ENTRY)
        return fd

    @classmethod
    def open_writer(cls, fd: int) -> ActorTable:
        """The supervisor's view: map writable, then seal against every other writer."""
        table = cls(fd, writable=True)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return table

    def read(self, index: int) -> Entry:
        b = index * _WORDS
        u, i = self._u32, self._i32
        return Entry(u[b], u[b + 1], i[b + 2], i[b + 3], u[b + 4], u[b + 5])

    def alive(self, index: int, incarnation: int) -> bool:
        """True while incarnation ``incarnation`` of actor ``index`` is ALIVE (fast path)."""
        b = index * _WORDS
        return self._u32[b] == ALIVE and self._u32[b + 1] == incarnation

    def find_pid(self, pid: int) -> tuple[int, Entry] | None:
        """The (index, entry) of the live or starting actor process ``pid``, if any.

        Asked at every channel open from an actor: the pid column is copied out in one
        go and searched in C (34 us for a miss, against 173 us entry by entry).
        """
        if pid <= 0:  # no process's (SO_PEERCRED says 0 for a peer outside our pid namespace)
            return None
        column = self._i32[_PID::_WORDS]
        try:
            pids = column.tolist()
        finally:
            column.release()
        index = -1
        while True:
            try:
                index = pids.index(pid, index + 1)
            except ValueError:
                return None
            if self._u32[index * _WORDS] in (STARTING, ALIVE):  # a dead one may share it
                return index, self.read(index)

    def write(self, index: int, *, state: int, incarnation: int | None = None,
              pid: int | None = None, exit: int | None = None, flags: int | None = None,
              restarts: int | None = None) -> None:
        """Update an entry (supervisor only); ``state`` is stored last."""
        if not self.writable:
            raise ActorRuntimeError("the actor table is read-only in this process")
        b = index * _WORDS
        u, i = self._u32, self._i32
        if incarnation is not None:
            u[b + _INCARNATION] = incarnation
        if pid is not None:
            i[b + _PID] = pid
        if exit is not None:
            i[b + _EXIT] = exit
        if flags is not None:
            u[b + _FLAGS] = flags
        if restarts is not None:
            u[b + _RESTARTS] = restarts
        u[b + _STATE] = state

    def close(self) -> None:
        """Unmap and close the descriptor (idempotent)."""
        if self._mm is not None:
            self._u32.release()
            self._i32.release()
            self._mm.close()
            self._mm = None
            os.close(self.fd)


def describe_exit(code: int) -> str:
    """'exit code 3' or 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
