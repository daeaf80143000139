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
    "copy_buffer",
    "head_bytes",
    "head_size",
    "measure",
    "pack_bare_into",
    "pack_head_into",
    "parse_head",
    "parse_record",
    "write_buffer",
    "write_record",
]

KIND_INLINE, KIND_BULK, KIND_CLOSE, KIND_POOL = 0, 1, 2, 3
_PREFIX = struct.Struct("<B3xIII")  # kind, nbuf, header length, tag
PREFIX_LEN = _PREFIX.size  # 16
_MEMMOVE_MIN = 64 * 1024  # below this a memoryview assignment beats a ctypes call
_NDARRAY = np.ndarray
_U8 = np.uint8
_frombuffer = np.frombuffer


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


_HEADS: dict[int, struct.Struct] = {}


def _head_struct(n: int) -> struct.Struct:
    """The struct of a prefix and ``n`` sizes: one ``pack_into`` writes both when sending.

    Counts are the sender's own; cached up to 64 like :func:`_sizes`.
    """
    st = struct.Struct(f"{_PREFIX.format}{n}Q")
    if n <= 64:
        _HEADS[n] = st
    return st


def head_size(nbuf: int, hlen: int) -> int:
    """Bytes of prefix, size table and header: where (8-aligned) the first buffer goes."""
    return (PREFIX_LEN + 8 * nbuf + hlen + 7) & ~7


def measure(header: Any, buffers: Sequence[Any]) -> tuple[list[int], int]:
    """``(sizes, record size)``: what a sender needs to reserve a record.

    The record is the head, then each buffer padded to 8.
    """
    size = (PREFIX_LEN + 8 * len(buffers) + len(header) + 7) & ~7  # head_size, inline
    sizes = []
    for b in buffers:
        n = b.nbytes
        sizes.append(n)
        size += (n + 7) & ~7
    return sizes, size


def pack_head_into(view: Any, off: int, kind: int, tag: int, *, header: Any,
                   sizes: Sequence[int]) -> int:
    """Write prefix, sizes and header at ``view[off:]``; returns the first buffer's offset."""
    nbuf = len(sizes)
    hlen = len(header)
    st = _HEADS.get(nbuf) or _head_struct(nbuf)
    st.pack_into(view, off, kind, nbuf, hlen, tag & 0xFFFFFFFF, *sizes)
    pos = off + st.size
    view[pos:pos + hlen] = header
    return off + ((pos - off + hlen + 7) & ~7)  # head_size, without the call


def pack_bare_into(view: Any, off: int, kind: int, tag: int, header: Any) -> None:
    """A head without buffers at ``view[off:]``: the prefix, then the header.

    :func:`pack_head_into` with no sizes, in one call: most messages (a call, a reply of a
    few numbers) are header only, and this is their hot path.
    """
    hlen = len(header)
    _PREFIX.pack_into(view, off, kind, 0, hlen, tag & 0xFFFFFFFF)
    view[off + PREFIX_LEN:off + PREFIX_LEN + hlen] = header


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


def _prefix(buf: Any, off: int, length: int, extra: int,
            max_nbuf: int | None = None) -> tuple[int, int, tuple, int, int]:
    """``(kind, tag, sizes, header offset, header length)`` of the frame at ``buf[off:]``.

    Every parse goes through here: the prefix, size table and header are checked against
    ``length`` once, in one place; ``max_nbuf``: the most buffers a message may have (None:
    any that fit), checked before the size table is read.
    """
    if length < PREFIX_LEN:
        raise ProtocolError(f"frame of {length} bytes is shorter than a prefix")
    kind, nbuf, hlen, tag = _PREFIX.unpack_from(buf, off)
    pos = off + PREFIX_LEN
    sizes = ()
    try:
        if max_nbuf is not None and nbuf > max_nbuf:
            raise ProtocolError(f"{nbuf} buffers in one message (at most {max_nbuf} from "
                                f"this peer)")
        if nbuf:
            if nbuf > (length - PREFIX_LEN) // 8:
                raise ProtocolError(f"{nbuf} buffers declared in a {length}-byte frame")
            sizes = _sizes(nbuf).unpack_from(buf, pos)
            pos += 8 * nbuf
        pos += extra
        if pos + hlen > off + length:
            raise ProtocolError(f"header of {hlen} bytes overruns a {length}-byte frame")
    except ProtocolError as exc:
        exc.tag = tag
        raise
    return kind, tag, sizes, pos, hlen


