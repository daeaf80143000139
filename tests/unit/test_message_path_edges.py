"""Regression tests for defects found reviewing the layered message path (framing, lent
ring records, MessageChannel, borrowing actors)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from runtime import codec
from runtime.errors import ProtocolError
from runtime.messages import MessageChannel
from runtime.transport.ring import MIN_CAPACITY, ShmRing
from runtime.worker import ActorServer, _Inbound
from tests.unit.test_transport import SHM, make_pair

MiB = 1 << 20


# -- 1. a buffer that fails to write itself must not end the actor -------------------------


class _FailingWriter:
    """A ``framing.BufferWriter`` whose device-to-host copy fails (a CUDA error, say)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def write_into(self, dst: np.ndarray) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def host(self) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _server() -> ActorServer:
    server = ActorServer.__new__(ActorServer)
    server.untrusted = False
    server.name = "reviewed"
    server.inbound = []
    server._poller = None
    server._inbound_lock, server._inbound_gen = threading.Lock(), 0
    return server


def test_a_reply_whose_device_buffer_fails_to_write_is_that_calls_error(private_dir,
                                                                       monkeypatch):
    """Results are now copied device-to-host while the reply is *sent*, outside the method:
    a failing copy must become the call's error, not an exception out of the serve loop
    (which ends the actor for every caller)."""
    caller, callee, bell = make_pair(private_dir, MiB)
    original = MessageChannel.encode

    def encode(self, obj, **kw):
        enc = original(self, obj, **kw)
        if enc.buffers:  # the result's tensor: a device buffer that cannot be copied
            enc = codec.Encoded(enc.header, [_FailingWriter(b.nbytes) for b in enc.buffers],
                                enc.nbytes)
        return enc

    monkeypatch.setattr(MessageChannel, "encode", encode)
    conn = _Inbound.__new__(_Inbound)
    conn.channel, conn.caller_pid, conn.check, conn.answered = callee, os.getpid(), None, 0
    try:
        _server()._reply(conn, (7, True, torch.arange(16.0)))  # raised RuntimeError
        call_id, ok, payload = caller.recv(deadline=time.monotonic() + 10)
        assert (call_id, ok) == (7, False) and "RuntimeError" in payload[0]
        # The channel carries on.
        callee.send((8, True, None))
        assert caller.recv(deadline=time.monotonic() + 10) == (8, True, None)
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- 2. a held record stays held while the reader goes on behind it ------------------------


def test_advancing_past_a_later_record_does_not_give_back_the_held_one():
    """``ShmRing.hold`` promises the writer cannot reuse the held record until ``release``
    and that the reader may go on peeking behind it; ``advance`` of the next record
    published read_pos past the held one anyway."""
    path_name = f"rt_test{uuid.uuid4().hex[:8]}"
    w = ShmRing.create(SHM, path_name, MIN_CAPACITY)
    r = ShmRing.attach(w.segment.path)
    try:
        for n in (1000, 1000):
            w.reserve(n)
            w.commit()
        r.peek()
        start = r._rpos.value
        r.hold()
        r.peek()
        r.advance()  # e.g. a record found malformed or a close record: consumed
        assert r._rpos.value == start, "the held record was given back to the writer"
        r.release()
        assert r._rpos.value == w._w
    finally:
        r.close()
        w.unlink()
        w.close()


# -- 3. borrowing from an untrusted peer ---------------------------------------------------


def test_borrow_switched_on_later_still_never_borrows_from_an_untrusted_peer(private_dir):
    """``MessageChannel.__init__`` drops ``borrow`` for a safe channel, but ``borrow`` is a
    plain attribute: set afterwards, a safe-mode receiver decoded the untrusted peer's ring
    record in place (bytes the peer can still change)."""
    caller, callee, bell = make_pair(private_dir, MiB, safe=True)
    try:
        callee.borrow = True
        t = torch.arange(4096.0)
        caller.send(t)
        got = callee.recv(deadline=time.monotonic() + 10)
        seg = callee.rx.segment
        assert not seg.address <= got.data_ptr() < seg.address + seg.size
        assert torch.equal(got, t)
    finally:
        caller.close()
        callee.close()
        bell.close()


# -- 4. KeyboardInterrupt between lending a record and noting the loan ---------------------


def test_an_interrupt_while_a_record_is_lent_does_not_keep_it_forever(private_dir, monkeypatch):
    """``try_recv`` held the record (``rx.hold()``) and only then noted the loan
    (``_lent = True``): a KeyboardInterrupt in between left the ring holding a record no
    receive would give back -- and with ``_held`` stuck, ``peek`` never publishes the
    read position past a WRAP either, so a writer waiting for that space waits forever."""
    caller, callee, bell = make_pair(private_dir, MiB)
    rx = callee.transport.rx
    real_hold = rx.hold

    def hold():
        real_hold()
        raise KeyboardInterrupt  # SIGINT lands just after the record was held

    try:
        monkeypatch.setattr(rx, "hold", hold)
        caller.send(torch.arange(4096.0))
        with pytest.raises(KeyboardInterrupt):
            callee.transport.try_recv()
        monkeypatch.undo()
        assert callee.try_recv() == (False, None)  # nothing more to read ...
        tx = caller.transport.tx
        # ... and the record's space is the writer's again.
        assert tx.capacity - (tx._w - tx._rpos.value) == tx.capacity
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_message_channel_without_its_transport_has_no_attributes():
    """``copy``/``pickle`` build one before ``__init__``: lookups must raise AttributeError
    (not KeyError or infinite recursion), so ``hasattr`` works."""
    from runtime.messages import MessageChannel

    bare = MessageChannel.__new__(MessageChannel)
    assert not hasattr(bare, "rx") and not hasattr(bare, "transport")


