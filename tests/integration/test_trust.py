"""The trust boundary: an untrusted actor can make no other process run its code.

Each hostile payload is a pickle whose loading creates a marker file; a test
passes only if no marker appears and the session goes on working.  The
safe-mode tests fail if either side of a call decodes an untrusted peer's
message in trusted mode.
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from runtime import ActorStartError, ActorSystem, ProtocolError
from runtime.errors import ActorRuntimeError
from runtime.table import FLAG_UNTRUSTED
from tests.integration.actors_lib import Echo
from tests.integration.hostile_lib import BadStatus, Intruder, Liar, Relay

REFUSED = {"EPERM", "EACCES"}


def test_hostile_untrusted_actor_reaches_nothing(tmp_path):
    config = LlamaConfig.preset("tiny")
    marker = tmp_path / "pwned"
    ids = torch.arange(1, 40) % config.vocab_size
    with ActorSystem(shm_threshold=4096) as system:  # both routes carry traffic
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0)
        echo = system.spawn(Echo)
        assert echo.echo(torch.ones(2000)).sum().item() == 2000  # a bulk link to attack
        before = drv.prefill(ids)
        intruder = system.spawn(Intruder, drv)
        report = intruder.attack(system.session.private_dir, system.session.shm_dir,
                                 system.session.sid, str(marker))
        assert not marker.exists(), "a process of the session unpickled attacker bytes"
        # It found something to attack: the actors' control sockets, ZeroMQ links, doorbells.
        assert report["unix"] >= 3 and report["zmq"] >= 3 and report["fifo"] >= 3, report
        assert report["shm"] == 0, "ring segments must have no name to open"
        assert set(report["table"].values()) <= REFUSED | {"ActorRuntimeError"}, report
        assert report["call"] in ("ProtocolError", "TransportError"), report
        entry = system._table.read(intruder._ref.index)
        assert entry.flags & FLAG_UNTRUSTED
        # Everyone keeps serving, with the same results.
        assert torch.equal(drv.prefill(ids), before)
        assert echo.echo(torch.ones(2000)).sum().item() == 2000
        assert echo.echo(7) == 7
    assert not marker.exists()


def test_caller_refuses_a_pickled_reply_from_an_untrusted_actor(tmp_path, route, threshold):
    marker = tmp_path / "pwned"
    with ActorSystem(shm_threshold=threshold) as system:
        liar = system.spawn(Liar)
        with pytest.raises(ProtocolError, match="safe mode"):
            liar.pickled_reply(str(marker))
        assert not marker.exists()


def test_trusted_actor_refuses_a_pickled_argument_from_an_untrusted_caller(tmp_path, route,
                                                                           threshold):
    marker = tmp_path / "pwned"
    with ActorSystem(shm_threshold=threshold) as system:
        echo = system.spawn(Echo)
        relay = system.spawn(Relay, echo)
        answer = relay.send_pickle(str(marker))
        assert "safe mode" in answer, answer
        assert not marker.exists()
        assert echo.echo(5) == 5


def test_the_table_is_read_only_outside_the_supervisor():
    with ActorSystem() as system:
        intruder = system.spawn(Intruder)
        outcomes = intruder.table_attempts()
        assert set(outcomes.values()) <= REFUSED | {"ActorRuntimeError"}, outcomes
        with pytest.raises(ActorRuntimeError, match="read-only"):
            system._table.write(0, state=0)


def test_a_malformed_status_message_fails_the_start():
    with ActorSystem() as system:
        with pytest.raises(ActorStartError):
            system.spawn(BadStatus)
        assert system.spawn(Echo).echo(1) == 1


def test_constructor_arguments_do_not_stay_in_the_supervisor():
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB
    with ActorSystem() as system:
        sup = psutil.Process(system._link.proc.pid)
        before = sup.memory_full_info().uss
        echo = system.spawn(Echo, big)
        assert echo.echo(1) == 1
        grew = sup.memory_full_info().uss - before
        assert grew < 16 << 20, f"the supervisor grew by {grew >> 20} MiB"


def test_an_open_request_may_name_only_the_requesters_own_files():
    """A peer cannot point an actor at another channel's ZeroMQ socket or doorbell."""
    from runtime import control
    from runtime.calls import ctl_path

    with ActorSystem() as system:
        echo = system.spawn(Echo)
        assert echo.echo(1) == 1  # the driver's channel: its files exist
        s = system.session
        theirs = [n for n in os.listdir(s.private_dir) if n.endswith(".zmq")]
        assert theirs
        from runtime.transport.channel import ChannelSpec

        spec = ChannelSpec(rings=False, endpoint="", caller_bell=None, threshold=1,
                           secret=bytes(16)).as_dict()
        for endpoint in (f"ipc://{os.path.join(s.private_dir, 'elsewhere.zmq')}",
                         f"ipc://{s.private_dir}/rt_{s.sid}_{os.getpid()}_/../x.zmq",
                         "ipc:///tmp/x.zmq"):
            spec["endpoint"] = endpoint
            reply = control.request(ctl_path(s, echo._ref.index, 0),
                                    ["open", {"name": "x", "spec": spec}], (), timeout=5)
            assert reply[0] == "error" and "requester's own" in reply[1], reply
        assert echo.echo(2) == 2
