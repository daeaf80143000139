"""Signal handlers during calls: their exceptions reach the caller; shutting down in one is
prompt and safe.

Found by a fault-injection review: an alarm-based timeout (``signal.setitimer`` plus a
handler that raises, as timeout decorators do) raising ``TimeoutError`` during a blocking
call was swallowed (the transport's own deadlines were caught as ``TimeoutError``) and the
call ran to its end; any other exception failed the whole channel, other threads' calls
included.  A handler that shut the system down while its thread was blocked in a send sat
out the send lock its own thread held (5 s), and during a read it unmapped the ring under
the interrupted reader.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from runtime import ActorSystem
from runtime.errors import ProtocolError
from tests.integration.actors_lib import Echo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UserAlarm(Exception):
    pass


@pytest.fixture
def alarm():
    """``alarm(seconds, handler)``: SIGALRM once; the old handler is back afterwards."""
    old = signal.getsignal(signal.SIGALRM)

    def arm(seconds, handler):
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc_type", [TimeoutError, UserAlarm])
def test_an_exception_from_a_signal_handler_reaches_the_blocked_caller(alarm, exc_type,
                                                                       caplog):
    def handler(*_):
        raise exc_type("user alarm")

    with ActorSystem() as system:
        e = system.spawn(Echo)
        assert e.add(1, 1) == 2
        alarm(0.3, handler)
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR), pytest.raises(exc_type, match="user alarm"):
            e.sleep(1.5)
        assert time.monotonic() - t0 < 1.2
        # The channel is in step and was not failed (bd777ad logged "channel to actor ...
        # failed" and failed every call on it): the sleep's late reply is dropped.
        assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text
        assert e.add(2, 2) == 4


@pytest.mark.timeout(60)
def test_shutdown_from_a_signal_handler_during_a_blocked_send_is_prompt(alarm):
    system = ActorSystem(shm_threshold=1 << 20)
    took: list[float] = []

    def handler(*_):
        t0 = time.monotonic()
        system.shutdown()
        took.append(time.monotonic() - t0)

    try:
        e = system.spawn(Echo)
        e.sleep.remote(10)
        x = torch.ones(200_000)  # 800 KB records: the 2 MiB ring fills at once
        alarm(0.5, handler)
        with pytest.raises(Exception):
            for _ in range(100):
                e.echo.remote(x)
    finally:
        system.shutdown()
    assert took and took[0] < 2.0, f"shutdown in the handler took {took} s"


@pytest.mark.timeout(60)
def test_shutdown_from_a_signal_handler_during_a_blocked_read_unmaps_nothing_in_use(
        alarm, caplog):
    system = ActorSystem()

    def handler(*_):
        system.shutdown()

    try:
        e = system.spawn(Echo)
        assert e.add(1, 1) == 2
        alarm(0.5, handler)
        with caplog.at_level(logging.ERROR), pytest.raises(Exception):
            e.sleep(3)
    finally:
        system.shutdown()
    assert not [r for r in caplog.records if r.exc_info], caplog.text  # e.g. a torn ring


@pytest.mark.timeout(60)
def test_a_reply_that_cannot_be_decoded_in_the_main_thread_fails_its_call(monkeypatch):
    """Found by a review of the first version: a reply consumed but not decoded (here
    MemoryError) reached the main-thread caller raw while the call it answered stayed
    pending for ever.  Its call now fails (ProtocolError, from the MemoryError); the channel
    goes on."""
    import threading

    from runtime import calls, messages

    with ActorSystem() as system:
        e = system.spawn(Echo)
        e.echo(1)  # the channel is open
        monkeypatch.setattr(calls.CallerChannel, "_kick_pump", lambda self: None)  # main reads
        orig = messages._decode
        hit = []

        def out_of_memory(*args, **kwargs):
            obj = orig(*args, **kwargs)
            if not hit and threading.current_thread() is threading.main_thread() \
                    and type(obj) is tuple and obj[2] == "the reply":
                hit.append(1)
                raise MemoryError
            return obj

        monkeypatch.setattr(messages, "_decode", out_of_memory)
        fut = e.echo.remote("the reply")
        with pytest.raises(ProtocolError, match="out of memory"):
            fut.result(timeout=5)
        assert hit
        assert isinstance(fut.exception(timeout=3), ProtocolError)  # f00d571: never completed
        assert e.echo(2) == 2


@pytest.fixture
def alarm_in_decode(monkeypatch):
    """``arm(handler, *replies)``: SIGUSR1 strikes inside the decode of each marked reply."""
    from runtime import calls, messages

    old = signal.getsignal(signal.SIGUSR1)
    orig = messages._decode
    marks = set()

    def decode(*args, **kwargs):
        obj = orig(*args, **kwargs)
        if type(obj) is tuple and len(obj) == 3 and obj[2] in marks:
            marks.discard(obj[2])  # once per mark (a reply kept is decoded again)
            signal.raise_signal(signal.SIGUSR1)
        return obj

    def arm(handler, *mark):
        signal.signal(signal.SIGUSR1, handler)
        marks.update(mark)
        monkeypatch.setattr(messages, "_decode", decode)
        monkeypatch.setattr(calls.CallerChannel, "_kick_pump", lambda self: None)  # main reads

    yield arm
    signal.signal(signal.SIGUSR1, old)


@pytest.mark.timeout(60)
def test_an_alarm_inside_another_calls_decode_reaches_the_interrupted_caller(alarm_in_decode):
    """A review of the second version: the handler's exception, raised while another call's
    reply was decoded, failed that call (its reply thrown away) and the call it was meant to
    interrupt ran to its end.  The reply is now kept for the next reader."""
    def handler(signum, frame):
        raise TimeoutError("alarm")

    with ActorSystem() as system:
        e = system.spawn(Echo)
        e.echo(1)
        alarm_in_decode(handler, "other")
        fut = e.echo.remote("other")
        with pytest.raises(TimeoutError, match="alarm"):
            e.sleep(0.5)
        assert fut.result(timeout=5) == "other"


@pytest.mark.timeout(60)
def test_a_handler_raising_one_prepared_exception_twice(alarm_in_decode):
    """The second version marked a foreign exception with its reply's call id; one instance
    raised twice kept its first mark, so the second reply and the exception were both lost
    and the call waited out call_timeout."""
    prepared = TimeoutError("alarm")

    def handler(signum, frame):
        raise prepared

    with ActorSystem(call_timeout=3) as system:
        e = system.spawn(Echo)
        e.echo(1)
        alarm_in_decode(handler, "x0", "x1")
        for i in range(2):
            with pytest.raises(TimeoutError) as got:
                e.echo(f"x{i}")
            assert got.value is prepared, repr(got.value)
        assert e.echo(3) == 3


_SIGNAL_SCRIPT = textwrap.dedent("""
    import collections, faulthandler, signal, sys, time
    faulthandler.dump_traceback_later(8, exit=True)
    from runtime import ActorSystem
    from tests.integration.actors_lib import Echo

    system = ActorSystem()
    e = system.spawn(Echo)
    assert e.add(1, 1) == 2
    cc = system._ctx._channels[e._ref.index]

    class Due(collections.deque):
        def append(self, item):
            super().append(item)
            signal.raise_signal(signal.SIGUSR1)  # a signal lands while _due_cv is held

    cc._due = Due()
    signal.signal(signal.SIGUSR1, lambda *_: system.shutdown())
    f = e.sleep.remote(0.2)
    f.add_done_callback(lambda f: None)
    try:
        f.result(10)  # the main thread reads: it completes f and queues its callback
    except Exception as exc:
        pass
    print("returned", flush=True)
    system.shutdown()
""")


@pytest.mark.timeout(60)
def test_shutdown_from_a_signal_handler_while_a_callback_is_queued():
    """Found in review: a handler that shuts the system down landed while its thread, a
    reader, held the callback queue's lock (queueing a callback); ``close()`` took the same
    lock, not re-entrant: the process hung.  In a subprocess, since it hangs."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, "hung (faulthandler dump):\n" + out[-3000:]
    except subprocess.TimeoutExpired:
        p.kill()  # its supervisor follows the driver's death
        out, _ = p.communicate()
        pytest.fail("shutdown in a signal handler hung on _due_cv:\n" + out[-2000:])
    assert "returned" in out, out[-2000:]
