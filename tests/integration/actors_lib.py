"""Actor classes shared by the integration and fault tests (an importable module)."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import signal
import struct
import sys
import threading
import time

import torch

from runtime import actor


@actor
class Echo:
    def __init__(self, tag="echo"):
        self.tag = tag
        self.calls = 0

    def echo(self, x):
        self.calls += 1
        return x

    def add(self, a, b=0):
        return a + b

    def count(self):
        return self.calls

    def pid_(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def spin(self, seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return seconds

    def fail(self, kind, message):
        raise {"value": ValueError, "key": KeyError, "runtime": RuntimeError,
               "custom": CustomError}[kind](message)

    def fail_custom_init(self, kind):
        if kind == "two_args":
            raise TwoArgError(1, 2)
        if kind == "kw_only":
            raise KwOnlyError("bad code", code=4)
        if kind == "slots":
            raise SlotsError(4)
        raise NotAnException("not an Exception")

    def fail_unpicklable(self):
        raise UnpicklableError("cannot travel", threading.Lock())

    def exit(self, code):
        sys.exit(code)

    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def ones(self, n):
        return torch.ones(n)

    def weird(self):
        return {1, 2, 3}


@actor(untrusted_callers=True)
class OpenEcho(Echo):
    """An Echo that also serves untrusted actors (trusted actors refuse them by default)."""


class CustomError(Exception):
    """A user exception type that must keep its identity across the boundary."""


class TwoArgError(Exception):
    """An ``__init__`` whose arguments are not its ``args``: ``cls(*args)`` fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


class SlotsError(Exception):
    """State kept in ``__slots__``, which Python's own reduction drops."""

    __slots__ = ("code",)

    def __init__(self, code):
        super().__init__(f"code {code}")
        self.code = code


class KwOnlyError(Exception):
    """A keyword-only ``__init__`` argument: ``cls(*args)`` fails."""

    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code


class NotAnException(BaseException):
    """A ``BaseException`` that is neither ``SystemExit`` nor ``KeyboardInterrupt``."""


class UnpicklableError(Exception):
    def __init__(self, message, lock):
        super().__init__(message)
        self.lock = lock


@actor
class Caller:
    """Calls another actor through a handle it was given."""

    def __init__(self, other):
        self.other = other

    def relay(self, x):
        return self.other.echo(x)

    def relay_fail(self, kind, message):
        return self.other.fail(kind, message)  # not caught: the remote exception goes on

    def relay_many(self, n):
        futs = [self.other.add.remote(i, 1) for i in range(n)]
        return [f.result(timeout=30) for f in futs]

    def channel_sealed(self):
        """Whether this process's channel to the other actor is sealed."""
        return [ch["sealed"] for ch in self.other.stats()["channels"]]


@actor
class FailingInit:
    def __init__(self, message):
        raise ValueError(message)


@actor(untrusted=True)
class Untrusted:
    def tensor(self, n):
        return torch.arange(n)

    def obj(self):
        return {"a": {1, 2}}

    def fail(self):
        raise KeyError("from the untrusted side")


