"""An actor process: builds the instance, then serves calls one at a time.

Forked by the session's zygote (``zygote.py``: torch already imported,
nothing run) or, as a fall-back, started as ``python -m runtime.worker
BOOT_JSON``; never a fork of the driver and never a re-run of the driver's
``__main__``.  The class and constructor arguments arrive in a sealed memfd
(``spec.py``), decoded after ``sys.path`` has been set to the driver's.

The serve loop scans every inbound channel round-robin, one message per
channel per pass, so a busy caller cannot starve another; calls from one
caller run in the order issued.  With nothing to do it spins briefly, then
declares itself asleep in every ring and blocks in ``poll`` on its doorbell:
an idle actor uses no CPU.  Channels are opened by a thread of their own
(``_control_main``), so a new caller gets its channel while the actor is busy
in a long call, and its calls wait in the queue like any other's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from runtime import codec, faults, limits
from runtime.actor import _set_called, _set_served, actor_options
from runtime.calls import MAX_CHAIN, ProcessContext, bell_path, ctl_path, register_context
from runtime.control import ControlServer
from runtime.errors import ProtocolError, TransportError
from runtime.messages import MessageChannel
from runtime.session import Session
from runtime.spec import read_spec
from runtime.spin import SpinPolicy
from runtime.table import ALIVE, DEAD, FLAG_UNTRUSTED, STARTING, ActorTable, Entry
from runtime.transport.channel import Channel, ChannelSpec
from runtime.transport.doorbell import Doorbell
from runtime.transport.ring import fence
from runtime.wire import write_frame

log = logging.getLogger("runtime.worker")

# How long the frames of an untrusted caller's BULK marker may take: an honest sender
# queues them before the marker, and a hostile one would hold this actor (everyone's calls).
UNTRUSTED_FRAMES_S = 5.0
# Spin after a reply between these bounds (see runtime.spin), then sleep: a
# caller's next call usually follows within tens of microseconds, or -- a split's decode
# step -- after 0.3-1 ms of the caller's own compute.  Waking from sleep costs 100-200 us
# on the 2-core VM (a halted vCPU), a third of such a gap: with a 1 ms cap decode gaps of
# ~0.5 ms put twice their average just past it, and the worker slept through every one
# (SmolLM2 split decode, 120 calls a token: transport 29-38 ms/token with 1 ms, 20 ms/token
# with 3 ms; seed-bench prefill, whose gaps are 10 ms attentions, unchanged).
IDLE_SPIN_MIN_S, IDLE_SPIN_MAX_S = 100e-6, 3e-3
LIVENESS_EVERY_S = 1.0
# A connection that cannot be accepted (EMFILE, no spare descriptor) is tried again after
# this, doubling up to the cap while it stays so: the socket polls ready all the while.
CONTROL_RETRY_S, CONTROL_RETRY_MAX_S = 0.001, 0.5
CHANNEL_FDS = 16  # descriptors an actor keeps free when it takes a new channel
NAMED_WAIT_S = 30.0  # an actor waits this long for the supervisor's table to name it


class _Inbound:
    __slots__ = ("answered", "caller_incarnation", "caller_pid", "channel", "check")

    def __init__(self, channel: Channel, caller_pid: int, *, borrow: bool,
                 caller_incarnation: int = -1) -> None:
        # A call nests its values two containers deep, a reply one.
        self.channel = MessageChannel(channel, recv_envelope=2, send_envelope=1, borrow=borrow)
        self.caller_pid = caller_pid
        # Of the calling actor (-1: the driver): its wait notes count only while that very
        # process is the actor's live one (a restart may reuse the pid; see runtime.waits).
        self.caller_incarnation = caller_incarnation
        self.check = _pid_check(caller_pid)
        # The id of the last call answered (ids grow along a channel, wrapping at 2**32;
        # see runtime.waits).
        self.answered = 0


class ActorServer:
    """Serves one actor instance over any number of inbound channels."""

    def __init__(self, ctx: ProcessContext, index: int, incarnation: int, name: str,
                 untrusted: bool, *, driver_pid: int) -> None:
        self.ctx = ctx
        self.index = index
        self._alone = (index,)  # what a call from no actor's call leaves serving
        self.name = name
        self.untrusted = untrusted
        self.driver_pid = driver_pid
        s = ctx.session
        self.bell = Doorbell(bell_path(s, index, incarnation))
        self.ctl = ControlServer(ctl_path(s, index, incarnation), self._open, name=name,
                                 group=self._caller_group)
        # Replaced, never changed in place (the serve loop walks the list it read), under
        # ``_inbound_lock``: the control thread adds, the serving thread drops.
        self.inbound: list[_Inbound] = []
        self._inbound_lock = threading.Lock()
        self._inbound_gen = 0  # bumped at each change: the sleep's poller follows it
        self.instance: Any = None
        # ``@actor(borrow_args=True)``: a trusted caller's arguments are decoded in place,
        # as views of the received ring record, valid until the method returns.
        self.borrow_args = False
        # ``@actor(untrusted_callers=True)``: a trusted actor that also serves untrusted ones.
        self.untrusted_callers = False
        self._poller: zmq.Poller | None = None
        self._poller_gen = -1
        if not untrusted:  # an untrusted actor leaves no wait notes and reads none
            ctx.inbound_notes = self._inbound_notes
            ctx.self_name = name

    def _inbound_notes(self) -> list[tuple[bytes, int, int, int]]:
        """The wait notes of the trusted callers (see runtime.waits), with their ``answered``.

        An untrusted caller's note is not read: it could claim any wait, and fail ours.  Each
        comes with the caller's pid and incarnation: only the note of the live process of the
        actor it names counts (``ProcessContext.look``), not a dead caller's.
        """
        notes = []
        for conn in self.inbound:
            if not conn.channel.safe:
                raw = conn.channel.peer_note()
                if raw:
                    notes.append((raw, conn.answered, conn.caller_pid,
                                  conn.caller_incarnation))
        return notes

    # -- control: channel opening ------------------------------------------------
    def _caller_entry(self, pid: int) -> Entry | None:
        """A connecting process, from the supervisor's records only: its actor's table entry.

        None for the driver (its pid came from the supervisor); the entry's flags say
        whether an actor was spawned ``untrusted``, its incarnation which process of the
        actor this is.  Any other process is refused: it is not part of this session.
        """
        if pid == self.driver_pid:
            return None
        found = self.ctx.table.find_pid(pid)
        if found is None:
            raise ProtocolError(f"pid {pid} is not a process of this session")
        return found[1]

    def _caller_group(self, pid: int) -> int:
        """Whose share of the waiting connections a peer takes (``ControlServer``).

        Its own if it is a process of this session, else one share for all the others
        (``_open`` refuses them anyway): a process forking a child per connection would
        otherwise get a share per child (review M).
        """
        if pid == self.driver_pid or (pid > 0 and self.ctx.table.find_pid(pid) is not None):
            return pid
        return 0

    def _open(self, msg: list, fds: list[int], pid: int) -> list:
        """Handle one control request: ``["open", {"name": str, "spec": {...}}]``."""
        if len(msg) != 2 or msg[0] != "open" or not isinstance(msg[1], dict):
            raise ProtocolError("unknown control request")
        name = msg[1].get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ProtocolError("malformed channel name")
        spec = ChannelSpec.from_dict(msg[1].get("spec"))
        entry = self._caller_entry(pid)  # one look at the table for trust and incarnation
        safe = entry is not None and bool(entry.flags & FLAG_UNTRUSTED)
        incarnation = -1 if entry is None else entry.incarnation
        if safe and not (self.untrusted or self.untrusted_callers):
            raise ProtocolError(f"actor {self.name!r} does not serve untrusted actors (pid "
                                f"{pid}); @actor(untrusted_callers=True) lets it")
        # A channel's segments, sockets and pool slots take descriptors: refused here with
        # the count, rather than failing somewhere in the attach (or in libzmq).
        limits.check_fd_headroom(
            f"a channel in actor {self.name!r}", CHANNEL_FDS,
            advice="the actor holds too many descriptors: a leak in it, or raise its limit")
        # The files a channel names must be the requester's own, in this session: a peer
        # may not point this actor at another channel's ZeroMQ socket or doorbell.
        own = os.path.join(self.ctx.session.private_dir, f"rt_{self.ctx.session.sid}_{pid}_")
        if not (spec.endpoint.startswith(f"ipc://{own}") and ".." not in spec.endpoint
                and (spec.caller_bell is None
                     or (spec.caller_bell.startswith(own) and ".." not in spec.caller_bell))):
            raise ProtocolError(f"channel files outside the requester's own ({own}*)")
        # Channel.attach owns the descriptors from here on (it closes them all when it
        # fails): empty the server's list, which the server closes after a refusal -- a
        # second close would hit whatever another thread opened under the same numbers.
        owned = list(fds)
        fds.clear()
        channel = Channel.attach(spec, fds=owned, own_bell=self.bell, safe=safe, name=name,
                                 shm_dir=self.ctx.session.shm_dir,
                                 limit=self.ctx.session.threshold)
        if safe:  # a BULK marker without its frames would stall every caller of this actor
            channel.frames_wait_s = min(channel.frames_wait_s, UNTRUSTED_FRAMES_S)
        with self._inbound_lock:
            self.inbound = [*self.inbound, _Inbound(channel, pid, borrow=self.borrow_args,
                                                    caller_incarnation=incarnation)]
            self._inbound_gen += 1
        # A serve loop asleep waits on a poller built without this channel (its ZeroMQ
        # socket, when it has no ring): it wakes, and sleeps next with a new poller.
        self.bell.wake()
        return ["ok", {"bell": self.bell.path}]

    def _control_main(self) -> None:
        """Answer channel-open requests, busy or not, for the life of the process.

        The serve loop used to answer them between calls: a caller's first call to an actor
        busy in a long call waited for the call's end just to open its channel (a
        ``.remote()`` too, though it must not wait), and an actor busy serving a call
        whose chain led back to it could never be reached on first contact.
        """
        retry = CONTROL_RETRY_S
        while True:
            try:
                self.ctl.wait(LIVENESS_EVERY_S)
                if self.ctl.ready():
                    self.ctl.service()
                    if self.ctl.starved:  # what is waiting cannot be taken now
                        time.sleep(retry)
                        retry = min(2 * retry, CONTROL_RETRY_MAX_S)
                        continue
                retry = CONTROL_RETRY_S
            except Exception:  # the thread must outlive any one request
                log.exception("actor %s: answering a channel-open request failed", self.name)
                time.sleep(CONTROL_RETRY_S)

    def _drop(self, conn: _Inbound, *, notify: bool = False) -> None:
        """Forget a channel; with ``notify``, tell its (living) caller first."""
        with self._inbound_lock:
            if conn in self.inbound:
                # A new list: the serve loop may be walking the old one by index (a drop in
                # mid-walk made it read past the end, IndexError, and the actor died).
                self.inbound = [c for c in self.inbound if c is not conn]
                self._inbound_gen += 1
        conn.channel.close(notify=notify)

    # -- calls -----------------------------------------------------------------------
    def _run_call(self, conn: _Inbound, msg: Any) -> None:
        try:
            serving = self._alone
            if len(msg) == 4:
                call_id, method, args, kwargs = msg
            else:
                call_id, method, args, kwargs, chain = msg
                # Whatever a caller sends here bears only on its own call's calls.
                if type(chain) is tuple and chain:
                    chain = chain[-(MAX_CHAIN - 1):]
                    if all(type(i) is int for i in chain):
                        serving = (*chain, self.index)
            if not isinstance(method, str) or method.startswith("__"):
                raise AttributeError(f"{method!r} is not a callable method")
            fn = getattr(self.instance, method)
            _set_called(fn)  # see runtime.actor.serving
            self.ctx.serving = serving  # see ProcessContext.serving
            try:
                reply = (call_id, True, fn(*args, **kwargs))
            finally:
                _set_called(None)
        except (SystemExit, KeyboardInterrupt):
            self.ctx.serving = ()
            raise  # the method ends the actor (sys.exit): the caller gets ActorDiedError
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            call_id = msg[0] if isinstance(msg, tuple) and msg else 0
            reply = (call_id, False, self._error_payload(exc))
        try:
            faults.hit("before_reply")
            # Still this call's: encoding the reply runs user code, and a DeferredTensor's
            # fill may call other actors -- with this call's chain, and watched, as the
            # method's own calls are (they went out without either, and a cycle through
            # a fill hung: review L).
            self._reply(conn, reply)
        finally:
            self.ctx.serving = ()

    def _reply(self, conn: _Inbound, reply: tuple) -> None:
        """Send a reply; a reply that cannot be encoded becomes that call's error.

        Encoding runs user code (``__reduce__``) and can fail in any way --
        nesting too deep for pickle, an unpicklable value, even ``SystemExit``
        -- but nothing has been sent then: the call fails, the channel and the
        actor carry on.  Only a failure of the channel itself drops it.
        """
        call_id = reply[0] if type(reply[0]) is int else 0
        ch = conn.channel
        try:
            try:
                enc = ch.encode(reply, plain_only=self.untrusted)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                enc = ch.encode((call_id, False, self._error_payload(exc)))
            try:
                self._send_or_drop(conn, enc, call_id)
            except (SystemExit, KeyboardInterrupt):
                raise  # as from the method itself: the actor ends
            except BaseException as exc:  # noqa: BLE001 - a buffer that failed to write itself
                # A result's bytes are written while the reply is sent (a device tensor
                # copies itself device-to-host into the record, a DeferredTensor computes
                # itself there): that can fail in any way a method can.  A send happens
                # whole or not at all, so nothing went: the call fails instead (an error
                # payload is plain strings and bytes: no buffer to write).
                self._send_or_drop(conn, ch.encode((call_id, False,
                                                    self._error_payload(exc))), call_id)
        finally:
            # Calls are served in the order of their ids (0: a call that failed to decode;
            # callers never use id 0).  Recorded once the reply has gone: while it is
            # encoded and sent -- user code, a DeferredTensor's fill that may call other
            # actors -- the call is unanswered, and a caller's note naming it closes a
            # cycle through that wait (recorded before, such a cycle was missed: review L).
            # No look comes between the send and this: looks run on this thread.
            if call_id:
                conn.answered = call_id

    def _send_or_drop(self, conn: _Inbound, enc: Any, call_id: int) -> None:
        try:
            conn.channel.send_encoded(enc, tag=call_id, check=conn.check)
        except TransportError as exc:
            log.warning("actor %s: dropping the channel of pid %d: %s", self.name,
                        conn.caller_pid, exc)
            self._drop(conn)

    def _error_payload(self, exc: BaseException) -> tuple:
        """``(type name, message, traceback text, pickled exception or None)``.

        Plain strings whatever the exception does: its ``__str__`` or its
        pickling may raise (even ``SystemExit``), and the actor must live on.
        """
        cls = type(exc)
        try:
            tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
        except BaseException:  # noqa: BLE001 - a hostile exception must not end the actor
            tb = f"{cls.__qualname__} (its traceback could not be formatted)\n"
        try:
            message = str(exc)
            if type(message) is not str:
                raise TypeError("__str__ returned a non-str")
        except BaseException as err:  # noqa: BLE001 - as above
            message = f"<str() of the {cls.__qualname__} raised {type(err).__name__}>"
        exc_bytes = None if self.untrusted else codec.exception_bytes(exc)
        name = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', '?')}"
        return (str(name), message, str(tb), exc_bytes)

    # -- the loop ----------------------------------------------------------------------
    def serve(self) -> None:
        self.ctx.serving_thread = threading.get_ident()  # calls run on this thread
        threading.Thread(target=self._control_main, daemon=True, name="rt-control").start()
        rr = 0
        spin_until = 0.0
        spin = SpinPolicy(IDLE_SPIN_MIN_S, IDLE_SPIN_MAX_S)
        idle_since = None
        next_liveness = time.monotonic() + LIVENESS_EVERY_S
        while True:
            progressed = False
            conns = self.inbound
            n = len(conns)
            for k in range(n):
                conn = conns[(rr + k) % n]
                ch = conn.channel
                try:
                    ok, msg = ch.try_recv(check=conn.check)
                except TransportError as exc:
                    progressed = True
                    tag = getattr(exc, "tag", None)
                    if isinstance(exc, ProtocolError) and ch.failed is None:
                        # One message lost (consumed): its caller hears why.
                        if tag is not None:
                            self._reply(conn, (tag, False, self._error_payload(exc)))
                        continue
                    # A corrupt ring or a failed link: nothing more can be read
                    # from this channel.  The caller is told; others are served.
                    log.warning("actor %s: dropping the channel of pid %d: %s", self.name,
                                conn.caller_pid, exc)
                    self._drop(conn, notify=_pid_alive(conn.caller_pid))
                    continue
                except Exception as exc:
                    if not (ch.safe or isinstance(exc, MemoryError)):
                        raise
                    # An untrusted caller's message this side cannot take (or any caller's
                    # it has no memory for): that channel goes, the actor serves on.
                    progressed = True
                    log.warning("actor %s: dropping the channel of pid %d: %s: %s", self.name,
                                conn.caller_pid, type(exc).__name__, exc)
                    self._drop(conn, notify=_pid_alive(conn.caller_pid))
                    continue
                if ok:
                    self._run_call(conn, msg)
                    msg = None  # its tensors may hold the caller's pool slot: let it go now
                    ch.release()  # a borrowed record: the method (and its reply) are done
                    progressed = True
                elif ch.peer_closed:
                    self._drop(conn)
                    progressed = True
            rr += 1
            if progressed:
                now = time.perf_counter()
                if idle_since is not None:
                    spin.observe(now - idle_since)
                    idle_since = None
                spin_until = now + spin.window
                continue
            if idle_since is None:
                idle_since = time.perf_counter()
            if time.perf_counter() < spin_until:
                os.sched_yield()  # polite spin: a peer on this core runs at once
                continue
            self._sleep()
            now = time.monotonic()
            if now >= next_liveness:
                next_liveness = now + LIVENESS_EVERY_S
                for conn in list(self.inbound):
                    if not _pid_alive(conn.caller_pid):
                        self._drop(conn)
                self.ctx.sweep_soon()  # this actor's channels to actors that died

    def _sleep(self) -> None:
        gen = self._inbound_gen  # first: a change after it only rebuilds once more
        conns = self.inbound
        for conn in conns:
            conn.channel.set_sleeping(True)
        fence()
        if not any(conn.channel.readable() for conn in conns):
            poller = self._poller
            if poller is None or self._poller_gen != gen:
                poller = zmq.Poller()
                poller.register(self.bell.fd, zmq.POLLIN)
                for conn in conns:
                    if conn.channel.rx is None:
                        poller.register(conn.channel.bulk.socket, zmq.POLLIN)
                self._poller, self._poller_gen = poller, gen
            poller.poll(int(LIVENESS_EVERY_S * 1000))
            self.bell.drain()
        for conn in conns:
            conn.channel.set_sleeping(False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_check(pid: int):
    def check() -> None:
        if not _pid_alive(pid):
            raise TransportError(f"caller process {pid} is gone")
    return check


def named_by_table(table: ActorTable, index: int, incarnation: int,
                   wait_s: float = NAMED_WAIT_S) -> bool:
    """Wait until the supervisor's table names this process for ``(index, incarnation)``.

    False when it names another process, or not within ``wait_s``.  The supervisor records
    a pid once the process is its child; a process it does not know must not serve.  One
    such is a *twin*: when the zygote dies after forking the intermediate process, the
    intermediate still forks the actor, re-parented to the supervisor like any, while the
    supervisor starts the actor again as a fresh interpreter -- and the first to bind the
    control socket served calls the supervisor could neither see nor kill (found by a
    fault-injection review).
    """
    me = os.getpid()
    deadline = time.monotonic() + wait_s
    while True:
        # The supervisor stores the state last and ``read`` loads it first, so a STARTING
        # seen here comes with the pid and incarnation stored before it.
        entry = table.read(index)
        if entry.incarnation == incarnation and entry.state in (STARTING, ALIVE):
            return entry.pid == me
        if entry.incarnation == incarnation and entry.state == DEAD:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def main() -> None:
    boot = json.loads(sys.argv[1])
    if os.getppid() != boot["supervisor_pid"]:
        os._exit(70)  # the supervisor died before PR_SET_PDEATHSIG took effect
    run(boot)


def run(boot: dict[str, Any]) -> None:
    """Build the actor from ``boot`` and serve it until the process ends.

    Shared by a fresh interpreter (:func:`main`) and a fork of the zygote.
    """
    logging.basicConfig(level=logging.WARNING, format="[rt actor %(process)d] %(message)s",
                        force=True)
    sys.path[:] = list(dict.fromkeys([*boot["sys_path"], *sys.path]))
    name = boot["name"]
    faults.arm(name)
    session = Session(**boot["session"])
    table = ActorTable(boot["table_fd"])  # read-only: only the supervisor writes it
    index = boot["index"]
    if not named_by_table(table, index, boot["incarnation"]):
        os._exit(70)  # a process the supervisor does not know: see named_by_table
    untrusted = bool(boot.get("flags", 0) & FLAG_UNTRUSTED)
    ctx = ProcessContext(session, table, self_index=index)
    register_context(ctx)
    server = ActorServer(ctx, index, boot["incarnation"], name, untrusted,
                          driver_pid=boot["driver_pid"])
    status_fd = boot["status_fd"]
    try:
        cls, args, kwargs = read_spec(boot["spec_fd"])
        os.close(boot["spec_fd"])
        faults.hit("init")
        options = actor_options(cls)
        server.borrow_args = options.borrow_args
        server.untrusted_callers = options.untrusted_callers
        server.instance = cls(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported as ActorStartError
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        write_frame(status_fd, ["init_failed", f"__init__ of actor {name!r} raised:\n{tb}"])
        os._exit(1)
    _set_served(server.instance)  # its methods run on this thread: see runtime.actor.serving
    write_frame(status_fd, ["ready"])
    os.close(status_fd)
    try:
        server.serve()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        server.ctl.flush_log()  # a second of refusals may be counted, not yet logged
        os._exit(code)


if __name__ == "__main__":
    main()
