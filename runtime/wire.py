"""Length-prefixed JSON messages over pipes and Unix sockets, with descriptors.

Between the driver and the supervisor, and from a starting actor to the
supervisor.  The format is plain on purpose: an actor (an untrusted one
included) writes its status pipe, and nothing an actor can write is ever
unpickled by another process.  A message is a JSON array of strings,
numbers, booleans, None and nested arrays/objects::

    offset  size  field
    0       4     length N of the body (u32, little-endian), at most MAX_FRAME
    4       N     UTF-8 JSON

On a Unix socket a message may carry file descriptors (``SCM_RIGHTS``), sent
with its first byte: the driver hands the supervisor each actor's
constructor-call memfd that way, so the arguments never pass through the
supervisor's memory.  A malformed or oversized frame raises
:class:`~runtime.errors.ProtocolError`.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
from typing import Any

from runtime.errors import ProtocolError

__all__ = ["MAX_FRAME", "DescriptorsDropped", "FrameReader", "encode_frame", "write_frame"]

_LEN = struct.Struct("<I")
MAX_FRAME = 16 << 20
"""Longest message body: status messages carry an ``__init__`` traceback at most."""
_MAX_FDS = 8


def encode_frame(obj: Any) -> bytes:
    """One message as bytes: length prefix and JSON body."""
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(data)) + data


def write_frame(target: int | socket.socket, obj: Any, fds: tuple[int, ...] = ()) -> None:
    """Write one message (blocking until all of it is taken); ``fds`` need a socket."""
    buf = memoryview(encode_frame(obj))
    sock = target if isinstance(target, socket.socket) else None
    if fds and sock is None:
        raise ValueError("descriptors travel over a Unix socket, not a pipe")
    while buf:
        try:
            if sock is None:
                n = os.write(target, buf)
            elif fds:
                n = socket.send_fds(sock, [buf], list(fds))
                fds = ()
            else:
                n = sock.send(buf)
        except BlockingIOError:
            fd = target if sock is None else sock.fileno()
            poller = select.poll()  # not select(): descriptors past 1023 are fine
            poller.register(fd, select.POLLOUT)
            poller.poll(1000)
            continue
        buf = buf[n:]


class DescriptorsDropped(ProtocolError):
    """The kernel dropped descriptors sent with a message (``MSG_CTRUNC``).

    ``short``: fewer than a read takes arrived, so this process could not install them
    (it is at its descriptor limit); otherwise the peer sent more than a message may carry.
    """

    def __init__(self, arrived: int) -> None:
        self.short = arrived < _MAX_FDS
        super().__init__(
            "descriptors sent with a message were dropped: " +
            ("this process is out of file descriptors" if self.short
             else f"more than {_MAX_FDS} came"))


class FrameReader:
    """Reassembles messages from a pipe or socket read in whatever pieces arrive.

    Descriptors received on a socket queue up in ``fds`` in arrival order; a
    message that announces descriptors takes them from the front.
    """

    def __init__(self, source: int | socket.socket, *, max_frame: int = MAX_FRAME,
                 max_fds: int | None = None) -> None:
        self.max_frame = max_frame
        # Descriptors held for messages not yet whole: a peer sending a byte and eight
        # descriptors at a time, its frame never complete, filled the whole table.
        self.max_fds = max_fds
        self.sock = source if isinstance(source, socket.socket) else None
        self.fd = source.fileno() if self.sock is not None else source
        self._buf = bytearray()
        self.fds: list[int] = []
        self.eof = False

    def _read(self) -> bytes | None:
        try:
            if self.sock is None:
                return os.read(self.fd, 1 << 20)
            data, ancdata, flags, _ = self.sock.recvmsg(
                1 << 20, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize))
        except (BlockingIOError, InterruptedError):
            return None
        arrived = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
                arrived += len(fds)
        if flags & socket.MSG_CTRUNC:
            # The kernel dropped descriptors it could not install (this process at its
            # limit) or that did not fit: the message would be read without them, and
            # fail later as a count mismatch that hides why.
            raise DescriptorsDropped(arrived)
        if self.max_fds is not None and len(self.fds) > self.max_fds:
            raise ProtocolError(f"more than {self.max_fds} descriptors sent")
        return data

    def feed(self) -> list[Any]:
        """Read what is available (one read); return the complete messages.

        Raises ``ProtocolError`` on a frame that is oversized or not JSON; the
        stream is unusable after that.
        """
        chunk = self._read()
        if chunk == b"":
            self.eof = True
        elif chunk:
            self._buf += chunk
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf, 0)
            if n > self.max_frame:
                raise ProtocolError(f"frame of {n} bytes exceeds {self.max_frame}")
            if len(self._buf) < 4 + n:
                break
            try:
                msg = json.loads(bytes(self._buf[4:4 + n]))
            except ValueError as exc:
                raise ProtocolError(f"frame is not JSON: {exc}") from None
            except RecursionError:  # '[' * 32000: small, well framed, and would kill the reader
                raise ProtocolError("frame nests deeper than JSON decoding can follow") from None
            if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
                raise ProtocolError("frame is not a list starting with a name")
            out.append(msg)
            del self._buf[:4 + n]
        return out

    def take_fds(self, n: int) -> list[int]:
        """The next ``n`` received descriptors (``ProtocolError`` if fewer arrived)."""
        if n > len(self.fds):
            raise ProtocolError(f"message announces {n} descriptors, {len(self.fds)} arrived")
        out, self.fds = self.fds[:n], self.fds[n:]
        return out

    def close_fds(self) -> None:
        """Close descriptors received but never taken."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
