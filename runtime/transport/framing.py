"""Framing: the one place that writes and parses a message's prefix, size table and kinds.

A message below the codec is a *header* (opaque bytes: the codec's) plus any number of
out-of-band *buffers* (tensor and array bytes).  Framing lays them out; it knows nothing of
what the header says, and nothing of rings, sockets or pools (``channel.py`` routes frames,
``codec.py`` writes headers).  The same layout serves a ring record, the first ZeroMQ frame
of a large message and the constructor memfd (``spec.py``)::

    offset          size      field
    0               1         kind: 0 INLINE, 1 BULK (body on ZeroMQ), 2 CLOSE, 3 POOL
    1               3         zero
    4               4         nbuf: number of out-of-band buffers
    8               4         header length H
    12              4         tag: a number of the sender's (the call id), kept
                              readable even when the message cannot be decoded
    16              8*nbuf    buffer sizes
    16+8*nbuf       H         header
    align8(...)     ...       buffers, each starting 8-byte aligned (records only)

Buffer sizes are written here once and parsed here once: the codec's header carries none.

*Who writes a buffer chooses how.*  A buffer is a 1-D ``uint8`` numpy array (copied by the
CPU: a ``memoryview`` assignment when small, ``memcopy.copy_bytes`` when large -- a
``ctypes.memmove``, which releases the GIL, on several threads from 4 MiB where this host
was measured to gain from it), or any object with ``nbytes``, ``write_into(dst)`` and ``host()``
(:class:`BufferWriter`): a CUDA tensor's bytes, say, which ``write_into`` copies
device-to-host straight into the record or pool slot reserved for them, and ``host()`` brings
to the host only where a message must leave as ZeroMQ frames.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from runtime.errors import ProtocolError
from runtime.transport.memcopy import copy_bytes

__all__ = [
    "KIND_BULK",
    "KIND_CLOSE",
    "KIND_INLINE",
    "KIND_POOL",
    "PREFIX_LEN",
    "BufferWriter",
    "Head",
    "as_host",
    "buffer_spans",
    "head_bytes",
    "head_size",
    "pack_head_into",
    "parse_head",
    "parse_record",
    "record_size",
    "sizes_of",
    "write_buffer",
    "write_record",
]

KIND_INLINE, KIND_BULK, KIND_CLOSE, KIND_POOL = 0, 1, 2, 3
_PREFIX = struct.Struct("<B3xIII")  # kind, nbuf, header length, tag
PREFIX_LEN = _PREFIX.size  # 16
_MEMMOVE_MIN = 64 * 1024  # below this a memoryview assignment beats a ctypes call
_NDARRAY = np.ndarray


@runtime_checkable
class BufferWriter(Protocol):
    """An out-of-band buffer that writes itself (a device tensor's bytes, say).

    ``write_into(dst)`` fills ``dst``, a 1-D ``uint8`` numpy array of exactly ``nbytes``
    over the destination memory (a ring record, a pool slot), and returns once the bytes
    are there.  ``host()`` returns the bytes as a 1-D ``uint8`` numpy array, for routes
    that need host memory of their own (ZeroMQ frames).
    """

    nbytes: int

    def write_into(self, dst: np.ndarray) -> None: ...

    def host(self) -> np.ndarray: ...


class Head(NamedTuple):
    """A parsed prefix: what :func:`parse_head` found at the start of a frame or record."""

    kind: int
    tag: int
    header: memoryview  # the codec's bytes, a view of the frame (bytes if it is not a view)
    sizes: tuple[int, ...]
    end: int  # offset just past the header (before alignment)


_new_head = tuple.__new__  # Head(...) without NamedTuple's Python-level __new__


_SIZES: dict[int, struct.Struct] = {}


def _sizes(n: int) -> struct.Struct:
    """The struct of ``n`` little-endian u64 buffer sizes.

    Cached for the usual counts only: a peer choosing counts must not grow the cache.
    """
    st = _SIZES.get(n)
    if st is None:
        st = struct.Struct(f"<{n}Q")
        if n <= 64:
            _SIZES[n] = st
    return st


def sizes_of(buffers: Sequence[Any]) -> list[int]:
    return [b.nbytes for b in buffers]


def head_size(nbuf: int, hlen: int) -> int:
    """Bytes of prefix, size table and header: where (8-aligned) the first buffer goes."""
    return (PREFIX_LEN + 8 * nbuf + hlen + 7) & ~7


def record_size(hlen: int, sizes: Sequence[int]) -> int:
    """Bytes of a whole record: head, then each buffer padded to 8."""
    size = head_size(len(sizes), hlen)
    for n in sizes:
        size += (n + 7) & ~7
    return size


def pack_head_into(view: Any, off: int, kind: int, tag: int, *, header: Any = b"",
                   sizes: Sequence[int] = ()) -> int:
    """Write prefix, sizes and header at ``view[off:]``; returns the first buffer's offset."""
    nbuf = len(sizes)
    hlen = len(header)
    _PREFIX.pack_into(view, off, kind, nbuf, hlen, tag & 0xFFFFFFFF)
    pos = off + PREFIX_LEN
    if nbuf:
        _sizes(nbuf).pack_into(view, pos, *sizes)
        pos += 8 * nbuf
    view[pos:pos + hlen] = header
    return off + ((PREFIX_LEN + 8 * nbuf + hlen + 7) & ~7)  # head_size, without the call


def head_bytes(kind: int, tag: int, header: Any, sizes: Sequence[int], *,
               extra: bytes = b"") -> bytes:
    """Prefix, sizes, ``extra`` (a pool placement) and header as one bytes object.

    The first frame of a large message; ``extra`` sits between the size table and the
    header and is the caller's to parse (see ``Head.header`` and :func:`parse_head`'s
    ``extra``).
    """
    nbuf = len(sizes)
    parts = [_PREFIX.pack(kind, nbuf, len(header), tag & 0xFFFFFFFF)]
    if nbuf:
        parts.append(_sizes(nbuf).pack(*sizes))
    if extra:
        parts.append(extra)
    parts.append(header)
    return b"".join(parts)


def parse_head(buf: Any, off: int, length: int, *, extra: int = 0) -> Head:
    """Parse a prefix at ``buf[off:off + length]``; ``ProtocolError`` when it does not fit.

    ``extra``: bytes between the size table and the header (a pool placement, see
    :func:`head_bytes`); they start at ``Head.header``'s offset minus ``extra``.  The
    error carries the tag once it is known (``exc.tag``), so a caller can still tell
    which message was lost.
    """
    if length < PREFIX_LEN:
        raise ProtocolError(f"frame of {length} bytes is shorter than a prefix")
    kind, nbuf, hlen, tag = _PREFIX.unpack_from(buf, off)
    try:
        pos = off + PREFIX_LEN
        if nbuf > (length - PREFIX_LEN) // 8:
            raise ProtocolError(f"{nbuf} buffers declared in a {length}-byte frame")
        sizes = _sizes(nbuf).unpack_from(buf, pos) if nbuf else ()
        pos += 8 * nbuf + extra
        if pos + hlen > off + length:
            raise ProtocolError(f"header of {hlen} bytes overruns a {length}-byte frame")
        header = buf[pos:pos + hlen]  # a view when ``buf`` is a memoryview
    except ProtocolError as exc:
        exc.tag = tag
        raise
    return _new_head(Head, (kind, tag, header, sizes, pos + hlen))


def buffer_spans(head: Head, off: int, length: int) -> list[tuple[int, int]]:
    """(offset, size) of each buffer of the record at ``off`` whose head is ``head``.

    ``ProtocolError`` (with the tag) when a buffer overruns the record.
    """
    spans = []
    pos = off + ((head.end - off + 7) & ~7)
    end = off + length
    for n in head.sizes:
        if pos + n > end:
            exc = ProtocolError(f"buffer of {n} bytes overruns a {length}-byte record")
            exc.tag = head.tag
            raise exc
        spans.append((pos, n))
        pos += (n + 7) & ~7
    return spans


def write_record(view: Any, base: int, off: int, kind: int, tag: int, *, header: Any,
                 buffers: Sequence[Any], sizes: Sequence[int]) -> None:
    """A whole record at ``view[off:]``: head, then each buffer as it chooses to be written.

    ``base`` is ``view``'s address; ``sizes`` are the buffers' (the caller has them already,
    to size the record with :func:`record_size`).
    """
    pos = pack_head_into(view, off, kind, tag, header=header, sizes=sizes)
    for b in buffers:
        write_buffer(view, base, pos, b)
        pos += (b.nbytes + 7) & ~7


def write_buffer(view: Any, base: int, off: int, b: Any) -> None:
    """Buffer ``b`` at ``view[off:]`` (``base``: ``view``'s address), written as ``b`` chooses.

    A numpy array is copied by the CPU: a slice assignment when small, ``memcopy`` when
    large (several threads from 4 MiB where this host gains); a :class:`BufferWriter`
    writes itself into a ``uint8`` array over the destination.  Ring records and pool
    slots are written with this one function.
    """
    nb = b.nbytes
    if not nb:
        return
    if type(b) is _NDARRAY:
        if nb >= _MEMMOVE_MIN:
            copy_bytes(base + off, b.ctypes.data, nb)
        else:
            view[off:off + nb] = b
    else:
        b.write_into(np.frombuffer(view, np.uint8, nb, off))


def parse_record(view: Any, off: int, length: int) -> tuple[Head, list[np.ndarray]]:
    """The head of the record at ``view[off:off + length]`` and its buffers.

    The buffers are ``uint8`` arrays over ``view`` (no copy).  ``ProtocolError`` (with the
    tag once known) when the head or a buffer does not fit the record.  The ring's hot path:
    :func:`parse_head` and :func:`buffer_spans` in one call.
    """
    if length < PREFIX_LEN:
        raise ProtocolError(f"frame of {length} bytes is shorter than a prefix")
    kind, nbuf, hlen, tag = _PREFIX.unpack_from(view, off)
    pos = off + PREFIX_LEN
    end = off + length
    if not nbuf and pos + hlen <= end:
        return _new_head(Head, (kind, tag, view[pos:pos + hlen], (), pos + hlen)), []
    head = parse_head(view, off, length)
    return head, [np.frombuffer(view, np.uint8, n, p)
                  for p, n in buffer_spans(head, off, length)]


def as_host(b: Any) -> np.ndarray:
    """Buffer ``b`` as a host ``uint8`` numpy array (a :class:`BufferWriter` copies itself out)."""
    return b if type(b) is _NDARRAY else b.host()
