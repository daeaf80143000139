"""The supervisor: parent of every actor process of a session.

Started by ``ActorSystem`` as ``python -m runtime.supervisor``: a child of the
driver, never a fork of it, and free of torch so it starts fast and stays
small.  It talks to the driver over a Unix socket pair and a pipe (JSON
frames, see ``wire.py``; each spawn request carries the actor's sealed
constructor memfd as a descriptor, see ``spec.py``) and reads each starting
actor's status pipe (JSON too: an untrusted actor writes it).  Callers learn
of deaths from the shared actor table (``table.py``), which only the
supervisor can write: it seals the table against every other writer.

Duties:

* spawn actors (``python -m runtime.worker``) with ``PR_SET_PDEATHSIG`` so
  they die with the supervisor, and report start-up success or the
  ``__init__`` traceback;
* notice a death at once (SIGCHLD wakes the loop; ``waitpid`` reaps), mark it
  in the table -- every caller blocked on that actor fails within its next
  100 ms wait slice -- and remove the files the dead process made;
* restart an actor with its original arguments while ``max_restarts`` allows;
* kill the processes actors leave behind (``_kill_strays``): a process an actor
  started is re-parented here when the actor dies, and would run on for ever;
* when the driver dies (its request pipe reaches EOF), kill every actor and
  every process of theirs, remove every file of the session and exit.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from runtime import malloc
from runtime import session as sessions
from runtime.children import Children, Proc
from runtime.errors import ProtocolError
from runtime.table import ALIVE, DEAD, RESTARTING, STARTING, ActorTable, describe_exit
from runtime.transport.segment import unlink_quietly
from runtime.wire import FrameReader, write_frame

log = logging.getLogger("runtime.supervisor")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TERM_GRACE_S = 1.0
ZYGOTE_START_S = 60.0  # then actors start as fresh interpreters
FORK_REPLY_S = 10.0
STRAY_KILL_S = 2.0  # for the processes actors left behind to go


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGKILL when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class _Actor:
    index: int
    name: str
    spec_fd: int
    max_restarts: int
    flags: int
    boot: dict[str, Any]
    incarnation: int = 0
    restarts: int = 0
    proc: Proc | None = None
    status: FrameReader | None = None
    pending: list[int] = field(default_factory=list)  # request ids awaiting start
    kill_requests: list[int] = field(default_factory=list)
    killed: bool = False
    ready: bool = False


class Supervisor:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.session = sessions.Session(**cfg["session"])
        self.table = ActorTable.open_writer(cfg["table_fd"])
        self.driver_pid = cfg["driver_pid"]
        self.req = FrameReader(socket.socket(fileno=cfg["req_fd"]))
        self.rep_fd = cfg["rep_fd"]
        os.set_blocking(self.req.fd, False)
        self.actors: dict[int, _Actor] = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.req.fd, selectors.EVENT_READ, "req")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self._exit_all("SIGTERM"))
        self.stopping = False
        self.actor_env = actor_environment(dict(os.environ))
        self.children = Children()
        # Actors forked by the zygote are orphaned on purpose: they must land here.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.zygote: _Zygote | None = None
        self._awaiting_zygote: list[_Actor] = []
        if cfg.get("zygote", True):
            try:
                self.zygote = _Zygote.start(self)
            except OSError as exc:
                log.warning("no zygote (%s): actors start as fresh interpreters", exc)

    # -- main loop -------------------------------------------------------------
    def run(self) -> None:
        self.session.record_owner("supervisor", os.getpid())
        write_frame(self.rep_fd, ["hello", os.getpid()])
        while not self.stopping:
            for key, _ in self.sel.select(timeout=0.2):
                if key.data == "req":
                    try:
                        msgs = self.req.feed()
                    except ProtocolError as exc:  # the driver is trusted: a bug, not an attack
                        log.error("bad request from the driver (%s); exiting", exc)
                        self._exit_all("bad request")
                        return
                    for msg in msgs:
                        self._handle(msg)
                    if self.req.eof:
                        self._exit_all("driver gone")
                        return
                elif key.data == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif key.data == "zygote":
                    self._zygote_event()
                else:
                    self._status(key.data)
            self._reap()
            if self._awaiting_zygote and self.zygote is not None and self.zygote.overdue():
                self._zygote_gone("it did not start in time")
            if os.getppid() != self.driver_pid:
                self._exit_all("driver gone")
                return

    def _handle(self, msg: list) -> None:
        op, rid = msg[0], msg[1]
        if op == "spawn":
            _, _, index, name, max_restarts, flags, boot = msg
            (spec_fd,) = self.req.take_fds(1)
            actor = _Actor(index, name, spec_fd, max_restarts, flags, boot)
            actor.pending.append(rid)
            self.actors[index] = actor
            self._start(actor)
        elif op == "kill":
            actor = self.actors.get(msg[2])
            if actor in self._awaiting_zygote:  # never started: it never will
                self._awaiting_zygote.remove(actor)
                actor.killed = True
                self._start_failed(actor, f"actor {actor.name!r} was killed while starting")
            if actor is None or actor.proc is None:
                write_frame(self.rep_fd, ["killed", rid, None])
                return
            actor.killed = True
            actor.kill_requests.append(rid)
            _signal(actor.proc, signal.SIGKILL)
        elif op == "shutdown":
            self._stop_all()
            write_frame(self.rep_fd, ["bye", rid, None])
            self.stopping = True
        else:
            write_frame(self.rep_fd, ["error", rid, f"unknown request {op!r}"])

    # -- the zygote ------------------------------------------------------------------
    def _zygote_event(self) -> None:
        z = self.zygote
        try:
            msgs = z.reader.feed()
        except ProtocolError as exc:
            self._zygote_gone(f"bad message: {exc}")
            return
        if any(m[0] == "ready" for m in msgs):
            z.ready = True
            waiting, self._awaiting_zygote = self._awaiting_zygote, []
            for actor in waiting:
                self._start(actor)
        if z.reader.eof:
            self._zygote_gone("it exited")

    def _zygote_gone(self, why: str) -> None:
        """Fall back to fresh interpreters for this session."""
        z, self.zygote = self.zygote, None
        if z is not None:
            log.warning("zygote unavailable (%s): actors start as fresh interpreters", why)
            self.sel.unregister(z.sock)
            z.close()
        waiting, self._awaiting_zygote = self._awaiting_zygote, []
        for actor in waiting:
            self._start(actor)

    # -- starting --------------------------------------------------------------
    def _start(self, actor: _Actor) -> None:
        if self.zygote is not None and not self.zygote.ready:
            self._awaiting_zygote.append(actor)  # the first spawns wait for its imports
            return
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        boot = dict(actor.boot, session=self.session.__dict__, index=actor.index,
                    name=actor.name, incarnation=actor.incarnation, table_fd=self.table.fd,
                    status_fd=status_w, spec_fd=actor.spec_fd, supervisor_pid=os.getpid(),
                    driver_pid=self.driver_pid)
        try:
            proc = None
            if self.zygote is not None:
                try:
                    proc = self.children.add(self.zygote.fork(boot, status_w, actor.spec_fd))
                except (OSError, ProtocolError) as exc:
                    self._zygote_gone(str(exc))
            if proc is None:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "runtime.worker", json.dumps(boot)],
                    stdin=subprocess.DEVNULL, pass_fds=(self.table.fd, status_w, actor.spec_fd),
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - the supervisor has one thread
                    cwd=actor.boot.get("cwd") or None, env=self.actor_env)
                proc = self.children.add(popen.pid, popen)
        except OSError as exc:
            os.close(status_r)
            self._start_failed(actor, f"cannot start the actor process: {exc}")
            return
        finally:
            os.close(status_w)
        actor.proc = proc
        actor.ready = False
        os.set_blocking(status_r, False)
        actor.status = FrameReader(status_r)
        self.sel.register(status_r, selectors.EVENT_READ, actor)
        self.table.write(actor.index, state=STARTING, incarnation=actor.incarnation,
                         pid=proc.pid, flags=actor.flags, restarts=actor.restarts)

    def _status(self, actor: _Actor) -> None:
        reader = actor.status
        try:
            msgs = reader.feed()
        except Exception as exc:  # noqa: BLE001 - a status pipe is the actor's: never our end
            log.warning("actor %s wrote a malformed status (%s); killing it", actor.name, exc)
            self._close_status(actor)
            _signal(actor.proc, signal.SIGKILL)
            return
        for msg in msgs:
            if msg[0] == "ready" and actor.proc is not None:
                actor.ready = True
                self.table.write(actor.index, state=ALIVE)
                for rid in actor.pending:
                    write_frame(self.rep_fd, ["spawned", rid, actor.proc.pid])
                actor.pending.clear()
            elif msg[0] == "init_failed" and len(msg) == 2 and isinstance(msg[1], str):
                actor.init_error = msg[1]
        if reader.eof:
            self._close_status(actor)

    def _close_status(self, actor: _Actor) -> None:
        if actor.status is not None:
            self.sel.unregister(actor.status.fd)
            os.close(actor.status.fd)
            actor.status = None

    def _start_failed(self, actor: _Actor, text: str) -> None:
        self.table.write(actor.index, state=DEAD)
        for rid in actor.pending:
            write_frame(self.rep_fd, ["start_failed", rid, text])
        actor.pending.clear()
        self._forget_spec(actor)

    def _forget_spec(self, actor: _Actor) -> None:
        """Close the constructor memfd of an actor that will never start again."""
        if actor.spec_fd >= 0:
            os.close(actor.spec_fd)
            actor.spec_fd = -1

    # -- deaths ----------------------------------------------------------------
    def _reap(self) -> None:
        died = False
        for actor in list(self.actors.values()):
            proc = actor.proc
            if proc is None or proc.poll() is None:
                continue
            if actor.status is not None:  # collect a last status message
                self._status(actor)
                self._close_status(actor)
            self._died(actor, proc.returncode)
            died = True
        if died:
            self._kill_strays(spare=self.children.pids())

    def _kill_strays(self, spare: set[int]) -> None:
        """SIGKILL every child of the supervisor not in ``spare``, and its descendants.

        A process an actor starts (``subprocess.Popen``, a helper server) is re-parented
        to the supervisor, a child subreaper, when the actor dies -- and, without this,
        to init when the supervisor exits: it ran on after the actor and after the
        system ("cleans all on exit"; a review found it).  Called after every death with
        ``spare`` = the registered children (live actors, restarted ones, the zygote), so
        only unregistered children go: the dead actors' orphans.  An actor being forked
        is the zygote's grandchild until it is registered, never a child of ours here.
        The cost of that rule: a process a *live* actor detached (a double fork, ``cmd &``
        in a shell) is re-parented here too and goes at the next death or at the end --
        an actor's helpers must stay its children to live as long as it does.  At
        shutdown and exit (``spare`` without actors) everything left goes.
        """
        import psutil  # here: ~17 ms the supervisor's start need not pay

        deadline = time.monotonic() + STRAY_KILL_S
        while True:
            self.children.reap()  # orphans that exited already: collected, not listed
            try:
                strays = [p for p in psutil.Process().children() if p.pid not in spare]
            except psutil.Error as exc:
                log.warning("cannot list the supervisor's children (%s)", exc)
                return
            if not strays or time.monotonic() > deadline:
                if strays:
                    log.warning("processes left by actors would not go: %s",
                                [p.pid for p in strays])
                return
            for root in strays:  # each root first, then what it started
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    tree = [root]
                for p in tree:
                    try:
                        p.kill()  # psutil refuses a pid that was reused meanwhile
                    except psutil.Error:
                        pass
            time.sleep(0.005)  # their descendants are re-parented here as they die

    def _died(self, actor: _Actor, code: int) -> None:
        pid = actor.proc.pid
        actor.proc = None
        # Callers learn of the death from the table first, then the files go.
        self.table.write(actor.index, state=RESTARTING if self._will_restart(actor) else DEAD,
                         exit=code)
        try:  # the driver lets go of its channel (two ring mappings) at once
            write_frame(self.rep_fd, ["died", 0, actor.index])
        except OSError:
            pass  # the driver is gone
        sessions.remove_session_files(self.session, pid=pid)
        for suffix in (".bell", ".ctl"):
            name = f"actor{actor.index}.{actor.incarnation}{suffix}"
            unlink_quietly(self.session.private_path(name))
        init_error = getattr(actor, "init_error", None)
        actor.init_error = None
        if actor.pending:  # died before it was ready: a failed start
            text = init_error or (f"actor {actor.name!r} died during start-up "
                                  f"({describe_exit(code)})")
            self.table.write(actor.index, state=DEAD, exit=code)
            for rid in actor.pending:
                write_frame(self.rep_fd, ["start_failed", rid, text])
            actor.pending.clear()
            for rid in actor.kill_requests:  # killed while starting (an interrupted spawn)
                write_frame(self.rep_fd, ["killed", rid, None])
            actor.kill_requests.clear()
            self._forget_spec(actor)
            return
        if not self._will_restart(actor):
            self.table.write(actor.index, state=DEAD, exit=code)
            for rid in actor.kill_requests:
                write_frame(self.rep_fd, ["killed", rid, None])
            actor.kill_requests.clear()
            self._forget_spec(actor)
            return
        actor.restarts += 1
        actor.incarnation += 1
        log.warning("actor %s died (%s); restart %d of %d", actor.name, describe_exit(code),
                    actor.restarts, actor.max_restarts)
        self.table.write(actor.index, state=RESTARTING, exit=code, restarts=actor.restarts)
        self._start(actor)

    def _will_restart(self, actor: _Actor) -> bool:
        return not (actor.pending or actor.killed or self.stopping
                    or actor.restarts >= actor.max_restarts)

    # -- stopping --------------------------------------------------------------
    def _stop_all(self) -> None:
        self.stopping = True
        waiting, self._awaiting_zygote = self._awaiting_zygote, []
        for actor in waiting:
            self._start_failed(actor, "the actor system is shutting down")
        live = [a for a in self.actors.values() if a.proc is not None]
        for a in live:
            _signal(a.proc, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for a in live:
            try:
                a.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(a.proc, signal.SIGKILL)
                a.proc.wait()
        self._reap()
        # Before the driver hears "bye" (then it kills the supervisor): the actors' own
        # processes go too.  The zygote stays; it dies with the supervisor.
        self._kill_strays(spare=self.children.pids())

    def _exit_all(self, why: str) -> None:
        for a in self.actors.values():
            if a.proc is not None:
                _signal(a.proc, signal.SIGKILL)
        for a in self.actors.values():
            if a.proc is not None:
                a.proc.wait()
        self._kill_strays(spare=set())  # what actors started, and the zygote
        sessions.remove_session_files(self.session)
        log.debug("supervisor exits: %s", why)
        os._exit(0)


class _Zygote:
    """The supervisor's end of the zygote (see ``zygote.py``)."""

    def __init__(self, sock: socket.socket, proc: Proc) -> None:
        self.sock = sock
        self.proc = proc
        self.reader = FrameReader(sock)
        self.ready = False
        self.started = time.monotonic()

    @classmethod
    def start(cls, sup: Supervisor) -> _Zygote:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {"supervisor_pid": os.getpid(), "sock_fd": theirs.fileno(),
               "table_fd": sup.table.fd}
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "runtime.zygote", json.dumps(cfg)],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(), sup.table.fd),
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - the supervisor has one thread
                env=sup.actor_env)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        z = cls(mine, sup.children.add(popen.pid, popen))
        sup.sel.register(mine, selectors.EVENT_READ, "zygote")
        return z

    def overdue(self) -> bool:
        return not self.ready and time.monotonic() - self.started > ZYGOTE_START_S

    def fork(self, boot: dict[str, Any], status_fd: int, spec_fd: int) -> int:
        """Ask for a new actor process; its pid (it becomes our child)."""
        write_frame(self.sock, ["fork", boot], (status_fd, spec_fd))
        deadline = time.monotonic() + FORK_REPLY_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError("the zygote did not answer a fork request in time")
            poller = select.poll()  # not select(): descriptors past 1023 are fine
            poller.register(self.sock, select.POLLIN)
            poller.poll(max(1, int(left * 1000)))
            for msg in self.reader.feed():
                if msg[0] == "forked" and len(msg) == 2 and isinstance(msg[1], int):
                    return msg[1]
                if msg[0] == "failed":
                    raise OSError(f"the zygote could not fork: {msg[1:]}")
            if self.reader.eof:
                raise OSError("the zygote exited")

    def close(self) -> None:
        self.sock.close()
        self.proc.send_signal(signal.SIGKILL)


def actor_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment actor processes start with.

    ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose otherwise: by default
    OpenMP threads spin after every parallel region and take the core the
    other side of a call needs next.  Measured on 2 cores: a split LLaMA
    prefill (seed-bench, 128 tokens) took 145-940 ms with spinning OpenMP
    threads and ~63 ms with passive waiting; llama-3.2-1b 4.07 s -> 1.53 s.
    Plus the malloc settings of ``runtime.malloc``.
    """
    env = dict(environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return malloc.child_environment(env)


def _signal(proc: Proc, sig: int) -> None:
    proc.send_signal(sig)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="[rt supervisor] %(message)s")
    sup = Supervisor(cfg)
    try:
        sup.run()
    except BaseException:
        sup._kill_strays(spare=set())  # a bug: actors die with us, what they started too
        raise


if __name__ == "__main__":
    main()
