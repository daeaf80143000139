"""A spawn that does not finish leaves no actor running and no name taken.

Found by a fault-injection review: Ctrl-C while ``spawn`` waited for a slow ``__init__``
left the actor running, with its name, until shutdown -- holding its memory (a model, GPU
memory) with no handle anywhere to kill it.
"""

from __future__ import annotations

import signal
import time

import pytest

from runtime import ActorStartError, ActorSystem
from runtime.table import ALIVE
from tests.integration.actors_lib import FailingInit, SlowStart


@pytest.mark.timeout(60)
def test_ctrl_c_during_spawn_leaves_no_actor_running():
    def handler(*_):
        raise KeyboardInterrupt

    with ActorSystem() as system:
        system.spawn(SlowStart, 0.0)  # the zygote is ready: the next spawn forks at once
        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                system.spawn(SlowStart, 1.0, name="svc")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        time.sleep(1.5)  # its __init__ would be over by now
        entry = system._table.read(1)
        assert entry.state != ALIVE, f"the interrupted spawn's actor is alive: {entry}"
        again = system.spawn(SlowStart, 0.0, name="svc")  # the name is free
        assert again.own_pid() > 0


def test_a_failed_start_frees_its_name():
    with ActorSystem() as system:
        for _ in range(2):
            with pytest.raises(ActorStartError):
                system.spawn(FailingInit, "no", name="flaky")
        with pytest.raises(TypeError):
            system.spawn(SlowStart, seconds=(x for x in ()), name="svc")  # cannot be sent
        assert system.spawn(SlowStart, 0.0, name="svc").own_pid() > 0
