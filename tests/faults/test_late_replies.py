"""Replies to calls that timed out are still read, and dropped, as they come.

Found by a fault-injection review: a caller whose calls timed out and that then went quiet
stopped reading its channel, the actor's late replies filled it (ring, pool slots, ZeroMQ),
and the actor stayed stuck in a send that only that caller could unblock: every other
caller's calls to it timed out, until the quiet one called again.
"""

from __future__ import annotations

import time

import pytest

from runtime import ActorSystem, CallTimeoutError
from tests.integration.actors_lib import Caller, Echo


@pytest.mark.timeout(90)
def test_a_caller_whose_calls_timed_out_does_not_wedge_the_actor_for_others():
    with ActorSystem(shm_threshold=64 << 10, call_timeout=1.0) as system:
        echo = system.spawn(Echo)
        caller = system.spawn(Caller, echo)
        assert caller.relay(1) == 1
        busy = echo.sleep.remote(1.2)
        futs = [echo.ones.remote(1 << 16) for _ in range(300)]  # 256 KiB replies: the pool
        for f in [busy, *futs]:
            with pytest.raises(CallTimeoutError):
                f.result(10)
        time.sleep(1.5)  # the echo actor has long computed every reply; this caller is quiet
        assert caller.relay(2) == 2  # another caller of the echo actor is served
        assert echo.add(2, 3) == 5  # and so is this one, on the same channel
