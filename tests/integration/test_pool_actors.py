"""Large calls and replies through the pool, end to end through ActorSystem."""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import torch

from runtime import ActorSystem
from tests.integration.actors_lib import Borrower, Caller, Copier, Echo, OpenEcho, Untrusted

MiB = 1 << 20
BIG = 16 * MiB  # bytes: above the 10 MiB default threshold


def pool_of(system) -> dict:
    (ch,) = system.stats()["channels"]
    return ch["pool"]


def test_results_stay_valid_while_later_large_calls_run():
    with ActorSystem() as system:
        e = system.spawn(Echo)
        zero = torch.zeros(BIG // 4)
        kept = [e.add(zero, float(i)) for i in range(3)]  # three results held
        for i in range(10):
            out = e.add(zero, 100.0 + i)
            assert torch.all(out == 100.0 + i)
            del out
        for i, k in enumerate(kept):
            assert torch.all(k == float(i)), "a held result was overwritten"
        pool = pool_of(system)
        # the actor made a slot per held result plus one it reuses
        assert pool["peer_slots"] == 4 and pool["received"] == 13
        del kept, k
        gc.collect()
        for _ in range(5):
            assert torch.all(e.add(zero, -1.0) == -1.0)
        assert pool_of(system)["peer_slots"] == 4  # freed slots are reused, none made


def test_an_echo_needs_at_most_two_slots_each_way(route, threshold):
    """The actor frees a call's slot right after its reply is sent; the next call
    may come before that (then the caller takes a second slot): never more."""
    with ActorSystem(shm_threshold=threshold) as system:
        e = system.spawn(Echo)
        for i in range(20):
            x = torch.full((BIG // 4,), float(i))
            assert torch.equal(e.echo(x), x)
        pool = pool_of(system)
        assert pool["created"] <= 2 and pool["peer_slots"] <= 2
        assert pool["fallbacks"] == 0 and pool["received"] == 20
        assert system.stats()["routes"]["zmq"]["messages"] == 40


def test_an_untrusted_actors_results_are_copied_out():
    with ActorSystem() as system:
        u = system.spawn(Untrusted)
        kept = [u.tensor(BIG // 8) for _ in range(4)]  # int64: 16 MiB each
        assert all(torch.equal(k, torch.arange(BIG // 8)) for k in kept)
        pool = pool_of(system)
        assert pool["received"] == 4 and pool["peer_slots"] == 1  # freed at once


def test_large_messages_on_a_tiny_shm_dir(tiny_tmpfs):
    with ActorSystem(shm_dir=tiny_tmpfs, shm_threshold=MiB) as system:
        e = system.spawn(Echo)
        x = torch.randn(BIG // 4)
        for _ in range(3):
            assert torch.equal(e.echo(x), x)
        assert system.stats()["routes"]["zmq"]["messages"] == 6
        assert pool_of(system)["created"] == 0
        assert os.listdir(tiny_tmpfs) == []


def test_many_large_calls_leave_descriptors_and_mappings_flat():
    me = psutil.Process()

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if "/dev/shm" in line)

    with ActorSystem() as system:
        e = system.spawn(Echo)
        sizes = [BIG, 2 * BIG, BIG // 2 + MiB * 7, 3 * BIG]
        for n in sizes * 2:
            e.echo(torch.ones(n // 4))
        fds, mapped = me.num_fds(), maps()
        for n in sizes * 10:
            out = e.echo(torch.ones(n // 4))
            assert out.numel() == n // 4
            del out
        assert me.num_fds() == fds and maps() == mapped


@pytest.mark.parametrize("direction", ["argument", "result"])
def test_a_dead_actors_slots_go_with_it(shm_tmpfs, direction):
    """A tensor received from an actor outlives it; its slot goes once the tensor does."""
    from tests.conftest import tmpfs_used

    with ActorSystem(shm_dir=shm_tmpfs) as system:
        e = system.spawn(Echo)
        kept = e.echo(torch.ones(BIG // 4))
        e.kill()
        assert torch.all(kept == 1.0)
        used = tmpfs_used(shm_tmpfs)
        assert used >= BIG  # the actor's slot, mapped here only
        del kept
        gc.collect()
        assert tmpfs_used(shm_tmpfs) <= used - BIG
    assert tmpfs_used(shm_tmpfs) == 0


@pytest.mark.parametrize("n", [1000, BIG // 4], ids=["ring", "pool"])
def test_a_borrowing_actor_reads_its_arguments_in_place(n):
    """``@actor(borrow_args=True)``: no copy on the actor's side, on either route, and each
    record is given back when the method returns (200 calls through a 20 MiB ring)."""
    with ActorSystem() as system:
        b = system.spawn(Borrower)
        c = system.spawn(Copier)
        t = torch.arange(float(n))
        assert b.where(t) == (True, float(t.double().sum()))
        # Without borrowing, a ring argument is copied out; a pool slot is always leased.
        assert c.where(t) == (n != 1000, float(t.double().sum()))
        for i in range(200 if n == 1000 else 20):
            assert torch.equal(b.twice(t + i), (t + i) * 2)


def test_channels_with_an_untrusted_side_are_sealed_both_ways():
    """The driver's channel to an untrusted actor, and that actor's own channel to a trusted
    one (whose end insists: it refuses rings an untrusted caller could truncate), are
    sealed; the driver's channel to a trusted actor is not.  Large and small calls work."""
    with ActorSystem() as system:
        e = system.spawn(OpenEcho)
        u = system.spawn(Caller, e, untrusted=True)
        x = torch.randn(BIG // 4)
        assert torch.equal(u.relay(x), x)  # through the pool, both hops, both ways
        assert u.relay(3) == 3
        assert u.channel_sealed() == [True]
        assert torch.equal(e.echo(x), x)
        sealed = {ch["actor"]: ch["sealed"] for ch in system.stats()["channels"]}
        assert sealed == {u.name: True, e.name: False}


@pytest.mark.timeout(60)
def test_a_forked_childs_copy_of_a_received_pool_tensor_does_not_change():
    """Found by a fault-injection review: a child's memory is a snapshot after fork, except a
    tensor read in place from a pool slot -- shared memory.  Once the parent let go, the
    slot was FREE, the actor's next reply reused it and the child's tensor changed.  A fork
    now pins the slots of live leases until the child is gone."""
    with ActorSystem(shm_threshold=1 << 20) as system:
        e = system.spawn(Echo)
        n = 1 << 20
        x = e.ones(n)  # 4 MiB: lies in a slot of the actor's pool
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait until the parent has moved on, then look
            code = 2
            try:
                os.close(w)
                os.read(r, 1)
                # numpy, not torch: torch's OpenMP threads do not survive a fork
                code = 0 if float(x.numpy().sum(dtype="float64")) == n else 1
            finally:
                os._exit(code)
        os.close(r)
        del x
        gc.collect()  # the parent lets go
        for _ in range(3):  # the replies take other slots, or frames, while the child lives
            assert float(e.echo(torch.zeros(n)).sum()) == 0.0
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's tensor changed under it"


@pytest.mark.timeout(120)
def test_forks_do_not_cost_the_parent_its_slots():
    """A driver that forks now and then (a fork-based multiprocessing pool, DataLoader
    workers) while it holds received tensors gets its slots back once the children are gone:
    the first fix pinned a slot per fork for good, and after eight every large reply went by
    frames."""
    with ActorSystem(shm_threshold=1 << 20) as system:
        e = system.spawn(Echo)
        n = 1 << 20
        for _ in range(16):
            x = e.ones(n)  # lies in a pool slot of the actor
            pid = os.fork()
            if pid == 0:
                os._exit(0 if float(x.numpy().sum(dtype="float64")) == n else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            del x
            gc.collect()

        _assert_replies_find_free_slots(system, e, n)


def _assert_replies_find_free_slots(system, e, n: int) -> None:
    """Four large echoes all arrive in the actor's pool slots, none as frames."""
    def received():
        ch = next(c for c in system.stats()["channels"] if c["actor"] == e.name)
        return ch["pool"]["received"]

    before = received()
    for _ in range(4):
        assert float(e.echo(torch.zeros(n)).sum()) == 0.0
    assert received() - before == 4, "the actor's replies no longer find a free slot"


def _anonymous_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


@pytest.mark.timeout(60)
def test_a_forked_child_does_not_pay_for_the_tensors_it_inherits():
    """A review of the second fix: a copy made in every child (subprocess with preexec_fn,
    fork-based pools) committed the leased bytes again in each, read or not."""
    with ActorSystem(shm_threshold=1 << 20) as system:
        e = system.spawn(Echo)
        x = e.ones(16 << 20)  # 64 MiB in a slot of the actor's pool
        before = _anonymous_kib()
        pid = os.fork()
        if pid == 0:
            os._exit(min((_anonymous_kib() - before) >> 10, 250))  # MiB
        _, status = os.waitpid(pid, 0)
        grew_mib = os.waitstatus_to_exitcode(status)
        assert grew_mib < 16, f"the child's anonymous memory grew by {grew_mib} MiB at fork"
        del x


@pytest.mark.timeout(120)
def test_pinned_slots_come_back_when_every_reply_goes_by_frames():
    """Found by a review of b3fbf37, whose release of pinned slots ran only inside a pooled
    receive: a driver holding as many in-place replies as the actor has slots (8) when it
    forked got them all pinned; once the child was gone and the driver let go, every slot
    was still BUSY, so the actor sent every large reply by frames, so no pooled receive ever
    ran the release -- the pool was lost for good after one fork."""
    with ActorSystem(shm_threshold=1 << 20) as system:
        e = system.spawn(Echo)
        n = 1 << 20
        held = [e.ones(n) for _ in range(8)]  # one pool slot of the actor each
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        del held
        gc.collect()  # the child is gone and the driver let go

        _assert_replies_find_free_slots(system, e, n)


@pytest.mark.timeout(120)
def test_a_closed_channels_pinned_slot_is_unmapped():
    """Found by a review of b3fbf37: a pinned lease keeps its slot's state word (an export of
    the mapping) until released, and b3fbf37 released only at a pooled receive -- after the
    channel closed none came, so the slot (up to the pool's cap) stayed mapped for good."""
    from runtime.transport import pool

    def maps():
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if "(deleted)" in line or "memfd:" in line)

    base = maps()
    with ActorSystem(shm_threshold=1 << 20) as system:
        e = system.spawn(Echo)
        x = e.ones(1 << 20)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        del x
        gc.collect()
    gc.collect()
    assert not pool._leases and not pool._groups, (len(pool._leases), len(pool._groups))
    assert maps() <= base, "a slot of the closed channel is still mapped"