@actor(max_restarts=2)
class Restartable:
    def __init__(self, base):
        self.base = base

    def add(self, x):
        return x + self.base

    def pid_(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


@actor
class Timer:
    """Times one call to another actor from its own process."""

    def __init__(self, other):
        self.other = other

    def time_call(self):
        t0 = time.monotonic()
        self.other.add(1, 1)
        return time.monotonic() - t0


# -- hostile values, hostile peers (tests/faults/test_hostile.py) -------------------


class Node:
    """A linked-list node: a long list nests deeper than pickle can follow."""

    def __init__(self, nxt):
        self.next = nxt


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("this exception has no text")


class ExitOnPickle:
    def __reduce__(self):
        raise SystemExit(3)


class ExitOnPickleError(Exception):
    def __reduce__(self):
        raise SystemExit(4)


def nest(depth):
    """A list nested ``depth`` lists deep (``nest(1) == [0]``)."""
    v = 0
    for _ in range(depth):
        v = [v]
    return v


def _serving_frame():
    """The worker's frame serving the current call (its channel and message)."""
    frame = sys._getframe(1)
    while frame.f_code.co_name != "_run_call":
        frame = frame.f_back
    return frame.f_locals["conn"], frame.f_locals["msg"]


@actor
class Tricky:
    """Trusted, but returns and raises values that are hard to send."""

    def ping(self):
        return "pong"

    def linked_list(self, n):
        node = None
        for _ in range(n):
            node = Node(node)
        return node

    def bad_str(self):
        raise BadStr()

    def reduce_exit(self):
        return ExitOnPickle()

    def raise_reduce_exit(self):
        raise ExitOnPickleError("cannot travel")

    def set_self(self, handle):
        self.me = handle

    def call_self(self):
        return self.me.ping()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


@actor(untrusted=True)
class Hostile:
    """An untrusted actor that breaks the protocol on request."""

    def ping(self):
        return "pong"

    def nest(self, depth):
        return nest(depth)

    def raw_reply(self, kind):
        """Send a malformed reply of its own before the real one."""
        conn, msg = _serving_frame()
        call_id = msg[0]
        bad = {"ok_tensor": (call_id, torch.ones(3), 1),
               "id_list": ([call_id, 1], True, 1),
               "short": (call_id, True),
               "not_tuple": [call_id, True, 1],
               "error_garbage": (call_id, False, torch.ones(2))}[kind]
        conn.channel.send(bad, tag=call_id)
        return "the real reply"

    def corrupt_reply_ring(self):
        """Publish a record whose length lies beyond the ring."""
        conn, _ = _serving_frame()
        tx = conn.channel.tx
        addr = tx.reserve(8)
        # Corrupt the length before publishing: a reader spinning on the ring
        # would otherwise take the record while it is still well-formed.
        struct.pack_into("<Q", tx.view, addr - 8 - tx.segment.address, 10**12)
        tx.commit()
        return "never read"


@actor(borrow_args=True)
class Borrower:
    """Takes its arguments in place: views of the message that carried them."""

    def where(self, t):
        """(whether ``t`` lies in a transport mapping, its sum)."""
        from runtime.transport import hostmem

        p = t.data_ptr()
        mapped = any(a <= p < a + n for a, n in hostmem.live().items())
        return mapped, float(t.double().sum())

    def twice(self, t):
        return t * 2


@actor
class Copier(Borrower):
    """The same methods, without borrowing: ring arguments arrive as private copies."""


def shrink(fd: int) -> bool:
    """Truncate the file behind ``fd`` under its other mappings, as a hostile worker would;
    True if it worked (the size is put back at once, so a failing test fails in its
    assertion, not by SIGBUS in the driver)."""
    size = os.fstat(fd).st_size
    try:
        os.ftruncate(fd, 0)
    except OSError:
        return False
    os.ftruncate(fd, size)
    return True


@actor(untrusted=True)
class Truncator:
    """An untrusted worker that tries to truncate every segment it is handed: the rings
    when its driver opens a channel, the pool slots as they are announced."""

    def __init__(self):
        from runtime.transport import pool, segment

        self.tried: list[bool] = []
        tried = self.tried
        from_fd = segment.Segment.from_fd.__func__
        control = pool.RxPool._control

        def hostile_from_fd(cls, fd, *, sealed=False):
            tried.append(shrink(fd))
            return from_fd(cls, fd, sealed=sealed)

        def hostile_control(rx, data, fds, flags):
            tried.extend(shrink(fd) for fd in fds)
            return control(rx, data, fds, flags)

        segment.Segment.from_fd = classmethod(hostile_from_fd)
        pool.RxPool._control = hostile_control

    def echo(self, x):
        return x

    def shrunk(self):
        return list(self.tried)


@actor
class SlowStart:
    """``__init__`` takes ``seconds``: a spawn to interrupt."""

    def __init__(self, seconds=1.0):
        time.sleep(seconds)

    def own_pid(self):
        return os.getpid()


@actor
class Peer:
    """Calls another actor it is given; two of them make a call cycle."""

    def __init__(self, other=None):
        self.other = other

    def set_other(self, other):
        self.other = other
        return True

    def own_pid(self):
        return os.getpid()

    def ask_other(self):
        return self.other.own_pid()

    def ask_other_to_ask_back(self):
        return self.other.ask_other()

    def ask_other_to_ask_back_in_turn(self):
        return self.other.ask_other_to_ask_back()

    def kick(self):
        """Fire and forget: the other's call back finds this actor free again."""
        self.fut = self.other.ask_other_store.remote()
        return True

    def ask_other_store(self):
        try:
            self.last = self.other.own_pid()
        except Exception as exc:
            self.last = f"{type(exc).__name__}: {exc}"
        return self.last

    def get_last(self):
        return getattr(self, "last", None)

    def notified(self, value):
        self.last = value
        return True

    def call_other_to_notify_back(self):
        return self.other.notify_other()

    def ask_other_to_wait_back(self, how="result"):
        return self.other.wait_on_other(how)

    def wait_on(self, method, *args, sleep=0.0):
        """A ``.remote()`` call of ``method`` on the other, waited on after ``sleep`` s."""
        fut = getattr(self.other, method).remote(*args)
        time.sleep(sleep)
        return fut.result()

    def call_back_after(self, delay):
        """Calls the other back, blocking, after ``delay`` s."""
        time.sleep(delay)
        return self.other.own_pid()

    def wait_back_after(self, delay):
        """Waits on a ``.remote()`` call back to the other, after ``delay`` s."""
        time.sleep(delay)
        return self.other.own_pid.remote().result()

    def wait_on_other(self, how="result"):
        """A ``.remote()`` to the other, then waiting on it: a cycle if the other waits
        on this call."""
        fut = self.other.own_pid.remote()
        return fut.result() if how == "result" else repr(fut.exception())

    def poll_own_call(self, me):
        """Polls (timeout 0), serving a call, a call to itself another thread made."""
        box = []
        t = threading.Thread(target=lambda: box.append(me.own_pid.remote()))
        t.start()
        t.join()
        try:
            box[0].result(timeout=0)
        except TimeoutError:
            return "not yet"
        return "done"

    def call_other_slow(self, seconds):
        try:
            return self.other.slow_then_ask_back(seconds)
        except Exception as exc:  # CallTimeoutError: gives up, and this call ends
            return f"gave up: {type(exc).__name__}"

    def slow_then_ask_back(self, seconds):
        """Outlasts the caller's call_timeout, then waits on a call back to the caller."""
        time.sleep(seconds)
        try:
            self.last = self.other.own_pid.remote().result()
        except Exception as exc:
            self.last = f"{type(exc).__name__}: {exc}"
        return self.last

    def wait_on_own_call(self, me):
        """Waits, serving a call, on a call to itself that another thread made."""
        box = []
        t = threading.Thread(target=lambda: box.append(me.own_pid.remote()))
        t.start()
        t.join()
        return box[0].result()

    def notify_other(self):
        """Tells the other something without waiting: served once it is free."""
        self.other.notified.remote("hello")
        return "sent"


@actor(untrusted=True)
class Streamer:
    """A worker that streams replies naming no call (found by an adversarial review)."""

    def ping(self):
        return "pong"

    def stream(self, seconds):
        """Send replies to a call id nobody waits for, for ``seconds``; then reply."""
        conn, _ = _serving_frame()
        ch = conn.channel
        enc = ch.encode((123456789, True, 0))  # a late reply, as the caller sees it
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            for _ in range(64):
                ch.send_encoded(enc, tag=123456789, deadline=end + 5)
            n += 64
        return n

    def take(self, blob):
        return len(blob)

    def jam(self, seconds, undecodable=False):
        """Reply at once, then make our inbound ring look full and stream late replies.

        ``undecodable``: replies the caller cannot decode (nested too deep for a reply
        from an untrusted actor), still naming no call.
        """
        from runtime.errors import DeadlineError

        conn, msg = _serving_frame()
        ch = conn.channel
        ch.send((msg[0], True, "jammed"), tag=msg[0])  # the real reply: nothing is pending
        rx = ch.transport.rx
        enc = ch.encode((123456789, True, nest(101) if undecodable else 0))
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            rx._rpos.value = rx._wpos.value - rx.capacity  # "we read nothing": ring full
            try:
                for _ in range(64):
                    ch.send_encoded(enc, tag=123456789, deadline=time.monotonic() + 0.05)
                    n += 1
            except DeadlineError:
                pass
        return n


@actor(max_restarts=1)
class Spawner:
    """Starts processes of its own: a helper and, under it, the helper's child."""

    def start_helper(self):
        """(helper pid, its child's pid): ``sh`` starts ``sleep`` and waits for it."""
        import subprocess

        self.helper = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"],
                                       stdout=subprocess.PIPE, text=True)
        return self.helper.pid, int(self.helper.stdout.readline())

    def die(self):
        os._exit(1)


