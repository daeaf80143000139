"""The pool of shared-memory slots that carries large messages' buffers (``pool.py``)."""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from runtime import codec
from runtime.errors import ProtocolError
from runtime.messages import MessageChannel
from runtime.transport import framing, pool
from runtime.transport.channel import KIND_POOL, POOL_MIN, Channel
from runtime.transport.doorbell import Doorbell
from tests.unit.test_transport import SHM, make_pair

MiB = 1 << 20


@pytest.fixture
def big_pair(private_dir):
    """Threshold 1 MiB: a 4 MiB tensor goes on ZeroMQ, its bytes through the pool."""
    caller, callee, bell = make_pair(private_dir, MiB)
    yield caller, callee
    caller.close()
    callee.close()
    bell.close()


def recv(ch):
    return ch.recv(deadline=time.monotonic() + 10)


def pool_stats(ch) -> dict:
    return ch.stats()["pool"]


def mapped_slot(ch, t: torch.Tensor) -> bool:
    """True if ``t``'s bytes lie in one of ``ch``'s mappings of the peer's slots."""
    p = t.data_ptr()
    return any(s.address <= p < s.address + pool.HEADER_SIZE + s.capacity
               for s in ch.pool_rx.slots.values() if s.state is not None)


# -- layout and sizing ------------------------------------------------------------------


def test_layout_aligns_every_buffer():
    offsets, span = pool.layout([1, 0, 64, 65, 7])
    assert offsets == [0, 64, 64, 128, 256] and span == 320
    assert pool.layout([]) == ([], 0)