def _spans(sizes: Sequence[int], pos: int, end: int, tag: int) -> list[tuple[int, int]]:
    """(offset, size) of each buffer from ``pos`` (8-aligned, each padded to 8) to ``end``."""
    spans = []
    for n in sizes:
        if pos + n > end:
            exc = ProtocolError(f"buffer of {n} bytes overruns a {end - pos}-byte rest of a record")
            exc.tag = tag
            raise exc
        spans.append((pos, n))
        pos += (n + 7) & ~7
    return spans


def parse_head(buf: Any, off: int, length: int, *, extra: int = 0,
               max_nbuf: int | None = None) -> Head:
    """Parse a prefix at ``buf[off:off + length]``; ``ProtocolError`` when it does not fit.

    ``extra``: bytes between the size table and the header (a pool placement, see
    :func:`head_bytes`); they start at ``Head.header``'s offset minus ``extra``.  The
    error carries the tag once it is known (``exc.tag``), so a caller can still tell
    which message was lost.  ``max_nbuf``: see :func:`_prefix`.
    """
    kind, tag, sizes, pos, hlen = _prefix(buf, off, length, extra, max_nbuf)
    header = buf[pos:pos + hlen]  # a view when ``buf`` is a memoryview
    return _new_head(Head, (kind, tag, header, sizes, pos + hlen))


def buffer_spans(head: Head, off: int, length: int) -> list[tuple[int, int]]:
    """(offset, size) of each buffer of the record at ``off`` whose head is ``head``.

    ``ProtocolError`` (with the tag) when a buffer overruns the record.
    """
    return _spans(head.sizes, off + ((head.end - off + 7) & ~7), off + length, head.tag)


def write_record(view: Any, base: int, off: int, kind: int, tag: int, *, header: Any,
                 buffers: Sequence[Any], sizes: Sequence[int]) -> None:
    """A whole record at ``view[off:]``: head, then each buffer as it chooses to be written.

    ``base`` is ``view``'s address; ``sizes`` are the buffers' (the caller has them already,
    to size the record with :func:`measure`).
    """
    pos = pack_head_into(view, off, kind, tag, header=header, sizes=sizes)
    for b, n in zip(buffers, sizes, strict=True):
        write_buffer(view, base, pos, b)
        pos += (n + 7) & ~7


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


def parse_record(view: Any, off: int, length: int, *, copy: bool = False,
                 max_nbuf: int | None = None) -> tuple[int, int, bytes, list[np.ndarray], int]:
    """``(kind, tag, header, buffers, nbytes)`` of the record at ``view[off:off + length]``.

    The ring's hot path.  ``header`` is a copy (the codec would make one anyway); the
    buffers are ``uint8`` arrays over ``view`` (no copy), or private copies with ``copy``
    (see :func:`copy_buffer`).  ``nbytes``: header and buffers.  Only an INLINE record's
    header and buffers are parsed: any other kind (BULK, CLOSE, ...) says all it has to
    say in its kind and tag, and comes back with ``b""`` and no buffers.
    ``ProtocolError`` (with the tag once known) when the head or a buffer does not fit, or
    when there are more than ``max_nbuf`` buffers.
    """
    if length < PREFIX_LEN:
        raise ProtocolError(f"frame of {length} bytes is shorter than a prefix")
    kind, nbuf, hlen, tag = _PREFIX.unpack_from(view, off)
    if kind != KIND_INLINE:
        return kind, tag, b"", [], 0
    if not nbuf and hlen <= length - PREFIX_LEN:  # header only: no table to check
        pos = off + PREFIX_LEN
        return kind, tag, view[pos:pos + hlen].tobytes(), [], hlen
    _, _, sizes, pos, hlen = _prefix(view, off, length, 0, max_nbuf)
    header = view[pos:pos + hlen].tobytes()
    bufs = []
    for p, n in _spans(sizes, off + ((pos + hlen - off + 7) & ~7), off + length, tag):
        b = _frombuffer(view, _U8, n, p)
        if copy:
            b = copy_buffer(b)
        bufs.append(b)
    return kind, tag, header, bufs, hlen + sum(sizes)


def copy_buffer(b: np.ndarray) -> np.ndarray:
    """A private copy of buffer ``b`` (1-D ``uint8``).

    One numpy call when small; ``memcopy.copy_bytes`` when large (``memmove``, which
    releases the GIL, on several threads from 4 MiB where this host gains from it).
    """
    nb = b.nbytes
    if nb < _MEMMOVE_MIN:
        return b.copy()
    c = np.empty(nb, np.uint8)
    copy_bytes(c.ctypes.data, b.ctypes.data, nb)
    return c


def as_host(b: Any) -> np.ndarray:
    """Buffer ``b`` as a host ``uint8`` numpy array (a :class:`BufferWriter` copies itself out)."""
    return b if type(b) is _NDARRAY else b.host()
