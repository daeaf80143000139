"""Where buffers are written and read: registration with CUDA, device buffers written straight
into the record reserved for them, and ring records lent to a borrowing receiver.

All of it runs on the CPU: a stand-in for CUDA's runtime records what would be registered,
and a CPU tensor wrapped as a ``DeviceBuffer`` takes the path a CUDA tensor's bytes take.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from runtime import codec
from runtime.messages import MessageChannel
from runtime.transport import hostmem
from runtime.transport.channel import Channel
from runtime.transport.doorbell import Doorbell
from runtime.transport.segment import Segment
from tests.unit.test_transport import make_pair

MiB = 1 << 20


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls; ``fail`` makes registering fail.

    Keeps two of CUDA's rules: registration is per process (a range registered already
    fails with 712), and a failed call leaves its error as the thread's last error, which
    the next kernel launch would raise (PyTorch's launch check reads ``cudaGetLastError``).
    """

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple] = []
        self.ranges: dict[int, int] = {}
        self._last = threading.local()

    def _ret(self, err: int) -> int:
        if err:
            self._last.err = err
        return err

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:
        self.calls.append(("register", address, size, flags))
        if self.fail:
            return self._ret(2)  # cudaErrorMemoryAllocation
        if any(a < address + size and address < a + n for a, n in self.ranges.items()):
            return self._ret(hostmem.CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED)
        self.ranges[address] = size
        return 0

    def cudaHostUnregister(self, address: int) -> int:
        self.calls.append(("unregister", address))
        if self.ranges.pop(address, None) is None:
            return self._ret(713)  # cudaErrorHostMemoryNotRegistered
        return 0

    def cudaGetLastError(self) -> int:
        err, self._last.err = self.pending(), 0
        return err

    def pending(self) -> int:
        """What the next kernel launch would raise (0: nothing)."""
        return getattr(self._last, "err", 0)


@pytest.fixture
def registrar():
    r = hostmem.CudaRegistrar(FakeCudart())
    hostmem.install(r)
    yield r
    hostmem.uninstall(r)


def _inside(r: hostmem.CudaRegistrar, t: torch.Tensor) -> bool:
    return r.covers(t.data_ptr(), t.numel() * t.element_size())


# -- registration -------------------------------------------------------------------------


def test_every_mapping_is_registered_once_and_unregistered_before_it_goes(private_dir,
                                                                         registrar):
    caller, callee, bell = make_pair(private_dir, MiB)
    try:
        rings = {caller.tx.segment.address, caller.rx.segment.address}
        assert rings <= registrar.registered.keys()
        assert registrar.registered[caller.tx.segment.address] == caller.tx.segment.size
        caller.send(torch.ones(MiB))  # above the threshold: a pool slot each side
        got = callee.recv(deadline=time.monotonic() + 10)
        slot = caller.pool_tx.slots[0].segment
        assert slot.address in registrar.registered
        assert _inside(registrar, got)  # the receiver's mapping of the slot, too
        del got
        gc.collect()
    finally:
        caller.close()
        callee.close()
        bell.close()
    gone = {c[1] for c in registrar.cudart.calls if c[0] == "unregister"}
    assert rings | {slot.address} <= gone
    assert not (rings & registrar.registered.keys())
    registered = [c[1] for c in registrar.cudart.calls if c[0] == "register"]
    assert len(registered) == len(set(registered))  # once each


def test_mappings_made_before_install_are_registered_at_install(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB)
    r = hostmem.CudaRegistrar(FakeCudart())
    try:
        hostmem.install(r)
        assert {caller.tx.segment.address, callee.tx.segment.address} <= r.registered.keys()
        hostmem.uninstall(r)
        assert not r.registered
    finally:
        hostmem.uninstall(r)
        caller.close()
        callee.close()
        bell.close()


def test_a_refused_registration_is_logged_once_and_changes_nothing_else(private_dir, caplog):
    r = hostmem.CudaRegistrar(FakeCudart(fail=True))
    hostmem.install(r)
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.transport.hostmem"):
            caller, callee, bell = make_pair(private_dir, MiB)
            try:
                for t in (torch.arange(1000.0), torch.arange(float(MiB))):  # ring, pool slot
                    caller.send(t)
                    assert torch.equal(callee.recv(deadline=time.monotonic() + 10), t)
            finally:
                caller.close()
                callee.close()
                bell.close()
        assert r.failures >= 5 and not r.registered
        assert len([m for m in caplog.messages if "cudaHostRegister" in m]) == 1
        # Found by a review: the failed call's error stayed pending, and PyTorch's check
        # after the worker's next kernel launch (any op) would have raised it.
        assert r.cudart.pending() == 0
    finally:
        hostmem.uninstall(r)


