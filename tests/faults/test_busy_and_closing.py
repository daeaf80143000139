"""A busy actor, a closing channel, a Ctrl-C: calls that must neither hang nor fail wrongly.

An actor serves one call at a time; its channels are opened by a thread of its own, so
the first call to an actor busy with another process's call gets its channel at once and
waits in the queue -- bounded by ``call_timeout`` (``CallTimeoutError``), unbounded
without it -- and must not hold up anything else meanwhile: calls to other actors,
``kill()``, ``shutdown()``.  And a call that registers itself while ``kill()`` or
``shutdown()`` fails the pending ones must fail too, not spin for ever.  A Ctrl-C in
the thread that reads replies must not lose another call's reply.
(Found by an adversarial review; each test failed on the tree before.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from runtime import ActorDiedError, ActorRuntimeError, ActorSystem, CallTimeoutError, actor
from tests.integration.actors_lib import Caller, ControlBreaker, Echo


@actor
class Proxy:
    """Starts a call on another actor from its own process and does not wait."""

    def __init__(self, other):
        self.other = other
        self.futs = []

    def start(self, method, *args):
        self.futs.append(getattr(self.other, method).remote(*args))
        return True


def _busy(system, seconds):
    """An Echo busy for ``seconds`` in a call from another process (a Proxy)."""
    target = system.spawn(Echo)
    proxy = system.spawn(Proxy, target)
    assert proxy.start("sleep", seconds)
    time.sleep(0.5)  # the target is inside sleep() now
    return target


def test_first_call_to_a_busy_actor_honours_call_timeout():
    """It waited 30 s for the open request's reply, then failed with TransportError."""
    with ActorSystem(call_timeout=1.0) as system:
        target = _busy(system, 40)
        errors = []

        def second():  # shares the first thread's channel, and times out as it does
            try:
                target.add(2, 2)
            except CallTimeoutError as exc:
                errors.append(exc)

        t0 = time.monotonic()
        other = threading.Thread(target=second)
        other.start()
        with pytest.raises(CallTimeoutError, match="no reply within"):
            target.add(1, 2)
        other.join(5)
        assert time.monotonic() - t0 < 5
        assert len(errors) == 1
        target.kill()


def test_a_busy_actor_opens_a_new_callers_channel_at_once():
    """Channels were opened between calls: a ``.remote()`` to an actor busy in a long call
    waited for that call's end, only to open its channel.  A thread of the actor opens them
    now, and the call waits in the actor's queue."""
    with ActorSystem() as system:
        target = _busy(system, 3)
        t0 = time.monotonic()
        fut = target.add.remote(1, 2)
        assert time.monotonic() - t0 < 1.0
        assert not fut.done()  # queued behind the long call
        assert fut.result(10) == 3
        assert time.monotonic() - t0 > 1.5  # served after it


def test_call_timeout_covers_the_open_and_the_call_together():
    """Found in review: the open had its own call_timeout and the call another, so a first
    call to a busy actor could take twice call_timeout.  Here the open waits ~1 s for the
    actor and the call itself takes 1.8 s: 2.8 s in all, past the 2 s limit."""
    with ActorSystem(call_timeout=2.0) as system:
        target = _busy(system, 1.5)
        t0 = time.monotonic()
        with pytest.raises(CallTimeoutError):
            target.sleep(1.8)
        took = time.monotonic() - t0
        assert took < 2.6, f"the call failed after {took:.2f} s, not at call_timeout"
        assert target.add(1, 2) == 3  # the actor is fine: the late reply is dropped


def test_first_call_to_a_busy_actor_waits_for_it():
    with ActorSystem() as system:
        target = _busy(system, 3)
        assert target.add(1, 2) == 3


def test_a_death_while_the_first_call_opens_its_channel_is_actor_died_error():
    """Found in review: the open's connection was reset by the dying actor, and the caller
    read the table once, before the supervisor had recorded the death:
    ``TransportError("... failed the connection: Connection reset by peer")``."""
    with ActorSystem() as system:
        target = _busy(system, 30)
        out = {}

        def first_call():
            try:
                out["value"] = target.add(1, 2)
            except BaseException as exc:  # what it got is the test
                out["exc"] = exc

        t = threading.Thread(target=first_call)
        t.start()
        time.sleep(0.3)  # the open now waits on the busy actor
        os.kill(target.pid, signal.SIGKILL)
        t0 = time.monotonic()
        t.join(5)
        assert not t.is_alive(), "hang"
        assert isinstance(out.get("exc"), ActorDiedError), repr(out.get("exc"))
        assert time.monotonic() - t0 < 1.5


