"""The actor table: one shared, anonymous memory region per session.

The supervisor is its only writer; every process of the session maps it and
reads an actor's state, incarnation and pid from it, so a caller blocked on a
dead actor notices the death with one memory load.  The region is a
``memfd`` inherited by file descriptor: it has no name in any directory, so
no crash can leak it.

Entry layout (32 bytes, entry ``i`` at ``32 * i``)::

    offset  size  field
    0       4     state        EMPTY / STARTING / ALIVE / RESTARTING / DEAD
    4       4     incarnation  0 for the first process, +1 per restart
    8       4     pid          of the current (or last) process
    12      4     exit         exit code of the last process, -N for signal N
    16      4     flags        bit 0: untrusted
    20      4     restarts     restarts so far

Writers store ``state`` last, so a reader that sees ALIVE sees the matching
incarnation and pid.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
from typing import NamedTuple

__all__ = ["ActorTable", "Entry", "describe_exit"]

EMPTY, STARTING, ALIVE, RESTARTING, DEAD = range(5)
STATE_NAMES = ("empty", "starting", "alive", "restarting", "dead")
CAPACITY = 4096
ENTRY = 32
FLAG_UNTRUSTED = 1


class _Entry(ctypes.Structure):
    _fields_ = [("state", ctypes.c_uint32), ("incarnation", ctypes.c_uint32),
                ("pid", ctypes.c_int32), ("exit", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("restarts", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32 * 2)]


class Entry(NamedTuple):
    state: int
    incarnation: int
    pid: int
    exit: int
    flags: int
    restarts: int


class ActorTable:
    """A view of the session's actor table."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._mm = mmap.mmap(fd, CAPACITY * ENTRY, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self._entries = (_Entry * CAPACITY).from_buffer(self._mm)

    @classmethod
    def create(cls) -> ActorTable:
        fd = os.memfd_create("rt_actor_table", 0)  # close-on-exec; passed explicitly
        os.ftruncate(fd, CAPACITY * ENTRY)
        return cls(fd)

    def read(self, index: int) -> Entry:
        e = self._entries[index]
        return Entry(e.state, e.incarnation, e.pid, e.exit, e.flags, e.restarts)

    def alive(self, index: int, incarnation: int) -> bool:
        """True while incarnation ``incarnation`` of actor ``index`` is ALIVE (fast path)."""
        e = self._entries[index]
        return e.state == ALIVE and e.incarnation == incarnation

    def write(self, index: int, *, state: int, incarnation: int | None = None,
              pid: int | None = None, exit: int | None = None, flags: int | None = None,
              restarts: int | None = None) -> None:
        """Update an entry (supervisor only); ``state`` is stored last."""
        e = self._entries[index]
        if incarnation is not None:
            e.incarnation = incarnation
        if pid is not None:
            e.pid = pid
        if exit is not None:
            e.exit = exit
        if flags is not None:
            e.flags = flags
        if restarts is not None:
            e.restarts = restarts
        e.state = state

    def close(self) -> None:
        if self._mm is not None:
            del self._entries
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