def test_registration_is_one_per_process(monkeypatch):
    """Two CUDA workers in one process share the process's registrar.  Two registrars would
    register every mapping twice: the second fails with 712 (registered already), which is
    not a failure and leaves no error pending."""
    cudart = FakeCudart()
    first, second = hostmem.CudaRegistrar(cudart), hostmem.CudaRegistrar(cudart)
    hostmem.install(first)
    hostmem.install(second)
    seg = Segment.create_anonymous("/dev/shm", MiB)
    try:
        assert seg.address in first.registered and seg.address not in second.registered
        assert (first.failures, second.failures) == (0, 0) and cudart.pending() == 0
    finally:
        seg.close()
        hostmem.uninstall(second)
        hostmem.uninstall(first)
    monkeypatch.setattr(hostmem, "_process_registrar", None)
    r = hostmem.cuda_registrar(FakeCudart())
    try:
        assert hostmem.cuda_registrar() is r and hostmem.cuda_registrar(FakeCudart()) is r
        seg = Segment.create_anonymous("/dev/shm", MiB)
        assert seg.address in r.registered
        seg.close()
        assert seg.address not in r.registered
    finally:
        hostmem.uninstall(r)


def test_without_cudagetlasterror_a_launch_clears_the_error(monkeypatch):
    """``torch.cuda.cudart()`` has no ``cudaGetLastError``: the registrar takes the CUDA
    runtime library the process loaded, or else launches a kernel and swallows its error."""
    class Bare:  # the bindings torch exposes: no cudaGetLastError
        def cudaHostRegister(self, address, size, flags):
            return 1

    monkeypatch.setattr(hostmem, "open", lambda *a, **k: io.StringIO(""), raising=False)
    launched = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: launched.append(k) or torch.zeros(1))
    r = hostmem.CudaRegistrar(Bare())
    r.register(4096, 8192)
    assert r.failures == 1 and launched == [{"device": "cuda"}]


@pytest.mark.parametrize("end", ["create", "attach"])
def test_a_channel_that_fails_to_open_leaves_nothing_mapped_or_registered(private_dir,
                                                                          registrar, end):
    """Found by a review: the constructor ran outside the try that closes the rings, so a
    failure there (the pool's stat of ``shm_dir``) left two mapped, registered rings to GC --
    unmapped while CUDA still held them, and the next mapping at that address was then
    taken as registered already."""
    before_live, before_reg = set(hostmem.live()), set(registrar.registered)
    if end == "create":
        with pytest.raises(OSError):
            Channel.create(shm_dir="/nonexistent-shm-dir", private_dir=private_dir,
                           name="rt_testfail", threshold=MiB, sealed=True)
        assert os.listdir(private_dir) == []  # its doorbell and ZeroMQ socket file: gone
    else:
        caller = Channel.create(shm_dir="/dev/shm", private_dir=private_dir,
                                name="rt_testfail", threshold=MiB)
        bell = Doorbell(os.path.join(private_dir, "callee.bell"))
        try:
            before_live, before_reg = set(hostmem.live()), set(registrar.registered)
            open_fds = psutil.Process().num_fds()  # ZeroMQ's context exists already
            fds = [os.dup(fd) for fd in caller.peer_fds()]
            with pytest.raises(OSError):
                Channel.attach(caller.spec(), fds=fds, own_bell=bell, safe=False,
                               name="callee", shm_dir="/nonexistent-shm-dir")
            # The descriptors it took over, its sockets and its doorbell writer: closed
            # (ZeroMQ's I/O thread closes a socket's own descriptors a moment later).
            give_up = time.monotonic() + 5
            while psutil.Process().num_fds() != open_fds and time.monotonic() < give_up:
                time.sleep(0.02)
            assert psutil.Process().num_fds() == open_fds
        finally:
            caller.close()
            bell.close()
    assert set(hostmem.live()) <= before_live
    assert set(registrar.registered) <= before_reg
    assert registrar.cudart.pending() == 0


def test_a_mapping_announced_at_a_live_address_replaces_the_stale_registration(registrar,
                                                                               caplog):
    """Should a mapping ever go without ``unmapping``, the next one at its address must be
    registered afresh (CUDA would still hold the old pages there), not taken as done."""
    address = 1 << 40  # the stand-in registers ranges, never touches them
    hostmem.mapped(address, 4096)
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.transport.hostmem"):
            hostmem.mapped(address, 8192)  # the first went unannounced
        assert registrar.registered[address] == 8192
        assert registrar.cudart.ranges[address] == 8192
        ops = [c[:3] for c in registrar.cudart.calls if c[1] == address]
        assert ops == [("register", address, 4096), ("unregister", address),
                       ("register", address, 8192)]
        assert any("without being announced" in m for m in caplog.messages)
    finally:
        hostmem.unmapping(address)
    assert address not in registrar.registered and address not in hostmem.live()


