"""Processes an actor starts go when the actor dies and when the system ends.

A process an actor starts (``subprocess.Popen``, a helper server) is re-parented to the
supervisor, a child subreaper, when the actor dies, and to init when the supervisor exits.
It used to run on for ever: the conftest's leak check could not see it (no longer a
descendant of the test process).  The supervisor now kills such orphans, and what they
started, at every death, at shutdown and when the driver is gone (``_kill_strays``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from runtime import ActorDiedError, ActorSystem
from tests.faults.test_faults import gone, wait_gone
from tests.integration.actors_lib import Spawner


def _kill_all(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(60)
def test_processes_started_by_actors_go_at_shutdown():
    helpers = []
    try:
        with ActorSystem() as system:
            a, b = system.spawn(Spawner), system.spawn(Spawner)
            helpers += [*a.start_helper(), *b.start_helper()]
            assert not any(gone(p) for p in helpers)
        assert wait_gone(helpers, 2), "processes started by actors outlived the system"
    finally:
        _kill_all(helpers)


@pytest.mark.timeout(60)
def test_a_dead_actors_processes_go_at_its_death_and_the_others_stay():
    helpers = []
    try:
        with ActorSystem() as system:
            a, b = system.spawn(Spawner), system.spawn(Spawner)
            kept, doomed = a.start_helper(), b.start_helper()
            helpers += [*kept, *doomed]
            with pytest.raises(ActorDiedError):
                b.die()
            assert wait_gone(doomed, 2), "a dead actor's processes ran on"
            # b restarted (max_restarts=1): it and a's processes are untouched.
            helpers += b.start_helper()
            assert not any(gone(p) for p in kept)
            helpers += a.start_helper()
    finally:
        _kill_all(helpers)


DRIVER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {path!r}
    from runtime import ActorSystem
    from tests.integration.actors_lib import Spawner
    system = ActorSystem()
    print(*system.spawn(Spawner).start_helper(), flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
def test_processes_started_by_actors_go_when_the_driver_dies(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(path=[os.getcwd(), *sys.path]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    helpers = []
    try:
        helpers = [int(p) for p in proc.stdout.readline().split()]
        assert len(helpers) == 2
        proc.kill()
        proc.wait()
        assert wait_gone(helpers, 2.5), "processes started by actors outlived the driver"
    finally:
        proc.kill()
        proc.wait()
        _kill_all(helpers)