@pytest.mark.slow
def test_first_call_to_a_busy_actor_waits_past_the_old_open_limit():
    """No call_timeout, no limit: it failed after 30 s with TransportError."""
    with ActorSystem() as system:
        target = _busy(system, 35)
        assert target.add(1, 2) == 3


def test_opening_a_channel_to_a_busy_actor_holds_up_nothing_else():
    """The context lock was held through the open: a first call to an idle actor, and
    shutdown(), waited for the busy actor's call to end."""
    system = ActorSystem()
    try:
        target = _busy(system, 20)
        idle = system.spawn(Echo)
        got = []

        def first_call():
            try:
                got.append(target.add(1, 2))
            except ActorRuntimeError as exc:  # the system shut down under it
                errors.append(exc)

        errors = []
        blocked = threading.Thread(target=first_call, daemon=True)
        blocked.start()
        time.sleep(0.5)  # that thread now waits for the busy actor's open reply
        t0 = time.monotonic()
        assert idle.add(2, 2) == 4
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        system.shutdown()
        assert time.monotonic() - t0 < 5
        blocked.join(5)
        assert not blocked.is_alive() and not got  # the open was abandoned, with an error
        assert len(errors) == 1, errors
    finally:
        system.shutdown()


def test_two_threads_opening_one_channel_share_it():
    with ActorSystem() as system:
        target = _busy(system, 2)
        got = []
        threads = [threading.Thread(target=lambda i=i: got.append(target.add(i, 1)))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(got) == [1, 2, 3, 4]
        assert len([c for c in system.stats()["channels"] if c["actor"] == target.name]) == 1


class _SlowIds:
    """``CallerChannel._ids`` whose next id comes late: widens the window between the
    send path's ``dead`` check and its ``pending`` registration (a thread switch can land
    at any bytecode there)."""

    def __init__(self, pause):
        self.pause, self.n = pause, 100

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.pause)
        self.n += 1
        return self.n


@pytest.mark.parametrize("how", ["kill", "shutdown"])
def test_a_call_registered_while_the_channel_closes_fails(how):
    """Registered after close() had failed the pending calls, the call was never failed,
    and ``drive`` looped for ever on the dead channel (100 % CPU, no return)."""
    system = ActorSystem()
    cc = None
    try:
        e = system.spawn(Echo)
        assert e.add(1, 1) == 2
        cc = system._ctx.channel_for(e._ref)
        cc._ids = _SlowIds(0.5)
        got = []

        def call():
            try:
                got.append(e.add(2, 2))
            except Exception as exc:
                got.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        time.sleep(0.2)  # the caller passed the dead check and waits in next(_ids)
        if how == "kill":
            e.kill()
        else:
            threading.Thread(target=system.shutdown, daemon=True).start()
        caller.join(5)
        assert not caller.is_alive(), "the call never returned"
        assert isinstance(got[0], ActorRuntimeError), got
    finally:
        if cc is not None:
            cc._fail_all(ActorRuntimeError("test cleanup"))  # frees a spinning caller
        system.shutdown()


def _slow_load(v):
    time.sleep(1.0)  # runs where the reply is decoded: a Ctrl-C can land inside
    return v


class SlowToLoad:
    def __init__(self, v):
        self.v = v

    def __reduce__(self):
        return (_slow_load, (self.v,))


@actor
class SlowReply:
    def add(self, a, b=0):
        return a + b

    def slow_obj(self, v, delay=0.2):
        time.sleep(delay)
        return SlowToLoad(v)


def test_a_ctrl_c_while_reading_another_calls_reply_loses_nothing(monkeypatch, sigint_raises):
    """The blocked thread reads every reply of the channel.  A KeyboardInterrupt while it
    decoded a *future's* reply lost that reply (consumed from the ring, never delivered):
    the future never completed.  The pump thread is kept from starting, so that this
    thread is the one that reads (which one does is otherwise a race)."""
    from runtime.calls import CallerChannel

    monkeypatch.setattr(CallerChannel, "_kick_pump", lambda self: self._pump_event.set())
    with ActorSystem() as system:
        a = system.spawn(SlowReply)
        assert a.add(1, 1) == 2
        fut = a.slow_obj.remote(6)  # without an interrupt: read by this thread, delivered
        assert a.add(1, 2) == 3
        assert fut.result(timeout=3) == 6
        fut = a.slow_obj.remote(7)
        timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            a.add(1, 2)  # reads fut's reply first: decoding it takes 1 s
        timer.join()
        assert a.add(2, 2) == 4
        assert fut.result(timeout=5) == 7


