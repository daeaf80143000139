"""The public contract of actors (DESIGN.md "Public API" and "Errors"), over both routes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

import runtime
from runtime import (
    ActorDiedError,
    ActorRuntimeError,
    ActorStartError,
    ActorSystem,
    CallTimeoutError,
    RemoteError,
    actor,
)
from runtime.actor import actor_options
from runtime.system import _importable
from tests.conftest import tmpfs_used
from tests.integration.actors_lib import (
    Caller,
    CustomError,
    Echo,
    FailingInit,
    KwOnlyError,
    NotAnException,
    Restartable,
    SlotsError,
    TwoArgError,
    Untrusted,
)


@pytest.fixture
def system(threshold):
    with ActorSystem(shm_threshold=threshold) as s:
        yield s


def test_sync_and_future_calls(system, route):
    e = system.spawn(Echo, name="e")
    assert e.add(2, b=3) == 5
    t = torch.randn(3, 5)
    assert torch.equal(e.echo(t), t)
    fut = e.add.remote(torch.ones(4), 1.0)
    assert torch.equal(fut.result(timeout=10), torch.full((4,), 2.0))
    routes = system.stats()["routes"]
    assert routes[route]["messages"] >= 6
    other = "zmq" if route == "shm" else "shm"
    assert routes[other]["messages"] == 0


def _channel_routes(system, actor) -> dict:
    (ch,) = [c for c in system.stats()["channels"] if c["actor"] == actor.name]
    return ch["routes"]


def test_call_with_wire_reports_the_calls_own_route_and_sizes(system, route):
    """A blocking call's wire record: its route each way, and sizes that are exactly what
    the channel's counters moved (what the TEE driver's per-op table counts) -- the first
    call too, which opens the channel."""
    e = system.spawn(Echo)
    t = torch.randn(64, 3)
    value, wire = e.echo.call_with_wire(t)  # the first call: it opens the channel
    assert torch.equal(value, t)
    assert wire[0] == wire[2] == route
    r = _channel_routes(system, e)[route]
    assert (r["sent_messages"], r["sent_bytes"]) == (1, wire[1])
    assert (r["received_messages"], r["received_bytes"]) == (1, wire[3])
    assert wire[1] > t.nbytes and wire[3] > t.nbytes  # the tensor, and a header
    value, wire = e.add.call_with_wire(2, b=3)  # the channel open: the hot path
    assert value == 5 and wire[0] == wire[2] == route
    r2 = _channel_routes(system, e)[route]
    assert r2["bytes"] - r["bytes"] == wire[1] + wire[3]
    with pytest.raises(KeyError, match="gone"):
        e.fail.call_with_wire("key", "gone")  # the call's exception, as a plain call's


def test_a_reply_read_by_another_thread_still_completes_the_wire_record(system):
    """Review V: the record was made only once ``send`` returned, and a reply that another
    thread read in between (one waiting for the send lock drains replies) left it without
    its reply's half, which the TEE driver then skipped: 1 call in 40,000 under load.
    Here the send returns late on purpose, while another thread's call reads that reply."""
    e = system.spawn(Echo)
    e.echo(1)
    cc = system._ctx.channel_for(e._ref)
    real = cc.channel.send_encoded

    def late(*a, **k):
        route = real(*a, **k)
        if threading.current_thread().name == "late-sender":
            time.sleep(0.2)  # as if the GIL went to the other thread right here
        return route

    cc.channel.send_encoded = late
    for how in ("call_with_wire", "remote"):
        out = {}

        def send(how=how, out=out):
            if how == "remote":
                f = e.echo.remote(7)
                f.result()
                out["wire"] = f.wire
            else:
                out["wire"] = e.echo.call_with_wire(7)[1]

        sender = threading.Thread(target=send, name="late-sender")
        sender.start()
        time.sleep(0.05)
        assert e.echo(9) == 9  # waits for the send lock, reading the other call's reply
        sender.join(10)
        assert len(out["wire"]) == 4 and None not in out["wire"], (how, out["wire"])


