"""Framing (``transport/framing.py``): the one writer and parser of prefix, sizes and kinds."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from runtime.errors import ProtocolError
from runtime.transport import framing


def _record(header: bytes, bufs: list, tag: int = 7) -> bytearray:
    sizes, size = framing.measure(header, bufs)
    out = bytearray(size)
    addr = np.frombuffer(out, np.uint8).ctypes.data
    framing.write_record(memoryview(out), addr, 0, framing.KIND_INLINE, tag, header=header,
                         buffers=bufs, sizes=sizes)
    return out


def test_a_record_parses_back_to_its_header_and_buffers():
    bufs = [np.arange(n, dtype=np.uint8) for n in (0, 1, 9, 70_000)]  # memmove above 64 KiB
    rec = _record(b"hdr!", bufs, tag=0xFFFF_FFFF + 3)  # tags are 32-bit
    head = framing.parse_head(rec, 0, len(rec))
    assert (head.kind, head.tag, bytes(head.header), head.sizes) == (
        framing.KIND_INLINE, 2, b"hdr!", (0, 1, 9, 70_000))
    spans = framing.buffer_spans(head, 0, len(rec))
    assert all(off % 8 == 0 for off, _ in spans)
    for (off, n), b in zip(spans, bufs, strict=True):
        assert bytes(rec[off:off + n]) == b.tobytes()


def test_the_layout_is_the_documented_one():
    rec = _record(b"H", [np.full(3, 5, np.uint8)], tag=9)
    assert struct.unpack_from("<B3xIII", rec, 0) == (framing.KIND_INLINE, 1, 1, 9)
    assert struct.unpack_from("<Q", rec, 16) == (3,)
    assert rec[24:25] == b"H" and rec[32:35] == b"\x05\x05\x05"
    assert len(rec) == 40


def test_head_bytes_carries_extra_bytes_between_sizes_and_header():
    frame = framing.head_bytes(framing.KIND_POOL, 4, b"codec", [10, 20], extra=b"PLACE123")
    head = framing.parse_head(frame, 0, len(frame), extra=8)
    assert head.kind == framing.KIND_POOL and head.sizes == (10, 20)
    assert bytes(head.header) == b"codec" and head.end == len(frame)
    assert frame[head.end - 5 - 8:head.end - 5] == b"PLACE123"


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda r: r[:10], "shorter than a prefix"),
    (lambda r: r[:4] + struct.pack("<I", 1 << 30) + r[8:], "buffers declared"),
    (lambda r: r[:8] + struct.pack("<I", 1 << 20) + r[12:], "overruns"),
])
def test_a_malformed_head_is_a_protocol_error_with_its_tag(mutate, words):
    rec = bytes(mutate(bytes(_record(b"hdr", [np.ones(4, np.uint8)], tag=42))))
    with pytest.raises(ProtocolError, match=words) as info:
        framing.parse_head(rec, 0, len(rec))
    if len(rec) >= framing.PREFIX_LEN:
        assert info.value.tag == 42


def test_a_buffer_overrunning_its_record_is_refused_with_its_tag():
    rec = _record(b"hdr", [np.ones(16, np.uint8)], tag=5)
    head = framing.parse_head(rec, 0, len(rec) - 8)
    with pytest.raises(ProtocolError, match="overruns") as info:
        framing.buffer_spans(head, 0, len(rec) - 8)
    assert info.value.tag == 5


class _Writer:
    """A BufferWriter: records where it was asked to write."""

    def __init__(self, data: bytes) -> None:
        self.data = np.frombuffer(data, np.uint8)
        self.nbytes = len(data)
        self.dst: list[int] = []

    def write_into(self, dst: np.ndarray) -> None:
        assert dst.dtype == np.uint8 and dst.nbytes == self.nbytes
        self.dst.append(dst.ctypes.data)
        dst[:] = self.data

    def host(self) -> np.ndarray:
        return self.data


def test_a_buffer_writer_writes_itself_straight_into_the_record():
    w = _Writer(b"device bytes")
    assert isinstance(w, framing.BufferWriter)
    rec = _record(b"h", [np.ones(3, np.uint8), w])
    head = framing.parse_head(rec, 0, len(rec))
    off, n = framing.buffer_spans(head, 0, len(rec))[1]
    assert w.dst == [np.frombuffer(rec, np.uint8).ctypes.data + off]
    assert bytes(rec[off:off + n]) == b"device bytes"
    assert framing.as_host(w) is w.data


def test_parse_record_gives_views_or_copies_and_the_payload_size():
    bufs = [np.arange(n, dtype=np.uint8) for n in (5, 70_000)]  # small and memcopy-sized
    rec = _record(b"head", bufs, tag=9)
    sizes, size = framing.measure(b"head", bufs)
    assert (sizes, size) == ([5, 70_000], len(rec))
    base = np.frombuffer(rec, np.uint8).ctypes.data
    for copy in (False, True):
        kind, tag, header, got, nbytes = framing.parse_record(memoryview(rec), 0, len(rec),
                                                              copy=copy)
        assert (kind, tag, header, nbytes) == (framing.KIND_INLINE, 9, b"head", 70_009)
        assert type(header) is bytes
        inside = [base <= g.ctypes.data < base + len(rec) for g in got]
        assert inside == [not copy] * 2
        assert all(np.array_equal(g, b) for g, b in zip(got, bufs, strict=True))


def test_parse_record_of_a_marker_reads_only_its_kind_and_tag():
    rec = bytearray(framing.PREFIX_LEN)
    framing.pack_bare_into(rec, 0, framing.KIND_BULK, 4, b"")
    assert framing.parse_record(rec, 0, len(rec)) == (framing.KIND_BULK, 4, b"", [], 0)
    rec = memoryview(bytearray(framing.PREFIX_LEN + 8))  # parse_record reads memoryviews
    framing.pack_bare_into(rec, 0, framing.KIND_INLINE, 6, b"abc")
    assert framing.parse_record(rec, 0, len(rec)) == (framing.KIND_INLINE, 6, b"abc", [], 3)
    with pytest.raises(ProtocolError):
        framing.parse_record(rec, 0, framing.PREFIX_LEN + 2)  # the header overruns
