"""Wait notes (runtime/waits.py): the ring's note slot, the channel's, and the rule.

The end-to-end cycles are in tests/faults/test_call_cycles.py; here each layer alone."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from runtime import waits
from runtime.errors import TransportError
from runtime.transport import channel as channel_module
from runtime.transport.ring import MIN_CAPACITY, NOTE_MAX, ShmRing
from runtime.waits import BLOCKED, WAITING, Link, WaitNote, cycle_through, upstream
from tests.unit.test_transport import make_pair


@pytest.fixture
def ring():
    r = ShmRing.create("/dev/shm", f"rt_test{uuid.uuid4().hex[:8]}", MIN_CAPACITY)
    yield r
    r.close()
    r.unlink()


# -- the ring's note slot --------------------------------------------------------------------

def test_a_note_is_state_the_latest_replaces_the_last(ring):
    assert ring.read_note() is None
    ring.write_note(b"x" * NOTE_MAX)
    assert ring.read_note() == b"x" * NOTE_MAX
    ring.write_note(b"short")
    assert ring.read_note() == b"short"
    ring.write_note(b"")
    assert ring.read_note() is None
    with pytest.raises(ValueError, match="at most"):
        ring.write_note(b"y" * (NOTE_MAX + 1))
    assert ring.read_note() is None  # a refused note leaves nothing half written


def test_a_note_in_mid_write_or_with_a_hostile_length_reads_as_none(ring):
    ring.write_note(b"note")
    seq = ring._note_seq.value
    ring._note_seq.value = seq | 1  # a writer stopped in the middle (or lying)
    assert ring.read_note() is None
    ring._note_seq.value = seq + 2
    assert ring.read_note() == b"note"
    ring._note_len.value = NOTE_MAX + 1  # claims bytes past the slot
    assert ring.read_note() is None


def test_a_reader_never_sees_a_torn_note(ring):
    """A writer thread alternates two notes of different lengths as fast as it can: every
    read is one of them whole, or None (the writer kept it busy).

    Reads go on until one has seen a note whole (up to 10 s): a thread switch tends to come
    in the middle of a write, the writer's whole loop, so 20,000 reads in a row could all
    see it busy (once in the whole suite's run: ``make test`` at d75ce1d)."""
    notes = (b"A" * 700, b"B" * 40)
    stop = threading.Event()

    def write():
        i = 0
        while not stop.is_set():
            ring.write_note(notes[i & 1])
            i += 1

    t = threading.Thread(target=write)
    t.start()
    seen = set()
    reads, deadline = 0, time.monotonic() + 10
    try:
        while reads < 20000 or (not (seen - {None}) and time.monotonic() < deadline):
            seen.add(ring.read_note())
            reads += 1
    finally:
        stop.set()
        t.join()
    assert seen <= {None, *notes} and seen & set(notes)


# -- the channel's -----------------------------------------------------------------------------

def test_each_end_reads_the_note_the_other_left(private_dir, threshold):
    caller, callee, bell = make_pair(private_dir, threshold)
    try:
        assert caller.set_note(b"caller waits") and callee.peer_note() == b"caller waits"
        assert callee.set_note(b"callee waits") and caller.peer_note() == b"callee waits"
        assert caller.set_note(b"") and callee.peer_note() is None
    finally:
        caller.close()
        callee.close()
        bell.close()
    assert caller.set_note(b"late") is False and callee.peer_note() is None  # closed


def test_a_channel_without_rings_takes_no_note(private_dir, threshold, monkeypatch):
    def full(*args, **kwargs):
        raise TransportError("no space left in /dev/shm (simulated)")

    monkeypatch.setattr(channel_module.ShmRing, "create_anonymous", full)
    caller, callee, bell = make_pair(private_dir, threshold)  # falls back to ZeroMQ alone
    try:
        assert caller.tx is None
        assert caller.set_note(b"waits") is False and callee.peer_note() is None
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- the note and the rule ---------------------------------------------------------------------

def test_a_note_round_trips_and_keeps_a_bounded_name_and_links():
    note = WaitNote(BLOCKED, 7, 123456789, 3, "b", (Link(1, 3, 9, 10, 11), Link(2, 1, 4, 5, 6)))
    assert waits.decode(waits.encode(note)) == note
    many = tuple(Link(i, i + 1, 2**32 - 1, 2**63, 2**64 - 1) for i in range(100))
    long = WaitNote(WAITING, 1, 5, 2, "n" * 500, many)
    back = waits.decode(waits.encode(long))
    assert back.name == "n" * waits.MAX_NAME and back.links == many[:waits.MAX_LINKS]
    assert len(waits.encode(long)) <= NOTE_MAX


@pytest.mark.parametrize("raw", [
    None, b"", b"\x01" * 10,
    waits.encode(WaitNote(BLOCKED, 1, 1, 1, "b"))[:-1],  # cut short
    waits.encode(WaitNote(BLOCKED, 1, 1, 1)) + b"x",  # trailing bytes
    waits._HEAD.pack(1, BLOCKED, 1, 1, 1, 0, 0),  # another version
    waits._HEAD.pack(2, 9, 1, 1, 1, 0, 0),  # an unknown kind
    waits._HEAD.pack(2, BLOCKED, 1, 1, -1, 0, 0),  # no actor
    waits._HEAD.pack(2, BLOCKED, 1, 1, 1, 201, 0) + b"n" * 201,  # a name too long
    waits._HEAD.pack(2, BLOCKED, 1, 1, 1, 0, 1),  # a link announced, none there
    waits._HEAD.pack(2, BLOCKED, 1, 1, 1, 0, 25) + waits._LINK.pack(1, 2, 3, 4, 5) * 25,
    waits._HEAD.pack(2, BLOCKED, 1, 1, 1, 0, 1) + waits._LINK.pack(-1, 2, 3, 4, 5),
])
def test_a_malformed_note_is_no_note(raw):
    assert waits.decode(raw) is None


def test_call_ids_compare_across_the_wrap():
    assert waits.unanswered(1, 0) and not waits.unanswered(0, 0)
    assert not waits.unanswered(3, 3) and not waits.unanswered(2, 3)
    assert waits.unanswered(0, 2**32 - 1) and waits.unanswered(5, 2**32 - 2)  # after the wrap
    assert not waits.unanswered(2**32 - 1, 3)  # before it: long answered


def _mine(started=100):
    return WaitNote(WAITING, 5, started, 0, "a")  # actor 0 waits on its call 5 to actor 1


def _context(me=0):
    """Actor ``me``'s context over a table where actors 0 to 2 live as pid 4242."""
    from types import SimpleNamespace

    from runtime.calls import ProcessContext
    from runtime.table import ALIVE, Entry

    ctx = ProcessContext.__new__(ProcessContext)
    ctx.table = SimpleNamespace(read=lambda i: Entry(ALIVE, 0, 4242, 0, 0, 0) if i < 3
                                else Entry(0, 0, 0, 0, 0, 0))
    ctx.self_index, ctx.self_name, ctx._channels = me, "ab"[me] if me < 2 else "c", {}
    return ctx


def _two_actor_verdict(note, answered, *, me=0, mine=None, noted=True):
    """What ``look`` concludes of a caller's ``note`` during ``mine`` on a call to the other."""
    from runtime.calls import ActorRef

    ctx = _context(me)
    ctx.inbound_notes = lambda: [] if note is None else [(waits.encode(note), answered, 4242, 0)]
    other = 1 - me
    ref = ActorRef("0" * 12, other, "ab"[other], "X", frozenset(), False)
    return ctx.look(ref, mine or _mine(), noted=noted)[0] is not None


@pytest.mark.parametrize("note, answered, expected", [
    (WaitNote(BLOCKED, 3, 50, 1), 0, True),  # b blocked on a call to a, earlier: a fails
    (WaitNote(BLOCKED, 3, 50, 1), 3, False),  # answered: b's note is stale
    (WaitNote(BLOCKED, 3, 50, 1), 2**32 - 2, True),  # ... not after the ids wrapped
    (WaitNote(BLOCKED, 3, 50, 2), 0, False),  # c: not the actor waited on
    (WaitNote(BLOCKED, 3, 500, 1), 0, False),  # b's wait is the later: b fails it
    (WaitNote(WAITING, 3, 500, 1), 0, False),
    (WaitNote(WAITING, 3, 100, 1), 0, False),  # a tie: the higher index (b) fails it
    (None, 0, False),
])
def test_which_notes_close_a_cycle_of_two(note, answered, expected):
    assert _two_actor_verdict(note, answered) is expected


def test_a_wait_the_other_side_cannot_see_is_not_left_to_it():
    """b's later wait would fail it -- but b can only see a's wait if a's note reached it."""
    note = WaitNote(BLOCKED, 3, 500, 1)
    assert _two_actor_verdict(note, 0, noted=True) is False
    assert _two_actor_verdict(note, 0, noted=False) is True
    tie = WaitNote(WAITING, 3, 100, 0)  # b's side of a tie: b, the higher index, fails
    assert _two_actor_verdict(tie, 0, me=1, mine=WaitNote(WAITING, 3, 100, 1)) is True


def test_the_text_of_a_cycle_of_two_says_how_the_other_waits():
    from runtime.calls import ActorRef

    ctx = _context()
    ctx.inbound_notes = lambda: [(waits.encode(WaitNote(WAITING, 3, 50, 1, "b")), 0, 4242, 0)]
    text, links = ctx.look(ActorRef("0" * 12, 1, "b", "X", frozenset(), False), _mine(),
                           noted=True)
    assert text.startswith("call cycle: waiting, in a call of actor 'a', on a call to actor "
                           "'b', which is blocked (a wait on a future) on a call to 'a'")
    assert [link.wait for link in links] == [(1, 0, 3, 50)]


# -- cycles through more actors: waits passed along (edge chasing) -----------------------------

NOW = 50_000_000_000


def _waiting(writer, call_id, started, links=(), me=0):
    """A caller's note, blocked on its unanswered call to ``me``, with the link it proves."""
    return (WaitNote(BLOCKED, call_id, started, writer, f"#{writer}", tuple(links)),
            Link(writer, me, call_id, started, NOW))


def test_upstream_passes_on_each_wait_once_without_the_actors_own_or_stale_ones():
    old = NOW - waits.LINK_TTL_NS - 1
    carried = (Link(2, 3, 7, 70, NOW - 5), Link(0, 2, 1, 10, NOW - 9),  # 0: this actor's
               Link(4, 3, 1, 1, old), Link(5, 2, 1, 1, NOW - 8))
    again = (Link(2, 3, 7, 70, NOW - 1), Link(5, 2, 1, 1, NOW - 30))  # seen later / earlier
    got = upstream([_waiting(3, 4, 40, carried), _waiting(6, 2, 20, again)], 0, 1, NOW)
    assert got == (Link(3, 0, 4, 40, NOW), Link(6, 0, 2, 20, NOW), Link(2, 3, 7, 70, NOW - 1),
                   Link(5, 2, 1, 1, NOW - 8))
    many = [_waiting(i, 1, 1) for i in range(1, 40)]
    assert len(upstream(many, 0, 1, NOW)) == waits.MAX_LINKS


def test_a_crowd_of_waits_on_a_member_cannot_push_a_cycles_links_out():
    """Review P: 23 callers blocked on b (1), none waited on, came first and cut the links
    of the cycle b -> c (2) -> a (3) -> b off b's note: b, the latest, never saw it."""
    crowd = [_waiting(i, 1, 1, me=1) for i in range(10, 33)]
    a_waits = _waiting(3, 9, 90, [Link(2, 3, 8, 80, NOW)], me=1)  # c waits on a, a on b
    got = upstream([*crowd, a_waits], 1, 2, NOW)
    assert len(got) == waits.MAX_LINKS
    # a: waited on (by c); c: b's target
    assert got[:2] == (Link(3, 1, 9, 90, NOW), Link(2, 3, 8, 80, NOW))
    assert cycle_through(Link(1, 2, 7, 100, NOW), got) is not None


def test_a_link_seen_before_this_wait_began_is_not_walked():
    """Review P: a wait of the cycle that failed (or a waiter killed) left its link in a
    note until the next look; a later wait walked it as if it still held, and failed."""
    ab, ca = Link(0, 1, 5, 1000, NOW), Link(2, 0, 7, 300, NOW)
    assert cycle_through(ab, (Link(1, 2, 6, 200, 999), ca)) is None  # seen before 1000
    assert cycle_through(ab, (Link(1, 2, 6, 200, 1000), ca)) is not None
    # ... nor does a stale wait of an actor hide its fresh one
    fresh = Link(1, 2, 9, 1500, NOW)
    assert cycle_through(ab, (Link(1, 2, 6, 200, 999), fresh, ca)) == (ab, fresh, ca)


def test_a_cycle_through_three_actors_is_found_from_each_member():
    """a (0) waits on b (1), b on c (2), c on a: each sees the cycle in its upstream."""
    ab, bc, ca = Link(0, 1, 5, 100, NOW), Link(1, 2, 6, 200, NOW), Link(2, 0, 7, 300, NOW)
    assert cycle_through(ab, (ca, bc)) == (ab, bc, ca)
    assert cycle_through(bc, (ab, ca)) == (bc, ca, ab)
    assert cycle_through(ca, (bc, ab, Link(9, 2, 1, 1, NOW))) == (ca, ab, bc)  # 9: off the cycle
    assert waits.fails((ca, ab, bc), noted=True)  # c's wait is the latest
    assert not waits.fails((ab, bc, ca), noted=True) and not waits.fails((bc, ca, ab), noted=True)
    assert waits.fails((ab, bc, ca), noted=False)  # nobody else sees a's wait


@pytest.mark.parametrize("links", [
    (),  # nothing known of b
    (Link(1, 2, 6, 200, NOW),),  # b waits on c, c on nothing known
    (Link(1, 2, 6, 200, NOW), Link(2, 1, 7, 300, NOW)),  # b and c wait on each other, not on a
    (Link(1, 2, 6, 200, NOW), Link(2, 0, 7, 300, NOW), Link(1, 3, 8, 400, NOW)),  # b's later
])
def test_no_cycle_through_this_wait_is_none(links):
    assert cycle_through(Link(0, 1, 5, 100, NOW), links) is None


def test_an_actor_with_two_waits_is_followed_through_the_later_one():
    """Review R: a signal handler's wait nested in an outer one (both renewed at every
    look) made the walk give up for ever: the nested one, the later, blocks the thread."""
    ab, ca = Link(0, 1, 5, 100, NOW), Link(2, 0, 7, 300, NOW)
    outer, nested = Link(1, 3, 6, 150, NOW), Link(1, 2, 9, 250, NOW)
    assert cycle_through(ab, (outer, nested, ca)) == (ab, nested, ca)
    assert cycle_through(ab, (nested, outer, ca)) == (ab, nested, ca)  # whatever the order
    assert cycle_through(ab, (Link(1, 2, 9, 150, NOW), Link(1, 3, 6, 250, NOW), ca)) is None


def test_this_actors_stale_link_passed_back_does_not_hide_its_current_wait():
    ab, bc, ca = Link(0, 1, 5, 100, NOW), Link(1, 2, 6, 200, NOW), Link(2, 0, 7, 300, NOW)
    assert cycle_through(ab, (Link(0, 1, 2, 50, NOW), bc, ca)) == (ab, bc, ca)


# -- what an actor reads of its callers' notes -------------------------------------------------

def test_an_actor_reads_the_notes_of_trusted_callers_with_their_pids():
    from types import SimpleNamespace

    from runtime.worker import ActorServer, _Inbound

    def conn(pid, *, safe=False, note=b"note", answered=3):
        c = _Inbound.__new__(_Inbound)
        c.channel = SimpleNamespace(safe=safe, peer_note=lambda: note)
        c.caller_pid, c.answered, c.caller_incarnation = pid, answered, 2
        return c

    server = ActorServer.__new__(ActorServer)
    server.inbound = [conn(10, note=b"one"), conn(11, safe=True, note=b"untrusted"),
                      conn(12, note=None)]
    assert server._inbound_notes() == [(b"one", 3, 10, 2)]


def test_only_the_note_of_the_live_process_of_the_actor_it_names_counts():
    """Review M: a dead caller's note stays in a ring its busy callee still maps; once its
    pid is reused (or the actor restarted), it named a wait nobody waits."""
    from types import SimpleNamespace

    from runtime.calls import ActorRef, ProcessContext
    from runtime.table import ALIVE, DEAD, Entry

    entries = {1: Entry(ALIVE, 0, 4242, 0, 0, 0), 2: Entry(DEAD, 0, 5151, 0, 0, 0)}
    ctx = ProcessContext.__new__(ProcessContext)
    ctx.table = SimpleNamespace(read=lambda i: entries.get(i, Entry(0, 0, 0, 0, 0, 0)))
    ctx.self_index, ctx.self_name = 0, "a"
    b = ActorRef("0" * 12, 1, "b", "B", frozenset(), False)
    note = waits.encode(WaitNote(BLOCKED, 3, 50, 1, "b"))

    def cycle(*notes):
        ctx.inbound_notes = lambda: list(notes)
        return ctx.look(b, _mine(), noted=True)[0]

    assert "call cycle" in cycle((note, 0, 4242, 0))  # b's live process
    assert cycle((note, 0, 9999, 0)) is None  # another process (b's pid reused, say)
    entries[1] = Entry(ALIVE, 1, 4242, 0, 0, 0)
    assert cycle((note, 0, 4242, 0)) is None  # b restarted, as the same pid (review N)
    entries[1] = Entry(DEAD, 0, 4242, 0, 0, 0)
    assert cycle((note, 0, 4242, 0)) is None  # b is dead: its note is stale
    bad = waits.encode(WaitNote(BLOCKED, 3, 50, 5000, "x"))
    assert cycle((bad, 0, 4242, 0)) is None  # an index past the table
