"""The caller's side of calls (runtime.calls) against a scripted channel: deterministic."""

from __future__ import annotations

import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest

from runtime import waits
from runtime.calls import ActorRef, CallerChannel, CallFuture, ProcessContext, _complete
from runtime.errors import ActorRuntimeError, DeadlineError
from runtime.table import ALIVE, Entry


class _Table:
    def read(self, index):
        return Entry(ALIVE, 0, 4242, 0, 0, 0)

    def alive(self, index, incarnation):
        return True


class _Context:
    table = _Table()
    session = SimpleNamespace(call_timeout=None)
    serving: tuple = ()  # a driver's: no call is being served
    serving_thread = None
    inbound_notes = None  # a driver's: no callers, no wait notes

    def check_owner(self):
        pass

    def retire(self, cc):
        pass

    def refuse_wait_cycle(self, ref):
        pass  # a driver's: never serving a call

    def watches_waits(self):
        return False


class _ScriptedChannel:
    """Replies come from ``inbox``; with ``full`` set, a send finds the ring full
    once and reads replies meanwhile (``on_full``), as a real send would."""

    woke_peer = False
    peer_closed = False
    failed = None
    last_in = None  # no route or size of the last reply: calls record no wire sizes here

    rx = object()  # a channel with rings: it can tell that no reply is on the way
    safe = False  # to a trusted actor

    def __init__(self):
        self.inbox = deque()
        self.sent = []
        self.full = False
        self.notes = []

    def set_note(self, note):
        self.notes.append(note)
        return True

    def readable(self):
        return bool(self.inbox)

    def encode(self, obj):
        return SimpleNamespace(obj=obj, nbytes=0)

    def send_encoded(self, enc, *, tag, deadline, check, on_full):
        if self.full and on_full is not None:
            on_full()
        self.sent.append(enc.obj)
        return "shm"

    def try_recv(self, *, check=None, deadline=None):
        if self.inbox:
            return True, self.inbox.popleft()
        return False, None

    def wait(self, *, deadline, check, spin_s=0.0):
        raise DeadlineError("scripted: nothing before the deadline")

    def ack(self):  # a reply is popped from the inbox as it is read: nothing to keep
        pass


def _caller(ctx=None):
    ref = ActorRef("0" * 12, 1, "scripted", "Scripted", frozenset({"m"}), False)
    ch = _ScriptedChannel()
    cc = CallerChannel(ctx or _Context(), ref, 0, ch)
    cc._kick_pump = lambda: None  # no pump thread: this test reads itself
    return cc, ch


def test_replies_read_during_a_full_ring_send_complete_in_issue_order():
    cc, ch = _caller()
    order, locked = [], []
    futures = [cc.submit("m", (i,), {}) for i in range(1, 7)]
    for f in futures:
        f.add_done_callback(lambda f: (order.append(f.result()),
                                       locked.append(cc._send_lock.locked())))
    ch.inbox.extend((i, True, i) for i in range(1, 7))  # the replies, in order
    ch.full = True
    last = cc.submit("m", (7,), {})  # waits for space: reads all six meanwhile
    assert all(f.done() for f in futures)
    deadline = time.monotonic() + 5  # the channel's callback thread runs the callbacks
    while len(order) < 6 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert order == [1, 2, 3, 4, 5, 6]
    assert not any(locked), "a callback ran while the send lock was held"
    ch.inbox.append((7, True, 7))
    assert last.result(timeout=5) == 7


def test_a_malformed_reply_fails_only_its_call_and_keeps_order():
    cc, ch = _caller()
    futures = [cc.submit("m", (i,), {}) for i in range(1, 4)]
    ch.inbox.extend([(1, True, "one"), (2, "not a bool", None), (3, True, "three")])
    assert futures[2].result(timeout=5) == "three"
    assert futures[0].result(timeout=0) == "one"
    exc = futures[1].exception(timeout=0)
    assert type(exc).__name__ == "ProtocolError" and "ok flag" in str(exc)
    assert cc.dead is None