def test_a_ctrl_c_as_a_reply_is_dispatched_loses_nothing(monkeypatch, sigint_raises):
    """A SIGINT handled right after the reply's call left the pending set (an eval-breaker
    check follows every C call): the call was gone, the reply dropped when redelivered,
    the future never completed.  Calls are now completed before they leave the set."""
    from runtime.calls import CallerChannel

    monkeypatch.setattr(CallerChannel, "_kick_pump", lambda self: self._pump_event.set())
    with ActorSystem() as system:
        a = system.spawn(SlowReply)
        assert a.add(1, 1) == 2
        cc = system._ctx.channel_for(a._ref)
        target = []

        class Trap(dict):
            fired = False

            def pop(self, key, *default):
                v = super().pop(key, *default)
                if v is not None and target and v[0] is target[0] and not Trap.fired:
                    Trap.fired = True
                    os.kill(os.getpid(), signal.SIGINT)  # handled at the next check
                return v

        cc.pending = Trap(cc.pending)
        fut = a.slow_obj.remote(7, 0.3)
        target.append(fut)
        with pytest.raises(KeyboardInterrupt):
            a.add(1, 2)  # this thread reads fut's reply first
        assert Trap.fired
        assert a.add(2, 2) == 4
        assert fut.result(timeout=5) == 7


def test_an_interrupted_opener_leaves_no_wedge():
    """A Ctrl-C in channel_for's cleanup (simulated: ``del _opening[i]`` raises) left an
    Event nobody would set, and every later call to the actor waited on it for ever."""
    with ActorSystem() as system:
        a = system.spawn(Echo)
        ctx = system._ctx

        class Trap(dict):
            armed = True

            def __delitem__(self, key):
                if Trap.armed:
                    Trap.armed = False
                    raise KeyboardInterrupt
                super().__delitem__(key)

        ctx._opening = Trap()
        with pytest.raises(KeyboardInterrupt):
            a.add(1, 1)
        ctx._channels.clear()  # as if the interrupt had come before the channel was kept
        got = []
        t = threading.Thread(target=lambda: got.append(a.add(2, 2)), daemon=True)
        t.start()
        t.join(10)
        assert got == [4]


def test_a_slow_done_callback_holds_up_no_other_call():
    """Found in review: done-callbacks ran on the pump while it held the reader role, so a
    3 s callback made an unrelated blocking call wait ~2.7 s."""
    with ActorSystem() as system:
        target = system.spawn(Echo)
        fut = target.sleep.remote(0.2)
        fut.add_done_callback(lambda f: time.sleep(3))
        time.sleep(0.5)  # the pump completed the future and runs the callback now
        t0 = time.monotonic()
        assert target.add(1, 2) == 3
        assert time.monotonic() - t0 < 1.0


def test_a_death_during_a_slow_done_callback_is_reported_at_once():
    """Found in review: with a 5 s callback running, a SIGKILL was reported 4.5 s late (the
    reader role, then the close's join of the pump, waited for the callback)."""
    with ActorSystem() as system:
        target = system.spawn(Echo)
        fut = target.sleep.remote(0.2)
        fut.add_done_callback(lambda f: time.sleep(5))
        time.sleep(0.5)
        pending = target.sleep.remote(30)
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(target.pid, signal.SIGKILL)
        with pytest.raises(ActorDiedError):
            pending.result(10)
        assert time.monotonic() - t0 < 1.5


def test_a_call_does_not_run_another_futures_slow_done_callback():
    """Found in review: callbacks queued while a reader held the role were run by the next
    thread that sent on the channel, so a ``.remote()`` returned only after another
    future's 2 s callback."""
    with ActorSystem() as system:
        target = system.spawn(Echo)
        assert target.echo(0) == 0
        first = target.sleep.remote(0.1)
        first.add_done_callback(lambda f: time.sleep(2))
        second = target.sleep.remote(1.0)  # the pump keeps reading past the first reply
        time.sleep(0.3)
        t0 = time.monotonic()
        third = target.echo.remote(1)
        assert time.monotonic() - t0 < 0.5
        assert second.result(10) == 1.0 and third.result(10) == 1