def test_a_mapping_inside_a_stale_one_replaces_its_registration(registrar):
    """The kernel may put a smaller mapping at the top of a larger freed range, not at its
    start (a review saw it 20 times in 20), so an overlap, not an equal address, marks the
    stale one."""
    old, new = 1 << 44, (1 << 44) + 7 * MiB  # that placement, with stand-in addresses
    hostmem.mapped(old, 8 * MiB)  # then it goes without unmapping (the bug elsewhere)
    try:
        hostmem.mapped(new, MiB)
        assert old not in registrar.registered and old not in hostmem.live()
        assert registrar.registered.get(new) == MiB
    finally:
        hostmem.unmapping(new)
        hostmem.unmapping(old)


def test_a_mapping_that_goes_while_a_registrar_installs_is_not_left_registered():
    """Announcements are serialised with the registrars' calls: ``install`` registered its
    snapshot of the live mappings outside any lock, so a mapping that went meanwhile was
    unregistered (a no-op) before it was registered, and stayed registered for good."""
    address = 1 << 41
    entered, release = threading.Event(), threading.Event()

    class Slow:  # a registrar that takes its time before it registers
        def __init__(self):
            self.registered = set()

        def register(self, address, size):
            entered.set()
            release.wait(10)
            self.registered.add(address)

        def unregister(self, address, size):
            self.registered.discard(address)

    r = Slow()
    hostmem.mapped(address, 4096)
    installer = threading.Thread(target=hostmem.install, args=(r,))
    installer.start()
    try:
        assert entered.wait(10)
        goes = threading.Thread(target=hostmem.unmapping, args=(address,))
        goes.start()
        goes.join(0.2)  # returns at once only if it did not wait for the installation
        release.set()
        installer.join(10)
        goes.join(10)
        assert not installer.is_alive() and not goes.is_alive()
        assert address not in r.registered
    finally:
        release.set()
        hostmem.unmapping(address)
        hostmem.uninstall(r)