def test_a_waiter_left_on_a_finished_channel_is_failed_not_spun_on():
    """A call that slipped into the pending set after the channel failed them all: no
    reader will ever complete it, so ``drive`` fails it (it spun for ever)."""
    from runtime.calls import _Slot
    from runtime.errors import ActorDiedError

    cc, _ = _caller()
    cc._fail_all(ActorDiedError("gone"))
    slot = _Slot()
    cc.pending[99] = (slot, None)  # as if registered just after _fail_all ran
    cc.drive(slot, 5)
    assert slot.done and isinstance(slot.value, ActorDiedError) and not cc.pending


def test_every_completer_lets_the_first_completion_win():
    """A reply, a timeout and the channel's end may race to one call: the first wins, and
    a call is completed before it leaves the pending set."""
    from runtime.calls import _complete, _Slot

    fut = _caller()[0].submit("m", (1,), {})
    _complete(fut, True, "reply")
    _complete(fut, False, RuntimeError("late"))  # a Future would raise: ignored
    assert fut.result(timeout=0) == "reply"
    slot = _Slot()
    _complete(slot, True, 1)
    _complete(slot, False, RuntimeError("late"))
    assert slot.ok and slot.value == 1


def test_done_ns_is_not_moved_by_a_second_completion():
    """Found in review: ``_complete`` lets the first completion win, but ``complete`` stamped
    ``done_ns`` before ``set_result`` refused the second: a close() racing a reader (it
    fails what is still in ``pending`` between the reader's complete and pop) moves the
    time the TEE driver accounts as the reply's arrival."""
    fut = CallFuture(owner=None)
    fut.set_running_or_notify_cancel()
    _complete(fut, True, 1)
    first = fut.done_ns
    time.sleep(0.01)
    _complete(fut, False, RuntimeError("closed"))
    assert fut.result() == 1
    assert fut.done_ns == first, f"moved by {(fut.done_ns - first) / 1e6:.1f} ms"


def test_the_pump_reads_once_a_reader_that_did_not_kick_it_lets_go():
    """The pump never queues for the reader role (it stole the next call of a thread
    doing .remote().result() one at a time); readers that leave calls pending kick it,
    and a short backstop covers any that does not."""
    cc, ch = _caller()
    del cc._kick_pump  # the real pump, this time
    cc._role.acquire()  # another reader holds the role
    try:
        fut = cc.submit("m", (1,), {})  # kicks the pump, which finds the role taken
        ch.inbox.append((1, True, "one"))
        time.sleep(0.05)
        assert not fut.done()
    finally:
        cc._role.release()  # and leaves without a kick
    t0 = time.monotonic()
    while not fut.done() and time.monotonic() - t0 < 3:
        time.sleep(0.001)
    assert fut.done() and time.monotonic() - t0 < 0.5
    assert fut.result(timeout=0) == "one"
    cc.closed = True  # the pump ends (the scripted channel has nothing to close)
    cc._pump_event.set()


def test_the_pump_does_not_poll_while_another_reader_holds_the_role():
    """Second review: the backstop polled every 5 ms for as long as a long blocking call
    held the role (430 wake-ups in 3 s a channel); it backs off to 0.5 s."""
    import threading

    class CountingEvent(threading.Event):
        waits = 0

        def wait(self, timeout=None):
            if threading.current_thread().name.startswith("rt-pump"):
                CountingEvent.waits += 1
            return super().wait(timeout)

    cc, ch = _caller()
    del cc._kick_pump
    cc._pump_event = CountingEvent()
    cc._role.acquire()  # a reader in a long blocking call
    try:
        fut = cc.submit("m", (1,), {})  # the pump wakes, finds the role taken
        time.sleep(2.0)
    finally:
        cc._role.release()
    ch.inbox.append((1, True, "one"))
    assert fut.result(timeout=5) == "one"
    assert CountingEvent.waits <= 12, f"{CountingEvent.waits} pump wake-ups in 2 s"
    cc.closed = True
    cc._pump_event.set()


# -- the watched wait of an actor's serving thread (runtime/waits.py) -------------------------

