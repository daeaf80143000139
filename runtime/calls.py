"""The caller's side of method calls: channels to actors, futures, replies.

One :class:`ProcessContext` per process and session holds that process's
channels to actors (one per target actor, shared by every handle and thread
of the process).  A call is ``(call_id, method, args, kwargs[, chain])`` (``chain``: the
actors whose calls led to it, see ``ProcessContext.serving``; none from a driver); a reply is
``(call_id, ok, result_or_error)``.

Who reads replies.  The thread that waits for a result reads the channel
itself (it holds the channel's *reader role*), so a blocking call costs no
thread hand-off: send, spin or sleep on the doorbell, read, return.  Replies
for other calls it meets on the way complete their futures.  Futures that
nobody waits on (``.remote()`` followed by ``add_done_callback``) are
completed by a per-channel pump thread that takes the role when it is free.
Done-callbacks run on neither: each channel has one callback thread that runs
them in completion order (``CallerChannel._callbacks_main``), so a slow or
re-entrant callback holds up no reader, sender, sweep or serving thread.

Failure.  Every wait is cut into slices of at most 100 ms; after each the
actor's entry in the shared actor table is read (one memory load): a death or
restart fails every pending call with :class:`ActorDiedError`.  Call deadlines
(``call_timeout``) fail a call with :class:`CallTimeoutError` and forget its
id, so a late reply is dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from runtime import codec, control, limits, waits
from runtime.errors import (
    ActorDiedError,
    ActorRuntimeError,
    CallTimeoutError,
    DeadlineError,
    ProtocolError,
    TransportError,
    make_remote_exception,
    rebuilt,
)
from runtime.messages import MessageChannel
from runtime.session import Session
from runtime.spin import SpinPolicy
from runtime.table import (
    ALIVE,
    DEAD,
    FLAG_UNTRUSTED,
    RESTARTING,
    STATE_NAMES,
    ActorTable,
    describe_exit,
)
from runtime.table import CAPACITY as TABLE_CAPACITY
from runtime.transport.channel import Channel

__all__ = ["ActorRef", "ProcessContext", "context_for", "register_context"]

log = logging.getLogger(__name__)

# This process's pid, refreshed in a forked child: a context made by another
# process (the parent of a fork) refuses to work (its channels are the parent's).
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)

# Spin for a reply between these bounds before sleeping on the doorbell
# (see runtime.spin): a no-op round trip is ~35 us, a 1 MiB echo ~600 us; a
# 200 ms call pays at most 2 ms of spinning (1 %) before its waiter sleeps.
REPLY_SPIN_MIN_S, REPLY_SPIN_MAX_S = 100e-6, 2e-3
# A call that had to wake a sleeping actor waits for that wake-up (~100-250 us
# on this VM) on top of the call: spin through it rather than sleep and need
# a second wake-up for the reply.
WOKE_SPIN_S = 600e-6
# Actors a call chain names at most: the callers whose calls are being served, innermost
# last (``ProcessContext.serving``); a longer chain keeps its innermost actors.
MAX_CHAIN = 64
# Timed-out calls whose late replies a channel still expects (and drops); past this many,
# more are not tracked (an actor that never answers them costs the caller nothing more).
MAX_LATE = 1 << 16
# Replies a send waiting for ring space reads per look (then it checks its deadline), and
# the slack over the calls in flight that the queue of such replies may hold.
DRAIN_MAX = 256
# How often a reader that keeps receiving replies still fails the calls past call_timeout.
EXPIRE_EVERY_S = 0.01
# How long the pump, finding the reader role taken, waits for a kick before it looks again
# (a reader that leaves calls pending kicks it; this is the backstop), doubling up to the
# cap while the role stays taken (a long blocking call: no polling every 5 ms for it).
PUMP_RETRY_S, PUMP_RETRY_MAX_S = 0.005, 0.5
# How long the serving thread of an actor, blocked without a timeout, waits before it leaves
# a wait note and reads its callers' (see runtime.waits), and then between two looks,
# doubling up to the cap: a cycle is seen within ~the cap of its closing.
WATCH_FIRST_S, WATCH_MAX_S = 0.02, 0.25
# How long shutdown waits for the done-callbacks of the calls it failed (all channels).
CALLBACKS_AT_CLOSE_S = 2.0


@dataclass(frozen=True)
class ActorRef:
    """Plain connection data of an actor: what a pickled handle carries."""

    sid: str
    index: int
    name: str
    cls_name: str
    methods: frozenset[str]
    untrusted: bool


def ctl_path(session: Session, index: int, incarnation: int) -> str:
    """The Unix socket on which incarnation ``incarnation`` of actor ``index`` opens channels."""
    return session.private_path(f"actor{index}.{incarnation}.ctl")


def bell_path(session: Session, index: int, incarnation: int) -> str:
    return session.private_path(f"actor{index}.{incarnation}.bell")


class _Slot:
    """Where a blocking call's reply lands; lighter than a Future (~0.3 us vs 4 us)."""

    __slots__ = ("call_id", "done", "event", "ok", "value", "wire")

    def __init__(self) -> None:
        self.done = False
        self.event: threading.Event | None = None
        self.wire: list[Any] | None = None

    def complete(self, ok: bool, value: Any) -> None:
        if self.done:  # the first completion wins (see _complete)
            return
        self.ok, self.value = ok, value
        self.done = True
        ev = self.event
        if ev is not None:
            ev.set()

    def is_done(self) -> bool:
        return self.done

    def wait(self, timeout: float) -> None:
        if self.event is None:
            self.event = threading.Event()
        if not self.done:
            self.event.wait(timeout)


if concurrent.futures.TimeoutError is TimeoutError:  # Python >= 3.11: one class
    ResultTimeoutError: type[TimeoutError] = TimeoutError
else:
    class ResultTimeoutError(concurrent.futures.TimeoutError, TimeoutError):  # type: ignore
        """Python 3.10's futures timeout, and the built-in ``TimeoutError`` too.

        DESIGN.md promises the built-in one; the two classes became one in 3.11.
        """


class CallFuture(Future):
    """A ``concurrent.futures.Future`` whose ``result()`` reads replies itself.

    Waiting in ``result``/``exception`` drives the channel (no thread
    hand-off); ``TimeoutError`` at the timeout leaves the call running.

    ``wire``: ``[route, bytes]`` of the call as sent, then of its reply once read
    (``"shm"``/``"zmq"`` and the encoded size, as the channel's counters count them):
    per-call accounting that stays exact with several calls in flight.
    """

    def __init__(self, owner: CallerChannel) -> None:
        super().__init__()
        self._owner = owner
        self.wire: list[Any] | None = None
        self.call_id = 0  # set when sent
        self.done_ns = 0  # monotonic ns when the reply (or the failure) completed the call

    def complete(self, ok: bool, value: Any) -> None:
        if self._state == "FINISHED":  # a second completion (see _complete) moves nothing
            raise InvalidStateError(f"{self!r} is done")
        self.done_ns = time.monotonic_ns()
        if ok:
            self.set_result(value)
        else:
            self.set_exception(value)

    def _invoke_callbacks(self) -> None:
        # Futures run done-callbacks on whichever thread completes them.  Here that is a
        # reader holding the channel's role (the pump, or a caller waiting on another
        # call), a sender reading while the ring is full, a sweep holding its lock, or an
        # actor's serving thread: a slow callback (post-processing, a chained call, a
        # kill) would hold up every other call to the actor, the news of its death, or
        # be refused what its thread may not do.  So they go to the channel's callback
        # thread (reviews found each of those).
        if self._done_callbacks:
            self._owner._queue_callbacks(self)

    def _run_callbacks(self) -> None:
        # concurrent.futures logs an Exception from a callback; a SystemExit or a
        # KeyboardInterrupt raised by one would end the channel's callback thread and
        # strand the callbacks queued behind it, so those are logged too.
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException:  # see above
                log.exception("exception calling callback for %r", self)

    def is_done(self) -> bool:
        return self._state == "FINISHED"

    def wait(self, timeout: float) -> None:
        with self._condition:
            if not self.done():
                self._condition.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._owner.wait_for(self, timeout)
        if not self.done():
            raise ResultTimeoutError()
        return super().result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._owner.wait_for(self, timeout)
        if not self.done():
            raise ResultTimeoutError()
        return super().exception()


