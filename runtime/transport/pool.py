"""Pool: reusable shared-memory slots that carry the buffers of large messages.

A message at or above the threshold travels on ZeroMQ (``channel.py``).
Between processes of one host its buffers (tensor and array bytes) need not
cross the socket: the sender copies them once into a *slot* of its pool and
ZeroMQ carries only the header and where the buffers lie; the receiver reads
them in place.  Slots are reused, so after the first message of a size no
message pays for page faults.

Each channel direction has its own pool, owned by the sender.  A slot is one
nameless segment (``Segment.create_anonymous``); its descriptor goes to the
receiver over the channel's private Unix socket pair (``SCM_RIGHTS``), before
the first ZeroMQ message that names the slot, and the sender then closes its
copy: a slot lives exactly as long as the two mappings, so no crash of either
side leaks it.

Slot layout (one segment)::

    offset  size  field      written by
    ------  ----  ---------  ----------------------------------------------
         0     8  magic      sender    b"RTPOOL01"
         8     8  capacity   sender    bytes in the data area
        16     4  state      both      FREE 0 / BUSY 1 (see below)
      4096     C  data       sender    the buffers of one message, each at a
                                       64-byte aligned offset (page-aligned start)

Slot states and who moves them::

    FREE --(sender: picks the slot for a message, before writing it)--> BUSY
    BUSY --(receiver: its lease on the slot has ended)-----------------> FREE
    BUSY --(sender: the message was never sent, e.g. a timeout)--------> FREE

The release rule.  A receiver that reads in place wraps the slot's bytes in a
*lease*: one ``uint8`` numpy array over the mapping, of which every decoded
tensor and array is a view (numpy keeps a view's ``base`` pointing at the
lease, and ``torch.from_numpy`` keeps its array).  A ``weakref.finalize`` on
the lease stores FREE in the slot's state word once the last of them is gone;
until then the slot stays BUSY and the sender never writes into it: it takes
another FREE slot, creates one (up to ``max_bytes`` and ``max_slots``, first
dropping FREE slots that are in the way), and otherwise sends the buffers as
plain ZeroMQ frames.  So a tensor the receiver keeps stays valid and
unchanged, and a receiver that never frees a slot only makes its sender fall
back.  The finalizer holds its own export of the mapping, so closing the
channel unmaps the slot only once the last lease is gone; it frees the slot
only in the process that took the lease (a forked child's copies do not).
A fork pins the slots of the leases live then until the child is gone
(``_pin_before_fork``): a slot is shared memory, no snapshot, and the parent
would reuse it once it let go.
A receiver that cannot map slots closes its end of the socket pair: the
sender's next announcement fails and it sends frames from then on.

Ordering: the sender loads FREE, stores BUSY, then writes the data and sends
the ZeroMQ message (a system call); the receiver reads the data and stores
FREE only after its last use.  x86-64 keeps a store after earlier loads and
stores, so the sender never overwrites bytes still being read; a weakly
ordered CPU would need a release fence before the FREE store.

Untrusted senders.  A receiver in safe mode (its peer is not trusted) never
reads in place: the peer could change the bytes after they were checked.  It
copies the slot out into private memory and frees it at once.  Everything the
sender says is checked: a slot's descriptor must be a regular file on the
receiver's own ``shm_dir`` filesystem -- or, on a *sealed* channel (one whose
peer is untrusted, see ``Channel.create``), a memfd sealed against resizing,
since a peer that truncated a slot under the receiver's mapping would kill it
with SIGBUS -- of the announced size, with the magic; a slot id must be
known, and offset and sizes must lie inside the mapping (``ProtocolError``
otherwise, for that message only).  A receiver maps at most
:data:`MAX_PEER_SLOTS` slots of a peer, of at most the channel's ``pool_bytes`` in all.

Control messages on the socket pair (``SOCK_SEQPACKET``, 16 bytes each):
``ADD slot capacity`` with the slot's descriptor, ``DROP slot`` when the
sender unmapped a FREE slot to make room.  The receiver reads them only when
a message names a slot it does not know (ADDs and DROPs always precede such a
message), so the fast path makes no system call.
"""

from __future__ import annotations

import array
import ctypes
import errno
import itertools
import logging
import mmap
import os
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np

from runtime.errors import ProtocolError, TransportError
from runtime.transport import hostmem, memcopy
from runtime.transport.segment import Segment, is_sealed

__all__ = ["BUSY", "FREE", "HEADER_SIZE", "PLACE", "RxPool", "TxPool", "layout", "release_pinned",
           "slot_size"]

