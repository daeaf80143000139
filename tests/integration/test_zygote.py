"""Actors forked by the session's zygote, and the fall-back to fresh interpreters."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import psutil
import pytest
import torch

from runtime import ActorDiedError, ActorSystem
from tests.integration.actors_lib import Echo


def _cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline())


def test_actors_are_forked_by_the_zygote_and_parented_by_the_supervisor():
    with ActorSystem() as system:
        e = system.spawn(Echo)
        sup = system._link.proc.pid
        assert psutil.Process(e.pid).ppid() == sup  # re-parented: the supervisor reaps it
        assert "runtime.zygote" in _cmdline(e.pid)  # a fork, not a fresh interpreter
        assert torch.equal(e.echo(torch.arange(5)), torch.arange(5))
        # Two actors are two processes with their own state.
        f = system.spawn(Echo, "other")
        assert f.pid != e.pid
        e.echo(1)
        assert e.count() == 2 and f.count() == 0


def test_restart_after_kill_9_comes_from_the_zygote():
    with ActorSystem() as system:
        e = system.spawn(Echo, max_restarts=1)
        old = e.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert e.echo(3) == 3
                break
            except ActorDiedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert e.pid != old and "runtime.zygote" in _cmdline(e.pid)


def test_rt_zygote_0_starts_fresh_interpreters(monkeypatch):
    monkeypatch.setenv("RT_ZYGOTE", "0")
    with ActorSystem() as system:
        e = system.spawn(Echo)
        assert "runtime.worker" in _cmdline(e.pid)
        assert e.echo(2) == 2


def test_a_dead_zygote_means_fresh_interpreters(caplog):
    with ActorSystem() as system:
        e = system.spawn(Echo)
        zygotes = [p for p in psutil.Process(system._link.proc.pid).children()
                   if "runtime.zygote" in " ".join(p.cmdline()) and p.pid != e.pid]
        assert len(zygotes) == 1
        zygotes[0].kill()
        zygotes[0].wait(5)
        f = system.spawn(Echo)
        assert "runtime.worker" in _cmdline(f.pid)
        assert f.echo(1) == 1 and e.echo(2) == 2


def test_actors_forked_by_the_zygote_die_with_the_supervisor():
    system = ActorSystem()
    try:
        pids = [system.spawn(Echo).pid for _ in range(2)]
        os.kill(system._link.proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids], timeout=5)
        assert not alive
    finally:
        system.shutdown()


def test_many_spawns_and_kills_leave_no_process():
    with ActorSystem() as system:
        handles = [system.spawn(Echo) for _ in range(8)]
        pids = {h.pid for h in handles}
        for h in handles[::2]:
            h.kill()
        for h in handles[1::2]:
            os.kill(h.pid, signal.SIGKILL)
        sup = psutil.Process(system._link.proc.pid)
        deadline = time.monotonic() + 5
        while [p for p in sup.children() if p.pid in pids] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in sup.children() if p.pid in pids], "dead actors were not reaped"


KILL_ZYGOTE_AT_FORK = textwrap.dedent("""
    import os, signal, sys
    if os.environ.get("RT_TEST_KILL_ZYGOTE_AT_FORK") and "runtime.zygote" in sys.orig_argv:
        # The zygote dies (as by kill -9) right after forking the intermediate process:
        # the intermediate still forks the actor, which is re-parented to the supervisor.
        os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGKILL))
""")


@pytest.mark.timeout(60)
def test_a_zygote_killed_mid_fork_leaves_no_twin_serving(tmp_path, monkeypatch):
    """Found by a fault-injection review: the twin the dead zygote's intermediate forked and
    the fresh interpreter the supervisor started in its place both ran; the twin bound the
    control socket first and served every call, unseen and unkillable by the supervisor.
    An actor now serves only once the supervisor's table names its pid."""
    (tmp_path / "sitecustomize.py").write_text(KILL_ZYGOTE_AT_FORK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RT_TEST_KILL_ZYGOTE_AT_FORK", "1")
    with ActorSystem() as system:
        e = system.spawn(Echo)
        assert e.pid_() == e.pid  # the process the supervisor knows serves the calls
        sup = psutil.Process(system._link.proc.pid)
        deadline = time.monotonic() + 10
        while [p.pid for p in sup.children() if p.status() != psutil.STATUS_ZOMBIE] \
                != [e.pid] and time.monotonic() < deadline:
            time.sleep(0.05)  # the twin exits (70) as soon as the table names another pid
        assert [p.pid for p in sup.children()] == [e.pid]
        f = e.sleep.remote(30)
        time.sleep(0.3)
        os.kill(e.pid, signal.SIGKILL)
        with pytest.raises(ActorDiedError):
            f.result(timeout=5)


def test_named_by_table_waits_for_its_own_entry():
    """The gate's other ways out: the entry is DEAD for this incarnation (killed while
    starting), or nothing names this process in time -- both mean: do not serve."""
    from runtime.table import ALIVE, DEAD, STARTING, Entry
    from runtime.worker import named_by_table

    class Table:
        def __init__(self, *entries):
            self.entries = list(entries)

        def read(self, index):
            return self.entries.pop(0) if len(self.entries) > 1 else self.entries[0]

    me = os.getpid()
    old = Entry(ALIVE, 1, me + 1, 0, 0, 0)  # the previous incarnation, still in the table
    assert named_by_table(Table(old, Entry(STARTING, 2, me, 0, 0, 0)), 0, 2)
    assert not named_by_table(Table(old, Entry(STARTING, 2, me + 1, 0, 0, 0)), 0, 2)
    assert not named_by_table(Table(old, Entry(DEAD, 2, 0, 0, 0, 0)), 0, 2)
    t0 = time.monotonic()
    assert not named_by_table(Table(old), 0, 2, wait_s=0.05)
    assert time.monotonic() - t0 < 1


def test_a_path_object_in_sys_path_does_not_fail_spawn():
    """Found in review: the boot message sent ``sys.path`` as JSON, and one ``Path`` entry
    (``sys.path.append(Path(...))``) failed every spawn with a TypeError."""
    import pathlib
    import sys

    extra = pathlib.Path("/nonexistent-sys-path-entry")
    sys.path.append(extra)
    try:
        with ActorSystem() as system:
            h = system.spawn(Echo)
            assert h.add(1, 2) == 3
    finally:
        sys.path.remove(extra)
