"""ActorSystem: starts the supervisor, spawns and kills actors, shuts down.

Options are built once, in :class:`SystemOptions`, from the arguments and
the environment (``RT_SHM_THRESHOLD``, ``RT_SHM_DIR``); nothing else reads the
environment.  ``with ActorSystem() as system:`` guarantees that on exit no
actor process, no segment and no per-session file remains; a system that is
never shut down is cleaned up by a ``weakref.finalize`` at interpreter exit,
and one whose driver is killed is cleaned up by its supervisor.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import cloudpickle
import psutil

import runtime
from runtime import limits, malloc
from runtime.actor import ActorHandle, actor_options
from runtime.calls import ActorRef, ProcessContext, register_context, summarize, unregister_context
from runtime.errors import ActorDiedError, ActorRuntimeError, ActorStartError, ProtocolError
from runtime.session import Session, collect, remove_session_files
from runtime.spec import write_spec
from runtime.table import CAPACITY, FLAG_UNTRUSTED, ActorTable
from runtime.transport.channel import ring_capacity
from runtime.wire import FrameReader, write_frame

__all__ = ["ActorSystem", "SystemOptions"]

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 10 * 1024 * 1024
SUPERVISOR_START_S = 60.0


@dataclass(frozen=True)
class SystemOptions:
    """Validated options of one ``ActorSystem``."""

    shm_threshold: int = DEFAULT_THRESHOLD
    shm_dir: str = "/dev/shm"
    call_timeout: float | None = None
    zygote: bool = True

    @classmethod
    def build(cls, *, shm_threshold: int | None = None, shm_dir: str | None = None,
              call_timeout: float | None = None) -> SystemOptions:
        """Arguments first, then ``RT_SHM_THRESHOLD`` / ``RT_SHM_DIR``, then defaults.

        ``RT_ZYGOTE=0`` starts every actor as a fresh interpreter instead of a
        fork of the session's zygote (see ``runtime.zygote``).
        """
        if shm_threshold is None:
            env = os.environ.get("RT_SHM_THRESHOLD")
            try:
                shm_threshold = int(env) if env else DEFAULT_THRESHOLD
            except ValueError:
                raise ValueError(f"RT_SHM_THRESHOLD must be an integer, got {env!r}") from None
        if isinstance(shm_threshold, bool) or not isinstance(shm_threshold, int):
            raise TypeError(f"shm_threshold must be an int, got {shm_threshold!r}")
        if shm_threshold < 1:
            raise ValueError(f"shm_threshold must be >= 1 byte, got {shm_threshold}")
        total = psutil.virtual_memory().total
        if 2 * (ring_capacity(shm_threshold) + 4096) > total:
            raise ValueError(
                f"shm_threshold {shm_threshold} is too large for this machine: one channel "
                f"needs {2 * ring_capacity(shm_threshold)} bytes of shared memory and the "
                f"machine has {total}")
        shm_dir = shm_dir if shm_dir is not None else os.environ.get("RT_SHM_DIR") or "/dev/shm"
        if not os.path.isdir(shm_dir):
            raise ValueError(f"shm_dir {shm_dir!r} is not a directory")
        if call_timeout is not None:
            if isinstance(call_timeout, bool) or not isinstance(call_timeout, (int, float)) \
                    or not math.isfinite(call_timeout) or call_timeout <= 0:
                raise ValueError(f"call_timeout must be a positive, finite number of seconds "
                                 f"(None for no limit), got {call_timeout!r}")
            call_timeout = float(call_timeout)
        zygote = os.environ.get("RT_ZYGOTE", "1").strip().lower() not in ("0", "false", "no")
        return cls(shm_threshold, os.path.abspath(shm_dir), call_timeout, zygote)


class _SupervisorLink:
    """The driver's side of the links to the supervisor.

    Requests go over a Unix socket pair (a spawn request carries the actor's
    constructor memfd as a descriptor), replies come back on a pipe; both
    carry JSON frames (``wire.py``).
    """

    def __init__(self, session: Session, table_fd: int, *, zygote: bool) -> None:
        self.req, req_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.rep_r, rep_w = os.pipe()
        cfg = {"session": session.__dict__, "table_fd": table_fd, "driver_pid": os.getpid(),
               "req_fd": req_r.fileno(), "rep_fd": rep_w, "zygote": zygote}
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(runtime.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.supervisor", json.dumps(cfg)],
                stdin=subprocess.DEVNULL, pass_fds=(table_fd, req_r.fileno(), rep_w), env=env)
        finally:
            req_r.close()
            os.close(rep_w)
        self._reader = FrameReader(self.rep_r)
        self._waiters: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.dead = False
        self.on_death: Callable[[], None] | None = None  # called on the link's thread
        self._hello: Future = Future()
        self._thread = threading.Thread(target=self._read_loop, daemon=True,
                                        name="rt-supervisor-link")
        self._thread.start()
        try:
            self._hello.result(SUPERVISOR_START_S)
        except Exception as exc:
            self.close(kill=True)
            raise ActorRuntimeError(f"the supervisor did not start: {exc}") from exc

    def _read_loop(self) -> None:
        while True:
            try:
                msgs = self._reader.feed()
            except (OSError, ProtocolError):
                msgs, self._reader.eof = [], True
            for msg in msgs:
                if msg[0] == "hello":
                    self._hello.set_result(msg[1])
                    continue
                if msg[0] == "died":  # unasked: an actor died (its index is msg[2])
                    if self.on_death is not None:
                        try:
                            self.on_death()
                        except Exception:  # the link must outlive it: it reports deaths
                            log.exception("handling an actor's death failed")
                    continue
                fut = self._waiters.pop(msg[1], None)
                if fut is not None:
                    fut.set_result((msg[0], msg[2]))
            if self._reader.eof:
                self.dead = True
                err = ActorDiedError("the supervisor process died")
                if not self._hello.done():
                    self._hello.set_exception(err)
                for fut in list(self._waiters.values()):
                    fut.set_exception(err)
                self._waiters.clear()
                return

    def request(self, op: str, *args: Any, fds: tuple[int, ...] = ()) -> Future:
        fut: Future = Future()
        with self._lock:
            if self.dead:
                raise ActorDiedError("the supervisor process died")
            rid = next(self._ids)
            self._waiters[rid] = fut
            try:
                write_frame(self.req, [op, rid, *args], fds)
            except OSError as exc:
                self._waiters.pop(rid, None)
                raise ActorDiedError(f"the supervisor process died ({exc})") from exc
        return fut

    def close(self, *, kill: bool = False) -> None:
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.req.close()  # EOF tells a live supervisor the driver is done
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)
        try:
            os.close(self.rep_r)
        except OSError:
            pass


def _emergency_cleanup(link: _SupervisorLink, session: Session, owner_pid: int) -> None:
    """Finalizer for a system that was never shut down (no reference to it).

    Runs at interpreter exit too -- also in a child made by ``os.fork()``,
    which must leave the parent's session alone.
    """
    if os.getpid() != owner_pid:
        return
    link.close(kill=False)
    remove_session_files(session)


class ActorSystem:
    """Starts the supervisor; spawns, kills and cleans up actors.

    ``ActorSystem(shm_threshold=10 MiB, shm_dir="/dev/shm", call_timeout=None)``.
    Use as a context manager, or call :meth:`shutdown` (idempotent).
    """

    def __init__(self, *, shm_threshold: int | None = None, shm_dir: str | None = None,
                 call_timeout: float | None = None) -> None:
        self.options = SystemOptions.build(shm_threshold=shm_threshold, shm_dir=shm_dir,
                                           call_timeout=call_timeout)
        collect([self.options.shm_dir])
        malloc.tune_current_process()
        limits.raise_fd_limit()  # actors inherit it through the supervisor
        self.session = Session.new(shm_dir=self.options.shm_dir,
                                   threshold=self.options.shm_threshold,
                                   call_timeout=self.options.call_timeout)
        self._closed = False
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._counters: dict[str, itertools.count] = {}
        self._next_index = 0
        self._table = None
        table_fd = -1
        try:
            table_fd = ActorTable.create()
            self._link = _SupervisorLink(self.session, table_fd, zygote=self.options.zygote)
            # Sealed by the supervisor by now: this process maps it read-only.
            self._table = ActorTable(table_fd)
        except BaseException:
            if self._table is not None:
                self._table.close()
            elif table_fd >= 0:
                os.close(table_fd)
            if getattr(self, "_link", None) is not None:
                self._link.close(kill=True)
            remove_session_files(self.session)
            raise
        self._ctx = ProcessContext(self.session, self._table, owner_check=self._check_link)
        self._ctx.killer = self._kill_index
        self._ctx.owner = self
        self._link.on_death = self._ctx.sweep_soon
        register_context(self._ctx)
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _emergency_cleanup, self._link, self.session,
                                           self._pid)

    def _check_process(self) -> None:
        """Refuse to work in a child forked from the driver (the session is the parent's)."""
        if os.getpid() != self._pid:
            raise ActorRuntimeError(
                f"this ActorSystem belongs to process {self._pid}; process {os.getpid()} is a "
                f"fork of it and cannot use it. Start an ActorSystem in the child")

    def _check_link(self) -> None:
        if self._link.dead:
            raise ActorDiedError("the supervisor process died; this actor system is unusable "
                                 "(shut it down and start a new one)")

    # -- spawning -----------------------------------------------------------------
    def spawn(self, cls: type, *args: Any, name: str | None = None,
              max_restarts: int | None = None, untrusted: bool | None = None,
              **kwargs: Any) -> ActorHandle:
        """Start an actor of ``cls``; returns its handle once ``__init__`` has run there.

        Raises ``ActorStartError`` (with the remote traceback) if ``__init__``
        raised or the process died during start-up.
        """
        self._check_process()
        options = actor_options(cls)
        if max_restarts is None:
            max_restarts = options.max_restarts
        elif isinstance(max_restarts, bool) or not isinstance(max_restarts, int) \
                or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if untrusted is None:
            untrusted = options.untrusted
        with self._lock:
            if self._closed:
                raise ActorRuntimeError("the actor system is shut down")
            if name is None:
                counter = self._counters.setdefault(cls.__name__, itertools.count())
                while (name := f"{cls.__name__}-{next(counter)}") in self._names:
                    pass
            elif not isinstance(name, str) or not name:
                raise ValueError(f"name must be a non-empty str, got {name!r}")
            if name in self._names:
                raise ValueError(f"an actor named {name!r} already exists in this system")
            if self._next_index >= CAPACITY:
                # An index is never reused: a handle to a killed actor must not reach a
                # newcomer in its place (it names the index, nothing more).
                raise ActorRuntimeError(
                    f"an actor system spawns at most {CAPACITY} actors in its lifetime, "
                    f"killed and dead ones included; start another ActorSystem for more")
            self._names.add(name)
            index = self._next_index
            self._next_index += 1
        methods = frozenset(n for n in dir(cls)
                            if not n.startswith("__") and callable(getattr(cls, n, None)))
        ref = ActorRef(self.session.sid, index, name, cls.__qualname__, methods, bool(untrusted))
        flags = FLAG_UNTRUSTED if untrusted else 0
        boot = {"sys_path": _json_sys_path(), "cwd": os.getcwd(), "flags": flags}
        requested = False
        try:
            spec_fd = _spec_memfd(cls, args, kwargs)
            try:
                requested = True  # from here an interrupt may leave the request sent
                fut = self._link.request("spawn", index, name, max_restarts, flags, boot,
                                         fds=(spec_fd,))
            finally:
                os.close(spec_fd)  # the supervisor holds its own descriptor now
            status, detail = fut.result()
        except BaseException:
            # Arguments that cannot be sent, or an interrupt (Ctrl-C) while __init__ ran: no
            # handle will ever reach the caller, so the actor must not live on, holding its
            # memory and its name, until shutdown.  The kill is not waited for: the
            # interrupt goes on at once.
            if requested:  # a kill of an index the supervisor never heard of is answered
                with contextlib.suppress(Exception):
                    self._link.request("kill", index)
            with self._lock:
                self._names.discard(name)
            raise
        if status != "spawned":
            with self._lock:
                self._names.discard(name)  # nothing runs under it: free for a new spawn
            raise ActorStartError(detail)
        return ActorHandle(ref, self._ctx)

    def _kill_index(self, index: int) -> None:
        self._link.request("kill", index).result()

    # -- statistics -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What this process sent and received, per route and per channel.

        ``{"routes": {"shm"|"zmq": {"messages", "bytes"}}, "channels": [...]}``; the
        routes' totals include channels to actors that have died or restarted since, the
        channel list only the open ones;
        each channel entry has ``actor``, ``mode``, ``routes`` (with sent and
        received splits), ``encode_s``, ``decode_s``, ``copy_s`` (copies into and out
        of the transport; a ring record under 4 KiB is not timed), ``wait_s`` and,
        when the channel has a pool, ``pool``: this side's slots (``slots``,
        ``slot_bytes``, ``created``, ``dropped``, ``fallbacks`` to frames) and
        the peer's it maps (``peer_slots``, ``received``).
        """
        chans = [self._ctx.channel_stats(cc.ref.index) for cc in self._ctx.channels()]
        with self._ctx._lock:  # the channels let go: their counts stay in the totals
            gone = {r: dict(t) for r, t in self._ctx.gone.items()}
        return summarize([c for c in chans if c], gone)

    # -- shutdown ---------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every actor, wait for them, remove every file of the session."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        if os.getpid() != self._pid:
            # A forked child leaving a ``with ActorSystem()`` block: the session,
            # its supervisor and its channels are the parent's.  Only let go.
            self._ctx.close()
            return
        self._ctx.close()
        self._ctx.owner = None
        unregister_context(self._ctx)
        try:
            if not self._link.dead:
                self._link.request("shutdown").result(30)
        except Exception as exc:  # noqa: BLE001 - shut down regardless
            log.warning("supervisor did not shut down cleanly: %s", exc)
        self._link.close(kill=True)
        remove_session_files(self.session)
        self._table.close()

    def __enter__(self) -> ActorSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "running"
        return f"<ActorSystem {self.session.sid} {state}>"


def _spec_memfd(cls: type, args: tuple, kwargs: dict) -> int:
    """The constructor call in a sealed memfd (see ``runtime.spec``).

    Classes of modules an actor process could not import (and ``__main__``)
    travel by value.
    """
    module = sys.modules.get(cls.__module__)
    by_value = (module is not None and cls.__module__ != "__main__"
                and not _importable(module))
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return write_spec((cls, args, kwargs))
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _importable(module: Any) -> bool:
    """Whether an actor process, importing by name on this ``sys.path``, gets ``module``.

    Asked of the import system's finders directly, not of ``importlib.util.find_spec``,
    which answers from ``sys.modules``: a module loaded from a file path (pytest's
    ``--import-mode=importlib``, ``spec_from_file_location``) looked importable, and the
    actor failed with ``ModuleNotFoundError``.  The file found must be the module's own, or
    the actor would run another module of the same name.
    """
    own = getattr(module, "__file__", None)
    if not own:
        return False
    spec = None
    path = None
    parts = module.__name__.split(".")
    for i in range(len(parts)):
        if i and path is None:  # the parent is no package
            return False
        name = ".".join(parts[:i + 1])
        spec = _find_spec(name, path)
        if spec is None:
            return False
        # The next part is looked up where the import will look: the imported package's
        # own ``__path__``, which its ``__init__`` may have extended (pkgutil.extend_path).
        parent = sys.modules.get(name)
        path = getattr(parent, "__path__", None)
        path = spec.submodule_search_locations if path is None else list(path)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return False
    try:
        return os.path.samefile(spec.origin, own)
    except (OSError, TypeError, ValueError):  # not a file of its own: a zip's member, say
        return isinstance(spec.origin, str) and \
            os.path.normpath(spec.origin) == os.path.normpath(own)


def _find_spec(name: str, path: Any) -> Any:
    """``name``'s spec from the finders on ``sys.meta_path``, or None if none finds it.

    As ``import`` would find it, without looking at ``sys.modules``.
    """
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except Exception:  # noqa: BLE001 - a third-party finder's failure: not found there
            continue
        if spec is not None:
            return spec
    return None


def _json_sys_path() -> list[str]:
    """``sys.path`` as strings, for the actor's boot message (JSON).

    ``sys.path.append(Path(...))`` is a common idiom; importlib skips such entries and a
    ``Path`` would fail the JSON encoding of every spawn, so path-like entries are sent as
    the paths they name, bytes decoded as file names, anything else left out.
    """
    out = []
    for entry in sys.path:
        if isinstance(entry, (str, bytes, os.PathLike)):
            try:
                out.append(os.fsdecode(os.fspath(entry)))
            except (TypeError, UnicodeDecodeError):
                continue
    return out
