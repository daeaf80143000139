"""An untrusted peer attacking the receive side (found by an adversarial review).

A channel decoded in safe mode must turn whatever an untrusted peer sends into a
``TransportError`` (``ProtocolError``) at a cost in proportion to what was sent: no other
exception (it would end a trusted actor's serve loop), no allocation of many times the
bytes received, no receive that overruns its deadline by seconds.  Each test failed on the
tree before its fix.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import mmap
import os
import re
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from runtime import codec
from runtime.errors import ProtocolError, TransportError
from runtime.messages import MessageChannel
from runtime.transport import framing, pool, segment
from runtime.transport import ring as ringmod
from runtime.transport.channel import SAFE_MAX_BUFFERS, Channel
from runtime.transport.doorbell import Doorbell
from tests.unit.test_pool import _pool_message, _send_control
from tests.unit.test_transport import SHM, make_pair

MiB = 1 << 20
GiB = 1 << 30


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak() -> int:
    """Trim the heap, reset VmHWM to the current RSS (Linux clear_refs 5); return it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    return _status("VmRSS")


def _huge() -> int:
    """A size the machine cannot allocate: 4x its memory and swap, at least 96 GiB."""
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":
            pytest.skip("overcommit_memory=1: the receiver would really try to copy it")
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(("MemTotal:", "SwapTotal:")):
                total += int(line.split()[1]) * 1024
    return max(96 * GiB, -(-4 * total // GiB) * GiB)


def _empty_tensors_record(tx, n: int) -> int:
    """Write a record of ``n`` empty tensors straight into ring ``tx``; its size."""
    header = b"".join([b"RTC\x02\x00l", struct.pack("<Q", n)]
                      + [b"A" + struct.pack("<IBBq", i, 9, 1, 0) for i in range(n)])
    bufs = [np.empty(0, np.uint8)] * n
    sizes, record = framing.measure(header, bufs)
    addr = tx.reserve(record)
    framing.write_record(tx.view, tx.address, addr - tx.address, framing.KIND_INLINE, 1,
                         header=header, buffers=bufs, sizes=sizes)
    tx.commit()
    return record


# -- memory and time out of proportion to what the peer sent ------------------------------


def test_a_record_of_many_empty_tensors_is_refused_cheaply(private_dir):
    """Each empty tensor costs the sender 23 bytes and became ~0.7 KB here: a 20 MiB ring
    record (911k of them) was 661 MiB kept and 5.2 s in one receive; this 8 MiB one took
    +319 MiB.  Now a message from an untrusted peer carries at most SAFE_MAX_BUFFERS."""
    caller, callee, bell = make_pair(private_dir, 4 * MiB, safe=True)
    try:
        tx = caller.transport.tx
        record = _empty_tensors_record(tx, (tx.capacity - 4096) // 23)
        before = _reset_peak()
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="buffers in one message"):
            callee.recv(deadline=time.monotonic() + 30)
        assert time.monotonic() - t0 < 1.0
        assert _status("VmHWM") - before <= record
        caller.send([torch.ones(2)])  # the record was consumed: the channel goes on
        assert torch.equal(callee.recv(deadline=time.monotonic() + 10)[0], torch.ones(2))
    finally:
        caller.close()
        callee.close()
        bell.close()


@pytest.mark.parametrize(("route", "threshold", "pool_bytes"), [
    ("shm", MiB, None), ("zmq", 64, None), ("zmq", 64, 0)], ids=["ring", "pool", "frames"])
def test_the_buffer_cap_is_exact(private_dir, route, threshold, pool_bytes):
    """SAFE_MAX_BUFFERS buffers pass on every route; one more is refused, not decoded."""
    options = {} if pool_bytes is None else {"pool_bytes": pool_bytes}
    caller, callee, bell = make_pair(private_dir, threshold, safe=True, **options)
    try:
        for n, ok in ((SAFE_MAX_BUFFERS, True), (SAFE_MAX_BUFFERS + 1, False)):
            caller.send([torch.full((1,), float(i)) for i in range(n)])
            if ok:
                got = callee.recv(deadline=time.monotonic() + 30)
                assert len(got) == n and float(got[-1]) == n - 1
            else:
                with pytest.raises(ProtocolError, match=r"buffers in one message|parts"):
                    callee.recv(deadline=time.monotonic() + 30)
        assert caller.transport.routes[route].msgs_out == 2
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_many_small_values_from_an_untrusted_peer_are_refused():
    """Inline values cost the sender 1-9 bytes and a Python object each here (an empty
    list ~7x, a numpy int8 ~15x its bytes): safe decoding stops at SAFE_MAX_VALUES."""
    fine = codec.encode([[] for _ in range(codec.SAFE_MAX_VALUES - 1)])
    assert len(codec.decode(fine.header, fine.buffers, safe=True)) == codec.SAFE_MAX_VALUES - 1
    over = codec.encode([np.int8(1)] * codec.SAFE_MAX_VALUES)
    with pytest.raises(ProtocolError, match="values in a message"):
        codec.decode(over.header, over.buffers, safe=True)
    assert len(codec.decode(over.header, over.buffers, safe=False)) == codec.SAFE_MAX_VALUES


def test_a_zeromq_message_of_many_empty_frames_is_refused_cheaply(private_dir):
    """recv_multipart took every part before anything was checked, and ZeroMQ bounds the
    number of messages, not of parts: 1M empty parts (~2 MB sent) were +240 MiB and 3.1 s
    inside one try_recv whose deadline was 0.5 s.  Now the receive stops at the first part
    past the cap, and the channel, out of step, is failed."""
    caller, callee, bell = make_pair(private_dir, MiB, safe=True)
    try:
        c = caller.transport
        parts = [c.secret + framing.head_bytes(0, 3, b"RTC\x02\x00N", [])] + [b""] * 1_000_000
        c._send_bulk(parts, None, None, None, small=True)
        del parts
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="parts"):
            callee.try_recv(deadline=time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 1.0
        assert callee.transport.failed is not None
        with pytest.raises(ProtocolError):
            callee.try_recv()
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_ringless_channel_stays_failed_after_the_parts_cap(private_dir):
    """Found in a second review: after the parts cap the rest of the refused message is
    still in the socket.  The ring path honoured ``failed``; the ring-less one (no room in
    shm_dir: everything over ZeroMQ) handed the tail -- parts the peer chose -- up as a
    fresh message."""
    caller, callee, bell = make_pair(private_dir, 64, shm_dir="/nonexistent_shm_dir",
                                     safe=True, sealed=False, pool_bytes=0)
    try:
        c = caller.transport
        assert c.rx is None and callee.transport.rx is None
        enc = codec.encode((3, True, "smuggled"), envelope=1)
        parts = ([c.secret + framing.head_bytes(0, 3, b"RTC\x02\x00N", [])]
                 + [b""] * SAFE_MAX_BUFFERS + [c.secret + framing.head_bytes(0, 9, enc.header, [])])
        c.bulk.send(parts, deadline=None, check=None, small=True)
        deadline = time.monotonic() + 5
        while not callee.transport.bulk.readable() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ProtocolError, match="parts"):
            callee.try_recv(deadline=time.monotonic() + 1)
        with pytest.raises(ProtocolError):
            callee.try_recv(deadline=time.monotonic() + 1)
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- an untrusted caller does not set the trusted callee's limits --------------------------


def test_an_untrusted_callers_sparse_pool_slot_is_refused(private_dir):
    """The callee capped the peer's slots at ``spec.pool_bytes``, which the untrusted caller
    writes itself: a sparse sealed memfd of 96 GiB (free to the peer) and a message
    spanning it made the copy-out raise MemoryError, which ended the trusted actor (its
    serve loop caught TransportError only).  Now the cap is the callee's own."""
    big = _huge()
    caller, callee, bell = make_pair(private_dir, MiB, safe=True, pool_bytes=1 << 47)
    fd = segment.memfd("hostile")
    try:
        assert callee.transport.pool_bytes < 2 * GiB
        os.ftruncate(fd, pool.HEADER_SIZE + big)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, segment.SEALS | fcntl.F_SEAL_SEAL)
        os.pwrite(fd, pool.MAGIC, 0)
        _send_control(caller, pool.OP_ADD, 50, big, [fd])
        _pool_message(caller, torch.ones(10), 50, sizes=[big - 64])
        with pytest.raises(TransportError):
            callee.try_recv(deadline=time.monotonic() + 5)
    finally:
        os.close(fd)
        caller.close()
        callee.close()
        bell.close()


