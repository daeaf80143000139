"""Length-prefixed pickle messages over pipes.

Between the driver, the supervisor and starting actors: processes of one
trusted session.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
from typing import Any

__all__ = ["FrameReader", "write_frame"]

_LEN = struct.Struct("<I")


def write_frame(fd: int, obj: Any) -> None:
    """Write one message (blocking until the pipe took all of it)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = memoryview(_LEN.pack(len(data)) + data)
    while buf:
        try:
            n = os.write(fd, buf)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        buf = buf[n:]


class FrameReader:
    """Reassembles messages from a pipe read in whatever pieces arrive."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self.eof = False

    def feed(self) -> list[Any]:
        """Read what is available (one ``read``); return the complete messages."""
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            self.eof = True
        elif chunk:
            self._buf += chunk
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf, 0)
            if len(self._buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self._buf[4:4 + n])))
            del self._buf[:4 + n]
        return out