@actor
class SelfCaller:
    """Calls its own handle from a background thread of its own (a timer, say)."""

    def __init__(self):
        self.bumps = 0
        self.error = None

    def start(self, me):
        def loop():
            try:
                me.bump()
            except BaseException as exc:  # what it got is the test's
                self.error = f"{type(exc).__name__}: {exc}"

        threading.Thread(target=loop, daemon=True).start()

    def call_self_now(self, me):
        return me.bump()  # from the serving thread: refused

    def chain_by_callback(self, me, other):
        """A done-callback of a call to ``other`` notifies this very actor (``.remote()``).

        Meanwhile the serving thread calls ``other`` again: a review found the callback
        run there, on the serving thread, where its self-call is refused.
        """
        first = other.sleep.remote(0.1)

        def notify(f):
            try:
                me.bump.remote()
            except BaseException as exc:  # what it got is the test's
                self.error = f"{type(exc).__name__}: {exc}"

        first.add_done_callback(notify)
        second = other.sleep.remote(1.0)  # keeps a reader busy past the first reply
        time.sleep(0.3)
        other.echo(1)
        return second.result()

    def bump(self):
        self.bumps += 1

    def state(self):
        return self.bumps, self.error


@actor
class ControlBreaker:
    """A target whose control server fails once, as a bug in it would."""

    def echo(self, x):
        return x

    def break_control_once(self):
        frame = sys._getframe(1)
        while frame.f_code.co_name != "_run_call":
            frame = frame.f_back
        ctl = frame.f_locals["self"].ctl  # the ActorServer's ControlServer
        real = ctl.service

        def service():
            ctl.service = real
            raise RuntimeError("a bug in the control server")

        ctl.service = service


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@actor
class Prober:
    """Calls another actor again and again; counts what each call raised, and times it."""

    def __init__(self, other):
        self.other = other
        self.times = []

    def probe(self, n):
        seen = {}
        self.times = []
        for i in range(n):
            t0 = time.monotonic()
            try:
                self.other.echo(i)
                key = "ok"
            except Exception as exc:  # what a caller meets is the point
                key = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}"
            seen[key] = seen.get(key, 0) + 1
            self.times.append(time.monotonic() - t0)
        return seen

    def get_times(self):
        return self.times

    def fds(self):
        return len(os.listdir("/proc/self/fd"))


