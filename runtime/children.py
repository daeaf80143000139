"""The supervisor's children: one reaper for every process it is parent of.

Actors forked by the zygote are re-parented to the supervisor (a child
subreaper) when the zygote's intermediate process exits, so the supervisor
cannot use ``subprocess.Popen`` to wait for them.  :class:`Children` reaps
with ``waitpid(-1, WNOHANG)`` and records each exit status in the matching
:class:`Proc` -- a ``Popen``-like view (``pid``, ``poll``, ``wait``,
``send_signal``, ``returncode``) of a process started either way.  Exits of
processes nobody registered (an actor's own orphaned children, re-parented
here too) are reaped and dropped, so no zombie accumulates.
"""

from __future__ import annotations

import os
import subprocess
import time

__all__ = ["Children", "Proc"]


class Proc:
    """One child process; ``returncode`` is set once it has been reaped."""

    def __init__(self, children: Children, pid: int,
                 popen: subprocess.Popen | None = None) -> None:
        self._children = children
        self.pid = pid
        self.popen = popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._children.reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(pause)
            pause = min(2 * pause, 0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the process unless it has been reaped (its pid may be reused)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Children:
    """Every child of this process, reaped in one place."""

    def __init__(self) -> None:
        self._procs: dict[int, Proc] = {}

    def add(self, pid: int, popen: subprocess.Popen | None = None) -> Proc:
        proc = Proc(self, pid, popen)
        self._procs[pid] = proc
        return proc

    def pids(self) -> set[int]:
        """The registered children not reaped yet (actors and the zygote)."""
        return set(self._procs)

    def reap(self) -> None:
        """Collect every exited child; record statuses of registered ones."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self._procs.pop(pid, None)
            if proc is not None:
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc.popen is not None:
                    proc.popen.returncode = proc.returncode  # Popen must not wait again