def test_a_done_callback_runs_soon_after_its_reply_with_other_calls_in_flight():
    """Found in review: the pump ran queued callbacks only once its 0.5 s read slice ended,
    so with another call in flight a callback came up to 0.5 s after its reply."""
    with ActorSystem() as system:
        target = system.spawn(Echo)
        assert target.echo(0) == 0
        lags = []
        for _ in range(3):
            ran = threading.Event()
            first = target.echo.remote(1)
            first.add_done_callback(lambda f, ran=ran: ran.set())
            second = target.sleep.remote(0.6)  # another call in flight: the pump reads on
            while not first.done():  # not result(): the pump, not this thread, reads
                time.sleep(0.001)
            t0 = time.monotonic()
            ran.wait(5)
            lags.append(time.monotonic() - t0)
            second.result(5)
        assert max(lags) < 0.1, lags


def test_shutdown_returns_once_the_callbacks_of_the_calls_it_failed_ran():
    """Callbacks run on a thread of their own; shutdown still waits for those of the calls
    it fails, as it did when it ran them itself."""
    got = []
    system = ActorSystem()
    target = system.spawn(Echo)
    assert target.echo(0) == 0
    fut = target.sleep.remote(30)
    fut.add_done_callback(lambda f: (time.sleep(0.2), got.append(type(f.exception()))))
    time.sleep(0.1)
    system.shutdown()
    assert got and issubclass(got[0], ActorRuntimeError)


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_the_callback_thread_starts_strands_no_callback(monkeypatch):
    """Found in review: a Ctrl-C (or 'can't start new thread') in the callback thread's
    ``start()`` left the channel naming a thread that never ran, and every later callback
    of the channel queued behind it for good."""
    with ActorSystem() as system:
        e = system.spawn(Echo)
        assert e.add(1, 1) == 2
        real_start = threading.Thread.start
        fired = []

        def start(self):
            if self.name.startswith("rt-callbacks-") and not fired:
                fired.append(1)
                raise KeyboardInterrupt  # as a Ctrl-C landing here would
            return real_start(self)

        monkeypatch.setattr(threading.Thread, "start", start)
        f1 = e.sleep.remote(0.2)
        f1.add_done_callback(lambda f: None)
        with pytest.raises(KeyboardInterrupt):
            f1.result(10)  # this thread reads, completes f1, starts the callback thread
        monkeypatch.setattr(threading.Thread, "start", real_start)
        ran = threading.Event()
        f2 = e.add.remote(2, 2)
        f2.add_done_callback(lambda f: ran.set())
        assert f2.result(10) == 4
        assert ran.wait(5), "later callbacks never run: _callbacks names an unstarted thread"


@pytest.mark.timeout(60)
def test_the_control_thread_outlives_a_failure_in_it():
    """The thread that opens an actor's channels logs what fails in it and goes on: a
    channel opened after the failure still works (had it died, no caller could ever reach
    the actor again)."""
    with ActorSystem(call_timeout=5) as system:
        target = system.spawn(ControlBreaker)
        target.break_control_once()
        relay = system.spawn(Caller, target)  # its first call opens a channel to target
        assert relay.relay(7) == 7


def test_callbacks_run_where_the_call_completes_when_no_thread_can_start(monkeypatch):
    """At interpreter exit no thread can start: the callbacks run on the completing thread
    rather than not at all."""
    with ActorSystem() as system:
        e = system.spawn(Echo)
        assert e.add(1, 1) == 2
        real_start = threading.Thread.start

        def start(self):
            if self.name.startswith("rt-callbacks-"):
                raise RuntimeError("can't create new thread at interpreter shutdown")
            return real_start(self)

        monkeypatch.setattr(threading.Thread, "start", start)
        ran = []
        fut = e.sleep.remote(0.2)
        fut.add_done_callback(lambda f: ran.append(threading.current_thread().name))
        assert fut.result(10) == 0.2
        deadline = time.monotonic() + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran and not ran[0].startswith("rt-callbacks-")
