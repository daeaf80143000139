"""Shared fixtures: every test must leave no rt_* file and no child process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

SHM = "/dev/shm"


def rt_files() -> set[str]:
    out = set()
    for d in (SHM, tempfile.gettempdir()):
        try:
            out |= {os.path.join(d, n) for n in os.listdir(d) if n.startswith("rt_")}
        except OSError:
            pass
    return out


def _foreign(path: str) -> bool:
    """True for files of a live session driven by some unrelated process.

    Other programs on the machine (a second test run, a benchmark) may have
    sessions open; only sessions of this process or its children count.
    """
    sid = os.path.basename(path)[3:].split("_", 1)[0]
    try:
        with open(os.path.join(tempfile.gettempdir(), f"rt_{sid}", "driver.json")) as f:
            pid = json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return False
    if pid == os.getpid() or not psutil.pid_exists(pid):
        return False
    try:
        return os.getpid() not in [p.pid for p in psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves segments, private directories or processes behind."""
    before = rt_files()
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while True:
        left = {p for p in rt_files() - before if not _foreign(p)}
        kids = [p for p in me.children(recursive=True) if _alive(p)]
        if (not left and not kids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in kids:
        p.kill()
    assert not left, f"test left files behind: {sorted(left)}"
    assert not kids, f"test left processes behind: {[(p.pid, p.cmdline()) for p in kids]}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Thresholds that force each route: everything below 10 MiB through the ring,
# or (threshold 1 byte) every message through ZeroMQ.
ROUTES = {"shm": 10 * 1024 * 1024, "zmq": 1}


@pytest.fixture(params=sorted(ROUTES))
def route(request):
    """The name of the route calls should take; see ``threshold``."""
    return request.param


@pytest.fixture
def threshold(route):
    return ROUTES[route]


def _tmpfs(tmp_path, name: str, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / name
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    yield from _tmpfs(tmp_path, "tiny", "1m")


@pytest.fixture
def small_tmpfs(tmp_path):
    """32 MiB: room for pool slots, not for two rings at the default threshold."""
    yield from _tmpfs(tmp_path, "small", "32m")


@pytest.fixture
def shm_tmpfs(tmp_path):
    """A tmpfs of its own as ``shm_dir``: its usage counts nameless segments exactly."""
    yield from _tmpfs(tmp_path, "shm", "1g")


def tmpfs_used(path: str) -> int:
    """Bytes in use on the filesystem of ``path`` (nameless segments included)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def own_tmp(monkeypatch):
    """A directory of the test's own as TMPDIR, to use as ``shm_dir`` too.

    Every ``ActorSystem()`` collects stale sessions machine-wide: a test that makes a
    session stale on purpose (a killed supervisor, a planted owner record) and then
    inspects it loses it to any other test process starting a session meanwhile (the
    other shard of ``make test``: 4 failures in 15 runs under such load, a review
    measured).  Sessions in here are out of that reach.
    """
    d = tempfile.mkdtemp(prefix="rtg")  # short: ipc:// paths are limited to 107 bytes
    monkeypatch.setenv("TMPDIR", d)
    monkeypatch.setattr(tempfile, "tempdir", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test, whatever the run inherited.

    A shell starts a background job with SIGINT ignored, and Python then installs no
    handler for it: a test that sends itself SIGINT saw nothing happen (a CI run started
    in the background failed three such tests).
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