def test_thousand_futures_complete_in_issue_order(system):
    e = system.spawn(Echo)
    done = []
    futs = [e.echo.remote(i) for i in range(1000)]
    for i, f in enumerate(futs):
        f.add_done_callback(lambda f, i=i: done.append(i))
    assert [f.result(timeout=30) for f in futs] == list(range(1000))
    deadline = time.monotonic() + 10  # callbacks run on the channel's callback thread
    while len(done) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == list(range(1000))


def test_futures_complete_without_anyone_waiting(system):
    e = system.spawn(Echo)
    ev = threading.Event()
    e.echo.remote(7).add_done_callback(lambda f: ev.set())
    assert ev.wait(10), "nobody called result(); the pump must complete the future"


@pytest.mark.parametrize("kind,exc_type", [("value", ValueError), ("key", KeyError),
                                           ("runtime", RuntimeError), ("custom", CustomError)])
def test_remote_exceptions_keep_their_type(system, kind, exc_type):
    e = system.spawn(Echo)
    with pytest.raises(exc_type) as info:
        e.fail(kind, "boom-" + kind)
    err = info.value
    assert isinstance(err, RemoteError)
    assert not isinstance(err, ActorRuntimeError)
    assert "boom-" + kind in str(err)
    assert "Traceback" in str(err) and "in fail" in str(err)
    assert "in fail" in str(err.__cause__)
    assert e.add(1, 1) == 2  # the actor is still serving


@pytest.mark.parametrize("kind,exc_type,state", [("two_args", TwoArgError, {"a": 1, "b": 2}),
                                                 ("kw_only", KwOnlyError, {"code": 4}),
                                                 ("slots", SlotsError, {"code": 4})])
def test_exception_with_its_own_init_keeps_its_type(system, kind, exc_type, state):
    """``cls(*args)`` fails for these: they are rebuilt without ``__init__``."""
    e = system.spawn(Echo)
    with pytest.raises(exc_type) as info:
        e.fail_custom_init(kind)
    err = info.value
    assert isinstance(err, RemoteError)
    assert {k: getattr(err, k) for k in state} == state
    assert "in fail_custom_init" in str(err)


@pytest.mark.parametrize("exc", [TwoArgError(1, 2), KwOnlyError("bad", code=4)],
                         ids=["two_args", "kw_only"])
def test_an_exception_passed_and_returned_keeps_its_type_and_state(system, exc):
    """Left undone before: only raised exceptions were rebuilt without ``__init__``; one
    passed as an argument failed the actor's decode of the call (``TypeError: missing
    argument``), one returned failed the caller's decode of the reply."""
    e = system.spawn(Echo)
    back = e.echo({"error": exc, "why": [exc]})
    assert type(back["error"]) is type(exc) and back["error"].args == exc.args
    assert back["error"].__dict__ == exc.__dict__
    assert back["why"][0] is back["error"]  # one object, as sent


def test_base_exception_that_is_no_exception_arrives_as_plain_remote_error(system):
    """Deliberate (docs/design.md): a CancelledError, GeneratorExit or the like steers
    the remote task; raised again in the caller it would steer the caller's."""
    e = system.spawn(Echo)
    with pytest.raises(RemoteError) as info:
        e.fail_custom_init("base")
    assert type(info.value) is RemoteError
    assert not isinstance(info.value, NotAnException)
    assert info.value.remote_type.endswith("NotAnException")
    assert "not an Exception" in str(info.value)


def test_exception_keeps_its_type_across_two_hops(system):
    """driver -> Caller -> Echo: Echo raises, Caller lets it through; the driver gets the
    type too, and the text holds both tracebacks."""
    e = system.spawn(Echo)
    c = system.spawn(Caller, e)
    with pytest.raises(CustomError, match="two hops") as info:
        c.relay_fail("custom", "two hops")
    err = info.value
    assert isinstance(err, RemoteError)
    assert "in relay_fail" in str(err) and "in fail" in str(err)
    assert "in relay_fail" in str(err.__cause__)


