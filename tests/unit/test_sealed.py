"""Sealed segments: a peer that is not trusted cannot resize shared memory under us.

Whoever holds a shared file's descriptor can ``ftruncate`` it, and the other side's
next access past the new end raises SIGBUS, which ends the process -- one way an
untrusted GPU worker could kill the TEE.  A channel with an untrusted side uses
memfds sealed against resizing for its rings and both sides' pool slots
(``Segment.create_sealed``), and a receiver refuses any that is not.
"""

from __future__ import annotations

import array
import os
import socket
import time

import pytest
import torch

from runtime.errors import ProtocolError
from runtime.transport import pool
from runtime.transport.channel import Channel
from runtime.transport.doorbell import Doorbell
from runtime.transport.segment import Segment, is_sealed
from tests.unit.test_transport import SHM, make_pair, name

MiB = 1 << 20


def shrinkable(fd: int) -> bool:
    """What a hostile peer would try: truncate the file under the other's mapping."""
    size = os.fstat(fd).st_size
    try:
        os.ftruncate(fd, 0)
    except PermissionError:
        return False
    os.ftruncate(fd, size)
    return True


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
        assert not is_sealed(fd) and shrinkable(os.dup(fd))
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