@actor
class FdHog:
    """An actor that uses up its descriptor table, as a leak would, and gives it back."""

    def echo(self, x):
        return x

    def starve(self, keep_spare: bool = True, leave: int = 0) -> None:
        """Fill every free descriptor; the soft limit drops to the highest one in use
        (plus ``leave``).

        ``keep_spare=False`` takes the control server's spare descriptor away first,
        as another thread opening a file at the wrong moment would.
        """
        frame = sys._getframe(1)
        while frame.f_code.co_name != "_run_call":
            frame = frame.f_back
        ctl = frame.f_locals["self"].ctl  # the ActorServer's ControlServer
        self.records = _Records()
        logging.getLogger("runtime.control").addHandler(self.records)
        if not keep_spare and getattr(ctl, "_spare", None) is not None:
            os.close(ctl._spare)
            ctl._spare = None
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + leave, self.limits[1]))
        self.fillers = []
        self._fill()
        # Another thread may still close a descriptor: the control thread closes the
        # connection that opened the caller's channel (and its pidfd) after its reply, which
        # under load comes after this call has begun.  The hole then took the relay's
        # connection, and with no room for the descriptors its request carried, it was
        # refused instead of waiting in the backlog (test_an_actor_out_of_descriptors_backs_
        # off_and_serves_the_caller_later failed once in a full run, and every time with that
        # close made 20 ms late on purpose).  So holes are filled until none has appeared for
        # 0.1 s: a late close waits only for the GIL, which changes hands every 5 ms.
        for _ in range(20):
            time.sleep(0.1)
            if not self._fill():
                break
        for _ in range(leave):  # free again: the table is full up to the limit less these
            os.close(self.fillers.pop())
        self.cpu0 = self._control_cpu()

    def _fill(self) -> int:
        """Take every free descriptor below the soft limit; how many there were."""
        n = 0
        while True:
            try:
                self.fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                return n
            n += 1

    @staticmethod
    def _control_cpu() -> float:
        """CPU time of the control thread alone: the process's would count the readers'
        spinning too, which grows with the load of other tests beside this one."""
        control = next(t for t in threading.enumerate() if t.name == "rt-control")
        return time.clock_gettime(time.pthread_getcpuclockid(control.ident))

    def release(self) -> float:
        """Give the descriptors back; the control thread's CPU time spent while starved."""
        cpu = self._control_cpu() - self.cpu0
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)
        for fd in self.fillers:
            os.close(fd)
        self.fillers = []
        return cpu

    def warnings(self) -> list[str]:
        """The control server's warnings since :meth:`starve`."""
        logging.getLogger("runtime.control").removeHandler(self.records)
        return self.records.lines


