"""The trust boundary: an untrusted actor can make no other process run its code.

Each hostile payload is a pickle whose loading creates a marker file; a test
passes only if no marker appears and the session goes on working.  The
safe-mode tests fail if either side of a call decodes an untrusted peer's
message in trusted mode.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from runtime import ActorStartError, ActorSystem, ProtocolError
from runtime.errors import ActorRuntimeError, TransportError
from runtime.table import FLAG_UNTRUSTED
from tests.integration.actors_lib import Echo, OpenEcho
from tests.integration.hostile_lib import (
    BadStatus,
    BigRinger,
    FdStuffer,
    Hijacker,
    Intruder,
    JsonBomber,
    Liar,
    MarkerOnly,
    ReceiveFails,
    Relay,
    Staller,
)

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
        echo = system.spawn(OpenEcho)  # one that serves untrusted callers at all
        relay = system.spawn(Relay, echo)
        answer = relay.send_pickle(str(marker))
        assert "safe mode" in answer, answer
        assert not marker.exists()
        assert echo.echo(5) == 5


def test_a_trusted_actor_refuses_untrusted_callers_unless_it_opts_in():
    with ActorSystem() as system:
        echo, open_echo = system.spawn(Echo), system.spawn(OpenEcho)
        answer = system.spawn(Relay, echo).send_pickle("/nonexistent/marker")
        assert "does not serve untrusted actors" in answer, answer
        assert "safe mode" in system.spawn(Relay, open_echo).send_pickle("/nonexistent/m")
        assert echo.echo(1) == 1


def test_an_untrusted_caller_does_not_size_a_trusted_actors_rings():
    """Found in review: a trusted actor serving untrusted callers took their rings at any
    size (only the seals were checked), and a sparse ring of 96 GiB made its copy-out raise
    MemoryError, which ended it.  Rings beyond the session's threshold are refused when the
    channel opens; the actor serves on."""
    with ActorSystem(shm_threshold=1 << 20) as system:
        echo = system.spawn(OpenEcho)
        answer = system.spawn(BigRinger, echo).call_with_big_rings()
        assert "rings of" in answer, answer
        assert echo.echo(7) == 7


def test_a_receive_that_fails_otherwise_drops_the_channel_not_the_actor():
    """The serve loop caught TransportError only: anything else a receive raised -- on an
    untrusted caller's channel, or MemoryError on any -- ended the actor and every caller's
    calls with it.  Now that channel is dropped (its caller told) and the actor serves on."""
    with ActorSystem() as system:
        target = system.spawn(ReceiveFails, "RuntimeError", True)
        answer = system.spawn(Relay, target).send_pickle("/nonexistent/marker")
        assert answer != "accepted" and "safe mode" not in answer, answer
        assert target.echo(5) == 5  # alive, serving its trusted caller
    with ActorSystem() as system:
        target = system.spawn(ReceiveFails, "MemoryError", False)
        with pytest.raises(TransportError):
            target.echo(1)  # that channel was dropped ...
        assert target.echo(2) == 2  # ... and the next call opens another


def test_an_untrusted_worker_cannot_call_the_tee_driver():
    """Handles are plain data: the worker makes one to the driver from the table it maps.
    Served, ``generate_step`` would hand it the user's next tokens (and a
    ``generate_start`` of its own would replace the user's prompt), ``_logits`` the
    private lm_head.  The driver refuses the channel; the user's generation is untouched."""
    config = LlamaConfig.preset("tiny")
    ids = (torch.arange(3, 27) * 7 % config.vocab_size).tolist()
    with ActorSystem() as system:
        gpu = system.spawn(GPUWorker, config, seed=0, device="cpu")
        drv = system.spawn(TEEDriver, config, gpu, seed=0)
        want = drv.generate(ids, 6).tolist()
        drv.generate_start(ids, 6)
        thief = system.spawn(Hijacker)
        for method, args in (("generate_step", (6,)), ("_logits", (torch.eye(64),)),
                             ("generate_start", (ids[::-1], 6))):
            got = thief.hijack(method, *args)
            assert len(got) == 2 and not any(g.startswith("served") for g in got), got
            # The driver refuses; the (untrusted) GPU worker serves, but has no such method.
            assert sum("TEEDriver-0' does not serve untrusted actors" in g for g in got) == 1
        assert drv.generate_step(6) == want


def test_a_json_nesting_bomb_kills_neither_the_supervisor_nor_an_actor():
    """64 KB of '[' ... ']' raised RecursionError (not a ProtocolError) in the JSON reader:
    on a control socket it ended the trusted actor, as a start-up status the supervisor."""
    from runtime.calls import ctl_path

    with ActorSystem() as system:
        echo = system.spawn(Echo)
        sup = psutil.Process(system._link.proc.pid)
        bomber = system.spawn(JsonBomber)
        answer = bomber.bomb(ctl_path(system.session, echo._ref.index, 0))
        assert b"nests deeper" in answer, answer
        assert echo.echo(1) == 1
        with pytest.raises(ActorStartError):
            system.spawn(JsonBomber, True)
        assert sup.is_running() and sup.status() != psutil.STATUS_ZOMBIE
        assert echo.echo(2) == 2 and system.spawn(Echo).echo(3) == 3


def test_descriptors_sent_with_a_control_reply_are_refused_and_closed():
    def stuffed() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += "rt_fd_stuffer" in os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return n

    with ActorSystem() as system:
        h = system.spawn(FdStuffer)
        with pytest.raises(ProtocolError, match="descriptors with its reply"):
            h.ping()
        assert stuffed() == 0


def test_a_bulk_marker_without_frames_is_cut_by_call_timeout():
    """The wait for a marker's frames was 60 s whatever the call's deadline."""
    with ActorSystem(call_timeout=2) as system:
        h = system.spawn(MarkerOnly)
        assert h.ping() == "pong"
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="BULK marker without"):
            h.marker_without_frames()
        assert time.monotonic() - t0 < 2 + 3


def test_an_untrusted_callers_bulk_marker_without_frames_stalls_its_callee_briefly():
    """A trusted actor that serves untrusted callers waited 60 s for the frames, serving
    nobody meanwhile; it gives an untrusted caller 5 s (UNTRUSTED_FRAMES_S)."""
    with ActorSystem() as system:
        t = system.spawn(OpenEcho)
        assert system.spawn(Staller, t).stall() == "sent"
        t0 = time.monotonic()
        assert t.echo(2) == 2
        assert time.monotonic() - t0 < 5 + 3


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