class _ActorContext(_Context):
    """The context of actor 0, serving a call, whose callers left ``notes``."""

    self_index, self_name, serving = 0, "a", (0,)
    serving_thread = -1  # an actor's (watches_waits says it is this thread)
    look = ProcessContext.look
    _cycle_text = ProcessContext._cycle_text
    _is_live = ProcessContext._is_live

    def __init__(self, notes):
        self.inbound_notes = notes

    def watches_waits(self):
        return True


def _blocked_on_a(call_id=1):
    """Actor 1 (the one called here) blocked on its call ``call_id`` to actor 0."""
    return waits.encode(waits.WaitNote(waits.BLOCKED, call_id, 0, 1, "scripted"))


@pytest.mark.parametrize("how", ["future", "blocking call"])
def test_a_watched_wait_fails_on_a_cycle_and_clears_its_note(how):
    cc, ch = _caller(_ActorContext(lambda: [(_blocked_on_a(), 0, 4242, 0)]))
    with pytest.raises(ActorRuntimeError, match="call cycle: waiting, in a call of actor 'a', "
                                                "on a call to actor 'scripted'"):
        if how == "future":
            cc.submit("m", (), {}).result()
        else:
            cc.call("m", (), {}, chain=(0,))
    left = waits.decode(ch.notes[0])
    kind = waits.WAITING if how == "future" else waits.BLOCKED
    assert (left.kind, left.call_id, left.writer, left.name) == (kind, 1, 0, "a")
    # Rewritten once with the wait found waiting on it (actor 1's, its call 1 to us),
    # then cleared when the wait ended.
    passed = waits.decode(ch.notes[1])
    assert passed._replace(links=()) == left
    assert [link.wait for link in passed.links] == [(1, 0, 1, 0)]
    assert ch.notes[2:] == [b""]


def test_a_cycle_note_read_just_before_the_reply_fails_nothing():
    """The actor answered our call, then blocked on a call to us: its note is read before
    our reply (already published).  The reply must end the wait, not the note."""
    ch_box = []

    def notes():
        if not ch_box[0].inbox:
            ch_box[0].inbox.append((1, True, "the reply"))  # published just before
        return [(_blocked_on_a(), 0, 4242, 0)]

    cc, ch = _caller(_ActorContext(notes))
    ch_box.append(ch)
    fut = cc.submit("m", (), {})
    assert fut.result() == "the reply"
    assert ch.notes[-1] == b""


def test_a_stale_note_of_an_answered_call_fails_nothing():
    cc, ch = _caller(_ActorContext(lambda: [(_blocked_on_a(call_id=3), 3, 4242, 0)]))
    fut = cc.submit("m", (), {})
    threading.Timer(0.2, lambda: ch.inbox.append((1, True, "late"))).start()
    assert fut.result() == "late"


def test_no_cycle_is_certain_while_another_reader_holds_a_reply():
    cc, ch = _caller(_ActorContext(list))
    fut = cc.submit("m", (), {})
    held, release = threading.Event(), threading.Event()

    def reader():  # consumed a reply, not dispatched yet
        with cc._role:
            cc._in_hand = True
            held.set()
            release.wait(5)
            cc._in_hand = False

    t = threading.Thread(target=reader)
    t.start()
    held.wait(5)
    try:
        assert cc._nothing_unread(fut) is False
    finally:
        release.set()
        t.join()
    assert cc._nothing_unread(fut) is True
    ch.inbox.append((1, True, "reply"))
    assert cc._nothing_unread(fut) is False and fut.result(timeout=0) == "reply"


class _RefusingContext(_Context):
    """A serving thread for which the call waited on is a cycle (a chain member, itself)."""

    serving_thread = -1  # an actor's

    def refuse_wait_cycle(self, ref):
        raise ActorRuntimeError("call cycle: scripted")


def test_a_call_answered_before_the_cycle_began_is_no_cycle():
    """Review K of 84e654d: a call to a chain member (or to itself) sent and answered before
    the current call began was refused when waited on while its reply sat unread."""
    cc, ch = _caller(_RefusingContext())
    fut = cc.submit("m", (), {})
    ch.inbox.append((1, True, "answered"))  # arrived, not read yet
    assert fut.result() == "answered"
    unanswered = cc.submit("m", (), {})
    with pytest.raises(ActorRuntimeError, match="call cycle: scripted"):
        unanswered.result()
    assert not unanswered.done()


