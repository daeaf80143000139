"""``codec.DeferredTensor``: a result computed straight into the memory the transport reserved.

The codec encodes it as a plain tensor; the channel runs its ``fill`` over the ring record or
pool slot itself (fresh memory only for ZeroMQ frames); a fill that raises sends nothing.
``runtime.actor.serving`` says when a method may return one.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runtime import codec
from runtime.actor import serving
from runtime.codec import DeferredTensor
from tests.unit.test_transport import make_pair

MiB = 1 << 20


class Fill:
    """``fill`` that writes ``value`` and records each ``out`` it was given."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.outs: list[tuple[int, tuple[int, ...], torch.dtype, bool]] = []

    def __call__(self, out: torch.Tensor) -> None:
        self.outs.append((out.data_ptr(), tuple(out.shape), out.dtype, out.is_contiguous()))
        out.copy_(self.value)


def _written(enc: codec.Encoded) -> list[np.ndarray]:
    """What a transport does with the buffers: each written into memory of its own."""
    out = []
    for b in enc.buffers:
        if isinstance(b, np.ndarray):
            out.append(b)
        else:
            dst = np.empty(b.nbytes, np.uint8)
            b.write_into(dst)
            out.append(dst)
    return out


class _NoControl:
    """A control server with nothing to open."""

    def ready(self):
        return False

    def wait(self, timeout):
        threading.Event().wait()  # the serve loop's control thread parks (a daemon)


def _bare_server(name):
    """An ActorServer without a process around it: the serve loop's own logic only."""
    from runtime.worker import ActorServer

    server = ActorServer.__new__(ActorServer)
    server.untrusted, server.name, server._poller = False, name, None
    server.ctx, server.index, server._alone = SimpleNamespace(serving=()), 0, (0,)
    server.ctl = _NoControl()
    server._inbound_lock, server._inbound_gen = threading.Lock(), 0
    return server


# -- the codec -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("pickled", [False, True], ids=["plain", "pickle"])
def test_a_deferred_tensor_decodes_as_the_tensor_its_fill_wrote(dtype, pickled):
    value = (torch.arange(24) % 5).to(dtype).reshape(2, 3, 4)
    fill = Fill(value)
    d = DeferredTensor((2, 3, 4), dtype, fill)
    msg = {"y": d, "again": d, "other": torch.ones(3)}
    if pickled:
        msg["set"] = {1, 2}  # not plain: the whole message goes to the pickle format
    enc = codec.encode(msg)
    assert enc.header[4] == (codec.FORMAT_PICKLE if pickled else codec.FORMAT_PLAIN)
    assert fill.outs == []  # nothing computed at encoding
    assert d in enc.buffers and len(enc.buffers) == 2  # one buffer, however often it appears
    assert enc.nbytes == len(enc.header) + value.numel() * dtype.itemsize + 12
    got = codec.decode(enc.header, [torch.from_numpy(b) for b in _written(enc)],
                       safe=not pickled)
    assert len(fill.outs) == 1 and fill.outs[0][1:] == ((2, 3, 4), dtype, True)
    assert type(got["y"]) is torch.Tensor and got["y"].dtype == dtype
    assert torch.equal(got["y"], value) and got["again"] is got["y"]
    assert torch.equal(got["other"], torch.ones(3))


def test_a_deferred_tensor_subclass_is_still_a_tensor_on_the_wire():
    class Mine(DeferredTensor):
        pass

    for extra in (None, {1}):  # plain, then pickle format
        enc = codec.encode([Mine((3,), torch.float32, lambda out: out.fill_(1.0)), extra])
        got, _ = codec.decode(enc.header, [torch.from_numpy(b) for b in _written(enc)],
                              safe=extra is None)
        assert type(got) is torch.Tensor and torch.equal(got, torch.ones(3))


def test_host_fills_fresh_memory_for_routes_without_a_record():
    d = DeferredTensor((), torch.float64, lambda out: out.fill_(2.5))  # 0-d
    raw = d.host()
    assert raw.dtype == np.uint8 and raw.nbytes == 8
    assert np.frombuffer(raw, np.float64)[0] == 2.5


@pytest.mark.parametrize(("args", "error"), [
    (((2,), "float32", None), TypeError),  # a name, not a torch.dtype
    (((2, -1), torch.float32, None), ValueError),
    (((2.0,), torch.float32, None), ValueError),
    (((1,) * 65, torch.float32, None), ValueError),
    (((2,), torch.float32, "not callable"), TypeError),
])
def test_a_malformed_deferred_tensor_is_refused_when_made(args, error):
    shape, dtype, fill = args
    with pytest.raises(error):
        DeferredTensor(shape, dtype, fill if fill is not None else (lambda out: None))