log = logging.getLogger(__name__)

MAGIC = b"RTPOOL01"
HEADER_SIZE = 4096
_OFF_MAGIC, _OFF_CAP, _OFF_STATE = 0, 8, 16
FREE, BUSY = 0, 1
ALIGN = 64
MIN_SLOT = 1 << 20
MAX_PEER_SLOTS = 32  # slots of one peer a receiver maps at most
POLL_MAX = 1024  # control messages read per poll (an honest backlog is a few hundred at most)
RETRY_S = 1.0  # after a slot could not be made (shm_dir full), try again this much later
OP_ADD, OP_DROP = 1, 2
_OP = struct.Struct("<IIQ")  # op, slot id, capacity
PLACE = struct.Struct("<IIQ")
"""Where a message's buffers lie: slot id, zero, offset of buffer 0 in the data area."""
_CMSG_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)

_warned_full = False


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``sizes`` in a slot (each 64-byte aligned) and the span."""
    offsets = []
    pos = 0
    for n in sizes:
        offsets.append(pos)
        pos = (pos + n + ALIGN - 1) & ~(ALIGN - 1)
    return offsets, pos


def slot_size(need: int) -> int:
    """Data bytes of a new slot for ``need``: the next 2**k or 1.5 * 2**k, at least 1 MiB.

    Sizes from a small set are reused across messages of slightly different
    sizes; at most a third of a slot is wasted.
    """
    need = max(need, MIN_SLOT)
    p = 1 << (need - 1).bit_length()
    three_quarters = p // 4 * 3
    return three_quarters if three_quarters >= need else p


class TxSlot:
    """The sender's view of one slot."""

    __slots__ = ("capacity", "data_address", "id", "segment", "state", "uses")

    def __init__(self, slot_id: int, segment: Segment, capacity: int) -> None:
        self.id = slot_id
        self.segment = segment
        self.capacity = capacity
        self.data_address = segment.address + HEADER_SIZE
        self.state = ctypes.c_uint32.from_address(segment.address + _OFF_STATE)
        self.uses = 0

    def is_free(self) -> bool:
        return self.state.value == FREE

    def release(self) -> None:
        """Back to FREE: the message written into it was never sent."""
        self.state.value = FREE

    def close(self) -> None:
        self.state = None  # a pointer into the mapping: drop it before unmapping
        self.segment.close()