def test_slot_sizes_come_from_a_small_set():
    assert pool.slot_size(1) == MiB
    assert pool.slot_size(MiB + 1) == 3 * MiB // 2
    assert pool.slot_size(3 * MiB // 2 + 1) == 2 * MiB
    assert pool.slot_size(128 * MiB) == 128 * MiB
    assert pool.slot_size(64 * MiB + 64) == 96 * MiB
    for need in (5, MiB - 1, 7 * MiB + 3, 100 * MiB):
        size = pool.slot_size(need)
        assert need <= size and (size <= MiB or size < 1.5 * need) and size % 4096 == 0


# -- the route --------------------------------------------------------------------------


def test_large_message_goes_through_a_slot_and_arrives_in_place(big_pair):
    caller, callee = big_pair
    t = torch.arange(MiB, dtype=torch.float32)  # 4 MiB
    assert caller.send({"t": t, "small": torch.ones(3), "s": "x"}) == "zmq"
    got = recv(callee)
    assert torch.equal(got["t"], t) and torch.equal(got["small"], torch.ones(3))
    assert got["s"] == "x"
    assert mapped_slot(callee, got["t"]), "a trusted peer's message is read in place"
    assert pool_stats(caller)["created"] == 1 and pool_stats(callee)["received"] == 1
    assert caller.stats()["routes"]["zmq"]["sent_messages"] == 1


def test_below_pool_min_goes_as_frames(big_pair):
    caller, callee = big_pair
    msg = [b"x" * MiB, torch.ones(POOL_MIN // 8)]  # large, but its buffers are small
    assert caller.send(msg) == "zmq"
    got = recv(callee)
    assert got[0] == msg[0] and torch.equal(got[1], msg[1])
    assert pool_stats(caller)["created"] == 0


def test_slots_are_reused(big_pair):
    caller, callee = big_pair
    for i in range(40):
        t = torch.full((MiB,), float(i))
        caller.send(t)
        got = recv(callee)
        assert float(got[0]) == i and float(got[-1]) == i
        del got  # the slot is free again
        callee.send(torch.full((MiB // 2,), float(-i)))
        back = recv(caller)
        assert float(back[-1]) == -i
        del back
    assert pool_stats(caller)["created"] == 1, "one slot serves every message"
    assert pool_stats(callee)["created"] == 1
    assert pool_stats(caller)["fallbacks"] == 0


def test_a_held_tensor_stays_valid_while_later_messages_arrive(big_pair):
    caller, callee = big_pair
    caller.send(torch.full((MiB,), 7.0))
    kept = recv(callee)
    for i in range(20):  # the sender must not reuse the slot `kept` lies in
        caller.send(torch.full((MiB,), float(i)))
        got = recv(callee)
        assert torch.all(got == i)
        del got
    assert torch.all(kept == 7.0)
    assert pool_stats(caller)["created"] == 2  # one held, one reused 20 times
    view = kept[10:20]  # a view keeps the lease too
    del kept
    gc.collect()
    caller.send(torch.full((MiB,), 1.0))
    assert torch.all(recv(callee) == 1.0)
    assert torch.all(view == 7.0)
    del view
    for _ in range(5):
        caller.send(torch.full((MiB,), 2.0))
        assert torch.all(recv(callee) == 2.0)
    assert pool_stats(caller)["created"] == 2


def test_received_tensor_outlives_the_channel(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB)
    try:
        caller.send(torch.full((MiB,), 3.0))
        kept = recv(callee)
    finally:
        caller.close()
        callee.close()
        bell.close()
    assert torch.all(kept == 3.0)  # the slot stays mapped for it
    kept += 1
    assert torch.all(kept == 4.0)


def test_a_peer_that_never_frees_makes_the_sender_fall_back(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB, pool_bytes=4 * MiB)
    kept = []
    try:
        for i in range(6):
            caller.send(torch.full((MiB // 2 + 100,), float(i)))  # needs a 3 MiB slot
            kept.append(recv(callee))
        st = pool_stats(caller)
        assert st["slot_bytes"] <= 4 * MiB and st["fallbacks"] >= 4
        assert [float(k[0]) for k in kept] == list(range(6))
        assert sum(mapped_slot(callee, k) for k in kept) == st["slots"]
        del kept[:]
        caller.send(torch.full((MiB // 2 + 100,), 9.0))
        assert float(recv(callee)[0]) == 9.0
        assert pool_stats(caller)["fallbacks"] == st["fallbacks"]  # a slot again
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_pool_off_sends_frames(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB, pool_bytes=0)
    try:
        assert not caller.spec().pool and "pool" not in caller.stats()
        t = torch.randn(MiB)
        caller.send(t)
        assert torch.equal(recv(callee), t)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_peer_that_cannot_map_slots_gets_frames(private_dir):
    """A callee attached without ``shm_dir`` closes the pool's pair: the caller
    learns it at its first slot announcement and sends frames from then on."""
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name="rt_nomap",
                            threshold=MiB)
    bell = Doorbell(os.path.join(private_dir, "nomap.bell"))
    callee = Channel.attach(caller.spec(), fds=[os.dup(fd) for fd in caller.peer_fds()],
                            own_bell=bell, safe=False, name="callee")  # no shm_dir
    caller.attached(bell.path)
    caller, callee = MessageChannel(caller), MessageChannel(callee)
    try:
        assert callee.pool_tx is None and callee.pool_sock is None
        for i in range(3):
            t = torch.full((MiB,), float(i))
            caller.send(t)
            got = recv(callee)
            assert torch.equal(got, t)
            callee.send(got)
            assert torch.equal(recv(caller), t)
        st = pool_stats(caller)
        assert st["created"] == 0 and st["fallbacks"] == 3 and caller.pool_tx.peer_gone
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_forked_child_dropping_a_tensor_does_not_free_the_slot(big_pair):
    caller, callee = big_pair
    caller.send(torch.full((MiB,), 5.0))
    kept = recv(callee)
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the tensor, then exits
        try:
            del kept
            gc.collect()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert not caller.pool_tx.slots[0].is_free()
    caller.send(torch.full((MiB,), 6.0))  # must not land in kept's slot
    assert torch.all(recv(callee) == 6.0)
    assert torch.all(kept == 5.0)


def test_an_untrusted_peers_slot_is_copied_out_and_freed_at_once(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB, safe=True)
    try:
        kept = []
        for i in range(5):
            caller.send(torch.full((MiB,), float(i)))
            kept.append(recv(callee))
            assert not mapped_slot(callee, kept[-1])
        assert [float(k[0]) for k in kept] == list(range(5))
        assert pool_stats(caller)["created"] == 1  # freed as soon as it was copied
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_both_directions_with_many_buffers(big_pair):
    caller, callee = big_pair
    msg = [torch.randn(n) for n in (0, 1, 3, 1000, MiB // 3, 17)] + [np.arange(MiB // 2)]
    caller.send(msg)
    got = recv(callee)
    callee.send(got)
    back = recv(caller)
    for a, b in zip(msg[:-1], back[:-1], strict=True):
        assert torch.equal(a, b)
    assert np.array_equal(msg[-1], back[-1])


def test_timeout_before_queueing_gives_the_slot_back(private_dir):
    caller, callee, bell = make_pair(private_dir, 1024)  # a small ring (64 KiB)
    try:
        while True:  # fill the ring with small messages nobody reads
            try:
                caller.send(b"z" * 900, deadline=time.monotonic() + 0.05)
            except TimeoutError:
                break
        with pytest.raises(TimeoutError):
            caller.send(torch.ones(MiB), deadline=time.monotonic() + 0.2)
        st = pool_stats(caller)
        assert st["created"] == 1 and all(s.is_free() for s in caller.pool_tx.slots)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_full_shm_dir_for_slots_falls_back(tiny_tmpfs, private_dir, caplog):
    # 64 KiB rings fit a 1 MiB tmpfs; a slot (at least 1 MiB) does not.
    caller, callee, bell = make_pair(private_dir, 64 * 1024, shm_dir=tiny_tmpfs)
    try:
        assert caller.mode == "shm"
        for i in range(3):
            t = torch.full((MiB // 4,), float(i))
            assert caller.send(t) == "zmq"
            assert torch.equal(recv(callee), t)
        st = pool_stats(caller)
        assert st["created"] == 0 and st["fallbacks"] == 3
        assert os.listdir(tiny_tmpfs) == []
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_pool_without_rings(small_tmpfs, private_dir):
    """Rings that do not fit (2 x 20 MiB) do not keep the pool from working."""
    caller, callee, bell = make_pair(private_dir, 10 * MiB, shm_dir=small_tmpfs)
    try:
        assert caller.mode == "zmq-only" and callee.mode == "zmq-only"
        for i in range(4):
            t = torch.full((MiB,), float(i))
            assert caller.send(t) == "zmq"
            got = recv(callee)
            assert torch.equal(got, t) and mapped_slot(callee, got)
            del got
            callee.send(torch.full((2 * MiB,), float(-i)))
            assert torch.all(recv(caller) == -i)
        assert pool_stats(caller)["created"] == 1 and pool_stats(callee)["created"] == 1
        assert caller.send("small") == "zmq" and recv(callee) == "small"
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- a hostile peer ---------------------------------------------------------------------


def _pool_message(ch, obj, slot_id, offset=0, zero=0, tag=5, sizes=None):
    """A POOL message as a peer could write it, with any placement."""
    enc = codec.encode(obj)
    sizes = [b.nbytes for b in enc.buffers] if sizes is None else sizes
    meta = ch.secret + framing.head_bytes(KIND_POOL, tag, enc.header, sizes,
                                          extra=pool.PLACE.pack(slot_id, zero, offset))
    ch._send_bulk([meta], None, None, None, small=True)


@pytest.mark.parametrize("case", ["unknown slot", "offset past the end", "size past the end",
                                  "misaligned offset", "reserved field", "huge size"])
def test_hostile_placements_are_protocol_errors(big_pair, case):
    caller, callee = big_pair
    caller.send(torch.ones(MiB))  # slot 1 exists, 4 MiB + rounding
    del_ = recv(callee)
    del del_
    cap = caller.pool_tx.slots[0].capacity
    t = torch.ones(1000)
    kw = {"unknown slot": {"slot_id": 99},
          "offset past the end": {"slot_id": 1, "offset": cap + 64},
          "size past the end": {"slot_id": 1, "offset": cap - 64},
          "misaligned offset": {"slot_id": 1, "offset": 3},
          "reserved field": {"slot_id": 1, "zero": 1},
          "huge size": {"slot_id": 1, "sizes": [2**64 - 1]}}[case]
    _pool_message(caller, t, **kw)
    caller.send("after")
    with pytest.raises(ProtocolError) as info:
        callee.try_recv(deadline=time.monotonic() + 5)
    assert info.value.tag == 5
    assert recv(callee) == "after"  # the channel goes on
    caller.send(torch.full((MiB,), 2.0))
    assert torch.all(recv(callee) == 2.0)


def _send_control(ch, op, slot_id, capacity, fds=()):
    socket.send_fds(ch.pool_sock, [struct.pack("<IIQ", op, slot_id, capacity)], list(fds))


@pytest.mark.parametrize("case", ["pipe", "file elsewhere", "wrong size", "no magic",
                                  "no descriptor", "twice", "garbage"])
def test_hostile_slot_announcements_are_refused(big_pair, case, tmp_path):
    caller, callee = big_pair
    fds = []
    cap = 2 * MiB
    if case == "pipe":
        r, w = os.pipe()
        fds, closers = [r], [r, w]
    elif case == "file elsewhere":  # a regular file, not on the receiver's shm_dir
        fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, pool.HEADER_SIZE + cap)
        fds, closers = [fd], [fd]
    else:
        seg = pool.Segment.create_anonymous(SHM, pool.HEADER_SIZE + cap)
        if case != "no magic":
            ctypes.memmove(seg.address, pool.MAGIC, len(pool.MAGIC))
        fds, closers = [seg.fd], []
    slot_id = 77
    if case == "wrong size":
        cap += 4096
    if case == "no descriptor":
        fds = []
    if case == "garbage":
        caller.pool_sock.send(b"\x01" * 5)
    else:
        _send_control(caller, pool.OP_ADD, slot_id, cap, fds)
        if case == "twice":
            _send_control(caller, pool.OP_ADD, slot_id, cap, fds)
    for fd in closers:
        os.close(fd)
    if not closers:
        seg.close()
    _pool_message(caller, torch.ones(1000), slot_id)
    if case == "twice":  # the first announcement was good: the slot's bytes are read
        assert torch.equal(recv(callee), torch.zeros(1000))
        assert "announced twice" in callee.pool_rx.refused
    else:
        with pytest.raises(ProtocolError, match="unknown pool slot") as info:
            recv(callee)
        assert info.value.tag == 5 and callee.pool_rx.refused
    caller.send(torch.full((MiB,), 2.0))  # the real pool still works
    assert torch.all(recv(callee) == 2.0)


def test_a_peer_may_map_only_so_many_slots(big_pair, monkeypatch):
    caller, callee = big_pair
    monkeypatch.setattr(pool, "MAX_PEER_SLOTS", 2)
    segs = []
    for i in range(3):
        seg = pool.Segment.create_anonymous(SHM, pool.HEADER_SIZE + MiB)
        ctypes.memmove(seg.address, pool.MAGIC, len(pool.MAGIC))
        _send_control(caller, pool.OP_ADD, 100 + i, MiB, [seg.fd])
        segs.append(seg)
    for seg in segs:
        seg.close()
    _pool_message(caller, torch.ones(1000), 102)
    with pytest.raises(ProtocolError, match="unknown pool slot"):
        recv(callee)
    assert "more than 2 pool slots" in callee.pool_rx.refused
    assert len(callee.pool_rx.slots) == 2


# -- nothing leaks ----------------------------------------------------------------------


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm" in line)


def test_descriptors_and_mappings_stay_flat(private_dir):
    def churn():
        caller, callee, bell = make_pair(private_dir, MiB, pool_bytes=16 * MiB)
        try:
            for i in range(10):
                n = (1 + i % 3) * MiB
                caller.send(torch.ones(n))
                got = recv(callee)
                callee.send(got)
                del got
                back = recv(caller)
                assert back.numel() == n
                del back
        finally:
            caller.close()
            callee.close()
            bell.close()

    churn()
    fds, maps = len(os.listdir("/proc/self/fd")), _maps()
    for _ in range(8):
        churn()
    gc.collect()
    # No growth: another part of the process (a thread of an earlier test's actor system)
    # may still close a descriptor of its own meanwhile, never open one for our channels.
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert _maps() == maps


# -- fork pins (pool._pin_before_fork): found by reviews of the first fixes ------------


def _run(src: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(src)], capture_output=True,
                          text=True, timeout=60, cwd=os.getcwd(), env=dict(os.environ))


@pytest.mark.timeout(90)
def test_two_threads_forking_at_once_pin_both_children():
    """Thread A's after_in_parent pops *every* entry of ``_forking`` -- also thread B's,
    whose fork has not happened yet: B's write end is closed before B forks, so child B
    holds no pipe, and A's child holds B's write end.  Once A's child is gone the slot is
    FREE while child B still reads it.  (A slow before-hook of another library -- here a
    sleep, logging's takes a lock -- is the window.)"""
    out = _run("""
        import os, threading, time, ctypes
        def slow():  # registered first: runs after the pool's before-hook
            if threading.current_thread().name == "A":
                time.sleep(0.5)
        os.register_at_fork(before=slow)
        from runtime.transport import pool
        state = ctypes.c_uint32(1)  # BUSY: an in-place lease of this process
        pool._leases[0] = pool._Lease(state)
        pids = {}
        def fork(name, life):
            pid = os.fork()
            if pid == 0:
                time.sleep(life); os._exit(0)
            pids[name] = pid
        a = threading.Thread(target=fork, args=("A", 0.0), name="A")
        b = threading.Thread(target=fork, args=("B", 1.5), name="B")
        a.start(); time.sleep(0.1); b.start(); a.join(); b.join()
        pool._set_free(state, os.getpid(), 0)  # the parent lets go of its lease
        os.waitpid(pids["A"], 0)
        pool.release_pinned()  # the next pooled receive
        alive = os.waitpid(pids["B"], os.WNOHANG) == (0, 0)
        print("child B alive:", alive, "slot state:", state.value)
        os.waitpid(pids["B"], 0)
    """)
    assert "child B alive: True" in out.stdout, out.stdout + out.stderr
    assert "slot state: 1" in out.stdout, out.stdout  # b3fbf37: 0 (FREE under child B)


@pytest.mark.timeout(90)
def test_forks_whose_children_are_gone_keep_no_descriptor():
    """Every fork while a lease is live keeps a pipe's read end until the next pooled
    receive, though its child is long gone: a process forking workers while it holds a
    tensor read in place runs out of descriptors (then ``pipe2`` fails silently and later
    children are not pinned at all)."""
    out = _run("""
        import os, ctypes, resource
        from runtime.transport import pool
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        state = ctypes.c_uint32(1)
        pool._leases[0] = pool._Lease(state)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        after = len(os.listdir("/proc/self/fd"))
        print("fds:", before, after, "groups:", len(pool._groups),
              "pins:", pool._leases[0].pins)
    """)
    assert "fds:" in out.stdout, out.stdout + out.stderr
    fds = out.stdout.split("fds:")[1].split()
    assert int(fds[1]) - int(fds[0]) < 10, out.stdout  # b3fbf37: ~120, up to the limit


@pytest.mark.timeout(90)
def test_two_readers_releasing_pins_at_once_take_each_pin_off_once():
    """``_release_pinned`` runs at every pooled receive, on each channel's reader thread, and
    is not locked: two readers read the same end of file (``os.read`` drops the GIL), both
    close the descriptor (EBADF out of ``RxPool.buffers`` -- a consumed message lost -- or,
    had a third thread opened something meanwhile, another file's descriptor closed) and
    both take the group's pin off, so a slot another, live child still pins goes FREE."""
    out = _run("""
        import os, sys, threading, ctypes
        from runtime.transport import pool
        sys.setswitchinterval(1e-6)
        errs, early = [], 0
        for it in range(300):
            state = ctypes.c_uint32(1)
            pool._leases[it] = lease = pool._Lease(state)
            r, live_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # a child still alive
            pool._groups.append((r, [it])); lease.pins += 1
            live = (r, live_w)
            for _ in range(4):  # children gone
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK); os.close(w)
                pool._groups.append((r, [it])); lease.pins += 1
            lease.done = True
            bar = threading.Barrier(2)
            def go():
                bar.wait()
                try:
                    pool.release_pinned()
                except Exception as e:
                    errs.append(repr(e))
            ts = [threading.Thread(target=go) for _ in range(2)]
            [t.start() for t in ts]; [t.join() for t in ts]
            early += state.value == 0  # FREE though a live child pins it
            pool._groups.clear(); pool._leases.clear()
            os.close(live_w)
            try: os.close(live[0])
            except OSError: pass
        print("errors:", len(errs), errs[:1], "freed under a live child:", early)
    """)
    assert "errors: 0 " in out.stdout and "live child: 0" in out.stdout, out.stdout + out.stderr


# A review of the lock held across a fork (a58500e): a finalizer that waited for it, inside
# logging's lock or the import lock, deadlocked against the fork waiting for those.
PRELUDE = """
    import ctypes, faulthandler, gc, logging, os, sys, threading, time, weakref
    import numpy as np
    from runtime.transport import pool
    faulthandler.dump_traceback_later(TIMEOUT, exit=True)

    def lease(k):  # an in-place lease, as RxPool.buffers makes one
        state = ctypes.c_uint32(1)
        pool._leases[k] = pool._Lease(state)
        data = np.empty(8, np.uint8)
        weakref.finalize(data, pool._set_free, state, os.getpid(), k)
        return data
"""


def _run_with_leases(src: str, timeout: int) -> subprocess.CompletedProcess:
    code = textwrap.dedent(PRELUDE).replace("TIMEOUT", str(timeout)) + textwrap.dedent(src)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout + 30, cwd=os.getcwd(), env=dict(os.environ))


@pytest.mark.timeout(60)
def test_a_lease_let_go_under_loggings_lock_during_a_fork_does_not_deadlock():
    out = _run_with_leases("""
        data = lease(0)
        held = threading.Event()
        def other():  # holds logging's module lock (getLogger, setLevel, a handler made...)
            logging._acquireLock()
            held.set()
            time.sleep(0.5)  # the main thread forks meanwhile
            global data
            del data  # what a GC pass inside that logging call does to cyclic garbage
            logging._releaseLock()
        threading.Thread(target=other, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("no deadlock")
    """, timeout=8)
    assert "no deadlock" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.timeout(90)
def test_gc_inside_an_import_during_a_fork_does_not_deadlock():
    out = _run_with_leases("""
        stop = False
        def other():  # lazy imports: _find_spec runs finders under the import lock
            k = 0
            while not stop:
                k += 1
                c = [lease(k)]; c.append(c); del c  # a cycle (a traceback, a frame...)
                try:
                    __import__(f"no_such_module_{k}")
                except ImportError:
                    pass
        gc.set_threshold(50)
        t = threading.Thread(target=other, daemon=True); t.start()
        t0 = time.time()
        while time.time() - t0 < 3:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        stop = True; t.join()
        print("no deadlock")
    """, timeout=20)
    assert "no deadlock" in out.stdout, out.stdout + out.stderr[-3000:]


def test_a_pin_pipe_closed_by_someone_else_breaks_no_receive():
    """A review of a58500e: one read end closed behind the pool's back made every later
    release raise EBADF into receives, and every later fork pin nothing."""
    out = _run("""
        import ctypes, os
        from runtime.transport import pool
        state = ctypes.c_uint32(1)
        pool._leases[0] = lease = pool._Lease(state)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pool._groups.append((r, [0])); lease.pins += 1
        os.close(r); os.close(w)  # someone else's doing
        lease.done = True
        pool.release_pinned()  # no exception
        print("groups", len(pool._groups), "state", state.value)
        pool._leases[1] = pool._Lease(ctypes.c_uint32(1))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        print("pins after a fork", pool._leases[1].pins)
        os.waitpid(pid, 0)
    """)
    assert "groups 0 state 0" in out.stdout, out.stdout + out.stderr
    assert "pins after a fork 1" in out.stdout, out.stdout + out.stderr