# -- the channel: each route writes it where the bytes go ---------------------------------


def _inside(ptr: int, seg) -> bool:
    return seg.address <= ptr < seg.address + seg.size


@pytest.mark.parametrize(("numel", "pool", "where"), [
    (1000, True, "ring"), (MiB, True, "pool"), (MiB, False, "frames")])
def test_a_deferred_result_is_computed_once_where_the_transport_puts_it(
        private_dir, numel, pool, where):
    caller, callee, bell = make_pair(private_dir, MiB, **({} if pool else {"pool_bytes": 0}))
    try:
        value = torch.randn(numel)
        fill = Fill(value)
        route = callee.send_encoded(codec.encode((5, True, DeferredTensor((numel,),
                                                                            torch.float32,
                                                                            fill))), tag=5)
        assert route == ("shm" if where == "ring" else "zmq")
        (ptr, shape, _, contiguous), = fill.outs
        assert shape == (numel,) and contiguous
        if where == "ring":
            assert _inside(ptr, callee.tx.segment)
        elif where == "pool":
            assert _inside(ptr, callee.pool_tx.slots[0].segment)
        else:
            assert not _inside(ptr, callee.tx.segment)
        _, ok, got = caller.recv(deadline=time.monotonic() + 10)
        assert ok and torch.equal(got, value)
    finally:
        caller.close()
        callee.close()
        bell.close()


@pytest.mark.parametrize("route", ["ring", "frames"])
def test_an_empty_deferred_tensor_never_runs_its_fill(private_dir, route):
    caller, callee, bell = make_pair(private_dir, MiB,
                                     **({"pool_bytes": 0} if route == "frames" else {}))
    try:
        def fill(out):
            raise AssertionError("nothing to write")
        big = torch.ones(MiB if route == "frames" else 10)  # frames: the message is large
        assert callee.send((big, DeferredTensor((0, 7), torch.float32, fill))) == \
            ("zmq" if route == "frames" else "shm")
        _, got = caller.recv(deadline=time.monotonic() + 10)
        assert got.shape == (0, 7) and got.dtype == torch.float32
    finally:
        caller.close()
        callee.close()
        bell.close()


@pytest.mark.parametrize(("numel", "pool"), [(1000, True), (MiB, True), (MiB, False)],
                         ids=["ring", "pool", "frames"])