class TxPool:
    """The sender's slots for one direction of a channel."""

    def __init__(self, sock: socket.socket, shm_dir: str, *, max_bytes: int,
                 max_slots: int, sealed: bool = False) -> None:
        self.sock = sock
        self.shm_dir = shm_dir
        self.sealed = sealed  # slots are sealed memfds (a channel with an untrusted peer)
        self.max_bytes = max_bytes
        self.max_slots = max_slots
        self.slots: list[TxSlot] = []
        self.bytes = 0
        self._next_id = 1
        self._retry_at = 0.0
        self.peer_gone = False  # the peer closed its end: it takes no slots
        # statistics
        self.created = self.dropped = self.fallbacks = 0

    def acquire(self, need: int) -> TxSlot | None:
        """A slot of at least ``need`` bytes, now BUSY; None means: send plain frames."""
        best = None
        for s in self.slots:
            if s.capacity >= need and s.is_free() and (best is None
                                                       or s.capacity < best.capacity):
                best = s
        if best is None:
            best = self._grow(need)
            if best is None:
                self.fallbacks += 1
                return None
        best.state.value = BUSY
        best.uses += 1
        return best

    def _grow(self, need: int) -> TxSlot | None:
        size = slot_size(need)
        if size > self.max_bytes or self.peer_gone or time.monotonic() < self._retry_at:
            return None
        while len(self.slots) >= self.max_slots or self.bytes + size > self.max_bytes:
            free = [s for s in self.slots if s.is_free()]
            if not free:
                return None  # the receiver still holds every slot
            self._drop(min(free, key=lambda s: s.capacity))
        try:
            seg = (Segment.create_sealed(HEADER_SIZE + size) if self.sealed
                   else Segment.create_anonymous(self.shm_dir, HEADER_SIZE + size))
        except TransportError as exc:
            self._retry_at = time.monotonic() + RETRY_S
            _warn_full(exc)
            return None
        try:
            base = seg.address
            ctypes.memmove(base + _OFF_MAGIC, MAGIC, len(MAGIC))
            ctypes.c_uint64.from_address(base + _OFF_CAP).value = size
            ctypes.c_uint32.from_address(base + _OFF_STATE).value = FREE
            slot_id = self._next_id
            socket.send_fds(self.sock, [_OP.pack(OP_ADD, slot_id, size)], [seg.fd],
                            socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError as exc:  # the peer's queue is full, or it closed its end
            seg.close()
            self._retry_at = time.monotonic() + RETRY_S
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED):
                self.peer_gone = True  # it cannot map slots: frames from now on
            log.debug("cannot hand a pool slot to the peer: %s", exc)
            return None
        except BaseException:
            seg.close()
            raise
        seg.release_fd()  # the peer has it now; the slot lives as long as the mappings
        self._next_id += 1
        slot = TxSlot(slot_id, seg, size)
        self.slots.append(slot)
        self.bytes += size
        self.created += 1
        return slot

    def _drop(self, slot: TxSlot) -> None:
        self.slots.remove(slot)
        self.bytes -= slot.capacity
        self.dropped += 1
        try:
            self.sock.send(_OP.pack(OP_DROP, slot.id, 0), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass  # the peer keeps a stale mapping until its channel closes
        slot.close()

    def stats(self) -> dict[str, int]:
        return {"slots": len(self.slots), "slot_bytes": self.bytes, "created": self.created,
                "dropped": self.dropped, "fallbacks": self.fallbacks}

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots = []
        self.bytes = 0


class _RxSlot:
    """The receiver's mapping of one of the peer's slots."""

    __slots__ = ("_anchor", "address", "capacity", "mm", "state")

    def __init__(self, mm: mmap.mmap, capacity: int) -> None:
        self.mm = mm
        self.capacity = capacity
        # Exports of the mapping (not bare addresses): the mapping cannot go
        # while they live, and each lease's finalizer holds ``state``.
        self._anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(self._anchor)
        self.state = ctypes.c_uint32.from_buffer(mm, _OFF_STATE)
        hostmem.mapped(self.address, len(mm))

    def close(self) -> None:
        """Unmap now, or -- while leases hold it -- once the last lease is gone."""
        if self._anchor is not None:
            hostmem.unmapping(self.address)
        self._anchor = self.state = None
        try:
            self.mm.close()
        except BufferError:
            pass  # exported by live leases: unmapped when they are collected


class _Lease:
    """One in-place lease of this process: its slot's state word and who still needs it."""

    __slots__ = ("done", "pins", "state")

    def __init__(self, state: ctypes.c_uint32) -> None:
        self.state = state
        self.done = False  # this process let go of it
        self.pins = 0  # forked children (groups) that may still read it


_leases: dict[int, _Lease] = {}  # this process's in-place leases, live or pinned
_lease_ids = itertools.count()
_groups: list[tuple[int, list[int]]] = []  # (read end of a fork's pipe, the leases it pins)
_forking: dict[int, tuple[int, int, list[int]]] = {}  # thread -> its fork under way
_let_go: list[tuple[ctypes.c_uint32, int]] = []  # leases let go, not yet settled
# Guards the four above (``_groups`` takes atomic appends without it) and every lease's
# ``pins``/``done``.  Never waited for by a finalizer (GC runs them on any thread, inside
# any lock: logging's, the import lock -- a finalizer that waited deadlocked against a fork
# holding this lock, a review found), nor by a receive, and never held across a fork.
_pin_lock = threading.RLock()


def _set_free(state: ctypes.c_uint32, pid: int, key: int) -> None:
    # Only in the process that took the lease: a forked child holds copies of
    # the parent's tensors, and its dropping them must not free the parent's slot.
    if os.getpid() != pid:
        return
    _let_go.append((state, key))
    if _pin_lock.acquire(blocking=False):
        _unlock()
    # else: the holder settles it before it lets go (_unlock)


def _unlock() -> None:
    """Settle the leases let go meanwhile, then release ``_pin_lock`` (held once)."""
    while True:
        pinned = False
        while _let_go:
            state, key = _let_go.pop()
            lease = _leases.get(key)
            if lease is not None and lease.pins:
                lease.done = True  # a forked child may still read it: freed once none can
                pinned = True
            else:
                _leases.pop(key, None)
                state.value = FREE
        if pinned:
            _release_pinned_locked()  # unless its children are all gone already
        _pin_lock.release()
        if not _let_go or not _pin_lock.acquire(blocking=False):
            return


def _pin_before_fork() -> None:
    """A forked child's tensors read in place stay what they were: their slots are pinned.

    A slot is ``MAP_SHARED``, so a child's copy of a tensor read in place is no snapshot:
    once the parent let go, the slot was FREE, the peer's next message reused it and the
    child's tensor changed under it (a fault-injection review).  So a fork pins the slots
    of the leases live at that moment until the parent has let go of each *and* the child
    is gone -- the child and whatever it forks in turn hold the write end of a pipe
    (close-on-exec: a child that ``exec``s lets go at once), and its end of file is the
    release (:func:`release_pinned`: at each fork, each lease let go, each receive from
    ZeroMQ or a pool slot, each pool closed).  Costs nothing at the fork; meanwhile the
    sender uses other slots, or frames.  Each forking thread has its own pipe; a child
    forked by another thread meanwhile inherits it too, which only pins longer.  Reviews
    rejected two alternatives -- pinned for good (after eight forks every large reply went
    by frames), a copy made in the child (it raced the parent's reuse of the slot, and
    every child committed the leased bytes again) -- and then holes in this one (see
    docs/design.md).  Never raises.
    """
    try:
        # Held only briefly; but a GC pass in its holder may run any finalizer, which may
        # wait for a lock this forking thread holds: past a second, this fork pins nothing.
        if not _pin_lock.acquire(timeout=1.0):
            return
        try:
            _release_pinned_locked()  # children gone: their pipes go before a new one
            keys = [k for k, lease in list(_leases.items()) if not lease.done]
            if keys:
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                for k in keys:
                    _leases[k].pins += 1
                _forking[threading.get_ident()] = (r, w, keys)
        finally:
            _unlock()
    except Exception:  # noqa: BLE001 - a fork hook must not raise; the lease stays shared
        pass


def _pinned_after_fork_in_parent() -> None:
    entry = _forking.pop(threading.get_ident(), None)
    if entry is not None:
        r, w, keys = entry
        _close(w)
        _groups.append((r, keys))  # one atomic append: no lock to wait for after a fork


def _pinned_after_fork_in_child() -> None:
    global _pin_lock
    _pin_lock = threading.RLock()  # the parent's may be held, by a thread that is not here
    me = threading.get_ident()
    for tid, (r, w, _keys) in list(_forking.items()):
        _close(r)
        if tid != me:
            _close(w)  # another thread's fork under way: not this child's to hold
    _forking.clear()  # this thread's write end stays open: this process's life pins them
    for r, _keys in _groups:
        _close(r)
    _groups.clear()
    _leases.clear()  # the child's finalizers never free (see _set_free)
    _let_go.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def release_pinned() -> None:
    """Free the slots whose forked children are all gone and whose lease was let go."""
    if (_groups or _let_go) and _pin_lock.acquire(blocking=False):  # busy: its holder does
        try:
            _release_pinned_locked()
        finally:
            _unlock()


def _release_pinned_locked() -> None:
    for group in list(_groups):
        r, keys = group
        try:
            if os.read(r, 1):
                continue  # nobody writes to it; a byte would be odd, not an end of file
        except BlockingIOError:
            continue  # a child still holds the write end
        except OSError:
            pass
        _groups.remove(group)
        _close(r)
        for k in keys:
            lease = _leases.get(k)
            if lease is None:
                continue
            lease.pins -= 1
            if not lease.pins and lease.done:
                _leases.pop(k, None)
                lease.state.value = FREE


os.register_at_fork(before=_pin_before_fork, after_in_parent=_pinned_after_fork_in_parent,
                    after_in_child=_pinned_after_fork_in_child)


class RxPool:
    """The receiver's mappings of the peer's slots for one direction of a channel."""

    def __init__(self, sock: socket.socket, shm_dir: str, *, sealed: bool = False,
                 max_bytes: int | None = None) -> None:
        self.sock = sock
        self.dev = os.stat(shm_dir).st_dev
        self.sealed = sealed  # the peer's slots must be sealed memfds, not shm_dir files
        # The peer's cap (the channel's pool_bytes), which an honest sender keeps to: the
        # slots it has announced and not dropped never add up to more.  A hostile one could
        # announce sparse slots of any size and have our copies fill them on our account.
        self.max_bytes = max_bytes
        self.slots: dict[int, _RxSlot] = {}
        self.refused: str | None = None
        self.received = 0

    def buffers(self, slot_id: int, offset: int, sizes: Sequence[int], *,
                copy: bool) -> tuple[list[np.ndarray], weakref.finalize | None]:
        """The buffers a message places at ``offset`` of slot ``slot_id``.

        In place (``copy=False``): views of one lease over the mapping, and its
        finalizer (call it to free the slot at once, e.g. when decoding fails).
        With ``copy=True``: views of a private copy; the slot is already FREE.
        """
        release_pinned()  # slots a fork pinned whose children are gone
        slot = self.slots.get(slot_id)
        if slot is None:
            self.poll()
            slot = self.slots.get(slot_id)
            if slot is None:
                why = f" (refused: {self.refused})" if self.refused else ""
                raise ProtocolError(f"message in unknown pool slot {slot_id}{why}")
        if slot.state is None:
            raise ProtocolError(f"message in closed pool slot {slot_id}")
        offsets, span = layout(sizes)
        if offset % ALIGN or offset > slot.capacity or span > slot.capacity - offset:
            raise ProtocolError(f"buffers of {span} bytes at offset {offset} overrun pool slot "
                                f"{slot_id} of {slot.capacity} bytes")
        self.received += 1
        start = HEADER_SIZE + offset
        if copy:
            data = np.empty(span, np.uint8)
            if span:
                memcopy.copy_bytes(data.ctypes.data, slot.address + start, span)
            slot.state.value = FREE
            fin = None
        else:
            data = np.frombuffer(slot.mm, np.uint8, span, start)
            key = next(_lease_ids)
            fin = weakref.finalize(data, _set_free, slot.state, os.getpid(), key)
            fin.atexit = False
            _leases[key] = _Lease(slot.state)
        return [data[o:o + n] for o, n in zip(offsets, sizes, strict=True)], fin

    def poll(self) -> None:
        """Read the peer's ADD and DROP messages waiting on the socket, up to POLL_MAX.

        Bounded: a peer that keeps the socket full of control messages would otherwise hold
        the receiver in here past every deadline.  An honest peer's backlog is bounded by
        the socket's buffer (a few hundred small datagrams), far below the cap.
        """
        for _ in range(POLL_MAX):
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    64, _CMSG_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.refused = f"pool socket: {exc}"
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if not data and not fds:
                return  # the peer closed its end
            try:
                self._control(data, fds, flags)
            except ProtocolError as exc:
                if self.refused is None:  # once per pool: a flood must not flood the log
                    log.warning("refused a pool message from the peer: %s (later refusals "
                                "of this pool are not logged)", exc)
                self.refused = str(exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _control(self, data: bytes, fds: list[int], flags: int) -> None:
        if len(data) != _OP.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(f"malformed pool control message ({len(data)} bytes)")
        op, slot_id, capacity = _OP.unpack(data)
        if op == OP_DROP:
            if fds:
                raise ProtocolError("descriptors came with a DROP")
            slot = self.slots.pop(slot_id, None)
            if slot is not None:
                slot.close()
            return
        if op != OP_ADD or len(fds) != 1:
            raise ProtocolError(f"pool control op {op} with {len(fds)} descriptors")
        if slot_id in self.slots:
            raise ProtocolError(f"pool slot {slot_id} announced twice")
        if len(self.slots) >= MAX_PEER_SLOTS:
            raise ProtocolError(f"more than {MAX_PEER_SLOTS} pool slots")
        if self.max_bytes is not None and (
                capacity + sum(s.capacity for s in self.slots.values()) > self.max_bytes):
            raise ProtocolError(f"pool slots over the channel's cap of {self.max_bytes} bytes")
        fd = fds.pop()
        try:
            # Seals first: a size read before them could change before they were added.
            if self.sealed and not is_sealed(fd):
                raise ProtocolError("a pool slot not sealed against resizing")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError("a pool slot that is not a regular file")
            if not self.sealed and st.st_dev != self.dev:
                raise ProtocolError("a pool slot that is not a file in this shm_dir")
            if capacity <= 0 or st.st_size != HEADER_SIZE + capacity:
                raise ProtocolError(f"pool slot of {st.st_size} bytes announced as "
                                    f"{capacity} + {HEADER_SIZE}")
            try:
                mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"cannot map a pool slot: {exc}") from exc
        finally:
            os.close(fd)
        if mm[:len(MAGIC)] != MAGIC:
            mm.close()
            raise ProtocolError("a pool slot without the magic")
        self.slots[slot_id] = _RxSlot(mm, capacity)

    def stats(self) -> dict[str, int]:
        return {"peer_slots": len(self.slots), "received": self.received}

    def close(self) -> None:
        release_pinned()  # a slot a fork pinned keeps its mapping until then
        for slot in self.slots.values():
            slot.close()
        self.slots = {}


def _warn_full(exc: TransportError) -> None:
    global _warned_full
    if not _warned_full:
        _warned_full = True
        log.warning("no room for a pool slot (%s); large messages go as ZeroMQ frames "
                    "until there is", exc)
