"""ShmRing: a single-producer single-consumer ring of variable-size records.

Layout of the segment (all integers little-endian, native order)::

    offset  size  field            written by
    ------  ----  ---------------  ----------
         0     8  magic            creator     b"RTRING01"
         8     8  capacity C       creator     bytes in the data area (multiple of 8)
        64     8  write_pos        writer      total bytes ever published
       128     8  read_pos         reader      total bytes ever consumed
       192     4  reader_sleeping  reader      1 while the reader may block on its doorbell
      1024     8  note_seq         writer      odd while the note below is being written
      1032     4  note_len         writer      bytes of the note, 0: none
      1040   <1K  note             writer      what the writer wants the reader to know
                                               (see :meth:`ShmRing.write_note`)
      4096     C  data             writer

    data area, records back to back at (pos % C), each 8-byte aligned:

    +-----------+--------------------------+-----+-----------+------------ ...
    | u64 len L | payload (L bytes)        | pad | u64 len L | payload
    +-----------+--------------------------+-----+-----------+------------ ...

    A record never wraps: when the tail of the data area is too short the
    writer stores WRAP (2**64-1) as the length and the record starts at 0.
    The writer may also wrap early, when the ring is drained (see HOT_BYTES).
    The WRAP is published on its own, before the record, so the reader can
    pass it and free the tail: any record up to C bytes fits a drained ring.

Why counters, not one flag per fixed-size slot: messages range from a 40-byte
call to just under the threshold (10 MiB by default).  Fixed slots would have
to be threshold-sized, so a ring within the memory budget (2 x threshold per
direction) would hold two messages in flight.  Packing records by their real
size lets thousands of small calls be in flight while any record up to C - 8
bytes still fits.  ``write_pos`` and ``read_pos`` play the role of the written
and read flags: the region [read_pos, write_pos) is full, the rest is free.

States (per byte of the data area)::

    free      read_pos <= pos - C        the writer may fill it
    written   read_pos <= pos < write_pos  the reader may read it
    (a record is "being written" while it lies past write_pos: invisible)

Ordering rule: the writer copies the payload and its length first, then
stores ``write_pos``; the reader loads ``write_pos`` first, then the payload,
and stores ``read_pos`` only after it has copied the payload out.  In CPython
the payload copy (``memmove``/``memoryview`` assignment) and the counter
store are separate C calls the compiler cannot reorder, and x86-64 (TSO)
keeps stores in program order and loads in program order, so the reader
never sees a counter before its payload.  On a weakly ordered CPU (ARM,
POWER) a release fence before the counter store and an acquire fence after
the counter load would be needed; :func:`fence` is where they go.

Sleeping: before blocking, the reader sets ``reader_sleeping``, calls
:func:`fence` (a full barrier: x86 may reorder a store with a later load) and
checks the ring once more; after publishing, the writer calls :func:`fence` and
rings the reader's doorbell only if ``reader_sleeping`` is set.  One of the
two always sees the other's store (Dekker), so a wake-up is never lost and the
fast path makes no system call.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from runtime.errors import ProtocolError, TransportError
from runtime.transport.segment import Segment

__all__ = ["HEADER_SIZE", "HOT_BYTES", "MIN_CAPACITY", "NOTE_MAX", "ShmRing", "fence"]

MAGIC = int.from_bytes(b"RTRING01", "little")
HEADER_SIZE = 4096
MIN_CAPACITY = 64 * 1024
WRAP = 2**64 - 1
# A drained ring whose writer stands past this offset starts its next record at 0 (when it
# fits there): small messages then cycle through a cache-warm region instead of the whole
# data area (20 MiB per direction at the default threshold), and a process maps in only
# this much of it until a large record comes.  In-process 4 KiB ping-pong: ~1 us a message.
HOT_BYTES = 256 * 1024
_OFF_MAGIC, _OFF_CAP, _OFF_WPOS, _OFF_RPOS, _OFF_SLEEP = 0, 8, 64, 128, 192
_OFF_NOTE_SEQ, _OFF_NOTE_LEN, _OFF_NOTE = 1024, 1032, 1040
# The largest note: it ends at byte 2064, inside the header.
NOTE_MAX = 1024
# Reads of a note that keep meeting its writer in mid-write before the reader gives up.
_NOTE_TRIES = 64

_U64 = struct.Struct("<Q")
_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier.

    CPython's lock acquire/release runs a locked read-modify-write on x86
    (sem_wait/sem_post or a pthread mutex), which orders every earlier store
    before every later load.  ~60 ns; no system call when uncontended.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def align8(n: int) -> int:
    return (n + 7) & ~7


class ShmRing:
    """One direction of a channel: the writer's or the reader's view of a ring."""

    def __init__(self, segment: Segment, *, check: bool = True) -> None:
        self.segment = segment
        mm_view = segment.view
        self._u64 = ctypes.c_uint64
        base = segment.address
        self._magic = ctypes.c_uint64.from_address(base + _OFF_MAGIC)
        self._cap = ctypes.c_uint64.from_address(base + _OFF_CAP)
        self._wpos = ctypes.c_uint64.from_address(base + _OFF_WPOS)
        self._rpos = ctypes.c_uint64.from_address(base + _OFF_RPOS)
        self._sleeping = ctypes.c_uint32.from_address(base + _OFF_SLEEP)
        self._note_seq = ctypes.c_uint64.from_address(base + _OFF_NOTE_SEQ)
        self._note_len = ctypes.c_uint32.from_address(base + _OFF_NOTE_LEN)
        if check:
            if self._magic.value != MAGIC:
                raise ProtocolError(f"segment {segment.path} is not a ring (bad magic)")
            cap = self._cap.value
            if cap % 8 or cap + HEADER_SIZE > segment.size or cap < 64:
                raise ProtocolError(f"ring {segment.path} declares a bad capacity {cap}")
        self.capacity = int(self._cap.value)
        self.address = base  # of the segment, which ``view`` starts at
        self.data_address = base + HEADER_SIZE
        self.view = mm_view
        # Local copies of the positions: the writer owns write_pos, the reader read_pos.
        self._w = int(self._wpos.value)
        self._r = int(self._rpos.value)
        self._next_r = self._r
        self._held = False

    # -- construction --------------------------------------------------------
    @classmethod
    def create(cls, shm_dir: str, name: str, capacity: int) -> ShmRing:
        """Create a ring segment with ``capacity`` data bytes (rounded up to 8)."""
        capacity = max(MIN_CAPACITY, align8(capacity))
        return cls._over(Segment.create(shm_dir, name, HEADER_SIZE + capacity), capacity)

    @classmethod
    def create_anonymous(cls, shm_dir: str, capacity: int) -> ShmRing:
        """Like :meth:`create`, on a nameless segment (see ``Segment.create_anonymous``)."""
        capacity = max(MIN_CAPACITY, align8(capacity))
        return cls._over(Segment.create_anonymous(shm_dir, HEADER_SIZE + capacity), capacity)

    @classmethod
    def create_sealed(cls, capacity: int) -> ShmRing:
        """Like :meth:`create_anonymous`, on a sealed memfd (see ``Segment.create_sealed``)."""
        capacity = max(MIN_CAPACITY, align8(capacity))
        return cls._over(Segment.create_sealed(HEADER_SIZE + capacity), capacity)

    @classmethod
    def from_fd(cls, fd: int, *, sealed: bool = False) -> ShmRing:
        """The ring behind a received descriptor (which this closes); ``sealed``: required."""
        return cls._over(Segment.from_fd(fd, sealed=sealed))

    @classmethod
    def attach(cls, path: str) -> ShmRing:
        return cls._over(Segment.attach(path))

    @classmethod
    def _over(cls, seg: Segment, capacity: int | None = None) -> ShmRing:
        """The ring in ``seg``, whose header is written first when ``capacity`` is given.

        A segment that is no ring is closed (and a new one unlinked) before the error rises.
        """
        try:
            if capacity is not None:
                ctypes.c_uint64.from_address(seg.address + _OFF_CAP).value = capacity
                ctypes.c_uint64.from_address(seg.address + _OFF_MAGIC).value = MAGIC
            return cls(seg)
        except BaseException:
            seg.close()
            if capacity is not None:
                seg.unlink()
            raise

    @staticmethod
    def record_size(payload: int) -> int:
        """Bytes a record of ``payload`` bytes occupies in the data area."""
        return 8 + align8(payload)

    @property
    def max_payload(self) -> int:
        return self.capacity - 8

    # -- writer side ---------------------------------------------------------
    def reserve(self, n: int) -> int | None:
        """Space for an ``n``-byte payload: its absolute address, or None if full.

        The caller fills the payload, then calls :meth:`commit`.  A record that
        does not fit in the rest of the data area starts at offset 0: the WRAP
        marker that sends the reader there is *published at once* (if the tail
        is free), so that once the reader has passed it the whole ring is
        available.  Hence any record up to ``capacity`` bytes fits a drained
        ring, wherever the positions stand (without this a record longer than
        half the ring could need ``tail + record > capacity`` bytes and never
        fit).  The same WRAP takes a record to offset 0 early when the ring is
        drained, the writer is past ``HOT_BYTES`` and the record fits before it:
        the traffic of small messages stays in a warm region (see ``HOT_BYTES``).
        After a None the writer must ring a sleeping reader: only the reader
        moving on frees space.
        """
        cap = self.capacity
        if n > cap - 8:
            raise TransportError(f"record of {n} bytes exceeds ring capacity {cap}")
        total = 8 + align8(n)
        pos = self._w
        off = pos % cap
        tail = cap - off
        free = cap - (pos - self._rpos.value)
        if total > tail or (free == cap and off >= HOT_BYTES and total <= off):
            if free < tail:
                return None
            _U64.pack_into(self.view, HEADER_SIZE + off, WRAP)
            pos += tail
            free -= tail
            off = 0
            self._w = pos  # published alone: the reader consumes it by itself
            self._wpos.value = pos
        if free < total:
            return None
        _U64.pack_into(self.view, HEADER_SIZE + off, n)
        self._pending = pos + total
        return self.data_address + off + 8

    def commit(self) -> None:
        """Publish the reserved record (after its payload is written)."""
        self._w = w = self._pending
        self._wpos.value = w

    def reader_sleeping(self) -> bool:
        return bool(self._sleeping.value)

    def write_note(self, note: bytes) -> None:
        """Leave ``note`` (at most :data:`NOTE_MAX` bytes; empty: none) for the reader.

        A note is state, not a message: the reader sees the latest one whenever it looks
        (:meth:`read_note`), and a newer one replaces it.  One thread writes the notes of
        a ring.  A sequence counter, odd while the writer is in the middle, lets the
        reader tell a torn read (a seqlock).  x86 keeps stores in program order, and loads;
        the fences make it hold on a weakly ordered CPU too (notes are rare: ~0.1 us each).
        """
        n = len(note)
        if n > NOTE_MAX:
            raise ValueError(f"a ring note holds at most {NOTE_MAX} bytes, not {n}")
        seq = self._note_seq.value
        self._note_seq.value = seq | 1  # odd: being written
        fence()
        if n:
            self.view[_OFF_NOTE:_OFF_NOTE + n] = note
        self._note_len.value = n
        fence()
        self._note_seq.value = (seq | 1) + 1

    # -- reader side ---------------------------------------------------------
    def read_note(self) -> bytes | None:
        """The writer's latest note (:meth:`write_note`); None when there is none.

        Also None when the writer keeps writing notes faster than this can read one, or
        claims a length past :data:`NOTE_MAX`: a note is advice, never worth a wait or a
        read outside the header.
        """
        for _ in range(_NOTE_TRIES):
            seq = self._note_seq.value
            if seq & 1:
                continue
            fence()
            n = self._note_len.value
            note = bytes(self.view[_OFF_NOTE:_OFF_NOTE + n]) if 0 < n <= NOTE_MAX else None
            fence()
            if self._note_seq.value == seq:
                return note
        return None

    def readable(self) -> bool:
        return self._wpos.value != self._r

    def peek(self) -> tuple[int, int] | None:
        """The next record as (absolute address, length), or None if empty.

        The payload stays valid until :meth:`advance`.  A WRAP marker with
        nothing published behind it is consumed here (the writer waits for the
        reader to pass it).  ``ProtocolError`` means the ring itself is corrupt:
        nothing more can be read from it.
        """
        wpos = self._wpos.value
        r = self._r
        if wpos == r:
            return None
        cap = self.capacity
        off = r % cap
        (length,) = _U64.unpack_from(self.view, HEADER_SIZE + off)
        if length == WRAP:
            r += cap - off
            off = 0
            if r == wpos:
                self._r = self._next_r = r
                if not self._held:
                    self._rpos.value = r
                return None
            (length,) = _U64.unpack_from(self.view, HEADER_SIZE)
        nxt = r + 8 + ((length + 7) & ~7)
        if length > cap - off - 8 or nxt > wpos or wpos - r > cap:
            raise ProtocolError(
                f"corrupt ring record at {r}: length {length}, capacity {cap}, "
                f"published up to {wpos}")
        self._next_r = nxt
        return self.data_address + off + 8, length

    def advance(self) -> None:
        """Release the record returned by the last :meth:`peek`.

        While an earlier record is held (:meth:`hold`) its space stays the reader's:
        read_pos moves on at :meth:`release`.
        """
        self._r = self._next_r
        if not self._held:
            self._rpos.value = self._r

    def hold(self) -> None:
        """Consume the last :meth:`peek`'s record but keep its space: it stays valid.

        The reader may go on peeking behind it; the writer cannot reuse it until
        :meth:`release`.  One record is held at a time.
        """
        self._r = self._next_r
        self._held = True

    def release(self) -> None:
        """Give back the space of the held record (and of everything read before it)."""
        self._held = False
        self._rpos.value = self._r

    def set_sleeping(self, flag: bool) -> None:
        self._sleeping.value = 1 if flag else 0

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        # ctypes views point into the mapping: drop them before unmapping.
        for attr in ("_magic", "_cap", "_wpos", "_rpos", "_sleeping", "_note_seq", "_note_len"):
            self.__dict__.pop(attr, None)
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()