def test_a_fill_that_raises_sends_nothing_and_the_channel_goes_on(private_dir, numel, pool):
    caller, callee, bell = make_pair(private_dir, MiB, **({} if pool else {"pool_bytes": 0}))
    try:
        def fill(out):
            out[: numel // 2] = 7.0  # half written into the record, then a failure
            raise ZeroDivisionError("the product failed")
        with pytest.raises(ZeroDivisionError):
            callee.send(DeferredTensor((numel,), torch.float32, fill))
        if pool:
            assert all(s.is_free() for s in callee.pool_tx.slots)  # the slot went back
        ok, _ = caller.try_recv()
        assert not ok  # nothing was delivered, not even half a record
        callee.send(("next", torch.arange(10.0)))
        tag, t = caller.recv(deadline=time.monotonic() + 10)
        assert tag == "next" and torch.equal(t, torch.arange(10.0))
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- serving -----------------------------------------------------------------------------------


class _Served:
    def method(self):
        return serving(self, _Served.method)

    def other(self):
        return serving(self, _Served.other)

    def calls_other(self):
        return self.other()


def test_serving_is_true_only_in_the_method_the_serve_loop_called(monkeypatch):
    actor_module = importlib.import_module("runtime.actor")  # runtime.actor is the decorator
    a, b = _Served(), _Served()
    assert not a.method()  # in-process
    monkeypatch.setattr(actor_module, "_SERVED", None)
    monkeypatch.setattr(actor_module, "_CALLED", None)
    actor_module._set_served(a)
    assert not a.method()  # served instance, but no call running
    actor_module._set_called(a.method)  # what the serve loop does around a call
    assert a.method() and not b.method()  # another object is not served
    assert not a.other()  # another method than the one called
    actor_module._set_called(a.calls_other)
    assert not a.calls_other()  # called by the called method, not by the serve loop
    actor_module._set_called(a.method)
    seen = []
    t = threading.Thread(target=lambda: seen.append(a.method()))
    t.start()
    t.join()
    assert seen == [False]  # another thread of the actor is not where its calls run
    actor_module._set_called(None)
    assert not a.method()


def test_a_served_call_releases_its_borrowed_record_only_after_the_fill(private_dir,
                                                                        monkeypatch):
    """A deferred result reads the borrowed arguments while the reply is written: the serve
    loop must give the record back after the reply, not when the method returns."""
    from runtime.worker import _Inbound

    actor_module = importlib.import_module("runtime.actor")
    caller, callee, bell = make_pair(private_dir, MiB)
    seen = []

    class Doubler:
        def double(self, x):
            assert serving(self, Doubler.double)

            def fill(out):
                seen.append((callee.transport.rx._rpos.value, float(x.sum())))
                torch.mul(x, 2, out=out)
            return DeferredTensor(x.shape, x.dtype, fill)

    class Done(Exception):
        pass

    def sleep():
        raise Done  # the call was served and the loop went idle: stop it

    server = _bare_server("doubler")
    server._sleep = sleep
    server.instance = Doubler()
    monkeypatch.setattr(actor_module, "_SERVED", None)
    actor_module._set_served(server.instance)
    conn = _Inbound.__new__(_Inbound)
    callee.borrow = True
    conn.channel, conn.caller_pid, conn.check, conn.answered = callee, os.getpid(), None, 0
    server.inbound = [conn]
    try:
        x = torch.arange(1000.0)
        caller.send((1, "double", (x,), {}))
        start = callee.transport.rx._rpos.value
        with pytest.raises(Done):
            server.serve()
        call_id, ok, got = caller.recv(deadline=time.monotonic() + 10)
        assert (call_id, ok) == (1, True) and torch.equal(got, x * 2)
        assert seen == [(start, float(x.sum()))]  # the record was still held by the fill
        assert callee.transport.rx._rpos.value != start  # and given back after
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- the CPU worker's use of it ----------------------------------------------------------------


def test_a_cpu_workers_deferred_compute_counts_as_its_calls_work(config, monkeypatch):
    import actors.gpu_worker as gw

    w = gw.GPUWorker(config, seed=0, device="cpu", defer_min_bytes=1 << 10)
    x = torch.randn(64, config.hidden_size)
    assert type(w.batch_linear(0, ("q",), x)[0]) is torch.Tensor  # in-process: tensors
    monkeypatch.setattr(gw, "serving", lambda obj, method: obj is w)  # as when served
    small = w.batch_linear(0, ("k",), x[:2], tag="small")[0]
    assert type(small) is torch.Tensor  # 2 x 32 floats: below defer_min_bytes
    q, k = w.batch_linear(0, ("q", "k"), x, tag="t")
    assert type(q) is DeferredTensor and q.shape == (64, config.q_size)
    before = w.compute_stats()["t"]
    assert before["calls"] == 1 and before["deferred"] == 0
    t0 = time.monotonic_ns()
    got = [torch.from_numpy(d.host()).view(torch.float32).view(d.shape) for d in (q, k)]
    t1 = time.monotonic_ns()
    monkeypatch.setattr(gw, "serving", lambda obj, method: False)
    want = w.batch_linear(0, ("q", "k"), x, tag="ref")
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(got, want, strict=False))
    after = w.compute_stats()["t"]
    assert after["calls"] == 1 and after["deferred"] == 2
    assert 0 < after["seconds"] - before["seconds"] <= (t1 - t0) * 1e-9
    # The call's span is its products': from the first one's start to the last one's end.
    tag, start, end, rows = w.trace_events()["events"][-2]
    assert (tag, rows) == ("t", 64) and t0 <= start < end <= t1


def test_a_channel_dropped_in_mid_walk_does_not_end_the_serve_loop():
    """Found by a review: the serve loop walks its inbound channels by index, and a drop
    removed one from that very list, so the walk read past its end (IndexError) and the
    actor died -- every other caller's channel with it."""
    from runtime.worker import _Inbound

    class Done(Exception):
        pass

    class Fake:
        safe, failed = False, None

        def __init__(self, closed):
            self.peer_closed = closed
            self.closed_with = None

        def try_recv(self, check=None):
            return False, None

        def close(self, notify=False):
            self.closed_with = notify

    def sleep():
        raise Done  # one walk done, nothing to serve: stop

    server = _bare_server("walker")
    server._sleep = sleep
    conns = []
    for closed in (True, False):  # the first caller is gone; the second stays
        conn = _Inbound.__new__(_Inbound)
        conn.channel, conn.caller_pid, conn.check = Fake(closed), os.getpid(), None
        conn.answered = 0
        conns.append(conn)
    server.inbound = list(conns)
    with pytest.raises(Done):
        server.serve()
    assert server.inbound == [conns[1]] and conns[0].channel.closed_with is False