# -- 5. receiving without a loan (the common case, since the fast path of this PR) ---------


def test_a_receive_without_a_loan_copies_out_and_gives_the_record_back_at_once(private_dir):
    """``try_recv(lend=False)``, what every non-borrowing receiver asks for: the buffers are
    the receiver's own copies, and the record goes back at once -- the writer refills the
    whole ring behind it without waiting, and the copies do not change."""
    caller, callee, bell = make_pair(private_dir, 32 * 1024)  # a ring of MIN_CAPACITY
    ch_out, ch_in = caller.transport, callee.transport
    try:
        first = codec.encode(np.full(20_000, 7, np.uint8))
        ch_out.send(first)
        got = ch_in.try_recv(lend=False)
        assert (got.route, got.borrowed, ch_in.rx._held) == ("shm", False, False)
        seg = ch_in.rx.segment
        assert not seg.address <= got.buffers[0].ctypes.data < seg.address + seg.size
        # A ring of 64 KiB holds three such records: the received one must be free already.
        for fill in (1, 2, 3):
            ch_out.send(codec.encode(np.full(20_000, fill, np.uint8)),
                        deadline=time.monotonic() + 0.5)
        assert (got.buffers[0] == 7).all()
        assert codec.decode(got.header, got.buffers, safe=False)[0] == 7
        assert got.nbytes == first.nbytes
        for fill in (1, 2, 3):
            nxt = ch_in.try_recv(lend=False)
            assert (nxt.buffers[0] == fill).all()
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_lent_record_keeps_the_writer_out_until_it_is_released(private_dir):
    """The other side of the same coin: a lent record's space stays the reader's, so the
    writer cannot overwrite the views (it times out) until ``release``."""
    caller, callee, bell = make_pair(private_dir, 32 * 1024)
    ch_out, ch_in = caller.transport, callee.transport
    try:
        ch_out.send(codec.encode(np.full(20_000, 7, np.uint8)))
        got = ch_in.try_recv()  # lend=True: views of the record
        assert (got.route, got.borrowed) == ("shm", True)
        for fill in (1, 2):
            ch_out.send(codec.encode(np.full(20_000, fill, np.uint8)))
        with pytest.raises(TimeoutError):
            ch_out.send(codec.encode(np.full(20_000, 3, np.uint8)),
                        deadline=time.monotonic() + 0.2)
        assert (got.buffers[0] == 7).all()
        ch_in.release()
        ch_out.send(codec.encode(np.full(20_000, 3, np.uint8)), deadline=time.monotonic() + 5)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_ring_receive_copy_time_is_still_in_copy_s(private_dir):
    """A receiver that does not borrow copies ring buffers out inside ``Channel.try_recv``
    (``lend=False``): that time is still reported as ``copy_s`` (a review found it had
    dropped out of the stats when the copy moved down from the message layer)."""
    caller, callee, bell = make_pair(private_dir, 16 * MiB)
    try:
        t = torch.zeros(MiB)  # 4 MiB, the ring route
        for _ in range(20):
            caller.send(t)
            callee.recv(deadline=time.monotonic() + 10)
        assert callee.last_in[0] == "shm"
        assert callee.stats()["copy_s"] > 0
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_redelivering_end_keeps_a_message_until_acknowledged(tmp_path, monkeypatch):
    """An interrupt while a message is decoded, or before it is acknowledged, leaves it to
    the next try_recv; the message's own fault (ProtocolError) does not."""
    import runtime.messages as messages_mod

    caller, callee, bell = make_pair(str(tmp_path), 1 << 20)
    redo = MessageChannel(callee.transport, redeliver=True)
    try:
        real = messages_mod._decode
        calls = []

        def interrupted_once(*a, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(messages_mod, "_decode", interrupted_once)
        caller.send(("first", torch.arange(4)))
        caller.send("second")
        with pytest.raises(KeyboardInterrupt):
            redo.try_recv()
        ok, got = redo.try_recv()  # decoded again, from the bytes it kept
        assert ok and got[0] == "first" and torch.equal(got[1], torch.arange(4))
        assert redo.try_recv()[1][0] == "first"  # not acknowledged: handed on again
        redo.ack()
        assert redo.try_recv() == (True, "second")
        redo.ack()
        assert redo.try_recv() == (False, None)
        monkeypatch.setattr(messages_mod, "_decode", real)
        caller.transport.send(codec.Encoded(b"RTC\x02\x00\xff", [], 6), tag=9)  # bad tag
        with pytest.raises(ProtocolError):
            redo.try_recv()
        caller.send("third")
        assert redo.try_recv() == (True, "third")  # the bad one is gone, not redelivered
        with pytest.raises(TypeError, match="try_recv"):
            redo.recv()
    finally:
        caller.close()
        callee.close()
        bell.close()