def _sparse_ring(size: int) -> tuple[int, mmap.mmap]:
    fd = segment.memfd("hostile_ring")
    os.ftruncate(fd, ringmod.HEADER_SIZE + size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, segment.SEALS | fcntl.F_SEAL_SEAL)
    mm = mmap.mmap(fd, ringmod.HEADER_SIZE + size)
    struct.pack_into("<QQ", mm, 0, ringmod.MAGIC, size)
    return fd, mm


@pytest.mark.parametrize("limit", [None, MiB])
def test_an_untrusted_callers_oversized_ring_is_refused_at_open(private_dir, limit):
    """The callee's receive ring is the caller's memfd, and only its seals were checked: a
    sparse 96 GiB ring, one record declaring a buffer of that size, and the copy-out raised
    MemoryError out of try_recv.  Now rings beyond the threshold's capacity (the callee's
    own ``limit``, else the spec's) are refused when the channel opens."""
    big = _huge()
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name="hostile",
                            threshold=MiB, safe=True, sealed=True)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    fd, mm = _sparse_ring(big)
    peer = caller.peer_fds()
    fds = [fd, os.dup(peer[1]), *[os.dup(f) for f in peer[2:]]]
    try:
        with pytest.raises(ProtocolError, match="rings of"):
            Channel.attach(caller.spec(), fds=fds, own_bell=bell, safe=True, name="callee",
                           shm_dir=SHM, limit=limit)
    finally:
        mm.close()
        caller.close()
        bell.close()