def test_exception_through_future(system):
    e = system.spawn(Echo)
    fut = e.fail.remote("value", "via future")
    with pytest.raises(ValueError, match="via future"):
        fut.result(timeout=10)


def test_unpicklable_exception_arrives_as_remote_error(system):
    e = system.spawn(Echo)
    with pytest.raises(RemoteError) as info:
        e.fail_unpicklable()
    assert info.value.remote_type.endswith("UnpicklableError")
    assert "cannot travel" in str(info.value)


def test_init_failure_is_actor_start_error(system):
    with pytest.raises(ActorStartError) as info:
        system.spawn(FailingInit, "bad config")
    assert "bad config" in str(info.value) and "ValueError" in str(info.value)
    # "with the remote traceback": the actor's own frame, not only the message.
    assert "Traceback" in str(info.value) and "raise ValueError(message)" in str(info.value)
    e = system.spawn(Echo)  # the system still works
    assert e.add(1, 2) == 3


def test_unknown_method_fails_before_sending(system):
    e = system.spawn(Echo)
    before = system.stats()["routes"]
    with pytest.raises(AttributeError, match="no method 'nope'"):
        e.nope(1)
    assert system.stats()["routes"] == before


def test_many_threads_share_one_handle(system):
    e = system.spawn(Echo)

    def work(k):
        return [e.add(k * 1000 + i, 1) for i in range(200)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for k, res in enumerate(results):
        assert res == [k * 1000 + i + 1 for i in range(200)]
    assert e.count() == 0  # echo() was never called; add() does not count


def test_handle_passed_to_another_actor(system):
    e = system.spawn(Echo, name="target")
    c = system.spawn(Caller, e, name="caller")
    t = torch.arange(10.0)
    assert torch.equal(c.relay(t), t)
    assert c.relay_many(50) == list(range(1, 51))
    assert e.count() == 1


def test_handle_pickles_as_plain_data(system):
    e = system.spawn(Echo)
    data = pickle.dumps(e)
    assert len(data) < 1000
    again = pickle.loads(data)
    assert again.add(2, 2) == 4 and again.name == e.name


def test_64_mib_tensor_argument_and_result(system, route):
    e = system.spawn(Echo)
    big = torch.randn(16 * 1024 * 1024)  # 64 MiB
    out = e.echo(big)
    assert torch.equal(out, big)
    assert system.stats()["routes"]["zmq"]["messages"] >= 2


def test_call_timeout(threshold):
    with ActorSystem(shm_threshold=threshold, call_timeout=0.5) as system:
        e = system.spawn(Echo)
        t0 = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            e.sleep(2.0)
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - t0 < 1.5
        time.sleep(1.8)  # the late reply arrives and must be dropped
        assert e.add(40, 2) == 42


def test_future_result_timeout_lets_the_call_go_on(system):
    """The built-in ``TimeoutError`` (DESIGN.md), which is also the futures module's (on
    Python 3.10 they were two classes, and a ``Future`` raised only the module's)."""
    e = system.spawn(Echo)
    fut = e.sleep.remote(0.5)
    for wait in (fut.result, fut.exception):
        with pytest.raises(TimeoutError) as info:
            wait(timeout=0.05)
        assert isinstance(info.value, concurrent.futures.TimeoutError)
    assert fut.result(timeout=10) == 0.5
    assert fut.exception(timeout=0) is None


def test_with_exit_leaves_nothing(threshold):
    with ActorSystem(shm_threshold=threshold) as system:
        e = system.spawn(Echo)
        pid = e.pid
        e.echo(torch.ones(10))
        private = system.session.private_dir
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(private)
    assert not psutil.Process().children(recursive=True)


def _shared_mappings(pid: int) -> int:
    """Shared-memory mappings of a process: rings and pool slots are nameless (O_TMPFILE
    inodes or memfds), so they are counted where they are mapped, not by file name."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/dev/shm/" in line or "memfd:" in line)


def test_many_calls_leak_no_fds_or_segments(system):
    e = system.spawn(Echo)
    me = psutil.Process()
    t = torch.ones(64)
    for _ in range(100):
        e.echo(t)
    fds = me.num_fds(), psutil.Process(e.pid).num_fds()
    maps = _shared_mappings(me.pid), _shared_mappings(e.pid)
    assert maps[0] >= 2 and maps[1] >= 2  # the channel's two rings, in each process
    for _ in range(5000):
        e.echo(t)
    assert (me.num_fds(), psutil.Process(e.pid).num_fds()) == fds
    assert (_shared_mappings(me.pid), _shared_mappings(e.pid)) == maps


def test_kill_is_synchronous_and_final(system):
    e = system.spawn(Echo)
    pid = e.pid
    e.kill()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ActorDiedError):
        e.add(1, 1)


def test_kill_is_final_even_for_a_restartable_actor(system):
    """DESIGN.md: a killed actor is not restarted (max_restarts is for deaths)."""
    r = system.spawn(Restartable, 1)  # @actor(max_restarts=2)
    pid = r.pid
    r.kill()
    time.sleep(0.3)  # a restart would have begun by now
    with pytest.raises(ActorDiedError):
        r.add(1)
    assert r.pid == pid  # no new incarnation
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@actor
class _Concurrency:
    """Counts the calls running at once inside the actor."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self, seconds):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1

    def add(self, a, b=0):  # what Caller.relay_many calls
        self.enter(0.01)
        return a + b

    def peak(self):
        return self.most


def test_an_actor_runs_one_call_at_a_time(system):
    """DESIGN.md: calls from many threads, futures and another actor at once still run one
    after the other inside the actor."""
    c = system.spawn(_Concurrency)
    relay = system.spawn(Caller, c)
    with ThreadPoolExecutor(4) as pool:
        futs = [c.enter.remote(0.01) for _ in range(8)]
        futs += [pool.submit(c.enter, 0.01) for _ in range(8)]
        futs.append(relay.relay_many.remote(4))
        for f in futs:
            f.result(timeout=30)
    assert c.peak() == 1


@actor
class _SlowInit:
    def __init__(self, seconds):
        time.sleep(seconds)

    def sleep(self, seconds):
        time.sleep(seconds)


def test_call_timeout_bounds_method_calls_not_spawn():
    """DESIGN.md: ``call_timeout`` is for method calls only, not ``spawn``."""
    with ActorSystem(call_timeout=0.5) as system:
        slow = system.spawn(_SlowInit, 1.0)  # __init__ twice the timeout: still spawned
        slow.sleep(0.01)
        with pytest.raises(CallTimeoutError):
            slow.sleep(2.0)


def test_untrusted_results_are_safe_decoded(system):
    u = system.spawn(Untrusted)
    assert torch.equal(u.tensor(5), torch.arange(5))
    with pytest.raises(RemoteError) as info:
        u.obj()
    assert "safe-mode" in str(info.value)
    with pytest.raises(RemoteError) as info:
        u.fail()
    assert not isinstance(info.value, KeyError)  # never unpickled: type name only
    assert info.value.remote_type == "builtins.KeyError"
    assert "from the untrusted side" in str(info.value)


def test_spawn_untrusted_override(system):
    e = system.spawn(Echo, untrusted=True)
    assert e.add(1, 2) == 3
    with pytest.raises(RemoteError):
        e.weird()


def test_names_are_unique(system):
    system.spawn(Echo, name="x")
    with pytest.raises(ValueError, match="already exists"):
        system.spawn(Echo, name="x")
    a, b = system.spawn(Echo), system.spawn(Echo)
    assert a.name != b.name and a.name.startswith("Echo")


def test_idle_actor_uses_no_cpu(system):
    e = system.spawn(Echo)
    e.add(1, 1)
    proc = psutil.Process(e.pid)
    time.sleep(0.2)
    before = sum(proc.cpu_times()[:2])
    time.sleep(2.0)
    used = sum(proc.cpu_times()[:2]) - before
    assert used < 0.1, f"idle actor used {used:.3f} s of CPU in 2 s"


def test_decorator_rejects_misuse():
    with pytest.raises(TypeError, match="classes"):
        actor(lambda: None)
    with pytest.raises(TypeError, match="reserved"):
        @actor
        class Bad:
            def kill(self):
                pass
    with pytest.raises(ValueError):
        actor(max_restarts=-1)

    for reserved in ("pid", "stats", "name"):
        with pytest.raises(TypeError, match=f"defines {reserved}, which is reserved"):
            actor(type("Bad", (), {reserved: staticmethod(lambda: 1)}))

    @actor(max_restarts=2)
    class Fine:
        def m(self):
            return 1
    assert Fine().m() == 1  # still usable in-process
    assert actor(Fine) is Fine


def test_data_attributes_named_like_handle_attributes_are_fine(system):
    """DESIGN.md rejects *methods* named like a handle attribute; a field of that name (a
    dataclass's ``name``, say) shadows nothing a handle could reach (an API review found
    such classes refused)."""
    @actor
    @dataclasses.dataclass
    class Named:
        name: str = "mine"
        stats: int = 0

        def my_name(self):
            return self.name

    h = system.spawn(Named, "given")
    assert h.my_name() == "given"
    assert h.name.startswith("Named")  # the handle's own attribute


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_BY_PATH = """
from runtime import actor

@actor
class ByPath:
    def where(self):
        return WHERE
"""


def test_actor_classes_of_modules_loaded_by_path_travel_by_value(tmp_path, monkeypatch):
    """DESIGN.md: an actor class may live in a test module or any importable module, by value
    where the actor cannot import it.  ``importlib.util.find_spec`` answers from
    ``sys.modules``, so a module loaded by path (pytest's ``--import-mode=importlib``) looked
    importable and the actor failed with ModuleNotFoundError (an API review).  The module an
    actor would import by that name must also be the same file, or it runs another one."""
    (tmp_path / "loaded").mkdir()
    (tmp_path / "on_path").mkdir()
    (tmp_path / "loaded" / "rt_by_path.py").write_text(_BY_PATH.replace("WHERE", "'loaded'"))
    (tmp_path / "on_path" / "rt_by_path_shadow.py").write_text(
        _BY_PATH.replace("WHERE", "'on sys.path'"))
    (tmp_path / "loaded" / "rt_by_path_shadow.py").write_text(
        _BY_PATH.replace("WHERE", "'loaded'"))
    monkeypatch.syspath_prepend(str(tmp_path / "on_path"))
    try:
        alone = _load_by_path("rt_by_path", tmp_path / "loaded" / "rt_by_path.py")
        shadowed = _load_by_path("rt_by_path_shadow",
                                 tmp_path / "loaded" / "rt_by_path_shadow.py")
        with ActorSystem() as system:
            assert system.spawn(alone.ByPath).where() == "loaded"
            assert system.spawn(shadowed.ByPath).where() == "loaded"
    finally:
        sys.modules.pop("rt_by_path", None)
        sys.modules.pop("rt_by_path_shadow", None)


_ZIPPED = """
from runtime import actor

class Point:
    pass

@actor
class Maker:
    def check(self, p):
        return isinstance(p, Point)
"""


def test_importable_modules_of_zips_and_extended_packages_travel_by_reference(
        tmp_path, monkeypatch):
    """By value, an actor's classes are not the driver's (``isinstance`` fails there).  A
    review of the check above found two importable kinds it sent by value: a module in a zip
    on ``sys.path`` (no file of its own to compare), and a submodule in a directory its
    package added to ``__path__`` (``pkgutil.extend_path``)."""
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("rt_zipped.py", _ZIPPED)
    for part in ("a", "b"):
        (tmp_path / part / "rt_ext_pkg").mkdir(parents=True)
        (tmp_path / part / "rt_ext_pkg" / "__init__.py").write_text(
            "import pkgutil\n__path__ = pkgutil.extend_path(__path__, __name__)\n")
    (tmp_path / "b" / "rt_ext_pkg" / "extra.py").write_text("X = 1\n")
    for entry in (tmp_path / "b", tmp_path / "a", archive):
        monkeypatch.syspath_prepend(str(entry))
    try:
        zipped = importlib.import_module("rt_zipped")
        extra = importlib.import_module("rt_ext_pkg.extra")
        assert _importable(zipped) and _importable(extra)
        with ActorSystem() as system:
            assert system.spawn(zipped.Maker).check(zipped.Point()) is True
    finally:
        for name in ("rt_zipped", "rt_ext_pkg", "rt_ext_pkg.extra"):
            sys.modules.pop(name, None)


def test_importability_is_judged_without_failing(monkeypatch):
    """The check's refusals, each meaning "send it by value": a module with no file (made in
    memory), a name whose parent is no package; and a third-party finder that raises is
    passed over, not taken as an answer (the import would go on to the next one too)."""
    import types

    class Raising:
        def find_spec(self, name, path=None, target=None):
            raise RuntimeError("a broken finder")

    monkeypatch.setattr(sys, "meta_path", [Raising(), *sys.meta_path])
    assert _importable(sys.modules[Echo.__module__])  # found by the finders behind it
    in_memory = types.ModuleType("rt_in_memory")
    assert not _importable(in_memory)
    fake = types.ModuleType("json.decoder.deeper")  # json.decoder is a module, no package
    fake.__file__ = sys.modules["json.decoder"].__file__
    assert not _importable(fake)


_DRIVER_SCRIPT = """
import sys, torch
from runtime import ActorSystem, actor

with open(sys.argv[1], "a") as f:  # once per run of this file as a program
    f.write("ran\\n")

@actor
class Adder:
    def __init__(self, base):
        self.base = base

    def add(self, t):
        return t + self.base

with ActorSystem() as system:  # no main guard: DESIGN.md says none is needed
    a = system.spawn(Adder, 1.0)
    print(a.add(torch.ones(2)).tolist(), flush=True)
"""


def test_a_driver_script_needs_no_main_guard(tmp_path):
    """DESIGN.md: an actor class may live in a script's ``__main__``, and actor processes
    never re-run the driver's main module."""
    script, runs = tmp_path / "driver.py", tmp_path / "runs.txt"
    script.write_text(_DRIVER_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, str(script), str(runs)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2.0, 2.0]"
    assert runs.read_text() == "ran\n"


def test_spawn_rejects_unmarked_class(system):
    class Plain:
        pass
    with pytest.raises(TypeError, match="not an @actor"):
        system.spawn(Plain)


@pytest.mark.parametrize("internal", ["_context", "_ctx", "_ref", "_methods"])
def test_decorator_rejects_methods_named_like_handle_internals(internal):
    # A handle's internals shadow such a method: h._context() returned the runtime's
    # ProcessContext instead of calling the actor (a review found it).
    with pytest.raises(TypeError, match=f"reserved.*{internal}"):
        actor(type("Shadowed", (), {internal: lambda self: "from the actor"}))


@actor
class _Base:
    def ping(self):
        return "pong"


class _UndecoratedSub(_Base):
    """Not decorated: it inherits _Base's mark, so @actor never saw ``name``."""

    def name(self):
        return "from the actor"


def test_spawn_checks_reserved_names_of_an_undecorated_subclass():
    class Sub(_Base):  # an undecorated subclass without a clash is still spawnable
        def more(self):
            return 1
    assert actor_options(Sub) == actor_options(_Base)
    with ActorSystem() as system:
        with pytest.raises(TypeError, match=r"undecorated subclass.*defines name.*reserved"):
            system.spawn(_UndecoratedSub)
        assert system.spawn(Sub).more() == 1


def test_bad_options():
    with pytest.raises(ValueError):
        ActorSystem(shm_threshold=0)
    with pytest.raises(ValueError):
        ActorSystem(shm_threshold=1 << 50)
    with pytest.raises(ValueError):
        ActorSystem(call_timeout=-1)


def test_env_threshold(monkeypatch):
    monkeypatch.setenv("RT_SHM_THRESHOLD", "1")
    with ActorSystem() as system:
        e = system.spawn(Echo)
        monkeypatch.setenv("RT_SHM_THRESHOLD", str(10 << 20))  # read once: changes nothing
        e.add(1, 1)
        assert system.stats()["routes"]["zmq"]["messages"] == 2
        assert system.options.shm_threshold == 1
    with ActorSystem(shm_threshold=1 << 20) as system:  # an argument overrides it
        assert system.options.shm_threshold == 1 << 20


def test_env_shm_dir(monkeypatch, shm_tmpfs):
    """DESIGN.md: ``RT_SHM_DIR`` sets ``shm_dir``'s default; an argument overrides it."""
    monkeypatch.setenv("RT_SHM_DIR", shm_tmpfs)
    before = tmpfs_used(shm_tmpfs)
    with ActorSystem() as system:
        assert system.options.shm_dir == shm_tmpfs
        e = system.spawn(Echo)
        assert torch.equal(e.echo(torch.ones(8)), torch.ones(8))
        assert tmpfs_used(shm_tmpfs) > before  # the channel's rings live there
        assert system.stats()["routes"]["shm"]["messages"] == 2
    with ActorSystem(shm_dir="/dev/shm") as system:
        assert system.options.shm_dir == "/dev/shm"


def test_public_api():
    for name in ("actor", "ActorSystem", "ActorHandle", "ActorRuntimeError", "ActorStartError",
                 "ActorDiedError", "CallTimeoutError", "TransportError", "ProtocolError",
                 "RemoteError"):
        assert hasattr(runtime, name)
    assert issubclass(runtime.ProtocolError, runtime.TransportError)


def test_callers_are_served_fairly(system):
    from tests.integration.actors_lib import Timer

    e = system.spawn(Echo, name="busy")
    t = system.spawn(Timer, e, name="timer")
    t.time_call()  # open the timer's channel first
    futs = [e.sleep.remote(0.003) for _ in range(1000)]  # >= 3 s of queued work
    waited = t.time_call()
    assert not all(f.done() for f in futs)
    # Served in turn, the second caller waits for about one call (3 ms); behind
    # the queue it would wait seconds.  A third of the queue leaves room for a
    # loaded machine while still telling the two apart.
    assert waited < 1.0, f"a second caller waited {waited:.2f} s behind a busy one"
    for f in futs:
        f.result(timeout=60)


def test_done_callback_may_call_the_same_actor(system):
    e = system.spawn(Echo)
    got = []
    ev = threading.Event()

    def cb(f):
        got.append(e.add(f.result(), 1))  # a blocking call from inside a callback
        ev.set()

    e.echo.remote(41).add_done_callback(cb)
    assert ev.wait(10) and got == [42]


def test_callbacks_may_call_again_while_the_ring_is_full():
    # A 1 KiB threshold gives the smallest rings (64 KiB): 200 calls of ~900
    # bytes fill them, so sends wait for space and read replies meanwhile.
    with ActorSystem(shm_threshold=1024) as system:
        e = system.spawn(Echo)
        e.sleep(0.01)
        seconds = []
        blob = b"x" * 900

        def again(f):
            seconds.append(e.add.remote(1, 1))  # re-enters the runtime from a callback

        e.sleep.remote(0.3)  # replies pile up behind it while the sends fill the ring
        futs = []
        for _ in range(200):
            futs.append(e.echo.remote(blob))
            futs[-1].add_done_callback(again)
        assert all(f.result(timeout=30) == blob for f in futs)
        deadline = time.monotonic() + 10
        while len(seconds) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s.result(timeout=10) for s in seconds] == [2] * 200


def test_the_lifetime_limit_on_spawns_says_what_it_is(monkeypatch):
    """Table indices are never reused (a killed actor's handle names its index), so the
    limit counts killed actors too, and the error says so."""
    import runtime.system

    monkeypatch.setattr(runtime.system, "CAPACITY", 2)
    with ActorSystem() as system:
        system.spawn(Echo).kill()
        e = system.spawn(Echo)
        with pytest.raises(ActorRuntimeError, match="at most 2 actors in its lifetime"):
            system.spawn(Echo)
        assert e.echo(1) == 1
