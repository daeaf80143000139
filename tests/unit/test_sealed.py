"""Sealed segments: a peer that is not trusted cannot resize shared memory under us.

Whoever holds a shared file's descriptor can ``ftruncate`` it, and the other side's
next access past the new end raises SIGBUS, which ends the process -- one way an
untrusted GPU worker could kill the TEE.  A channel with an untrusted side uses
memfds sealed against resizing for its rings and both sides' pool slots
(``Segment.create_sealed``), and a receiver refuses any that is not.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import os
import socket
import time

import pytest
import torch

from runtime.errors import ProtocolError
from runtime.table import ALIVE, FLAG_UNTRUSTED, Entry
from runtime.transport import pool
from runtime.transport.channel import Channel
from runtime.transport.doorbell import Doorbell
from runtime.transport.segment import SEALS, Segment, is_sealed
from tests.integration.actors_lib import shrink as shrinkable
from tests.unit.test_transport import SHM, make_pair, name

MiB = 1 << 20


def growable(fd: int) -> bool:
    try:
        os.ftruncate(fd, os.fstat(fd).st_size + 4096)
    except PermissionError:
        return False
    return True


def test_a_sealed_segment_cannot_be_resized_through_any_descriptor():
    seg = Segment.create_sealed(MiB)
    other = os.dup(seg.fd)  # the peer's copy, as SCM_RIGHTS would hand it over
    try:
        assert is_sealed(other)
        assert not shrinkable(other) and not shrinkable(seg.fd) and not growable(other)
        seg.view[MiB - 1] = 7  # the whole mapping stays usable
        peer = Segment.from_fd(os.dup(other), sealed=True)
        assert peer.view[MiB - 1] == 7
        peer.close()
    finally:
        os.close(other)
        seg.close()


def test_an_unsealed_segment_from_an_untrusted_peer_is_refused():
    seg = Segment.create_anonymous(SHM, MiB)  # what a trusted channel uses: resizable
    try:
        fd = os.dup(seg.fd)
        assert not is_sealed(fd) and shrinkable(fd)
        with pytest.raises(ProtocolError, match="not sealed"):
            Segment.from_fd(fd, sealed=True)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed, as from_fd promises, even on refusal
    finally:
        seg.close()


def test_a_channel_with_an_untrusted_side_hands_over_only_sealed_rings(private_dir):
    for safe in (True, False):
        caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name=name(),
                                threshold=MiB, safe=safe)
        try:
            ring_fds = caller.peer_fds()[:2]
            assert caller.spec().sealed is safe
            assert [is_sealed(fd) for fd in ring_fds] == [safe, safe]
            assert [shrinkable(fd) for fd in ring_fds] == [not safe, not safe]
        finally:
            caller.close()


def test_a_callee_refuses_an_untrusted_callers_unsealed_rings(private_dir):
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name=name(), threshold=MiB,
                            sealed=False)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    try:
        with pytest.raises(ProtocolError, match="not sealed"):
            Channel.attach(caller.spec(), fds=[os.dup(fd) for fd in caller.peer_fds()],
                           own_bell=bell, safe=True, name="callee", shm_dir=SHM)
    finally:
        caller.close()
        bell.close()


def _received_fd(sock: socket.socket) -> int:
    _, anc, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(16))
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    assert len(fds) == 1
    return fds[0]


def test_a_sealed_pools_slots_are_sealed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tx = pool.TxPool(a, SHM, max_bytes=64 * MiB, max_slots=4, sealed=True)
    try:
        slot = tx.acquire(2 * MiB)
        fd = _received_fd(b)  # what the peer gets
        try:
            assert is_sealed(fd) and not shrinkable(fd)
        finally:
            os.close(fd)
        slot.release()
    finally:
        tx.close()
        a.close()
        b.close()


def test_a_sealed_receiver_refuses_an_unsealed_slot():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tx = pool.TxPool(a, SHM, max_bytes=64 * MiB, max_slots=4)  # a peer that does not seal
    rx = pool.RxPool(b, SHM, sealed=True)
    try:
        slot = tx.acquire(2 * MiB)
        with pytest.raises(ProtocolError, match="unknown pool slot"):
            rx.buffers(slot.id, 0, [MiB], copy=True)
        assert "not sealed" in rx.refused and rx.slots == {}
    finally:
        tx.close()
        rx.close()
        a.close()
        b.close()


@pytest.mark.parametrize("nbytes", [4096, 4 * MiB])  # ring, and pool slots both ways
def test_a_sealed_channel_carries_messages_both_ways(private_dir, nbytes):
    caller, callee, bell = make_pair(private_dir, MiB, safe=True)
    try:
        x = torch.randn(nbytes // 4)
        for _ in range(3):
            caller.send(x)
            got = callee.recv(deadline=time.monotonic() + 10)
            callee.send(got)
            assert torch.equal(caller.recv(deadline=time.monotonic() + 10), x)
        for ch in (caller, callee):
            st = ch.transport.stats()
            assert st["sealed"] and st["mode"] == "shm"
            if nbytes > MiB:
                assert st["pool"]["created"] >= 1 and st["pool"]["received"] == 3
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_sealed_channel_does_not_need_room_in_shm_dir(private_dir, tiny_tmpfs):
    """Its segments live in memory: a 1 MiB shm_dir takes neither its rings nor its slots."""
    caller, callee, bell = make_pair(private_dir, MiB, tiny_tmpfs, safe=True)
    try:
        x = torch.randn(MiB)  # 4 MiB: a pool slot each way
        caller.send(x)
        callee.send(callee.recv(deadline=time.monotonic() + 10))
        assert torch.equal(caller.recv(deadline=time.monotonic() + 10), x)
        assert caller.transport.stats()["mode"] == "shm"
        assert caller.transport.stats()["pool"]["fallbacks"] == 0
        assert os.listdir(tiny_tmpfs) == []
    finally:
        caller.close()
        callee.close()
        bell.close()


def _memfd(size: int, seals: int, *, flags: int = 0) -> int:
    fd = os.memfd_create("peer", os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    os.pwrite(fd, pool.MAGIC + (size - pool.HEADER_SIZE).to_bytes(8, "little"), 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize("case", ["not sealable", "grow only", "shrink only", "hugetlb"])
def test_a_segment_that_is_not_a_sealed_plain_memfd_is_refused(case):
    """Only both size seals on a plain memfd will do.  A hugetlbfs memfd takes the seals
    too, but a hole punched in it (which no size seal stops) frees the huge page and its
    reservation: the receiver's next fault may find none and get SIGBUS."""
    size = 2 * MiB
    both = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    try:
        fd = {"not sealable": lambda: _memfd(size, 0),
              "grow only": lambda: _memfd(size, fcntl.F_SEAL_GROW, flags=os.MFD_ALLOW_SEALING),
              "shrink only": lambda: _memfd(size, fcntl.F_SEAL_SHRINK,
                                            flags=os.MFD_ALLOW_SEALING),
              "hugetlb": lambda: _huge_memfd(size, both)}[case]()
    except OSError as exc:
        pytest.skip(f"cannot make that memfd here: {exc}")
    try:
        assert not is_sealed(fd)
        with pytest.raises(ProtocolError, match="not sealed"):
            Segment.from_fd(os.dup(fd), sealed=True)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rx = pool.RxPool(b, SHM, sealed=True)
        try:
            socket.send_fds(a, [pool._OP.pack(pool.OP_ADD, 1, size - pool.HEADER_SIZE)], [fd])
            rx.poll()
            assert rx.slots == {} and "not sealed" in rx.refused
        finally:
            rx.close()
            a.close()
            b.close()
    finally:
        os.close(fd)