class SlowToDecode:
    """Unpickling it takes ``delay`` s: the caller's reader holds the reply that long."""

    def __init__(self, delay):
        self.delay = delay

    def __setstate__(self, state):
        time.sleep(state["delay"])
        self.__dict__.update(state)


@actor
class Hop:
    """Calls the peers it is given by name, after a delay (review L's reproducers)."""

    def __init__(self):
        self.peers = {}

    def set(self, name, handle):
        self.peers[name] = handle
        return True

    def ping(self):
        return os.getpid()

    def work(self, delay):
        time.sleep(delay)
        return os.getpid()

    def call_after(self, delay, peer, method, *args):
        """Sleep, then a blocking call peer.method(*args); failures come back as text."""
        time.sleep(delay)
        try:
            return getattr(self.peers[peer], method)(*args)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def call_after_raw(self, delay, peer, method, *args):
        """As call_after, failures raise."""
        time.sleep(delay)
        return getattr(self.peers[peer], method)(*args)

    def wait_after(self, delay, peer, method, *args):
        """A ``.remote()`` call peer.method(*args), waited on after ``delay`` s."""
        fut = getattr(self.peers[peer], method).remote(*args)
        time.sleep(delay)
        return fut.result()

    def slow_reply(self, work, decode):
        time.sleep(work)
        return SlowToDecode(decode)

    def call_slow_reply(self, peer, work, decode):
        return type(self.peers[peer].slow_reply(work, decode)).__name__

    def sleep_wait_after(self, pre, delay, peer, method, *args):
        """Sleep ``pre`` s, then as wait_after."""
        time.sleep(pre)
        return self.wait_after(delay, peer, method, *args)

    def wait_then_call(self, peer, method, args, then_method, then_args):
        """Wait on peer.method.remote(*args), then a blocking peer.then_method(*then_args);
        failures come back as text."""
        out = []
        for call in (lambda: getattr(self.peers[peer], method).remote(*args).result(),
                     lambda: getattr(self.peers[peer], then_method)(*then_args)):
            try:
                out.append(call())
            except Exception as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    def kill_then_call(self, delay, peer, method, *args):
        """Sleep, SIGKILL ``peer``'s process, wait until its next one serves, then a
        blocking peer.method(*args); failures come back as text."""
        time.sleep(delay)
        h = self.peers[peer]
        os.kill(h.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                h.ping()
                break
            except Exception:
                time.sleep(0.005)
        try:
            return getattr(h, method)(*args)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def call_with_nested_alarm(self, alarm_s, outer, nested):
        """A blocking call ``outer`` = (peer, method, *args); ``alarm_s`` into it, a SIGALRM
        handler makes the blocking call ``nested`` (a wait nested in another).  Both
        outcomes, failures as text."""
        got = {}

        def run(call):
            try:
                return getattr(self.peers[call[0]], call[1])(*call[2:])
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        def on_alarm(signum, frame):
            got["nested"] = run(nested)

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, alarm_s)
        try:
            out = run(outer)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        return [out, got.get("nested")]

    def deferred_call(self, peer, method, *args):
        """A reply computed while it is sent (a DeferredTensor of four ones) whose fill
        first makes the blocking call peer.method(*args) (see :meth:`filled`)."""
        from runtime.codec import DeferredTensor

        def fill(out):
            self.fill_got = getattr(self.peers[peer], method)(*args)
            out.fill_(1.0)

        return DeferredTensor((4,), torch.float32, fill)

    def filled(self):
        """What the last fill's call gave."""
        return self.fill_got

    def skip_ids(self, peer, to):
        """The next call id on the channel to ``peer`` is ``to`` (as after ~4G calls)."""
        h = self.peers[peer]
        h._context().channel_for(h._ref)._ids = itertools.count(to)
        return True


@actor(untrusted_callers=True)
class OpenHop(Hop):
    pass


@actor(max_restarts=3)
class RestartedHop(Hop):
    pass


@actor(untrusted=True)
class Forger:
    def forge(self, target, victim_index, method, *args):
        """A blocking call to ``target`` whose chain claims actor ``victim_index`` waits on it."""
        cc = target._context().channel_for(target._ref)
        return cc.call(method, args, {}, chain=(victim_index,))
