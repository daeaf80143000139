"""Hostile actors for the trust-boundary tests (an importable module).

Each one runs as an ``untrusted`` actor and does what a compromised GPU
worker could: it talks to every socket, pipe and segment of the session it
can find, with pickles, garbage and oversized frames.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import stat
import struct
import sys

import zmq

from runtime import actor, codec
from runtime import messages as messages_mod
from runtime.transport import framing


class Marker:
    """Unpickling this creates a file: proof that someone unpickled attacker bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled_message(marker: str) -> bytes:
    """A well-framed channel message whose codec payload is a pickle of a Marker."""
    enc = codec.encode(Marker(marker))
    return framing.head_bytes(framing.KIND_INLINE, 1, enc.header, [])


def _outcome(fn) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    except Exception as exc:
        return type(exc).__name__
    return "done"


@actor(untrusted=True)
class Intruder:
    def __init__(self, target=None):
        self.target = target

    def attack(self, private_dir: str, shm_dir: str, sid: str, marker: str) -> dict:
        report = {"unix": 0, "zmq": 0, "fifo": 0, "shm": 0}
        evil_pickle = __import__("pickle").dumps(Marker(marker))
        ctx = zmq.Context.instance()
        for name in sorted(os.listdir(private_dir)):
            path = os.path.join(private_dir, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if stat.S_ISSOCK(mode) and name.endswith(".zmq"):
                report["zmq"] += 1
                for kind in (zmq.PAIR, zmq.DEALER):
                    s = ctx.socket(kind)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(f"ipc://{path}")
                    for frames in ([evil_pickle], [b"\0" * 16 + _pickled_message(marker)],
                                   [_pickled_message(marker)], [b"\xff" * 100]):
                        try:
                            s.send_multipart(frames, zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass
                    s.close(0)
            elif stat.S_ISSOCK(mode):
                report["unix"] += 1
                payloads = [struct.pack("<I", len(evil_pickle)) + evil_pickle,
                            b"\xff" * 256, struct.pack("<I", 0xFFFFFFFF),
                            _json(["open", {"name": "x", "spec": {"rings": False,
                                  "endpoint": "ipc:///nonexistent", "caller_bell": None,
                                  "threshold": 1, "secret": "00" * 16}}]),
                            _json(["open", evil_pickle.hex()])]
                for data in payloads:
                    _outcome(lambda path=path, data=data: _send_raw(path, data))
            elif stat.S_ISFIFO(mode):
                report["fifo"] += 1
                _outcome(lambda path=path: _write_fifo(path))
        for name in os.listdir(shm_dir):
            if name.startswith(f"rt_{sid}"):
                report["shm"] += 1
                path = os.path.join(shm_dir, name)
                _outcome(lambda path=path: _scribble(path))
        report["table"] = self.table_attempts()
        if self.target is not None:
            report["call"] = _outcome(lambda: self.target.prefill(Marker(marker)))
        return report

    def table_attempts(self) -> dict:
        from runtime.calls import _contexts

        table = next(iter(_contexts.values())).table
        fd, size = table.fd, 4096
        out = {}

        def map_writable():
            mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

        def reopen_and_map():
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                mmap.mmap(fd2, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd2)

        def reopen_and_write():
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                os.pwrite(fd2, b"\0" * 32, 0)
            finally:
                os.close(fd2)

        out["map_writable"] = _outcome(map_writable)
        out["reopen_map"] = _outcome(reopen_and_map)
        out["reopen_write"] = _outcome(reopen_and_write)
        out["table_write"] = _outcome(lambda: table.write(0, state=0, flags=0))
        return out


def _send_raw(path: str, data: bytes) -> None:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(3)
    try:
        c.connect(path)
        c.sendall(data)
        c.recv(4096)
    finally:
        c.close()


def _write_fifo(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"\xff" * 64)
    finally:
        os.close(fd)


def _scribble(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * 4096)


def _json(msg) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack("<I", len(body)) + body


@actor(untrusted=True)
class Liar:
    """Replies in the codec's pickle format, which an honest untrusted actor cannot."""

    def pickled_reply(self, marker: str):
        original = messages_mod.MessageChannel.encode

        def encode(self, obj, **kw):
            kw["plain_only"] = False
            return original(self, obj, **kw)

        messages_mod.MessageChannel.encode = encode
        return Marker(marker)


@actor(untrusted=True)
class Relay:
    """Calls a trusted actor with an argument outside the plain format."""

    def __init__(self, target):
        self.target = target

    def send_pickle(self, marker: str) -> str:
        try:
            self.target.echo(Marker(marker))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "accepted"


@actor(untrusted=True)
class BadStatus:
    """Writes garbage on its status pipe to the supervisor during __init__."""

    def __init__(self):
        fd = json.loads(sys.argv[1])["status_fd"]
        os.write(fd, struct.pack("<I", 5) + b"{bad}")


def _every_other_actor(ctx, methods):
    """Handles to every other live actor, built from the table this process maps.

    Handles are plain data: an untrusted actor needs nobody's to make its own.
    """
    from runtime.actor import ActorHandle
    from runtime.calls import ActorRef
    from runtime.table import ALIVE

    out = []
    for index in range(64):
        if index != ctx.self_index and ctx.table.read(index).state == ALIVE:
            ref = ActorRef(ctx.session.sid, index, f"actor{index}", "?", frozenset(methods),
                           False)
            out.append(ActorHandle(ref, ctx))
    return out


def _context():
    from runtime.calls import _contexts

    return next(iter(_contexts.values()))


@actor(untrusted=True)
class Hijacker:
    """Calls every other actor of its session, the TEE driver included, with handles of
    its own making: ``generate_step`` would return the user's next tokens, ``_logits`` the
    private lm_head (``_logits(I) = W``)."""

    def hijack(self, method: str, *args) -> list[str]:
        got = []
        for h in _every_other_actor(_context(), {method}):
            try:
                r = getattr(h, method)(*args)
                got.append(f"served: {type(r).__name__}")
            except Exception as exc:
                got.append(f"{type(exc).__name__}: {exc}")
        return got


# 64,000 bytes of '[' and ']': well under every frame limit, and deeper than JSON decoding
# can follow (RecursionError, which was not a ProtocolError).
JSON_BOMB = b"[" * 32000 + b"]" * 32000


@actor(untrusted=True)
class JsonBomber:
    """Sends a nesting bomb to an actor's control socket, or as its own start-up status."""

    def __init__(self, at_start: bool = False):
        if at_start:
            fd = json.loads(sys.argv[1])["status_fd"]
            os.write(fd, struct.pack("<I", len(JSON_BOMB)) + JSON_BOMB)

    def bomb(self, ctl_path: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(ctl_path)
            c.sendall(struct.pack("<I", len(JSON_BOMB)) + JSON_BOMB)
            try:
                return c.recv(4096)[:200]
            except OSError as exc:
                return str(exc).encode()


@actor(untrusted=True)
class FdStuffer:
    """Answers every channel-open request in pieces, each carrying 8 descriptors of a memfd
    named ``rt_fd_stuffer`` (SCM_RIGHTS), then the real reply."""

    def __init__(self):
        from runtime import control
        from runtime.wire import encode_frame

        leak = os.memfd_create("rt_fd_stuffer")

        def _finish(server, p, reply):
            server._pending.pop(p.sock.fileno(), None)
            try:
                server._poll.unregister(p.sock)
            except (KeyError, ValueError):
                pass
            data = encode_frame(reply)
            p.sock.setblocking(True)
            for i in range(10):
                socket.send_fds(p.sock, [data[i:i + 1]], [leak] * 8)
            p.sock.sendall(data[10:])
            p.reader.close_fds()
            p.sock.close()

        control.ControlServer._finish = _finish

    def ping(self) -> str:
        return "pong"


def _serving_channel():
    """The transport Channel of the call this actor is serving (found up the stack)."""
    frame = sys._getframe(1)
    while frame.f_code.co_name != "_run_call":
        frame = frame.f_back
    return frame.f_locals["conn"].channel.transport


@actor(untrusted=True)
class MarkerOnly:
    """Publishes a BULK marker in its reply ring and never sends the ZeroMQ frames."""

    def ping(self) -> str:
        return "pong"

    def marker_without_frames(self) -> str:
        _serving_channel()._send_marker(framing.KIND_BULK, None, None, None)
        return "the real reply, behind the marker"


@actor(untrusted=True)
class Staller:
    """An untrusted caller that publishes a BULK marker on its channel to a trusted actor
    (one that serves untrusted callers) and never sends the frames."""

    def __init__(self, target):
        self.target = target

    def stall(self) -> str:
        assert self.target.echo(1) == 1  # opens the channel
        cc = _context()._channels[self.target._ref.index]
        cc.channel.transport._send_marker(framing.KIND_BULK, None, None, None)
        return "sent"


@actor(untrusted=True)
class BigRinger:
    """Opens its channel to a trusted actor with rings larger than the session's threshold
    sizes (sparse sealed memfds cost it nothing), to make the callee's copies huge."""

    def __init__(self, target):
        self.target = target

    def call_with_big_rings(self) -> str:
        from runtime.transport import channel as channel_mod

        normal = channel_mod.ring_capacity
        channel_mod.ring_capacity = lambda threshold: 64 * normal(threshold)
        try:
            self.target.echo(1)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            channel_mod.ring_capacity = normal
        return "accepted"


@actor(untrusted_callers=True)
class ReceiveFails:
    """Serves anyone; its channels' receives raise ``exc`` -- on untrusted callers' (safe)
    channels, or on trusted ones once -- as an untrusted peer's message the receive cannot
    take would (a bug in the decoder, memory it cannot get)."""

    def __init__(self, exc: str, on_safe: bool):
        from runtime.transport.channel import Channel

        original = Channel.try_recv
        armed = [True]

        def try_recv(channel, *args, **kwargs):
            if channel.safe == on_safe and armed[0] and channel.readable():
                if not on_safe:
                    armed[0] = False
                raise {"RuntimeError": RuntimeError, "MemoryError": MemoryError}[exc]("injected")
            return original(channel, *args, **kwargs)

        Channel.try_recv = try_recv

    def echo(self, x):
        return x
