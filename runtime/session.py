"""A session's names, owner records and garbage collection of dead sessions.

A session is one ``ActorSystem``: an id ``sid``, segments named
``rt_<sid>_<creator pid>_...`` in ``shm_dir`` and one private 0700 directory
``<tmp>/rt_<sid>`` for ZeroMQ sockets, doorbells and the owner records.  The
owners are the driver and the supervisor, each recorded by pid *and* process
start time so that a recycled pid is not mistaken for a live owner.  A
session is stale when either owner is gone; :func:`collect` removes stale
sessions' files (run by ``ActorSystem`` at start and by ``python -m runtime gc``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass

import psutil

__all__ = ["Session", "collect", "process_identity", "remove_session_files"]

log = logging.getLogger(__name__)
PREFIX = "rt_"
_YOUNG_S = 30.0  # a session this young may still be writing its owner records


@dataclass(frozen=True)
class Session:
    """Plain data describing a session; travels to every process of it."""

    sid: str
    shm_dir: str
    private_dir: str
    threshold: int
    call_timeout: float | None

    @classmethod
    def new(cls, *, shm_dir: str, threshold: int, call_timeout: float | None) -> Session:
        sid = secrets.token_hex(6)
        private_dir = os.path.join(tempfile.gettempdir(), f"{PREFIX}{sid}")
        os.mkdir(private_dir, 0o700)
        session = cls(sid, os.path.abspath(shm_dir), private_dir, threshold, call_timeout)
        session.record_owner("driver", os.getpid())
        return session

    def segment_name(self, tag: str) -> str:
        """A name for a segment created by this process."""
        return f"{PREFIX}{self.sid}_{os.getpid()}_{tag}"

    def private_path(self, name: str) -> str:
        return os.path.join(self.private_dir, name)

    def record_owner(self, role: str, pid: int) -> None:
        path = self.private_path(f"{role}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": pid, "start": process_identity(pid)}, f)
        os.replace(tmp, path)


def process_identity(pid: int) -> float | None:
    """The start time of process ``pid`` (None if it does not exist)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def _owner_alive(private_dir: str, role: str) -> bool | None:
    """True/False for a recorded owner, None when there is no record."""
    try:
        with open(os.path.join(private_dir, f"{role}.json")) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
    start = process_identity(int(rec.get("pid", -1)))
    if start is None:
        return False
    try:
        proc = psutil.Process(int(rec["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.Error, KeyError, ValueError):
        return False
    return abs(start - float(rec.get("start") or 0.0)) < 0.5


def _session_state(sid: str) -> tuple[bool, str]:
    """(stale, reason) for session ``sid``."""
    private_dir = os.path.join(tempfile.gettempdir(), f"{PREFIX}{sid}")
    if not os.path.isdir(private_dir):
        return True, "no private directory"
    driver = _owner_alive(private_dir, "driver")
    supervisor = _owner_alive(private_dir, "supervisor")
    if driver is False:
        return True, "driver process gone"
    if supervisor is False:
        return True, "supervisor process gone"
    if driver is None or supervisor is None:
        try:
            age = time.time() - os.stat(private_dir).st_mtime
        except FileNotFoundError:
            return True, "no private directory"
        if age > _YOUNG_S:
            return True, "owner records missing"
    return False, "alive"


def _sid_of(name: str) -> str | None:
    if not name.startswith(PREFIX):
        return None
    sid = name[len(PREFIX):].split("_", 1)[0]
    return sid if len(sid) == 12 and all(c in "0123456789abcdef" for c in sid) else None


def collect(shm_dirs: list[str], *, dry_run: bool = False,
            keep: str | None = None) -> list[tuple[str, str]]:
    """Remove files of stale sessions; returns ``[(path, reason)]`` (what would go).

    ``keep`` is a session id never collected (the caller's own).
    """
    found: dict[str, list[str]] = {}
    for directory in [*shm_dirs, tempfile.gettempdir()]:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            sid = _sid_of(name)
            if sid is not None and sid != keep:
                found.setdefault(sid, []).append(os.path.join(directory, name))
    removed = []
    for sid, paths in sorted(found.items()):
        stale, reason = _session_state(sid)
        if not stale:
            continue
        for path in sorted(set(paths)):
            removed.append((path, reason))
            if not dry_run:
                _remove(path)
    return removed


def remove_session_files(session: Session, *, pid: int | None = None) -> None:
    """Remove a session's files: all of them, or only those process ``pid`` made.

    Without ``pid`` the private directory goes too.
    """
    prefix = f"{PREFIX}{session.sid}_" + (f"{pid}_" if pid is not None else "")
    dirs = [session.shm_dir] + ([session.private_dir] if pid is not None else [])
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix):
                _remove(os.path.join(directory, name))
    if pid is None:
        _remove(session.private_dir)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
