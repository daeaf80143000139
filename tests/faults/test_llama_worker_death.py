"""A GPU worker killed during a prefill makes the prefill fail fast, leaving nothing behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from runtime import ActorDiedError, ActorSystem, RemoteError

KILL_AFTER_S = 0.5
RAISE_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    # seed-bench at T=512: a prefill across two processes takes a good fraction of a second
    # on two cores, so the kill lands inside one; the loop below makes that certain.
    return LlamaConfig.preset("seed-bench")


def _prefill_until_it_fails(drv, ids: torch.Tensor, pid: int) -> tuple[BaseException, float]:
    """Run prefills back to back while a thread SIGKILLs ``pid``; return the error and how
    long after the kill it came."""
    return _run_until_it_fails(lambda: drv.prefill(ids), pid, "prefill")


def _run_until_it_fails(run, pid: int, what: str) -> tuple[BaseException, float]:
    """Call ``run()`` back to back while a thread SIGKILLs ``pid``; return the error and
    how long after the kill it came."""
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(KILL_AFTER_S)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    deadline = time.monotonic() + KILL_AFTER_S + 30
    try:
        while time.monotonic() < deadline:
            run()
    except Exception as e:  # what we are here for
        killer.join()
        if not killed_at:  # failed before the kill: not what this test is about
            raise
        return e, time.monotonic() - killed_at[0]
    finally:
        killer.join()
    pytest.fail(f"{what} kept succeeding after the GPU worker was killed")


def _names_actor_died(e: BaseException) -> bool:
    return (isinstance(e, ActorDiedError) or "ActorDiedError" in getattr(e, "remote_type", "")
            or "ActorDiedError" in str(e))


def test_worker_killed_under_driver_actor(config):
    ids = torch.randint(0, config.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
    with ActorSystem(shm_threshold=1024 * 1024) as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0, attention="worker")
        drv.prefill(ids[:16])  # both up and talking
        err, after = _prefill_until_it_fails(drv, ids, gpu.pid)
        # The TEEDriver's call into the dead worker raised ActorDiedError in the driver
        # process; it reaches us as that remote error.
        print(f"after {after:.2f} s: {type(err).__mro__[:3]} {str(err).splitlines()[0]}")
        assert isinstance(err, (RemoteError, ActorDiedError)), repr(err)
        assert _names_actor_died(err), repr(err)
        assert after < RAISE_WITHIN_S
        assert not psutil.pid_exists(gpu.pid) or \
            psutil.Process(gpu.pid).status() == psutil.STATUS_ZOMBIE


def test_worker_killed_under_in_process_driver(config):
    ids = torch.randint(0, config.vocab_size, (512,), generator=torch.Generator().manual_seed(1))
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = TEEDriver(config, gpu, seed=0, attention="worker")
        err, after = _prefill_until_it_fails(drv, ids, gpu.pid)
        print(f"after {after:.2f} s: {type(err).__mro__[:3]} {str(err).splitlines()[0]}")
        assert isinstance(err, ActorDiedError), repr(err)
        assert after < RAISE_WITHIN_S


def test_worker_killed_mid_generation_under_driver_actor(config):
    ids = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(2))
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0)
        assert len(drv.generate(ids, 3)) == 3  # both up and talking
        err, after = _run_until_it_fails(lambda: drv.generate(ids, 2000), gpu.pid,
                                         "generation")
        print(f"after {after:.2f} s: {type(err).__mro__[:3]} {str(err).splitlines()[0]}")
        assert isinstance(err, (RemoteError, ActorDiedError)), repr(err)
        assert _names_actor_died(err), repr(err)
        assert after < RAISE_WITHIN_S
        assert not psutil.pid_exists(gpu.pid) or \
            psutil.Process(gpu.pid).status() == psutil.STATUS_ZOMBIE


def test_worker_killed_while_streaming(config):
    ids = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(3))
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = TEEDriver(config, gpu, seed=0)
        drv.generate_start(ids, 4000)
        got = drv.generate_step(2)  # streaming has begun
        assert len(got) == 2
        killed_at: list[float] = []

        def kill() -> None:
            time.sleep(0.2)
            killed_at.append(time.monotonic())
            os.kill(gpu.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        try:
            with pytest.raises(ActorDiedError):
                while step := drv.generate_step():
                    got.extend(step)
            after = time.monotonic() - killed_at[0]
        finally:
            killer.join()
        print(f"after {after:.2f} s and {len(got)} tokens")
        assert after < RAISE_WITHIN_S
