"""Opening channels: a Unix stream socket per actor, peers known by their pid.

Every actor listens on ``<private dir>/actor<i>.<incarnation>.ctl``.  A caller
that wants a channel connects, sends one request (a :mod:`runtime.wire` JSON
frame) carrying the descriptors of the two ring segments and of the callee's
end of the channel's pool socket pair (``SCM_RIGHTS``: the rings have no name
anywhere, see ``segment.py``, and pool slots travel over that private pair),
and reads one reply.

Who is asking is never taken from the request: the server reads the peer's
pid from the socket (``SO_PEERCRED``, filled in by the kernel at ``connect``)
and the actor decides the peer's trust from the supervisor's record of that
pid (the read-only actor table; the driver's pid comes from the supervisor
too).  Why not a per-actor secret: a secret has to be handed to every process
that may call, stored, and kept out of untrusted actors; the kernel already
knows who is on the other end of a Unix socket.

The server never blocks on a peer: connections are accepted and read
non-blocking, a request must arrive whole within ``REQUEST_DEADLINE_S`` and
fit ``MAX_REQUEST`` bytes, and at most ``MAX_PENDING`` half-read connections
are kept: past that, the requests already whole are answered, then the oldest
connection of the process holding the most is dropped (all processes outside the
session count as one).  A malformed or hostile request is refused and the actor keeps
serving.  Refusals and drops are logged at most once a second each, with the count since
the last line: a peer can cause them as fast as it can connect.

An actor out of file descriptors cannot accept: the connection would stay in the
backlog, its caller waiting on it, and the listening socket readable -- the server
woke on it again and again, logging each time (a review saw 1,700 lines and 0.17 s of
CPU in 2 s for one waiting caller).  So the server keeps one spare descriptor: when an
accept fails for lack of them, it closes the spare, accepts, answers that it is out of
descriptors, and takes the spare again (as libuv and nginx do).  At the limit accept()
fails with EMFILE whether or not anyone waits; the spare's accept tells which.  Without
the spare (another thread took its number meanwhile) the server reports
:attr:`starved`, and its owner backs off.  A shortage is one episode, logged once when
it begins and once when a channel opens again, with the number refused meanwhile:
failed accepts, refusals by the spare, requests whose descriptors the kernel dropped
and the handler's :class:`~runtime.limits.OutOfDescriptors` all count into it.  A
caller refused before it wrote its request reads the refusal that waits in its buffer.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.errors import ProtocolError, TransportError
from runtime.limits import OutOfDescriptors
from runtime.wire import DescriptorsDropped, FrameReader, encode_frame, write_frame

__all__ = ["ControlServer", "peer_pid", "reply_fields", "request"]

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_PENDING = 32
MAX_REQUEST_FDS = 8  # an open request carries 3 (two rings and a pool socket)
REQUEST_DEADLINE_S = 2.0
# A refused connection to an actor's socket usually means the actor just died and the
# supervisor has not recorded it yet (it does within ~1 s): ``check`` is polled this long
# for that verdict before the refusal itself is the error.
REFUSED_WAIT_S = 2.0
# Connecting and writing a request without a deadline: the frame is small, a server's
# socket buffer takes it at once, unless the server is wedged.
WRITE_TIMEOUT_S = 30.0
_CRED = struct.Struct("3i")
# accept() errors that say the process (or system) has no room for the connection now.
_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A descriptor of the very process that connected (Linux >= 6.5); the constant is missing
# from Python 3.11's socket module.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class _Throttle:
    """One log line a second for one kind of event, with the count since the last line.

    The first event of a quiet spell is logged at once; the rest of its second are
    counted and reported by the next event after it, or by :meth:`flush` (which the
    server's :meth:`ControlServer.service` calls once :attr:`due` has passed), so a
    burst that stops is still reported whole.
    """

    __slots__ = ("_count", "_format", "_last", "_lock", "_next", "name")

    def __init__(self, name: str, line: str) -> None:
        self.name = name
        self._format = line  # % (actor, count, last event)
        self._count, self._last, self._next = 0, "", 0.0
        self._lock = threading.Lock()  # the control thread counts; an exit flushes

    @property
    def due(self) -> float | None:
        """When the events counted but not logged are to be logged; None if there are none."""
        return self._next if self._count else None

    def note(self, last: str, now: float) -> None:
        with self._lock:
            self._count += 1
            self._last = last
            if now >= self._next:
                self._flush(now)

    def flush(self, now: float) -> None:
        with self._lock:
            self._flush(now)

    def _flush(self, now: float) -> None:
        if self._count:
            log.warning(self._format, self.name, self._count, self._last)
        self._count, self._next = 0, now + 1.0


# handler(message, descriptors, peer pid) -> reply; raising refuses the request.
Handler = Callable[[list, list[int], int], list]


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected ``sock`` (from the kernel)."""
    pid, _, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid


def _pidfd_supported() -> bool:
    """Whether this kernel gives SO_PEERPIDFD (asked once, of a socket pair of our own)."""
    a, b = socket.socketpair()
    try:
        os.close(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


_PIDFD = _pidfd_supported()


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the process that connected ``sock``.

    None where the kernel has no such option; -1 when it has one but cannot give it for
    this peer, which means the peer has exited (ESRCH on recent kernels, EINVAL on 6.5 to
    ~6.14 once it is reaped).
    """
    if not _PIDFD:
        return None
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return -1


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # not ours to signal: alive, as far as this can tell
    return True


class _Pending:
    """A connection whose request has not arrived whole yet.

    ``pid`` is the connector's at ``connect``; ``pidfd`` pins that very process, so that
    a request whose sender has exited meanwhile -- its pid free for another process,
    maybe one the session trusts -- is refused, not judged by the pid's new owner.
    """

    __slots__ = ("deadline", "group", "pid", "pidfd", "reader", "sock")

    def __init__(self, sock: socket.socket, pid: int, pidfd: int | None, group: int) -> None:
        self.sock = sock
        self.pid = pid
        self.group = group  # whose share of MAX_PENDING it takes (ControlServer's group)
        self.pidfd = pidfd
        self.reader = FrameReader(sock, max_frame=MAX_REQUEST, max_fds=MAX_REQUEST_FDS)
        self.deadline = time.monotonic() + REQUEST_DEADLINE_S

    def close(self) -> None:
        self.reader.close_fds()
        self.sock.close()
        if self.pidfd is not None and self.pidfd >= 0:
            _close_fd(self.pidfd)
        self.pidfd = None


class ControlServer:
    """The listening end; call :meth:`service` when :meth:`ready` says so."""

    def __init__(self, path: str, handler: Handler, *, name: str = "",
                 group: Callable[[int], int] | None = None) -> None:
        self.path = path
        self.name = name
        self._handler = handler
        # Peer pid -> whose share of the waiting connections it takes (default: its own).
        # An actor puts every process outside its session in one group: one that forks
        # a child per connection must not get a share per child (review M).
        self._group = group
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(MAX_PENDING)
            self._sock.setblocking(False)
        except OSError as exc:
            self._sock.close()
            raise TransportError(f"cannot listen on {path}: {exc}") from exc
        self._pending: dict[int, _Pending] = {}
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self.refused = 0
        self._spare = _open_spare()
        # True while accepts fail for want of descriptors and none was spare: the
        # connection waits in the backlog, and polling the socket says ready at once.
        self.starved = False
        self._evictions = _Throttle(
            name, "actor %s: dropped %d waiting connection(s), too many waiting (the last "
                  "from pid %s)")
        self._refusals = _Throttle(
            name, "actor %s: refused %d control request(s) (the last from pid %s)")
        self._short = False  # in a shortage episode (see _shortage)
        self._short_refused = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def fds(self) -> list[int]:
        """Every descriptor to wait on: the listening socket and half-read requests."""
        return [self._sock.fileno(), *self._pending]

    def ready(self) -> bool:
        """True when a connection or request bytes are waiting, or drops are to be logged.

        Never blocks.
        """
        due = self._due()
        return bool(self._poll.poll(0)) or (due is not None and due <= time.monotonic())

    def wait(self, timeout: float) -> None:
        """Block until :meth:`ready` may be true, or ``timeout`` seconds pass."""
        due = self._due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        self._poll.poll(max(0, int(timeout * 1000)))

    def _due(self) -> float | None:
        """When there is next something to do that no peer's bytes announce.

        A waiting request's deadline, or the line for the refusals or drops counted
        since the last.
        """
        due = [p.deadline for p in self._pending.values()]
        due += [t.due for t in (self._evictions, self._refusals) if t.due is not None]
        return min(due, default=None)

    def service(self) -> None:
        """Accept what is waiting and answer every request that arrived whole.

        At most ``MAX_PENDING`` accepts a call: a flood of connections must not hold the
        requests already whole (an honest caller's among them) unread (review N).
        """
        for _ in range(MAX_PENDING):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                self.starved = False
                break
            except OSError as exc:
                # At the limit accept() fails before it looks at the backlog: EMFILE says
                # nothing of whether anyone waits.  The spare's accept tells.
                outcome = self._refuse_with_spare(exc) if exc.errno in _STARVED else None
                if outcome is None:  # no spare, or another error: back off and retry
                    self._shortage(f"cannot accept: {exc.strerror or exc}")
                    self.starved = True
                    break
                self.starved = False
                if not outcome:  # nobody was waiting
                    break
                continue
            self.starved = False
            if self._spare is None:
                self._spare = _open_spare()
            conn.setblocking(False)
            try:
                pid = peer_pid(conn)
            except OSError:
                conn.close()
                continue
            try:
                group = pid if self._group is None else self._group(pid)
            except Exception:  # noqa: BLE001 - a share is no reason to stop serving
                group = 0
            if len(self._pending) >= MAX_PENDING:
                # Requests already whole are answered, not counted as waiting: a burst of
                # honest first contacts lost one (review N).
                self._read_ready()
            if len(self._pending) >= MAX_PENDING:
                self._evict(self._hoarded(group))
            self._pending[conn.fileno()] = _Pending(conn, pid, peer_pidfd(conn), group)
            self._poll.register(conn, select.POLLIN)
        now = time.monotonic()
        self._read_ready()
        for p in list(self._pending.values()):
            if p.deadline <= now:
                self._refuse(p, "no complete request in time")
        for throttle in (self._evictions, self._refusals):
            if throttle.due is not None and throttle.due <= now:
                throttle.flush(now)

    def _read_ready(self) -> None:
        """Read every waiting connection that has bytes (answering the requests now whole)."""
        for fd, revents in self._poll.poll(0):
            p = self._pending.get(fd)
            if p is not None and revents:
                self._read(p)

    def _evict(self, p: _Pending) -> None:
        """Drop a waiting connection to make room (logged through a throttle)."""
        self.refused += 1
        self._evictions.note(str(p.pid), time.monotonic())
        self._finish(p, ["error", "too many connections waiting"])

    def _hoarded(self, newcomer: int) -> _Pending:
        """The waiting connection to drop for one more from group ``newcomer``.

        The oldest of the group (a process, or all outside the session) that holds the
        most, counting the newcomer's new one.  Dropping the oldest of all let one process
        holding 32 half-sent connections push out every honest caller's open (an
        untrusted actor may connect like anyone).
        """
        held: dict[int, list[_Pending]] = {}
        for p in self._pending.values():
            held.setdefault(p.group, []).append(p)

        def weight(group: int) -> tuple[int, float]:  # most held, then the oldest waiting
            mine = held[group]
            return len(mine) + (group == newcomer), -min(p.deadline for p in mine)
        return min(held[max(held, key=weight)], key=lambda p: p.deadline)

    def _refuse_with_spare(self, exc: OSError) -> bool | None:
        """Free the spare descriptor, accept, and tell the caller why.

        True when a caller was refused, False when nobody was waiting, None without a
        spare (or when the accept failed even so).  The caller gets a refusal that names
        the cause at once, instead of waiting in the backlog for a descriptor to free up
        -- maybe for good.
        """
        if self._spare is None:
            return None
        _close_fd(self._spare)
        self._spare = None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            self._spare = _open_spare()
            return False
        except OSError:
            self._spare = _open_spare()
            return None
        what = ("file descriptors" if exc.errno in (errno.EMFILE, errno.ENFILE)
                else "memory for connections")
        why = f"actor {self.name} is out of {what} ({exc.strerror})"
        self._shortage(why, refused=True)
        _send_reply(conn, ["error", why])
        conn.close()
        self._spare = _open_spare()
        return True

    def _shortage(self, why: str, *, refused: bool = False) -> None:
        """Note a symptom of running short of descriptors: one line per episode.

        An episode lasts until a channel is opened again (:meth:`_finish_shortage`): accepts
        that fail, refusals by the spare, requests whose descriptors the kernel dropped,
        and the handler's headroom refusals all count into it, quietly.
        """
        if not self._short:
            log.warning("actor %s: short of resources for new channels (%s); refusing or "
                        "delaying them until they free up", self.name, why)
            self._short = True
        if refused:
            self.refused += 1
            self._short_refused += 1

    def _finish_shortage(self) -> None:
        if self._short:
            log.warning("actor %s: opening channels again (%d refused meanwhile)",
                        self.name, self._short_refused)
            self._short, self._short_refused = False, 0

    def _read(self, p: _Pending) -> None:
        try:
            msgs = p.reader.feed()
        except Exception as exc:  # noqa: BLE001 - whatever a peer sends, the actor serves on
            self._refuse(p, str(exc) if isinstance(exc, (ProtocolError, OSError))
                         else f"{type(exc).__name__}: {exc}",
                         shortage=isinstance(exc, DescriptorsDropped) and exc.short)
            return
        if not msgs:
            if p.reader.eof:
                self._refuse(p, "closed before sending a request")
            return
        if len(msgs) > 1:
            self._refuse(p, "more than one request on a connection")
            return
        if p.pidfd is not None and (p.pidfd < 0 or not _alive(p.pidfd)):
            # The handler judges the sender by its pid: once the sender is gone, the pid
            # may be another process's.  (Checked just before: reusing a pid means
            # cycling through the whole pid space, not done in the handler's microseconds.)
            self._refuse(p, "the process that sent it has exited (its pid may be reused)")
            return
        fds, p.reader.fds = p.reader.fds, []
        try:
            reply = self._handler(msgs[0], fds, p.pid)
        except Exception as exc:  # noqa: BLE001 - refused, reported, and we go on serving
            for fd in fds:
                _close_fd(fd)
            self._refuse(p, str(exc), shortage=isinstance(exc, OutOfDescriptors))
            return
        self._finish_shortage()
        self._finish(p, reply)

    def _refuse(self, p: _Pending, why: str, *, shortage: bool = False) -> None:
        if shortage:  # counted into the episode: one line for all of them
            why = f"actor {self.name}: {why}"
            self._shortage(f"{why}; first refused: pid {p.pid}", refused=True)
        else:
            # Throttled: a peer sending garbage, or letting the deadline pass, as fast as
            # it connects logged a line a connection (review O).
            self.refused += 1
            self._refusals.note(f"{p.pid}: {why:.200}", time.monotonic())
        self._finish(p, ["error", why[:1000]])

    def _finish(self, p: _Pending, reply: list) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._poll.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        _send_reply(p.sock, reply)
        p.close()

    def flush_log(self) -> None:
        """Log the refusals and drops counted since the last line (at close, at exit)."""
        now = time.monotonic()
        self._evictions.flush(now)
        self._refusals.flush(now)

    def close(self) -> None:
        self.flush_log()
        for p in list(self._pending.values()):
            p.close()
        self._pending.clear()
        self._sock.close()
        if self._spare is not None:
            _close_fd(self._spare)
            self._spare = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _send_reply(sock: socket.socket, reply: list) -> None:
    """Send a reply frame without blocking; a peer that is gone or does not read misses it."""
    try:
        sock.send(encode_frame(reply), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError:
        pass  # nothing more to tell it


def _open_spare() -> int | None:
    """A descriptor held only to be given up when an accept meets the limit."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def request(path: str, msg: list, fds: tuple[int, ...], *, timeout: float | None,
            check: Callable[[], None] | None = None) -> list:
    """Send one request to the server at ``path``; return its reply.

    Waits in 50 ms slices, calling ``check`` (which raises if the server's
    actor died) after each; ``TransportError`` when ``timeout`` passes (``None``:
    as long as ``check`` lets it -- an actor busy in a long call answers after
    it).  A refused or missing socket is retried for up to
    :data:`REFUSED_WAIT_S` while ``check`` is polled: an actor killed a moment
    ago refuses before the supervisor has recorded its death, and its caller
    should get that death (``check``'s error), not a ``TransportError``.  A
    reply never carries descriptors: one that does is a ``ProtocolError``, and
    they are closed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = _connect(path, deadline, check)
    reader = FrameReader(sock, max_frame=MAX_REQUEST, max_fds=MAX_REQUEST_FDS)
    try:
        sock.settimeout(WRITE_TIMEOUT_S if timeout is None else timeout)
        try:
            write_frame(sock, msg, fds)
        except OSError as exc:
            # A server out of descriptors answers (a refusal) and closes before it reads:
            # the write meets EPIPE, and the answer waits in this socket's buffer.
            left = _reply_left(sock, reader)
            if left is not None:
                return left
            _await_death(check, deadline)
            raise TransportError(f"{path} failed the connection: {exc}") from exc
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            if poller.poll(50):
                try:
                    msgs = reader.feed()
                except OSError as exc:  # reset: the server's process is likely gone
                    _await_death(check, deadline)  # its death explains it best
                    raise TransportError(f"{path} failed the connection: {exc}") from exc
                if reader.fds:  # a reply never carries any: the server is hostile or broken
                    raise ProtocolError(f"{path} sent {len(reader.fds)} descriptors with "
                                        f"its reply")
                if msgs:
                    return msgs[0]
                if reader.eof:
                    _await_death(check, deadline)
                    raise TransportError(f"{path} closed the connection without a reply")
            if check is not None:
                check()
            if deadline is not None and time.monotonic() > deadline:
                raise TransportError(f"no reply from {path} within {timeout} s")
    finally:
        reader.close_fds()
        sock.close()


def _reply_left(sock: socket.socket, reader: FrameReader) -> list | None:
    """A reply already in ``sock``'s buffer (the server wrote it and closed), or None."""
    sock.setblocking(False)
    try:
        for _ in range(16):  # a refusal is one small frame: a read or two
            msgs = reader.feed()
            if msgs:
                return None if reader.fds else msgs[0]
            if reader.eof:
                return None
    except (OSError, ProtocolError):
        return None
    return None


def _await_death(check: Callable[[], None] | None, deadline: float | None) -> None:
    """Poll ``check`` for up to :data:`REFUSED_WAIT_S` (or until ``deadline``).

    A connection reset, or closed without a reply, most often means the server's process
    was killed a moment ago -- before the supervisor reaped it and recorded the death that
    ``check`` reads.  The caller should get that death (``ActorDiedError``), as the contract
    says, not a ``TransportError``; one ``check`` right at the reset loses that race.
    """
    if check is None:
        return
    until = time.monotonic() + REFUSED_WAIT_S
    if deadline is not None:
        until = min(until, deadline)
    while True:
        check()
        if time.monotonic() >= until:
            return
        time.sleep(0.01)


def _connect(path: str, deadline: float | None,
             check: Callable[[], None] | None) -> socket.socket:
    """A socket connected to ``path`` (see :func:`request` on refusals)."""
    refused_until = time.monotonic() + REFUSED_WAIT_S
    if deadline is not None:
        refused_until = min(deadline, refused_until)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(WRITE_TIMEOUT_S if deadline is None
                            else max(0.001, deadline - time.monotonic()))
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            sock.close()
            if check is not None:
                check()
            if check is None or time.monotonic() >= refused_until:
                raise TransportError(f"cannot reach {path}: {exc}") from exc
        except OSError as exc:
            sock.close()
            if check is not None:
                check()
            raise TransportError(f"cannot reach {path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        time.sleep(0.02)  # a fresh socket each try: a failed connect leaves one unspecified


def reply_fields(reply: Any, what: str) -> dict:
    """The fields of an ``["ok", {...}]`` reply; ``TransportError`` for a refusal."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise ProtocolError(f"malformed reply to {what}")
    status, detail = reply
    if status == "ok" and isinstance(detail, dict):
        return detail
    if status == "error":
        raise TransportError(f"{what} refused: {str(detail)[:1000]}")
    raise ProtocolError(f"malformed reply to {what}")
