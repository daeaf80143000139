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
