"""A call cycle between actors fails at once instead of waiting for ever.

Found by a fault-injection review: A calls B, B calls back A; A serves one call at a time,
so the inner call could never be served and, without ``call_timeout``, the outer one never
completed.  An actor calling itself directly already failed at once; every call now carries
the actors whose calls led to it.
"""

from __future__ import annotations

import pytest

from runtime import ActorSystem, RemoteError
from tests.integration.actors_lib import Peer


@pytest.mark.timeout(60)
def test_a_call_cycle_between_actors_fails_instead_of_hanging():
    with ActorSystem() as system:
        a = system.spawn(Peer, name="a")
        b = system.spawn(Peer, a, name="b")
        c = system.spawn(Peer, b, name="c")
        a.set_other(b)
        assert b.ask_other() == a.own_pid()  # b -> a: no cycle
        with pytest.raises(RemoteError, match="call cycle: actor 'a' is busy"):
            a.ask_other_to_ask_back.remote().result(timeout=15)  # a -> b -> a
        with pytest.raises(RemoteError, match="call cycle: actor 'b' is busy"):
            c.ask_other_to_ask_back_in_turn()  # c -> b -> a -> b
        assert c.ask_other() == b.own_pid()  # nothing stuck after the refusals
        assert a.ask_other() == b.own_pid()