class _Failed:
    """A reply that could not be decoded, queued like a reply (see ``_drain_nowait``)."""

    __slots__ = ("exc", "tag")

    def __init__(self, tag: int, exc: BaseException) -> None:
        self.tag, self.exc = tag, exc


def _cycle_text(ref: ActorRef, outcome: str) -> str:
    return (f"call cycle: actor {ref.name!r} is busy serving the call that led to this one, "
            f"and an actor runs one call at a time, so {outcome}")


def _complete(waiter: Any, ok: bool, value: Any) -> None:
    """Complete ``waiter`` unless it is done: the first of the paths that race to wins.

    A reply, a timeout and the channel's end may all reach one call.  Each path completes
    the call *before* it removes it from the pending set: a Ctrl-C between the two leaves a
    done call in the set (removed by the next path that meets it), where the other order
    could leave a call that nothing will ever complete.
    """
    try:
        waiter.complete(ok, value)  # a _Slot ignores a second completion
    except InvalidStateError:  # a Future refuses one
        pass


def _again(exc: BaseException) -> BaseException:
    """A fresh exception like ``exc``.

    One instance raised in many threads would collect all their tracebacks.
    """
    try:
        return type(exc)(str(exc))
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return ActorRuntimeError(str(exc))


class CallerChannel:
    """The channel of this process to one incarnation of one actor.

    Once the channel fails (the actor died, the system shut down, the peer
    broke the protocol) ``dead`` holds the reason: every pending call fails
    with it, and so does every later call that still holds this channel.
    Nothing touches the underlying :class:`Channel` without holding the send
    lock (to send) or the reader role (to read), and :meth:`close` takes both
    before it unmaps anything.
    """

    def __init__(self, ctx: ProcessContext, ref: ActorRef, incarnation: int,
                 channel: MessageChannel) -> None:
        self.ctx = ctx
        self.ref = ref
        self.incarnation = incarnation
        entry = ctx.table.read(ref.index)
        # The process this channel reaches: a death message names it, not a successor.
        self.pid = entry.pid if entry.incarnation == incarnation else 0
        self.channel = channel
        self.pending: dict[int, tuple[Any, float | None]] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._sender: int | None = None  # the thread holding _send_lock (close() asks)
        # Held while a wait note is written (see runtime.waits): close() takes it before
        # it unmaps the ring the note goes to.
        # Re-entrant: a signal handler's wait may nest in a write (close() asks _is_owned).
        self._note_lock = threading.RLock()
        self._note = b""  # the note left now (a nested wait puts the outer one back)
        # Re-entrant, for safety: done-callbacks never run under it (``_queue_callbacks``).
        self._role = threading.RLock()
        self._pump: threading.Thread | None = None
        self._pump_event = threading.Event()
        self.dead: BaseException | None = None
        self.closed = False
        self.spin = SpinPolicy(REPLY_SPIN_MIN_S, REPLY_SPIN_MAX_S)
        # Replies read while a send held the lock (at most one per call in flight, plus slack).
        self._deferred: collections.deque[Any] = collections.deque()
        # True while a reader may hold a reply it has consumed and not yet dispatched (or
        # queued in ``_deferred``): set before each receive, cleared when it goes to sleep.
        self._in_hand = False
        # Futures whose done-callbacks are yet to run, in completion order, and the
        # thread that runs them (started at the first, ended once closed and idle).
        self._due: collections.deque[CallFuture] = collections.deque()
        # Re-entrant: a signal handler may shut the system down (close() notifies) while
        # its own thread, a reader, queues a callback.
        self._due_cv = threading.Condition(threading.RLock())
        self._callbacks: threading.Thread | None = None
        # Calls that timed out and whose replies have not come yet: they are still read
        # (and dropped) as they come, or they would fill the channel -- ring, pool slots,
        # ZeroMQ -- and leave the actor stuck in a send only this caller could unblock.
        self._late: set[int] = set()

    # -- liveness --------------------------------------------------------------
    def check(self) -> None:
        """Raise if this channel is finished or the actor it reaches is gone."""
        if self.dead is not None:
            raise _again(self.dead)
        if not self.ctx.table.alive(self.ref.index, self.incarnation):
            raise ActorDiedError(self.death_text())
        self.ctx.check_owner()

    def death_text(self) -> str:
        return self.ctx.death_text(self.ref, self.ctx.table.read(self.ref.index),
                                   incarnation=self.incarnation, pid=self.pid)

    # -- calls -----------------------------------------------------------------
    def call(self, method: str, args: tuple, kwargs: dict, *,
             deadline: float | None = None, chain: tuple[int, ...] = (),
             wire: list[Any] | None = None) -> Any:
        """A blocking call: send, read replies until ours, return or raise.

        ``deadline`` (monotonic): when the call began, if earlier than now -- a first call
        spent part of its ``call_timeout`` opening the channel.  Default: now + call_timeout.
        ``chain``: the actors waiting on this call (``ProcessContext.serving``).
        ``wire``: a list that receives the call's wire record (see ``CallFuture``).
        """
        slot = _Slot()
        t0 = time.perf_counter()
        self._send(method, args, kwargs, slot, deadline, chain=chain)
        if chain and self.ctx.watches_waits():  # serving a call: see runtime.waits
            self._drive_watched(slot, waits.BLOCKED)
        else:
            self.drive(slot, None)
        self.spin.observe(time.perf_counter() - t0)
        if wire is not None and slot.wire is not None:
            wire[:] = slot.wire
        if slot.ok:
            return slot.value
        raise slot.value

    def submit(self, method: str, args: tuple, kwargs: dict, *,
               deadline: float | None = None) -> CallFuture:
        """Send the call; its reply completes the returned future.

        ``deadline``: as for :meth:`call`.
        """
        fut = CallFuture(self)
        fut.set_running_or_notify_cancel()  # a sent call cannot be taken back
        self._send(method, args, kwargs, fut, deadline)
        self._kick_pump()
        return fut

    def _send(self, method: str, args: tuple, kwargs: dict, waiter: Any,
              deadline: float | None, *, chain: tuple[int, ...] = ()) -> None:
        try:
            self._send_locked(method, args, kwargs, waiter, deadline, chain=chain)
        except ActorDiedError:
            self.ctx.retire(self)  # its descriptors go now, not at shutdown
            raise
        # Complete what was read meanwhile -- unless this thread is the reader
        # (a callback): its reading loop does it next, without nesting deeper.  Nor
        # when another thread reads: it may be in a long blocking call, which this send
        # (a .remote(), say) must not wait for; it dispatches them at its next look
        # (within a wait slice) -- review K of 84e654d.
        if self._deferred and not self._role._is_owned():
            if self._role.acquire(blocking=False):
                try:
                    self._dispatch_deferred()
                finally:
                    self._role.release()
            if self.pending or self._late:
                self._kick_pump()  # the pump does not queue for the role (see _pump_main)

    def _send_locked(self, method: str, args: tuple, kwargs: dict, waiter: Any,
                     deadline: float | None, *, chain: tuple[int, ...] = ()) -> None:
        if self.dead is not None:
            raise _again(self.dead)
        timeout = self.ctx.session.call_timeout
        if timeout is None:
            deadline = None
        elif deadline is None:
            deadline = time.monotonic() + timeout
        elif time.monotonic() >= deadline:  # not sent: it would time out unread
            raise CallTimeoutError(f"call to actor {self.ref.name!r} not sent: opening its "
                                   f"channel took all of call_timeout ({timeout} s)")
        # Waiting for the send lock, keep reading replies when we may: the
        # holder may be stuck on a full ring that only drains once the actor
        # can write its replies -- and the reader may be us, in a callback.
        while not self._send_lock.acquire(timeout=0.0005):
            self._drain_nowait()
            if self.dead is not None:
                raise _again(self.dead)
            if deadline is not None and time.monotonic() >= deadline:
                raise self._send_timeout(timeout)
        try:
            self._sender = threading.get_ident()
            if self.dead is not None:  # closed while we waited for the lock
                raise _again(self.dead)
            call_id = next(self._ids) & 0xFFFFFFFF
            if not call_id:  # 0 is no call's (an actor records no answer to it): skipped
                call_id = next(self._ids) & 0xFFFFFFFF
            waiter.call_id = call_id
            self.pending[call_id] = (waiter, deadline)
            if self.dead is not None:  # failed (close, kill) since the check above: the
                self.pending.pop(call_id, None)  # failure may have missed this call
                raise _again(self.dead)
            try:
                # No chain (the driver's calls, most of all): the four fields alone.
                enc = self.channel.encode((call_id, method, args, kwargs, chain) if chain
                                          else (call_id, method, args, kwargs))
                # The record exists before the send: another thread may read the reply
                # before ``send_encoded`` returns (one waiting for the send lock drains
                # replies), and notes its half then (review V: 1 record in 40,000 lacked it).
                wire = waiter.wire = [None, enc.nbytes]
                wire[0] = self.channel.send_encoded(enc, tag=call_id, deadline=deadline,
                                                    check=self.check,
                                                    on_full=self._drain_nowait)
            except BaseException as exc:
                self.pending.pop(call_id, None)
                if isinstance(exc, ActorDiedError):
                    self._fail_all(exc)
                elif isinstance(exc, DeadlineError):
                    raise self._send_timeout(timeout) from exc
                raise
        finally:
            self._sender = None
            self._send_lock.release()

    def _send_timeout(self, timeout: float | None) -> CallTimeoutError:
        return CallTimeoutError(f"call to actor {self.ref.name!r} could not be sent within "
                                f"{timeout} s: the actor is not reading its channel (busy, "
                                f"or too many calls queued)")

    def set_note(self, note: bytes) -> bool:
        """Leave a wait note for the actor (``Channel.set_note``); False where it cannot."""
        with self._note_lock:
            if self.closed:
                return False
            # Recorded before the write: a wait nested in it (a signal handler's) puts
            # this one back when it ends (review O).
            prev, self._note = self._note, note
            if not self.channel.set_note(note):
                self._note = prev
                return False
            return True

    def wait_for(self, fut: CallFuture, timeout: float | None) -> None:
        """Wait for ``fut`` (``result()``/``exception()``): refuse a wait that would never end.

        A wait with a timeout ends anyway.  Without one, a wait on a chain member or on this
        very actor is refused at once (``refuse_wait_cycle``), and the serving thread of
        an actor watches its callers' wait notes while it waits (:meth:`_drive_watched`),
        as it does in a blocking call.
        """
        if timeout is None and self.ctx.serving_thread is not None:  # an actor (not a driver)
            try:
                self.ctx.refuse_wait_cycle(self.ref)
            except ActorRuntimeError:
                if not self._unanswered(fut):
                    return  # answered before this call began: its reply was on the way
                raise
            if self.ctx.watches_waits():
                self._drive_watched(fut, waits.WAITING)
                return
        self.drive(fut, timeout)

    def _drive_watched(self, waiter: Any, kind: int) -> None:
        """Read replies until ``waiter`` is done, failing the wait if a cycle closes on it.

        See runtime.waits: the note left here lets the actor called see this wait; the
        notes of this actor's callers tell whether the call waited on waits for it.  Both
        wait until the call has taken ``WATCH_FIRST_S``: a cycle lasts for ever, and a
        short call (most of them) pays for neither (a note costs ~5 us).
        """
        started = time.monotonic_ns()
        self.drive(waiter, WATCH_FIRST_S)
        if waiter.is_done():
            return
        ctx = self.ctx
        mine = waits.WaitNote(kind, waiter.call_id, started, ctx.self_index, ctx.self_name)
        outer = self._note  # a wait this one interrupted (a signal handler's call)
        # An untrusted actor reads no notes: it is not told who waits on it (its trust from
        # the table, as the channel's: a handle is plain data -- review M).  ``writes`` is
        # known before the write, so that an interrupted one is still taken back.
        writes, noted = not self.channel.safe, False
        pause = WATCH_FIRST_S
        try:
            if writes:
                noted = self.set_note(waits.encode(mine))
            while True:
                text, links = ctx.look(self.ref, mine, noted=noted)
                if writes and links != mine.links:  # who waits on this wait, passed on
                    mine = mine._replace(links=links)
                    self.set_note(waits.encode(mine))
                # A dead actor's call ends anyway, and its death explains it better.
                if text is not None and ctx.table.alive(self.ref.index, self.incarnation) \
                        and self._nothing_unread(waiter):
                    raise ActorRuntimeError(text)
                pause = min(2 * pause, WATCH_MAX_S)
                self.drive(waiter, pause)
                if waiter.is_done():
                    return
        finally:
            if writes:
                self.set_note(outer)

    def _unanswered(self, fut: CallFuture) -> bool:
        """Whether ``fut``, refused as a cycle, is indeed unanswered (review K of 84e654d).

        A call to a chain member or to this actor may have been answered before the call
        now served began (sent by an earlier call, or another thread): its reply is then on
        the way, and the wait must take it rather than fail.  Inconclusive for a while
        (another reader holds a reply): looked at again for up to a second, then refused.
        """
        give_up = time.monotonic() + 1.0
        while not self._nothing_unread(fut):
            if fut.is_done():
                return False
            if self.channel.rx is None or time.monotonic() >= give_up:
                return True
            self.drive(fut, 0.005)
        return True

    def _nothing_unread(self, fut: Any) -> bool:
        """True if ``fut`` is not done with every reply the actor has sent so far read.

        What makes a cycle certain: its reply is not on the way.  Only a channel with
        rings can tell (a ZeroMQ-only one may hold a reply in flight unseen).  This reads
        what it can; another thread holding the reader role (the pump, most of all) may
        hold a consumed reply it has not dispatched yet, and says so (``_in_hand``).
        """
        ch = self.channel
        if ch.rx is None:
            return False
        if self._role.acquire(blocking=False):
            try:
                self._read_until(lambda: fut.is_done() or (
                    not self._deferred and not ch.readable()), time.monotonic() + 0.1)
            finally:
                self._role.release()
                if self.pending or self._late:
                    self._kick_pump()
        # In this order: a reply consumed after the first look was taken in hand first,
        # and is dispatched (its call done) before it leaves the reader's hand.
        return not ch.readable() and not self._in_hand and not self._deferred \
            and not fut.is_done() and self.dead is None

    def drive(self, waiter: Any, timeout: float | None) -> None:
        """Read replies until ``waiter`` is done or ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiter.is_done():
            if self._role.acquire(blocking=False):
                try:
                    self._read_until(waiter.is_done, deadline)
                finally:
                    self._role.release()
                    if self.pending or self._late:
                        self._kick_pump()
                if self.dead is not None and not waiter.is_done():
                    self._abandon(waiter)  # nothing will ever read its reply
            else:
                wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if wait > 0:
                    waiter.wait(wait)
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _read_until(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Read and dispatch replies (holding the reader role) until ``done()``.

        Never raises for what the actor sent: a reply that fails to decode
        fails its call; one that names no call, a corrupt ring, the actor's
        death fail the channel.  Returns at ``deadline``, or once the channel
        is finished.
        """
        ch = self.channel
        spin = self.spin.window  # spin once; after a slice of sleep, sleep again
        if ch.woke_peer:
            spin = max(spin, WOKE_SPIN_S)
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        outer = self._in_hand  # a reader this one interrupted (a signal handler) holds one
        try:
            self._read_loop(done, deadline, spin, next_expire, outer)
        finally:
            self._in_hand = outer

    def _read_loop(self, done: Callable[[], bool], deadline: float | None, spin: float,
                   next_expire: float, idle: bool) -> None:
        ch = self.channel
        while not done():
            if self.dead is not None or self.closed:
                return
            try:
                if self._deferred:
                    self._dispatch_deferred()
                    continue
                self._in_hand = True
                ok, msg = self._recv()
                if ok:
                    # Acknowledged once dispatched: a Ctrl-C before leaves the reply to
                    # the next reader (dispatching twice is harmless: see _dispatch).
                    self._dispatch(msg)
                    ch.ack()
                    spin = self.spin.window
                    # Timeouts are looked at between replies too: a peer streaming replies
                    # that answer nothing must not keep every call past its call_timeout.
                    now = time.monotonic()
                    if now >= next_expire:
                        self._expire(deadline)
                        next_expire = now + EXPIRE_EVERY_S
                    if deadline is not None and now >= deadline:
                        return
                    continue
                if ch.peer_closed:
                    self.check()  # the actor's death explains it best
                    raise TransportError(f"actor {self.ref.name!r} closed the channel (it "
                                         f"found the channel broken; see its log)")
                self._in_hand = idle  # asleep: holding nothing (unless the reader it interrupted)
                wait_until = self._expire(deadline)
                if deadline is not None and time.monotonic() >= deadline:
                    return
                ch.wait(deadline=wait_until, check=self.check, spin_s=spin)
                spin = 0.0
            except DeadlineError:
                continue  # a deadline passed: the loop re-evaluates
            except ProtocolError as exc:
                tag = getattr(exc, "tag", None)
                entry = None if ch.failed is not None else self.pending.get(tag)
                if entry is None:
                    if ch.failed is None and tag in self._late:
                        self._late.discard(tag)  # a timed-out call's reply: it failed already
                        continue
                    self._fail_all(exc)
                    return
                _complete(entry[0], False, exc)
                self.pending.pop(tag, None)
            except ActorDiedError as exc:
                self._fail_all(exc)
                self.ctx.retire(self)  # its descriptors go now, not at shutdown
                return
            except ActorRuntimeError as exc:
                self._fail_all(exc)
                return
            except Exception as exc:  # the reader must survive anything
                if threading.current_thread() is threading.main_thread():
                    # Where signal handlers run: an alarm-based timeout's exception is the
                    # caller's, as Ctrl-C is, and the channel is in step (a received reply
                    # stays held until dispatched: ``redeliver``).
                    raise
                log.exception("channel to actor %r failed", self.ref.name)
                self._fail_all(TransportError(f"channel to actor {self.ref.name!r} failed: "
                                              f"{type(exc).__name__}: {exc}"))
                return

    def _recv(self) -> tuple[bool, Any]:
        """``try_recv``, noting on the reply's call the route and size it came by (``wire``)."""
        ch = self.channel
        ok, msg = ch.try_recv(check=self.check)
        if ok and type(msg) is tuple and len(msg) == 3 and type(msg[0]) is int:
            entry = self.pending.get(msg[0])
            if entry is not None and entry[0].wire is not None and ch.last_in is not None:
                entry[0].wire[2:] = ch.last_in
        return ok, msg

    def _dispatch(self, msg: Any) -> None:
        """Complete the call ``msg`` answers; never raises for what the actor sent.

        Idempotent: a reply dispatched again (redelivered after a Ctrl-C) finds its call
        done, or gone from the pending set, and is dropped.
        The reply is validated before its call leaves the pending set.  A
        malformed reply that names a pending call fails that call with
        ``ProtocolError``; one that names no call fails the channel.
        """
        if type(msg) is _Failed:
            entry = self.pending.get(msg.tag)
            if entry is not None:
                _complete(entry[0], False, msg.exc)
                self.pending.pop(msg.tag, None)
            self._late.discard(msg.tag)
            return
        if type(msg) is not tuple or len(msg) != 3 or type(msg[0]) is not int:
            what = type(msg).__name__
            if type(msg) is tuple:
                what = f"tuple of {len(msg)}" + (f" with a {type(msg[0]).__name__} call id"
                                                 if len(msg) == 3 else "")
            self._fail_all(ProtocolError(f"malformed reply from actor {self.ref.name!r}: "
                                         f"expected (call id, ok, value), got a {what}"))
            return
        call_id, ok, payload = msg
        entry = self.pending.get(call_id)
        if entry is None:
            self._late.discard(call_id)
            return  # the call timed out earlier: drop its late reply
        if type(ok) is not bool:
            ok, value = False, ProtocolError(
                f"malformed reply from actor {self.ref.name!r} to call {call_id}: its ok "
                f"flag is a {type(ok).__name__}, not a bool")
        elif ok:
            value = payload
        else:
            value = _rebuild_error(payload, safe=self.channel.safe)
        _complete(entry[0], ok, value)
        self.pending.pop(call_id, None)

    def _expire(self, deadline: float | None) -> float | None:
        """Fail calls past their call_timeout; return the next deadline to wake at."""
        soonest = deadline
        if self.ctx.session.call_timeout is None:
            return soonest
        now = time.monotonic()
        for call_id, (fut, due) in list(self.pending.items()):
            if due is None:
                continue
            if due <= now:
                _complete(fut, False, CallTimeoutError(
                    f"call to actor {self.ref.name!r} got no reply within "
                    f"{self.ctx.session.call_timeout} s"))
                self.pending.pop(call_id, None)
                if len(self._late) < MAX_LATE:
                    self._late.add(call_id)
            elif soonest is None or due < soonest:
                soonest = due
        return soonest

    def _drain_nowait(self) -> None:
        """While our send waits for ring space, read replies if nobody else is.

        The replies are only queued: completing a future runs its callbacks,
        and a callback that calls this actor again would wait for the send
        lock we hold.  They are completed, in order, once the send is done
        (or by the next reader, before anything newer).  A reply that fails
        to decode is queued as a failure of its call; a failure of the channel
        fails every call (their callbacks find the channel dead and return).
        """
        if self._role.acquire(blocking=False):
            outer, self._in_hand = self._in_hand, True
            try:
                ch = self.channel
                # Bounded, so that the send's own deadline is looked at between batches: a
                # peer streaming replies would otherwise hold the send here for ever.
                for _ in range(DRAIN_MAX):
                    if self.dead is not None or self.closed:
                        break
                    try:
                        ok, msg = self._recv()
                    except ProtocolError as exc:
                        tag = getattr(exc, "tag", None)
                        if ch.failed is not None or tag is None or (
                                tag not in self.pending and tag not in self._late):
                            # As _read_until: an undecodable reply to no call fails the
                            # channel (queueing it would cost memory without bound).
                            self._fail_all(exc)
                            raise
                        self._deferred.append(_Failed(tag, exc))
                    else:
                        if not ok:
                            break
                        if type(msg) is tuple and len(msg) == 3 and type(msg[0]) is int \
                                and msg[0] not in self.pending and msg[0] not in self._late:
                            ch.ack()  # answers no call: dropped now, as _dispatch would
                            continue
                        self._deferred.append(msg)
                        ch.ack()
                    if len(self._deferred) > len(self.pending) + len(self._late) + DRAIN_MAX:
                        # More replies than calls in flight: an honest actor answers each
                        # call once.  Queueing them would cost memory without bound.
                        exc = ProtocolError(f"actor {self.ref.name!r} sent more replies "
                                            f"than there are calls in flight")
                        self._fail_all(exc)
                        raise exc
            finally:
                self._in_hand = outer
                self._role.release()
                if self.pending or self._late:
                    self._kick_pump()  # it does not queue for the role (see _pump_main)

    # -- done-callbacks ------------------------------------------------------------
    def _queue_callbacks(self, fut: CallFuture) -> None:
        """Have the channel's callback thread run ``fut``'s done-callbacks."""
        with self._due_cv:
            self._due.append(fut)
            if self._callbacks is not None:
                self._due_cv.notify()
                return
            # Named before it starts: a signal handler's nested completion must not start
            # a second thread (callbacks would run out of order).
            t = self._callbacks = threading.Thread(
                target=self._callbacks_main, daemon=True, name=f"rt-callbacks-{self.ref.name}")
            try:
                t.start()  # it waits for this lock before it looks at the queue
                return
            except BaseException as exc:
                self._callbacks = None  # the next completion starts one
                if not isinstance(exc, RuntimeError):
                    raise  # (a Ctrl-C) ``fut`` stays queued for that thread
                self._due.remove(fut)  # no new thread (the interpreter is exiting)
        fut._run_callbacks()  # then here, outside the lock

    def _callbacks_main(self) -> None:
        """Run queued done-callbacks in completion order, one at a time, until closed.

        One thread per channel: callbacks of one actor's calls keep their order, and a
        slow one holds up only those queued behind it.  A callback may do anything a user
        thread may: call (this actor too), kill, shut the system down.
        """
        while True:
            with self._due_cv:
                while not self._due:
                    if self.closed:
                        self._callbacks = None  # a later completion starts a new thread
                        self._due_cv.notify_all()  # for wait_callbacks
                        return
                    self._due_cv.wait(1.0)
                fut = self._due[0]  # left queued while it runs: wait_callbacks waits for it
            fut._run_callbacks()  # logs whatever a callback raises
            with self._due_cv:
                self._due.popleft()
                if not self._due:
                    self._due_cv.notify_all()

    def wait_callbacks(self, deadline: float) -> None:
        """Wait until the queued done-callbacks have run, or ``deadline`` (monotonic).

        Not from a callback (it would wait for itself).
        """
        with self._due_cv:
            t = self._callbacks
            if t is None or t is threading.current_thread():
                return
            while self._due:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._due_cv.wait(left)

    def _dispatch_deferred(self) -> None:
        """Complete the replies ``_drain_nowait`` queued (holding the reader role)."""
        while self._deferred:
            self._dispatch(self._deferred[0])  # then dropped: a Ctrl-C between loses none
            self._deferred.popleft()

    def _abandon(self, waiter: Any) -> None:
        """Fail ``waiter`` on a finished channel: no reader will ever complete it."""
        _complete(waiter, False, _again(self.dead))
        for call_id, entry in list(self.pending.items()):
            if entry[0] is waiter:
                self.pending.pop(call_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        if self.dead is None:
            self.dead = exc
        self._late.clear()
        while self.pending:  # a call registered meanwhile sees ``dead`` and leaves itself
            for call_id, (fut, _) in list(self.pending.items()):
                _complete(fut, False, _again(exc))
                self.pending.pop(call_id, None)

    # -- pump --------------------------------------------------------------------
    def _kick_pump(self) -> None:
        if self._pump is None and not self.closed:
            self._pump = threading.Thread(target=self._pump_main, daemon=True,
                                          name=f"rt-pump-{self.ref.name}")
            self._pump.start()
        self._pump_event.set()

    def _pump_main(self) -> None:
        while not self.closed:
            self._pump_event.wait(1.0)
            self._pump_event.clear()
            retry = PUMP_RETRY_S
            while (self.pending or self._late) and not self.closed and self.dead is None:
                # Never queue for the role: a pump blocked on it woke whenever its holder
                # let go -- after a .remote().result() read its reply -- and took the role
                # for the caller's next call, whose result() then slept until the pump
                # passed the reply on (55-60 us instead of ~30, round after round).  A
                # reader that leaves calls pending kicks the pump; the slice is a backstop.
                if not self._role.acquire(blocking=False):
                    if not self._pump_event.wait(retry):
                        retry = min(2 * retry, PUMP_RETRY_MAX_S)
                    self._pump_event.clear()
                else:
                    retry = PUMP_RETRY_S
                    try:
                        self._read_until(
                            lambda: not (self.pending or self._late) or self.closed,
                            time.monotonic() + 0.5)
                    except BaseException as exc:  # the pump never dies
                        log.exception("pump of actor %r", self.ref.name)
                        self._fail_all(TransportError(f"channel to actor {self.ref.name!r} "
                                                      f"failed: {exc!r}"))
                    finally:
                        self._role.release()

    def close(self, reason: BaseException | None = None) -> None:
        """Fail what is pending with ``reason``, then release the channel (idempotent)."""
        if self.closed:
            return
        notify = self.dead is None
        self.closed = True
        self._fail_all(reason or ActorDiedError(f"channel to actor {self.ref.name!r} closed"))
        self._pump_event.set()
        # An idle callback thread ends (it looks again within a second anyway): not
        # waited for, since a signal handler's close may interrupt a holder of the lock.
        if self._due_cv.acquire(blocking=False):
            try:
                self._due_cv.notify_all()
            finally:
                self._due_cv.release()
        # A reader finishes its current wait slice (<= 100 ms) and sees `dead`;
        # a sender waiting for ring space sees it in `check`.  This very thread may be
        # that sender or reader, interrupted (a signal handler that shuts the system
        # down, a done-callback): then the channel is closed once it has left.
        me = threading.get_ident()
        got_send = self._sender != me and self._send_lock.acquire(timeout=5)
        got_role = got_send and not self._role._is_owned() and self._role.acquire(timeout=5)
        got_note = got_role and not self._note_lock._is_owned() \
            and self._note_lock.acquire(timeout=5)
        try:
            if got_note:
                self.channel.close(notify=notify)
        finally:
            if got_note:
                self._note_lock.release()
            if got_role:
                self._role.release()
            if got_send:
                self._send_lock.release()
        if not got_note:
            # A thread is still inside the channel (a long done-callback, say):
            # unmapping now would pull memory from under it.  Close once it left.
            threading.Thread(target=self._close_when_free, args=(notify,), daemon=True,
                             name=f"rt-close-{self.ref.name}").start()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(2.0)  # it runs no user code: it ends within a wait slice

    def _close_when_free(self, notify: bool) -> None:
        with self._send_lock, self._role, self._note_lock:
            self.channel.close(notify=notify)


def _rebuild_error(payload: Any, *, safe: bool) -> BaseException:
    try:
        type_name, message, tb_text, exc_bytes = payload
    except (TypeError, ValueError):
        return ProtocolError("malformed error reply")
    exc, built = None, []
    if type(exc_bytes) is bytes and not safe:  # never from an untrusted actor
        with rebuilt() as built:
            exc = codec.trusted_exception(exc_bytes)
    try:
        # Adopted (made the remote exception itself) only if built for this reply: an
        # object the process already held must not become a remote one (review Q).
        return make_remote_exception(exc, str(type_name), str(message), str(tb_text),
                                     adopt=any(e is exc for e in built))
    except Exception as err:  # noqa: BLE001 - a hostile payload is a protocol error
        return ProtocolError(f"malformed error reply: {type(err).__name__}: {err}")


class ProcessContext:
    """What one process knows of one session: the actor table and its channels."""

    def __init__(self, session: Session, table: ActorTable, *, self_index: int = -1,
                 owner_check: Callable[[], None] | None = None) -> None:
        self.session = session
        self.table = table
        self.self_index = self_index
        self._owner_check = owner_check
        self._channels: dict[int, CallerChannel] = {}
        self._opening: dict[int, threading.Event] = {}  # index -> set once its open ended
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._sweeping = self._sweep_due = False  # see sweep_soon
        # What the channels let go of (dead actors, old incarnations) had sent and received.
        self.gone = {r: {"messages": 0, "bytes": 0} for r in ("shm", "zmq")}
        self._sweep_lock = threading.Lock()
        self.closed = False
        self.killer: Callable[[int], None] | None = None
        self.owner: object = None  # the driver's ActorSystem: kept alive by its handles
        self.pid = os.getpid()
        # In an actor: the actors whose blocking calls led to the one its serving thread
        # runs, this one last.  Each blocking call carries them, so a call back into any of
        # them -- busy, one call at a time -- fails at once instead of waiting for ever.
        self.serving: tuple[int, ...] = ()
        self.serving_thread: int | None = None
        # In a trusted actor: the wait notes its inbound callers left, each with the id of
        # the last call answered on that channel, the caller's pid and incarnation (see
        # runtime.waits), and its name.
        self.inbound_notes: Callable[[], list[tuple[bytes, int, int, int]]] | None = None
        self.self_name = ""

    @property
    def forked(self) -> bool:
        """True in a child forked from the process this context belongs to."""
        return self.pid != _pid

    def check_process(self) -> None:
        """Refuse to work in a forked child: its channels are the parent's."""
        if self.pid != _pid:
            raise ActorRuntimeError(
                f"this actor handle belongs to process {self.pid}; process {_pid} is a fork "
                f"of it and cannot use it (the channels are the parent's). Start an "
                f"ActorSystem in the child, or call actors from the parent")

    def kill(self, ref: ActorRef) -> None:
        self.check_process()
        if self.killer is None:
            raise ActorRuntimeError("kill() works in the driver process (the one that owns "
                                    "the ActorSystem)")
        self.killer(ref.index)
        self.forget(ref.index, ActorDiedError(self.death_text(ref, self.table.read(ref.index))))

    def check_owner(self) -> None:
        if self._owner_check is not None:
            self._owner_check()

    def death_text(self, ref: ActorRef, entry: Any, *, incarnation: int | None = None,
                   pid: int = 0) -> str:
        """Why actor ``ref`` is gone, from its table ``entry``.

        With ``incarnation`` (and its ``pid``), the text is about that process
        -- the one a caller was talking to -- even after a restart replaced
        it: the table keeps the last exit code while the successor starts.
        """
        state = STATE_NAMES[entry.state] if entry.state < len(STATE_NAMES) else entry.state
        if incarnation is None or entry.incarnation == incarnation:
            pid = pid or entry.pid
            how = describe_exit(entry.exit) if pid else "never started"
            return f"actor {ref.name!r} (pid {pid}) died: {how}; now {state}"
        ended = entry.state in (RESTARTING, DEAD)
        if entry.incarnation == incarnation + 1 and not ended:
            return (f"actor {ref.name!r} (pid {pid}) died: {describe_exit(entry.exit)}; "
                    f"restarted as pid {entry.pid} ({state})")
        return (f"actor {ref.name!r} (pid {pid}) died; it has been restarted since "
                f"(now pid {entry.pid}, {state})")

    # -- calls -----------------------------------------------------------------
    def call(self, ref: ActorRef, method: str, args: tuple, kwargs: dict, *,
             wire: list[Any] | None = None) -> Any:
        """A blocking call to ``ref``; ``wire`` receives its wire record (``CallFuture``)."""
        # A blocking call from the thread serving a call carries the actors whose calls
        # wait on it (``serving``); one back into any of them could never be served.  Not
        # ``.remote()``: its caller may not wait (a notification, fire and forget).
        chain = self.serving if self.serving_thread is not None \
            and threading.get_ident() == self.serving_thread else ()
        if chain and ref.index in chain and ref.index != self.self_index:  # self: see below
            raise ActorRuntimeError(_cycle_text(ref, "this call could never be served"))
        if ref.index == self.self_index:
            self._refuse_self_call(ref)
        cc = self._open_channel(ref)
        if cc is not None:  # the hot path: the call's deadline starts at its send
            return cc.call(method, args, kwargs, chain=chain, wire=wire)
        deadline = self._call_deadline()
        return self.channel_for(ref, deadline).call(method, args, kwargs, deadline=deadline,
                                                    chain=chain, wire=wire)

    def refuse_wait_cycle(self, ref: ActorRef) -> None:
        """Refuse to wait, on the serving thread, for a pending call to ``ref`` that waits on it.

        ``.remote()`` back into the chain is allowed (its caller may never wait), but
        ``result()`` on it then waited for ever: the target is blocked in the call that
        this thread is serving -- or is this very actor, whose next call starts only
        once this one ends.  Only a wait without a timeout is refused (``result()``
        checks), and under ``call_timeout`` only one on this very actor: the wait on a
        chain member ends anyway, and a member whose call timed out may be free again.
        """
        if self.serving_thread is None or threading.get_ident() != self.serving_thread:
            return
        if ref.index == self.self_index:  # never served while this call runs: refused always
            raise ActorRuntimeError(
                f"call cycle: waiting, in a call of actor {ref.name!r}, on another call to "
                f"it: an actor runs one call at a time, so that call starts only after this "
                f"one ends")
        if self.session.call_timeout is not None:
            return  # the wait ends (its call times out), and a chain member may be free
        if ref.index in self.serving:
            raise ActorRuntimeError(_cycle_text(ref, "waiting on this call would never end"))

    def watches_waits(self) -> bool:
        """Whether this thread, blocked without a timeout, watches for cycles (runtime.waits).

        The serving thread of a trusted actor, when no ``call_timeout`` ends every wait.
        """
        return self.inbound_notes is not None and self.session.call_timeout is None \
            and threading.get_ident() == self.serving_thread

    def look(self, ref: ActorRef, mine: waits.WaitNote, *,
             noted: bool) -> tuple[str | None, tuple[waits.Link, ...]]:
        """Read the callers' wait notes during the wait ``mine`` on a call to ``ref``.

        Returns why the wait would never end (None if nothing says so), and the waits that
        wait on this one (``waits.upstream``), for this actor's own note.
        """
        now = time.monotonic_ns()
        waiting: list[tuple[waits.WaitNote, waits.Link]] = []
        for raw, answered, pid, incarnation in self.inbound_notes():
            note = waits.decode(raw)
            if note is None or not self._is_live(note.writer, pid, incarnation):
                continue  # none, or a dead incarnation's (its pid reused since): review M
            if waits.unanswered(note.call_id, answered):  # else a wait that has ended
                waiting.append((note, waits.Link(note.writer, self.self_index, note.call_id,
                                                 note.started_ns, now)))
        links = waits.upstream(waiting, self.self_index, ref.index, now)
        # Two actors (the target's own note blocked on a call to this one) or more: one walk.
        cycle = waits.cycle_through(waits.Link(self.self_index, ref.index, mine.call_id,
                                               mine.started_ns, now), links)
        if cycle is None or not waits.fails(cycle, noted=noted):
            return None, links
        return self._cycle_text(ref, cycle, [note for note, _ in waiting]), links

    def _cycle_text(self, ref: ActorRef, cycle: tuple[waits.Link, ...],
                    notes: list[waits.WaitNote]) -> str:
        """The error of a wait that ``cycle`` (this actor's wait first) would never end."""
        me = self.self_name or f"actor #{self.self_index}"
        head = f"call cycle: waiting, in a call of actor {me!r}, on a call to actor {ref.name!r}"
        tail = f"{me!r} serves only after this wait, so the wait would never end"
        # Two actors: the target blocked on a call to this one, as its own note says (a link
        # passed back to this actor may stand in for the note: then the general text).
        kind = next((n.kind for n in notes if n.writer == ref.index), None)
        if len(cycle) == 2 and kind is not None:
            how = "a blocking call" if kind == waits.BLOCKED else "a wait on a future"
            return f"{head}, which is blocked ({how}) on a call to {me!r} that {tail}"
        names = {ref.index: ref.name, self.self_index: me}
        names.update((n.writer, n.name) for n in notes if n.name)
        for index, cc in list(self._channels.items()):  # the names this process knows
            names.setdefault(index, cc.ref.name)
        hops = ", ".join(f"{names.get(link.waiter, f'actor #{link.waiter}')!r} on "
                         f"{names.get(link.target, f'actor #{link.target}')!r}"
                         for link in cycle[1:])
        return f"{head}; each waits on the next ({hops}), and {me!r} serves its call only " \
               f"after this wait, so the wait would never end"

    def _is_live(self, index: int, pid: int, incarnation: int) -> bool:
        """Whether ``pid`` is incarnation ``incarnation`` of actor ``index``, alive (the table)."""
        if not 0 <= index < TABLE_CAPACITY:
            return False
        entry = self.table.read(index)
        return entry.state == ALIVE and entry.pid == pid and entry.incarnation == incarnation

    def call_async(self, ref: ActorRef, method: str, args: tuple, kwargs: dict) -> Future:
        if ref.index == self.self_index:
            self._refuse_self_call(ref)
        cc = self._open_channel(ref)
        if cc is not None:
            return cc.submit(method, args, kwargs)
        deadline = self._call_deadline()
        return self.channel_for(ref, deadline).submit(method, args, kwargs, deadline=deadline)

    def _refuse_self_call(self, ref: ActorRef) -> None:
        """Refuse a call to this very actor from the thread that serves its calls.

        Only from that thread: another thread of the actor (a timer, a watcher) may feed
        work through the actor's queue, and its call is served once the current one ends
        (a review found those refused too).
        """
        if threading.get_ident() == self.serving_thread:
            raise ActorRuntimeError(
                f"actor {ref.name!r} called itself through its own handle: an actor runs "
                f"one call at a time, so that call could never be served; call the method "
                f"directly (self.method(...))")

    def _open_channel(self, ref: ActorRef) -> CallerChannel | None:
        """The channel to ``ref`` if it is open and its actor incarnation alive, else None."""
        if self.pid != _pid:
            self.check_process()
        cc = self._channels.get(ref.index)
        if cc is not None and cc.dead is None and self.table.alive(ref.index, cc.incarnation):
            return cc
        return None

    def _call_deadline(self) -> float | None:
        """When a call that starts now must end.

        ``call_timeout`` covers the whole call, opening its channel included.
        """
        limit = self.session.call_timeout
        return None if limit is None else time.monotonic() + limit

    def channel_for(self, ref: ActorRef, deadline: float | None = None) -> CallerChannel:
        """The open channel to ``ref``, opened now if need be.

        ``deadline`` (monotonic) bounds the open; default: now + call_timeout.
        """
        cc = self._open_channel(ref)
        if cc is not None:
            return cc
        if ref.index == self.self_index:
            self._refuse_self_call(ref)
        # An actor's control thread answers at once, busy or not; still, the open is
        # bounded by the call's own deadline (a process holding the GIL in C code answers
        # late), and it runs outside the lock -- calls to other actors, kill() and
        # shutdown() go on meanwhile.
        limit = self.session.call_timeout
        if limit is None:
            deadline = None
        elif deadline is None:
            deadline = time.monotonic() + limit
        while True:
            self._close_stale()
            entry = self._settled(ref, deadline)
            if entry.state != ALIVE:
                raise ActorDiedError(self.death_text(ref, entry))
            with self._lock:
                if self.closed:
                    raise ActorRuntimeError("the actor system is shut down")
                cc = self._channels.get(ref.index)
                if cc is not None and cc.dead is None and self.table.alive(ref.index,
                                                                           cc.incarnation):
                    return cc
                opening = self._opening.get(ref.index)
                if opening is not None and opening.is_set():
                    opening = None  # its opener was interrupted before it could remove it
                mine = opening is None
                if mine:
                    opening = self._opening[ref.index] = threading.Event()
            if not mine:  # another thread opens this channel: wait for it, then look again
                while not opening.wait(0.05):
                    self.check_owner()
                    if self.closed:
                        raise ActorRuntimeError("the actor system is shut down")
                    if deadline is not None and time.monotonic() >= deadline:
                        raise CallTimeoutError(f"no channel to actor {ref.name!r} within "
                                               f"{limit} s: it did not answer the open")
                continue
            try:
                cc = self._open(ref, entry.incarnation, deadline)
                with self._lock:
                    if not self.closed:
                        self._channels[ref.index] = cc
                        return cc
                cc.close(ActorRuntimeError("the actor system was shut down"))
                raise ActorRuntimeError("the actor system is shut down")
            finally:
                opening.set()  # first: a waiter must never outlive an interrupted opener
                with self._lock:
                    if self._opening.get(ref.index) is opening:
                        del self._opening[ref.index]

    def _close_stale(self) -> None:
        """Release channels to incarnations that are gone (descriptors, two mappings each)."""
        stale = []
        with self._lock:
            for index, old in list(self._channels.items()):
                if old.dead is not None or not self.table.alive(index, old.incarnation):
                    del self._channels[index]
                    self._count_gone(old)
                    stale.append(old)
        for old in stale:
            old.close(ActorDiedError(old.death_text()) if old.dead is None else None)

    def sweep_soon(self) -> None:
        """Release channels to incarnations that are gone, from a thread of its own.

        A channel to a dead actor holds two ring mappings, whose space in ``shm_dir`` is
        freed only when the last mapping goes (the segments are nameless): 2 x 2 x the
        threshold, 40 MiB by default.  A call or an open sweeps them, but a driver that
        stops calling a crashed worker held its rings for good (a review found it).  So
        the driver sweeps at each death the supervisor reports, and an idle actor at its
        liveness ticks.  In a thread: closing waits for a thread still inside the channel.
        Returns at once when nothing is stale.
        """
        with self._lock:
            if self.closed or self.forked or not any(
                    old.dead is not None or not self.table.alive(index, old.incarnation)
                    for index, old in self._channels.items()):
                return
            self._sweep_due = True
            if self._sweeping:
                return  # the running sweep looks again before it stops
            self._sweeping = True
        threading.Thread(target=self._sweep, daemon=True, name="rt-sweep").start()

    def _sweep(self) -> None:
        while True:
            with self._lock:
                if not self._sweep_due or self.closed:
                    self._sweeping = False
                    return
                self._sweep_due = False
            try:
                with self._sweep_lock:  # forget() waits on it for a channel taken here
                    self._close_stale()
            except Exception:  # a sweep must not end with an exception unlogged
                log.exception("releasing the channels of dead actors failed")

    def retire(self, cc: CallerChannel) -> None:
        """Close ``cc``, whose actor incarnation is gone, and forget it."""
        with self._lock:
            if self._channels.get(cc.ref.index) is cc:
                del self._channels[cc.ref.index]
                self._count_gone(cc)
        cc.close()

    def _settled(self, ref: ActorRef, deadline: float | None) -> Any:
        """The actor's entry once it is ALIVE or DEAD (waits out a restart)."""
        while True:
            entry = self.table.read(ref.index)
            if entry.state in (ALIVE, DEAD):
                return entry
            self.check_owner()
            if self.closed:
                raise ActorRuntimeError("the actor system is shut down")
            if deadline is not None and time.monotonic() > deadline:
                raise CallTimeoutError(f"actor {ref.name!r} did not come back within "
                                       f"{self.session.call_timeout} s")
            time.sleep(0.005)

    def _open(self, ref: ActorRef, incarnation: int, deadline: float | None) -> CallerChannel:
        s = self.session
        name = s.segment_name(f"c{next(self._names)}")
        # Trust comes from the supervisor's record (the read-only table), not
        # from the handle, which is plain data anyone could have built.
        safe = bool(self.table.read(ref.index).flags & FLAG_UNTRUSTED)
        # Segments neither side can resize (SIGBUS under the other's mapping) whenever one
        # side is untrusted: the callee, or this process -- whose callee then insists.
        me_untrusted = (self.self_index >= 0
                        and bool(self.table.read(self.self_index).flags & FLAG_UNTRUSTED))
        limits.check_fd_headroom(f"a channel to actor {ref.name!r}")
        channel = Channel.create(shm_dir=s.shm_dir, private_dir=s.private_dir, name=name,
                                 threshold=s.threshold, safe=safe, sealed=safe or me_untrusted)
        if safe and s.call_timeout is not None:
            # An honest actor's frames are queued before their BULK marker; an untrusted
            # one could publish the marker alone and hold this reader BULK_FRAMES_S.
            channel.frames_wait_s = min(channel.frames_wait_s, s.call_timeout)
        # A call nests its values two containers deep, a reply one.
        cc = CallerChannel(self, ref, incarnation,
                           MessageChannel(channel, send_envelope=2, recv_envelope=1,
                                          redeliver=True))

        def check() -> None:
            if self.closed:
                raise ActorRuntimeError("the actor system is shut down")
            cc.check()

        try:
            reply = control.request(
                ctl_path(s, ref.index, incarnation),
                ["open", {"name": name, "spec": channel.spec().as_dict()}],
                channel.peer_fds(),
                timeout=None if deadline is None else max(0.001, deadline - time.monotonic()),
                check=check)
            fields = control.reply_fields(reply, f"opening a channel to actor {ref.name!r}")
            bell = fields.get("bell")
            if (not isinstance(bell, str) or not bell.startswith(s.private_dir + os.sep)
                    or ".." in bell):
                raise ProtocolError(f"actor {ref.name!r} answered with a bad doorbell path")
            channel.attached(bell)
        except BaseException as exc:
            # The request may sit unread in the actor's socket: if the actor attaches the
            # channel after all, the CLOSE marker in it makes it drop the channel at once.
            channel.close(notify=True)
            if (isinstance(exc, TransportError) and deadline is not None
                    and time.monotonic() >= deadline):
                raise CallTimeoutError(
                    f"no channel to actor {ref.name!r} within {s.call_timeout} s: it did "
                    f"not answer (its process is busy outside Python?)") from exc
            raise
        return cc

    # -- bookkeeping -------------------------------------------------------------
    def channels(self) -> list[CallerChannel]:
        return list(self._channels.values())

    def _count_gone(self, cc: CallerChannel) -> None:
        """Fold a channel that is let go into ``gone`` (holding ``_lock``).

        ``ActorSystem.stats()`` counts what this process sent and received: without this,
        an actor's death or restart took its channel's messages out of the totals (a
        review saw them fall from 12 to 0).
        """
        try:
            routes = cc.channel.stats()["routes"]
        except Exception:  # noqa: BLE001 - a channel already torn down counts nothing more
            return
        for r, total in self.gone.items():
            total["messages"] += routes[r]["messages"]
            total["bytes"] += routes[r]["bytes"]

    def channel_stats(self, index: int) -> dict[str, Any] | None:
        cc = self._channels.get(index)
        if cc is None:
            return None
        return dict(cc.channel.stats(), actor=cc.ref.name, incarnation=cc.incarnation)

    def forget(self, index: int, reason: BaseException | None = None) -> None:
        """Close the channel to actor ``index`` and forget it; closed when this returns.

        A sweep (``sweep_soon``) may have taken the channel first: then this waits for the
        sweep, so that a ``kill()`` still returns with the channel's memory let go.
        """
        with self._lock:
            cc = self._channels.pop(index, None)
            if cc is not None:
                self._count_gone(cc)
        if cc is not None:
            cc.close(reason)
        elif self._sweeping and self._sweep_lock.acquire(timeout=5):
            self._sweep_lock.release()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            channels, self._channels = list(self._channels.values()), {}
        if self.forked:
            return  # the channels are the parent's: never touch them from a fork
        for cc in channels:
            cc.close(ActorRuntimeError("the actor system was shut down"))
        # A sweep in progress reads the actor table, which the system unmaps next.
        if self._sweeping and self._sweep_lock.acquire(timeout=5):
            self._sweep_lock.release()
        # The done-callbacks of the calls that shutdown failed have run when it returns,
        # as they did when they ran on the closing thread (bounded: a callback may hang).
        deadline = time.monotonic() + CALLBACKS_AT_CLOSE_S
        for cc in channels:
            cc.wait_callbacks(deadline)


def summarize(channel_stats: list[dict[str, Any]],
              gone: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """``{"routes": {"shm": {...}, "zmq": {...}}, "channels": [...]}`` over channels.

    ``gone``: the route totals of channels already let go, counted in ``routes`` too.
    """
    routes = {r: {"messages": 0, "bytes": 0} for r in ("shm", "zmq")}
    for r, total in (gone or {}).items():
        routes[r]["messages"] += total["messages"]
        routes[r]["bytes"] += total["bytes"]
    for ch in channel_stats:
        for r, total in routes.items():
            total["messages"] += ch["routes"][r]["messages"]
            total["bytes"] += ch["routes"][r]["bytes"]
    return {"routes": routes, "channels": channel_stats}


_contexts: dict[str, ProcessContext] = {}


def register_context(ctx: ProcessContext) -> None:
    _contexts[ctx.session.sid] = ctx


def unregister_context(ctx: ProcessContext) -> None:
    if _contexts.get(ctx.session.sid) is ctx:
        del _contexts[ctx.session.sid]


def context_for(sid: str) -> ProcessContext:
    ctx = _contexts.get(sid)
    if ctx is None or ctx.closed:
        raise ActorRuntimeError(
            "this actor handle belongs to an actor system that is shut down, or that "
            "this process is not part of")
    return ctx