def _huge_memfd(size: int, seals: int) -> int:
    # Made without mapping it: creating, sizing and sealing need no huge page.
    fd = os.memfd_create("peer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def test_a_callee_seals_a_channel_with_an_untrusted_caller_whatever_its_spec_says(private_dir):
    """An untrusted caller that seals its rings but calls the channel unsealed still gets a
    sealed channel: the callee's pool refuses its unsealed (truncatable) slots."""
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir, name=name(), threshold=MiB,
                            sealed=True)
    spec = dataclasses.replace(caller.spec(), sealed=False)
    bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    callee = Channel.attach(spec, fds=[os.dup(fd) for fd in caller.peer_fds()], own_bell=bell,
                            safe=True, name="callee", shm_dir=SHM)
    try:
        assert callee.sealed and callee.pool_rx.sealed and callee.pool_tx.sealed
    finally:
        callee.close()
        caller.close()
        bell.close()


def test_a_refused_open_closes_each_descriptor_once(private_dir):
    """Channel.attach owns the request's descriptors (it closes them when it refuses); the
    control server must not close the same numbers again -- by then they may be another
    thread's."""
    from types import SimpleNamespace

    from runtime import worker

    sid = "s"
    server = object.__new__(worker.ActorServer)  # just what _open uses
    server.ctx = SimpleNamespace(session=SimpleNamespace(private_dir=private_dir, sid=sid,
                                                         shm_dir=SHM, threshold=MiB))
    # An untrusted actor's process (the table's entry for it).
    server._caller_entry = lambda pid: Entry(ALIVE, 0, pid, 0, FLAG_UNTRUSTED, 0)
    server.bell = Doorbell(os.path.join(private_dir, "callee.bell"))
    server.inbound, server.borrow_args, server.name = [], False, "callee"
    server.untrusted, server.untrusted_callers = False, True  # it serves untrusted callers
    caller = Channel.create(shm_dir=SHM, private_dir=private_dir,
                            name=f"rt_{sid}_{os.getpid()}_c", threshold=MiB, sealed=False)
    fds = [os.dup(fd) for fd in caller.peer_fds()]
    try:
        with pytest.raises(ProtocolError, match="not sealed"):
            server._open(["open", {"name": "x", "spec": caller.spec().as_dict()}], fds,
                         os.getpid())
        assert fds == []  # nothing left for the server to close a second time
    finally:
        for fd in fds:
            os.close(fd)
        caller.close()
        server.bell.close()


