"""The actor table's lookups: an actor's pid found only while it is starting or alive."""

from __future__ import annotations

import pytest

from runtime.table import ALIVE, CAPACITY, DEAD, STARTING, ActorTable


@pytest.fixture
def table():
    t = ActorTable(ActorTable.create(), writable=True)
    yield t
    t.close()


def test_find_pid_skips_dead_entries_that_share_the_pid(table):
    table.write(3, state=DEAD, pid=4242)  # an earlier process whose pid came back
    table.write(CAPACITY - 1, state=ALIVE, pid=4242, incarnation=2)
    found = table.find_pid(4242)
    assert found is not None and found[0] == CAPACITY - 1 and found[1].incarnation == 2


@pytest.mark.parametrize("index", [0, 17, CAPACITY - 1])
def test_find_pid_finds_a_starting_actor_anywhere(table, index):
    table.write(index, state=STARTING, pid=777)
    assert table.find_pid(777)[0] == index
    table.write(index, state=DEAD)
    assert table.find_pid(777) is None
    assert table.find_pid(0) is None  # the unused entries' zero pid is no actor's