def test_an_untrusted_caller_may_not_raise_the_threshold(private_dir):
    """A spec's threshold above the callee's own is refused: it sizes rings and pools."""
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name="big",
                            threshold=4 * MiB, safe=True, sealed=True)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    try:
        with pytest.raises(ProtocolError, match="threshold"):
            Channel.attach(caller.spec(), fds=[os.dup(f) for f in caller.peer_fds()],
                           own_bell=bell, safe=True, name="callee", shm_dir=SHM, limit=MiB)
        trusted = Channel.attach(caller.spec(), fds=[os.dup(f) for f in caller.peer_fds()],
                                 own_bell=bell, safe=False, name="callee", shm_dir=SHM,
                                 limit=MiB)  # a trusted caller's sizes stand
        trusted.close()
    finally:
        caller.close()
        bell.close()


_BELL_FLOOD = r"""
import os, sys
import fcntl
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)  # the TEE's doorbell, from the spec
try:
    fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: the writer may grow the pipe
except OSError:
    pass
chunk = b"\x01" * 65536
while True:  # never sleeps: a full pipe is retried at once
    try:
        os.write(fd, chunk)
    except BlockingIOError:
        pass
"""

_POOL_FLOOD = r"""
import os, socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
msg = b"x"  # a malformed control message: refused every time
while True:
    s.send(msg)
"""


def _receive_under_flood(private_dir: str, threshold: int, flood: str, n: int,
                         target, before=None) -> None:
    """A TEE-side receive with a 1 s deadline, while ``n`` processes run ``flood``.

    ``target(caller, callee)`` -> (argument of the flood script, descriptors to pass);
    ``before(callee)`` runs once the flood has started.  The receive's thread runs at nice
    19: the peer has cores of its own on a real host, and on a small shared test machine it
    gets the CPU first.  The receive must end (any error) within about its deadline.
    """
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name="tee",
                            threshold=threshold, safe=True)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    callee = Channel.attach(caller.spec(), fds=[os.dup(fd) for fd in caller.peer_fds()],
                            own_bell=bell, safe=False, name="gpu", shm_dir=SHM)
    caller.attached(bell.path)
    tee = MessageChannel(caller)
    arg, fds = target(caller, callee)
    flooders = [subprocess.Popen([sys.executable, "-c", flood, arg], pass_fds=fds)
                for _ in range(n)]
    outcome: list = []

    def receive() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            outcome.append(tee.recv(deadline=time.monotonic() + 1.0))
        except BaseException as exc:  # what it got is the test
            outcome.append(exc)
        outcome.append(time.monotonic() - t0)

    try:
        time.sleep(0.5)
        if before is not None:
            before(callee)
        t0 = time.monotonic()
        th = threading.Thread(target=receive, daemon=True)
        th.start()
        th.join(15.0)
        held = time.monotonic() - t0
        stuck = th.is_alive()
    finally:
        for p in flooders:
            p.kill()
            p.wait()
    th.join(30.0)
    try:
        assert not stuck, f"a receive with a 1 s deadline still inside after {held:.1f} s"
        assert outcome[-1] < 2.0, f"a receive with a 1 s deadline took {outcome[-1]:.1f} s"
    finally:
        caller.close()
        callee.close()
        bell.close()


@pytest.mark.timeout(60)
def test_a_doorbell_flood_does_not_hold_a_receive_past_its_deadline(private_dir):
    """Found in review: ``Doorbell.drain`` read until the pipe was empty, and a peer that
    kept it full (an untrusted worker is given its caller's doorbell path) held a receive
    with a 1 s deadline for 5-15 s.  One read per wake-up now."""
    _receive_under_flood(private_dir, 1 << 20, _BELL_FLOOD, 4,
                         lambda caller, callee: (caller.spec().caller_bell, ()))


@pytest.mark.timeout(60)
def test_a_flood_of_pool_control_messages_does_not_hold_a_receive_past_its_deadline(
        private_dir):
    """Found in review: ``RxPool.poll`` read control messages until the socket was empty
    (logging each refusal), and a receive meeting an unknown slot polled with no deadline:
    a peer flooding the socket held it for as long as it flooded."""
    def pool_socket(caller, callee):
        fd = callee.pool_sock.fileno()
        os.set_blocking(fd, True)
        return str(fd), (fd,)

    _receive_under_flood(private_dir, 64, _POOL_FLOOD, 3, pool_socket,  # a slot never announced
                         before=lambda callee: _pool_message(callee, torch.ones(100), slot_id=99))


def test_an_untrusted_caller_cannot_hand_one_ring_for_both_directions(private_dir):
    """Found in review: given one sealed memfd twice, a trusted callee read back its own
    replies as calls, for ever (the serve loop answers a malformed call with an error)."""
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name="u", threshold=1 << 20,
                            sealed=True)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    tx_fd, _, *rest = caller.peer_fds()
    fds = [os.dup(tx_fd), os.dup(tx_fd), *(os.dup(fd) for fd in rest)]  # one ring, twice
    callee = None
    try:
        with pytest.raises(ProtocolError, match="two rings are one segment"):
            callee = Channel.attach(caller.spec(), fds=fds, own_bell=bell, safe=True,
                                    name="trusted", shm_dir=SHM)
    finally:
        if callee is not None:
            callee.close(notify=False)
        caller.close(notify=False)
        bell.close()