def test_a_sealed_pool_refuses_peer_slots_past_the_channels_cap():
    """A hostile peer could announce sparse slots of any size and have the receiver's
    copies fill them on its account: the slots it maps never add up past ``pool_bytes``."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rx = pool.RxPool(b, SHM, sealed=True, max_bytes=5 * MiB)
    segs = [Segment.create_sealed(pool.HEADER_SIZE + 2 * MiB) for _ in range(3)]
    try:
        for i, seg in enumerate(segs, 1):
            seg.view[:len(pool.MAGIC)] = pool.MAGIC
            socket.send_fds(a, [pool._OP.pack(pool.OP_ADD, i, 2 * MiB)], [seg.fd])
        rx.poll()
        assert sorted(rx.slots) == [1, 2] and "cap" in rx.refused
    finally:
        rx.close()
        for seg in segs:
            seg.close()
        a.close()
        b.close()


F_SEAL_EXEC = getattr(fcntl, "F_SEAL_EXEC", 0x0020)


def test_memfds_can_never_be_made_executable():
    """Since Linux 6.3 a memfd made without MFD_NOEXEC_SEAL logs a kernel warning, and is
    refused under vm.memfd_noexec=2; every memfd of the runtime is made with it."""
    from runtime.transport.segment import MFD_NOEXEC_SEAL, memfd

    try:
        os.close(os.memfd_create("rt_probe", os.MFD_CLOEXEC | MFD_NOEXEC_SEAL))
    except OSError:
        pytest.skip("this kernel has no MFD_NOEXEC_SEAL (before 6.3)")
    fd = memfd("rt_test")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & F_SEAL_EXEC
        assert os.fstat(fd).st_mode & 0o111 == 0
        with pytest.raises(PermissionError):
            os.fchmod(fd, 0o755)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)  # still sealable
        assert is_sealed(fd)
    finally:
        os.close(fd)


def test_memfd_without_noexec_support_falls_back(monkeypatch):
    """A kernel before 6.3 rejects the flag with EINVAL: a plain sealable memfd then."""
    import errno

    from runtime.transport import segment

    real = os.memfd_create
    flags_seen = []

    def old_kernel(name, flags):
        flags_seen.append(flags)
        if flags & segment.MFD_NOEXEC_SEAL:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(name, flags)

    monkeypatch.setattr(os, "memfd_create", old_kernel)
    fd = segment.memfd("rt_test")
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        assert is_sealed(fd) and len(flags_seen) == 2
    finally:
        os.close(fd)


def test_no_memory_for_a_sealed_segment_is_a_clear_transport_error(monkeypatch):
    """The channel falls back on a TransportError; its text must not invent a free size."""
    import errno

    from runtime.errors import TransportError

    def full(fd, offset, size):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TransportError, match=r"no room in memory for a \d+-byte segment$"):
        Segment.create_sealed(MiB)
    assert len(os.listdir("/proc/self/fd")) == before  # the memfd is closed