def test_a_child_forked_while_a_registration_runs_starts_free():
    """The announcements' lock is held across registrations (milliseconds), so a fork from
    another thread may copy it held: the child's first mapping waited for ever.  The child
    starts with a fresh lock and no registrars (CUDA does not survive a fork)."""
    address = 1 << 43
    entered, release = threading.Event(), threading.Event()

    class Slow:
        def register(self, address, size):
            entered.set()
            release.wait(10)

        def unregister(self, address, size):
            pass

    r = Slow()
    hostmem.install(r)
    announcer = threading.Thread(target=hostmem.mapped, args=(address, 4096))
    announcer.start()
    try:
        assert entered.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: a mapping of its own, within 5 s, or it is killed
            signal.alarm(5)
            try:
                seg = Segment.create_anonymous("/dev/shm", 4096)
                seg.close()
                os._exit(0 if r not in hostmem._registrars else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        announcer.join(10)
        hostmem.unmapping(address)
        hostmem.uninstall(r)


def test_registrations_are_made_on_the_registrars_device():
    """The registering threads (the actor's control thread, say) chose no device, so the
    runtime would make a context on GPU 0 for a worker on ``cuda:1``."""
    cudart = FakeCudart()

    @contextlib.contextmanager
    def guard(index):
        cudart.calls.append(("device", index))
        yield
        cudart.calls.append(("device done", index))

    r = hostmem.CudaRegistrar(cudart, device=1, device_guard=guard)
    r.register(1 << 42, 4096)
    r.unregister(1 << 42, 4096)
    assert [c[0] for c in cudart.calls] == ["device", "register", "device done",
                                            "device", "unregister", "device done"]
    assert all(c[1] == 1 for c in cudart.calls if c[0].startswith("device"))


# -- device buffers: written straight into the reply record --------------------------------


class Spy(codec.DeviceBuffer):
    """A DeviceBuffer over a CPU tensor that records where it was written."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(t)
        self.into: list[int] = []
        self.hosted = 0

    def write_into(self, dst: np.ndarray) -> None:
        self.into.append(dst.ctypes.data)
        super().write_into(dst)

    def host(self) -> np.ndarray:
        self.hosted += 1
        return super().host()


def _device_message(t: torch.Tensor) -> tuple[codec.Encoded, Spy]:
    """``t`` encoded as a device tensor's reply would be: a DeviceBuffer in place of bytes."""
    enc = codec.encode(t)
    spy = Spy(t)
    return codec.Encoded(enc.header, [spy], enc.nbytes), spy


@pytest.mark.parametrize(("n", "where"), [(1000, "ring"), (2 * MiB, "pool")])
def test_a_device_buffer_is_written_once_straight_into_registered_memory(
        private_dir, registrar, n, where):
    caller, callee, bell = make_pair(private_dir, MiB)
    try:
        t = torch.randn(n)
        enc, spy = _device_message(t)
        route = callee.send_encoded(enc, tag=3)  # the reply direction
        assert route == ("shm" if where == "ring" else "zmq")
        assert len(spy.into) == 1 and spy.hosted == 0
        assert registrar.covers(spy.into[0], t.numel() * 4)
        seg = callee.tx.segment if where == "ring" else callee.pool_tx.slots[0].segment
        assert seg.address <= spy.into[0] < seg.address + seg.size
        assert torch.equal(caller.recv(deadline=time.monotonic() + 10), t)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_device_buffer_comes_to_the_host_only_for_zeromq_frames(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB, pool_bytes=0)
    try:
        t = torch.randn(2 * MiB // 4 * 2)
        enc, spy = _device_message(t)
        assert callee.send_encoded(enc, tag=1) == "zmq"
        assert spy.into == [] and spy.hosted == 1
        assert torch.equal(caller.recv(deadline=time.monotonic() + 10), t)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_the_codec_brings_no_cuda_tensor_to_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t = torch.randn(1000, device="cuda")
    enc = codec.encode({"t": t})
    (buf,) = enc.buffers
    assert isinstance(buf, codec.DeviceBuffer) and buf.nbytes == 4000
    dst = np.empty(4000, np.uint8)
    buf.write_into(dst)
    got = codec.decode(enc.header, [dst], safe=True)
    assert torch.equal(got["t"], t.cpu())


# -- ring records lent to the receiver -----------------------------------------------------


def _in_ring(ch, t: torch.Tensor) -> bool:
    seg = ch.rx.segment
    return seg.address <= t.data_ptr() < seg.address + seg.size


def test_a_borrowing_receiver_decodes_in_place_until_it_releases(private_dir):
    caller, raw, bell = make_pair(private_dir, MiB)
    callee = MessageChannel(raw.transport, borrow=True)
    try:
        t = torch.arange(4096.0)
        caller.send(t)
        got = callee.recv(deadline=time.monotonic() + 10)
        assert _in_ring(callee, got) and torch.equal(got, t)
        # Lent: the record's space is not the writer's again until it is released.
        used = caller.tx.capacity - _free(caller.tx)
        assert used > t.numel() * 4
        callee.release()
        assert _free(caller.tx) == caller.tx.capacity
        # A receive gives back the previous loan by itself.
        caller.send(t + 1)
        first = callee.recv(deadline=time.monotonic() + 10)
        caller.send(t + 2)
        second = callee.recv(deadline=time.monotonic() + 10)
        assert torch.equal(second, t + 2) and _in_ring(callee, first)
        callee.release()
    finally:
        caller.close()
        callee.close()
        bell.close()


def _free(ring) -> int:
    return ring.capacity - (ring._w - ring._rpos.value)


def test_a_receiver_that_does_not_borrow_gets_private_copies_and_frees_the_record(private_dir):
    caller, callee, bell = make_pair(private_dir, MiB)
    try:
        t = torch.arange(4096.0)
        caller.send(t)
        got = callee.recv(deadline=time.monotonic() + 10)
        assert not _in_ring(callee, got) and torch.equal(got, t)
        assert _free(caller.tx) == caller.tx.capacity  # given back at once
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_an_untrusted_peer_is_never_borrowed_from(private_dir):
    """Its bytes could change after they were checked: always copied."""
    caller, raw, bell = make_pair(private_dir, MiB, safe=True)
    callee = MessageChannel(raw.transport, borrow=True)
    try:
        assert not callee.borrow
        t = torch.arange(4096.0)
        caller.send(t)
        got = callee.recv(deadline=time.monotonic() + 10)
        assert not _in_ring(callee, got) and torch.equal(got, t)
    finally:
        caller.close()
        callee.close()
        bell.close()


def test_a_borrowed_record_survives_its_channel_closing(private_dir):
    """Closing (the peer dying) while a method still holds borrowed views must not crash:
    the mapping goes when the last view does."""
    caller, raw, bell = make_pair(private_dir, MiB)
    callee = MessageChannel(raw.transport, borrow=True)
    t = torch.arange(4096.0)
    caller.send(t)
    got = callee.recv(deadline=time.monotonic() + 10)
    caller.close()
    callee.close()
    bell.close()
    assert torch.equal(got, t)


def test_a_failed_unregistration_is_logged_and_forgotten(caplog):
    cudart = FakeCudart()
    cudart.cudaHostUnregister = lambda address: 1
    r = hostmem.CudaRegistrar(cudart)
    r.register(4096, 8192)
    with caplog.at_level(logging.WARNING, logger="runtime.transport.hostmem"):
        r.unregister(4096, 8192)
        r.unregister(4096, 8192)  # once only: it is no longer registered
    assert not r.registered and r.stats()["registered"] == 0
    assert len([m for m in caplog.messages if "cudaHostUnregister" in m]) == 1
