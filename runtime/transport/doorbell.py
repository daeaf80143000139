"""Doorbells: a named FIFO that wakes a process blocked waiting for records.

Measured choice.  A futex on a shared word is the cheapest wake-up but one
thread can wait on one word only, and an actor must also wait on its ZeroMQ
control socket.  A FIFO is a file descriptor, so ``zmq.Poller`` (poll(2))
waits on it together with ZeroMQ sockets; writers need only its path (plain
connection data, picklable), and a byte written while nobody waits stays in
the pipe, so a late sleeper still wakes.  Cost: one ``write`` for the writer,
only when the reader has declared itself asleep (see ``ring.py``).

Each doorbell has exactly one waiting thread at a time (an actor's main loop,
or the one thread reading a caller's channel), so draining the pipe never
steals another waiter's wake-up.
"""

from __future__ import annotations

import errno
import os
import select
import stat

from runtime.errors import TransportError

__all__ = ["Doorbell", "DoorbellWriter"]

DRAIN_BYTES = 1 << 16  # one read per wake-up: a default pipe's whole capacity


class Doorbell:
    """The waiting side: creates the FIFO (mode 0600) and holds it open."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.mkfifo(path, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot create doorbell {path}: {exc.strerror}") from exc
        try:
            # O_RDWR keeps a writer on the FIFO, so writers never get ENXIO and
            # poll never reports a permanent hang-up.
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            os.unlink(path)
            raise TransportError(f"cannot open doorbell {path}: {exc.strerror}") from exc
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def fileno(self) -> int:
        return self.fd

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout`` seconds pass; True if rung."""
        ready = self._poll.poll(max(0, int(timeout * 1000)))
        if ready:
            self.drain()
            return True
        return False

    def drain(self) -> None:
        """Empty the pipe with one read (a default pipe holds 64 KiB).

        One read, not a loop until empty: a peer that keeps the pipe full (an untrusted
        worker holds the path of its caller's doorbell) would otherwise hold the waiter in
        here past every deadline.  What one read leaves makes the next wait return at once:
        a spurious wake-up, which every waiter handles.
        """
        try:
            os.read(self.fd, DRAIN_BYTES)
        except BlockingIOError:
            pass

    def wake(self) -> None:
        """Ring this doorbell from its own process (another thread wakes its waiter)."""
        try:
            os.write(self.fd, b"\x01")
        except BlockingIOError:
            pass  # pipe full: a wake-up is already pending

    def close(self) -> None:
        """Close and remove the FIFO (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class DoorbellWriter:
    """The ringing side: holds the peer's FIFO open for writing.

    Opened at once, not on the first ring, so a channel's file descriptors are
    all taken when it is set up (a process's descriptor count stays flat
    however its peers sleep) and a missing peer shows at set-up.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TransportError(f"cannot open doorbell {path}: {exc.strerror}") from exc
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise TransportError(f"doorbell {path} is not a FIFO")
        self._fd = fd

    def ring(self) -> None:
        if self._fd < 0:
            raise TransportError(f"doorbell {self.path} is closed")
        try:
            os.write(self._fd, b"\x01")
        except BlockingIOError:
            pass  # pipe full: a wake-up is already pending
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise TransportError(f"cannot ring doorbell {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