def test_a_send_does_not_wait_for_another_threads_long_read_to_dispatch_deferred_replies():
    """Review K of 84e654d: with replies deferred (read while a send held the lock), the
    next send took the reader role with a blocking acquire -- so a .remote() waited for
    another thread's long blocking call, which holds the role while it waits."""
    cc, ch = _caller()
    first = cc.submit("m", (), {})
    cc._deferred.append((1, True, "deferred"))  # read by a send's drain, not dispatched
    holding, release = threading.Event(), threading.Event()

    def long_call():  # holds the role, as a blocking call waiting on its reply does
        with cc._role:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=long_call)
    t.start()
    holding.wait(5)
    try:
        t0 = time.monotonic()
        second = cc.submit("m", (), {})
        assert time.monotonic() - t0 < 1.0
        assert not first.done()  # left for the reader, in order
    finally:
        release.set()
        t.join()
    ch.inbox.append((2, True, "second"))
    assert second.result(timeout=5) == "second" and first.result(timeout=0) == "deferred"


def test_close_in_a_handler_after_a_nested_note_waits_for_the_outer_write():
    """Review O: a signal handler's nested set_note cleared the writer mark while the
    interrupted outer write still held the (re-entrant) note lock; a close() in that
    handler then unmapped the ring under the outer write."""
    cc, ch = _caller()
    events = []
    state = {"depth": 0}

    def set_note(note):
        state["depth"] += 1
        try:
            events.append(("write-begin", note))
            if note == b"outer" and state["depth"] == 1:
                # A signal arrives mid-write; its handler waits on a call (a nested note,
                # put back after), then shuts the channel down.
                cc.set_note(b"inner")
                cc.set_note(b"outer")  # _drive_watched's finally: the outer note back
                cc.close()
            events.append(("write-end", note))
            return True
        finally:
            state["depth"] -= 1

    def close(notify=False):
        events.append(("close", state["depth"]))

    ch.set_note = set_note
    ch.close = close
    assert cc.set_note(b"outer")
    deadline = time.monotonic() + 10
    while not any(e[0] == "close" for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    closes = [e for e in events if e[0] == "close"]
    assert closes, events
    # The ring must not be unmapped while a write to it is still on the stack.
    assert closes[0][1] == 0, f"channel closed inside the outer write: {events}"


def test_a_nested_wait_interrupting_a_note_write_puts_back_the_outer_note():
    """Review O: a handler that ran after the ring write but before ``self._note = note``
    (what _drive_watched puts back) put back the stale note."""
    cc, ch = _caller()
    written = []

    def set_note(note):
        written.append(note)
        if note == b"outer" and len(written) == 1:
            outer = cc._note  # what _drive_watched does in the handler's wait
            cc.set_note(b"inner")
            cc.set_note(outer)
        return True

    ch.set_note = set_note
    assert cc.set_note(b"outer")
    assert cc._note == b"outer"
    assert written[-1] == b"outer", f"the ring's note is {written[-1]!r}, the wait's is gone"


@pytest.mark.parametrize("why", ["no rings", "callee dead"])
def test_a_watched_wait_that_cannot_conclude_waits_for_its_reply(why, monkeypatch):
    """A cycle note is there, but the wait cannot tell that no reply is on the way (a
    channel without rings: ZeroMQ may hold one unseen), or the actor waited on is dead
    (its death ends the call, and explains it better): no cycle error, the wait goes on."""
    cc, ch = _caller(_ActorContext(lambda: [(_blocked_on_a(), 0, 4242, 0)]))
    if why == "no rings":
        monkeypatch.setattr(ch, "rx", None)
    else:
        monkeypatch.setattr(cc.ctx.table, "alive", lambda index, incarnation: False,
                            raising=False)
    fut = cc.submit("m", (), {})
    threading.Timer(0.3, lambda: ch.inbox.append((1, True, "late"))).start()
    assert fut.result() == "late"
