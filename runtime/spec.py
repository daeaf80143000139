"""An actor's constructor call, in a sealed memfd that travels by descriptor.

The driver encodes ``(cls, args, kwargs)`` with the codec (trusted mode:
cloudpickle, tensors out of band) into an anonymous memfd, seals it against
writing and hands the descriptor to the supervisor, which passes it to every
incarnation of the actor.  The arguments never pass through the supervisor's
memory (a 600 MiB argument used to stay resident there), the actor maps the
buffers copy-on-write instead of reading them, and nobody -- the actor
included -- can change what a restart will read.

Layout::

    offset  size  field
    0       8     magic b"RTSPEC01"
    8       8     header length H
    16      H     codec header
    ...           buffers, in order, each starting 64-byte aligned
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Any

import numpy as np

from runtime import codec
from runtime.errors import ProtocolError

__all__ = ["read_spec", "write_spec"]

_HEAD = struct.Struct("<8sQ")
_MAGIC = b"RTSPEC01"
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _align(n: int) -> int:
    return (n + 63) & ~63


def write_spec(obj: Any) -> int:
    """Encode ``obj`` into a new sealed memfd; returns the descriptor (close-on-exec)."""
    enc = codec.encode(obj)
    fd = os.memfd_create("rt_spec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        pos = _align(_HEAD.size + len(enc.header))
        offsets = []
        for b in enc.buffers:
            offsets.append(pos)
            pos = _align(pos + b.nbytes)
        os.ftruncate(fd, max(pos, 1))
        os.pwrite(fd, _HEAD.pack(_MAGIC, len(enc.header)) + enc.header, 0)
        for off, b in zip(offsets, enc.buffers, strict=True):
            view = memoryview(b)
            done = 0
            while done < b.nbytes:
                done += os.pwrite(fd, view[done:], off + done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_spec(fd: int) -> Any:
    """Decode what :func:`write_spec` wrote; tensors map the memfd copy-on-write."""
    size = os.fstat(fd).st_size
    if size < _HEAD.size:
        raise ProtocolError(f"constructor spec of {size} bytes is truncated")
    mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    magic, hlen = _HEAD.unpack_from(mm, 0)
    if magic != _MAGIC or _HEAD.size + hlen > size:
        raise ProtocolError("constructor spec has a bad magic or header length")
    header = mm[_HEAD.size:_HEAD.size + hlen]
    prefix = struct.calcsize(codec.HEADER_PREFIX)
    if hlen < prefix:
        raise ProtocolError("constructor spec header is truncated")
    nbuf = struct.unpack_from(codec.HEADER_PREFIX, header)[3]
    sizes = struct.unpack_from(f"<{nbuf}Q", header, prefix)
    whole = np.frombuffer(mm, np.uint8)
    buffers = []
    pos = _align(_HEAD.size + hlen)
    for nb in sizes:
        if pos + nb > size:
            raise ProtocolError("constructor spec buffer overruns the file")
        buffers.append(whole[pos:pos + nb])
        pos = _align(pos + nb)
    return codec.decode(header, buffers, safe=False)
