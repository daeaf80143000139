"""An actor's constructor call, in a sealed memfd that travels by descriptor.

The driver encodes ``(cls, args, kwargs)`` with the codec (trusted mode:
cloudpickle, tensors out of band) into an anonymous memfd, seals it against
writing and hands the descriptor to the supervisor, which passes it to every
incarnation of the actor.  The arguments never pass through the supervisor's
memory (a 600 MiB argument used to stay resident there), the actor maps the
buffers copy-on-write instead of reading them, and nobody -- the actor
included -- can change what a restart will read.

Layout: an 8-byte magic ``b"RTSPEC02"``, then one framing record (``transport/framing.py``:
prefix, buffer sizes, codec header, buffers each 8-byte aligned) -- the same layout a ring
record has, written and parsed by the same code.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

import numpy as np

from runtime import codec
from runtime.errors import ProtocolError
from runtime.transport import framing
from runtime.transport.segment import memfd

__all__ = ["read_spec", "write_spec"]

_MAGIC = b"RTSPEC02"
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def write_spec(obj: Any) -> int:
    """Encode ``obj`` into a new sealed memfd; returns the descriptor (close-on-exec)."""
    enc = codec.encode(obj)
    sizes, size = framing.measure(enc.header, enc.buffers)
    fd = memfd("rt_spec")
    try:
        start = len(_MAGIC)
        os.ftruncate(fd, start + size)
        head = framing.head_bytes(framing.KIND_INLINE, 0, enc.header, sizes)
        os.pwrite(fd, _MAGIC + head, 0)
        pos = start + framing.head_size(len(sizes), len(enc.header))
        for b in enc.buffers:
            view = memoryview(framing.as_host(b))
            done = 0
            while done < b.nbytes:
                done += os.pwrite(fd, view[done:], pos + done)
            pos += (b.nbytes + 7) & ~7
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_spec(fd: int) -> Any:
    """Decode what :func:`write_spec` wrote; tensors map the memfd copy-on-write."""
    size = os.fstat(fd).st_size
    start = len(_MAGIC)
    if size < start + framing.PREFIX_LEN:
        raise ProtocolError(f"constructor spec of {size} bytes is truncated")
    mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        if mm[:start] != _MAGIC:
            raise ProtocolError("constructor spec has a bad magic")
        head = framing.parse_head(mm, start, size - start)
        if head.kind != framing.KIND_INLINE:
            raise ProtocolError(f"constructor spec of kind {head.kind}")
        spans = framing.buffer_spans(head, start, size - start)
    except ProtocolError:
        mm.close()
        raise
    whole = np.frombuffer(mm, np.uint8)
    buffers = [whole[pos:pos + n] for pos, n in spans]
    return codec.decode(head.header, buffers, safe=False)  # bytes: a slice of the mmap
