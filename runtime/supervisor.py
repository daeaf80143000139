"""The supervisor: parent of every actor process of a session.

Started by ``ActorSystem`` as ``python -m runtime.supervisor``: a child of the
driver, never a fork of it, and free of torch so it starts fast and stays
small.  It talks to the driver over two pipes (length-prefixed pickles; see
``wire.py``) and to nobody else; callers learn of deaths from the shared
actor table (``table.py``), which only the supervisor writes.

Duties:

* spawn actors (``python -m runtime.worker``) with ``PR_SET_PDEATHSIG`` so
  they die with the supervisor, and report start-up success or the
  ``__init__`` traceback;
* notice a death at once (SIGCHLD wakes the loop; ``waitpid`` reaps), mark it
  in the table -- every caller blocked on that actor fails within its next
  100 ms wait slice -- and remove the files the dead process made;
* restart an actor with its original arguments while ``max_restarts`` allows;
* when the driver dies (its request pipe reaches EOF), kill every actor,
  remove every file of the session and exit.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from runtime import malloc
from runtime import session as sessions
from runtime.table import ALIVE, DEAD, RESTARTING, STARTING, ActorTable, describe_exit
from runtime.transport.segment import unlink_quietly
from runtime.wire import FrameReader, write_frame

log = logging.getLogger("runtime.supervisor")
PR_SET_PDEATHSIG = 1
TERM_GRACE_S = 1.0


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGKILL when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class _Actor:
    index: int
    name: str
    spec: bytes
    max_restarts: int
    flags: int
    boot: dict[str, Any]
    incarnation: int = 0
    restarts: int = 0
    proc: subprocess.Popen | None = None
    status: FrameReader | None = None
    pending: list[int] = field(default_factory=list)  # request ids awaiting start
    kill_requests: list[int] = field(default_factory=list)
    killed: bool = False
    ready: bool = False


class Supervisor:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.session = sessions.Session(**cfg["session"])
        self.table = ActorTable(cfg["table_fd"])
        self.driver_pid = cfg["driver_pid"]
        self.req = FrameReader(cfg["req_fd"])
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

    # -- main loop -------------------------------------------------------------
    def run(self) -> None:
        self.session.record_owner("supervisor", os.getpid())
        write_frame(self.rep_fd, ("hello", os.getpid()))
        while not self.stopping:
            for key, _ in self.sel.select(timeout=0.2):
                if key.data == "req":
                    for msg in self.req.feed():
                        self._handle(msg)
                    if self.req.eof:
                        self._exit_all("driver gone")
                        return
                elif key.data == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self._status(key.data)
            self._reap()
            if os.getppid() != self.driver_pid:
                self._exit_all("driver gone")
                return

    def _handle(self, msg: tuple) -> None:
        op, rid = msg[0], msg[1]
        if op == "spawn":
            _, _, index, name, spec, max_restarts, flags, boot = msg
            actor = _Actor(index, name, spec, max_restarts, flags, boot)
            actor.pending.append(rid)
            self.actors[index] = actor
            self._start(actor)
        elif op == "kill":
            actor = self.actors.get(msg[2])
            if actor is None or actor.proc is None:
                write_frame(self.rep_fd, ("killed", rid, None))
                return
            actor.killed = True
            actor.kill_requests.append(rid)
            _signal(actor.proc, signal.SIGKILL)
        elif op == "shutdown":
            self._stop_all()
            write_frame(self.rep_fd, ("bye", rid, None))
            self.stopping = True
        else:
            write_frame(self.rep_fd, ("error", rid, f"unknown request {op!r}"))

    # -- starting --------------------------------------------------------------
    def _start(self, actor: _Actor) -> None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        spec_fd = os.memfd_create("rt_spec", 0)
        os.write(spec_fd, actor.spec)
        boot = dict(actor.boot, session=self.session.__dict__, index=actor.index,
                    name=actor.name, incarnation=actor.incarnation, table_fd=self.table.fd,
                    status_fd=status_w, spec_fd=spec_fd, supervisor_pid=os.getpid())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.worker", json.dumps(boot)],
                stdin=subprocess.DEVNULL, pass_fds=(self.table.fd, status_w, spec_fd),
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - the supervisor has one thread
                cwd=actor.boot.get("cwd") or None, env=self.actor_env)
        except OSError as exc:
            os.close(status_r)
            self._start_failed(actor, f"cannot start the actor process: {exc}")
            return
        finally:
            os.close(status_w)
            os.close(spec_fd)
        actor.proc = proc
        actor.ready = False
        os.set_blocking(status_r, False)
        actor.status = FrameReader(status_r)
        self.sel.register(status_r, selectors.EVENT_READ, actor)
        self.table.write(actor.index, state=STARTING, incarnation=actor.incarnation,
                         pid=proc.pid, flags=actor.flags, restarts=actor.restarts)

    def _status(self, actor: _Actor) -> None:
        reader = actor.status
        for msg in reader.feed():
            if msg[0] == "ready":
                actor.ready = True
                self.table.write(actor.index, state=ALIVE)
                for rid in actor.pending:
                    write_frame(self.rep_fd, ("spawned", rid, actor.proc.pid))
                actor.pending.clear()
            elif msg[0] == "init_failed":
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
            write_frame(self.rep_fd, ("start_failed", rid, text))
        actor.pending.clear()

    # -- deaths ----------------------------------------------------------------
    def _reap(self) -> None:
        for actor in list(self.actors.values()):
            proc = actor.proc
            if proc is None or proc.poll() is None:
                continue
            if actor.status is not None:  # collect a last status message
                for msg in actor.status.feed():
                    if msg[0] == "init_failed":
                        actor.init_error = msg[1]
                self._close_status(actor)
            self._died(actor, proc.returncode)

    def _died(self, actor: _Actor, code: int) -> None:
        pid = actor.proc.pid
        actor.proc = None
        # Callers learn of the death from the table first, then the files go.
        self.table.write(actor.index, state=RESTARTING if self._will_restart(actor) else DEAD,
                         exit=code)
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
                write_frame(self.rep_fd, ("start_failed", rid, text))
            actor.pending.clear()
            return
        if not self._will_restart(actor):
            self.table.write(actor.index, state=DEAD, exit=code)
            for rid in actor.kill_requests:
                write_frame(self.rep_fd, ("killed", rid, None))
            actor.kill_requests.clear()
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

    def _exit_all(self, why: str) -> None:
        for a in self.actors.values():
            if a.proc is not None:
                _signal(a.proc, signal.SIGKILL)
        for a in self.actors.values():
            if a.proc is not None:
                a.proc.wait()
        sessions.remove_session_files(self.session)
        log.debug("supervisor exits: %s", why)
        os._exit(0)


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


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="[rt supervisor] %(message)s")
    Supervisor(cfg).run()


if __name__ == "__main__":
    main()
