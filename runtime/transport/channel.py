"""Channel: ordered, size-routed messages between one caller and one callee.

A channel is one ring per direction plus one ZeroMQ PAIR link.  Every message
passes through the ring *in order*; a message whose encoded size is at or
above ``threshold`` (or whose framing would not fit a ring record) leaves only
a small BULK marker in the ring and travels on the ZeroMQ link, so the two
routes can never reorder (the trick of vLLM's ``MessageQueue``).

The channel moves *frames*: a header (the codec's bytes, opaque here) and out-of-band
buffers.  It neither encodes nor decodes -- the codec sits above it (``runtime/messages.py``)
-- and it neither writes nor parses a prefix or size table itself: ``framing.py`` does,
for ring records, ZeroMQ frames and the constructor memfd alike.  Whoever made a buffer
chooses how it is written (``framing.write_record``: a CPU copy, or a device-to-host copy
straight into the record).

A received ring record can be *lent*: its buffers are views of the ring (:class:`Received`,
``borrowed=True``; the header is copied, as the codec would), valid until
:meth:`Channel.release` or the next receive -- what an actor that asked for it uses in
place until its method returns.  Any other receiver asks for no loan (``lend=False``): the
buffers are copied out as the record is parsed, and it goes back at once.

A BULK message on ZeroMQ is ``[secret+prefix+codec header, buffer 0, buffer 1, ...]``,
where ``secret`` is the channel's 16 random bytes (see :class:`ChannelSpec`).
When its buffers lie in a pool slot (``pool.py``) it is one frame,
``secret+prefix(kind 3 POOL)+sizes+place+codec header`` where ``place`` is
``pool.PLACE`` (slot id, zero, offset of buffer 0): the buffers are not on the
socket at all.  The pool is used between processes of one host for messages
whose buffers add up to at least ``POOL_MIN``; plain frames remain the
fallback (no free slot and the pool at its cap, ``shm_dir`` full, a channel
made with ``pool_bytes=0``).

Sizing: each direction's ring holds ``2 x threshold`` bytes including its
4 KiB header, so one channel uses at most ``4 x threshold`` of ``shm_dir``
(40 MiB at the default 10 MiB).  Any record up to the ring's capacity fits
once the ring is drained (``ring.py`` publishes a WRAP on its own), so the
route is decided on the real record: framing repeats every buffer size, and a
message just below the threshold made of many small tensors has a record
larger than the threshold -- it still fits, and a record that would not fit
goes to ZeroMQ.  While a record is in flight there is room for more behind
it, so back-to-back messages of mixed sizes stream.  A small threshold still
gets a ring of ``MIN_CAPACITY`` (64 KiB) for the BULK markers.

A send happens whole or not at all and waits (for ring space, for ZeroMQ's
high-water mark) only until its deadline; see :meth:`Channel.send`.

When ``shm_dir`` has no room, ring creation fails with ``TransportError``;
the channel logs one warning per process and carries everything on ZeroMQ.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from runtime import faults
from runtime.errors import DeadlineError, ProtocolError, TransportError
from runtime.transport import framing
from runtime.transport.bulk import BulkLink
from runtime.transport.doorbell import Doorbell, DoorbellWriter
from runtime.transport.pool import PLACE, RxPool, TxPool, layout, release_pinned
from runtime.transport.ring import HEADER_SIZE, MIN_CAPACITY, ShmRing, align8, fence

__all__ = ["POOL_MIN", "Channel", "ChannelSpec", "Outgoing", "Received",
           "default_pool_bytes", "ring_capacity"]

log = logging.getLogger(__name__)

KIND_INLINE, KIND_BULK, KIND_CLOSE, KIND_POOL = (framing.KIND_INLINE, framing.KIND_BULK,
                                                framing.KIND_CLOSE, framing.KIND_POOL)
_PREFIX_LEN = framing.PREFIX_LEN  # 16
SECRET_LEN = 16
_TIMED_MIN = 4096  # ring records at least this long have their copy-out timed (copy_s)
# Large messages whose buffers add up to less than this go as plain frames:
# a slot is at least 1 MiB, and below this ZeroMQ's copies cost microseconds.
POOL_MIN = 64 * 1024
POOL_MAX_SLOTS = 8

# Default spin before blocking on the doorbell (seconds).  Waking a blocked
# process costs ~85 us here, a spin iteration ~0.3 us: spin a little longer
# than a typical round trip, then block so an idle process costs nothing.
SPIN_S = 100e-6
SLICE_S = 0.1  # longest single block; liveness is re-checked after each
BULK_FRAMES_S = 60.0  # a BULK marker's frames are already queued: this is for broken peers
# Buffers one message from an untrusted peer may carry (ring record or ZeroMQ frames): each
# becomes an array and a tensor on this side (~0.7 KB for an empty one, 23 bytes sent), and
# ZeroMQ's high-water mark counts messages, not their parts.  An honest worker's reply
# carries a few.
SAFE_MAX_BUFFERS = 4096

_warned_fallback = False
# Spinning politely: if the peer shares our core (an oversubscribed machine),
# sched_yield hands it the core at once instead of after a time slice; with
# a core to itself it returns in ~1 us.
_yield = os.sched_yield


class _interrupts_held:  # noqa: N801 - used like a function: ``with _interrupts_held():``
    """Hold back SIGINT (``KeyboardInterrupt``) for the duration of a short step.

    Only the main thread receives Python signal handlers, and only there can
    the handler be swapped; elsewhere this does nothing.  A SIGINT arriving
    inside runs the original handler on exit, after the step is complete.
    """

    __slots__ = ("got", "old")

    def __enter__(self) -> None:
        self.old = None
        if threading.current_thread() is not threading.main_thread():
            return
        old = signal.getsignal(signal.SIGINT)
        if not callable(old):
            return  # SIG_IGN / SIG_DFL: nothing Python-level to hold back
        self.got = None
        signal.signal(signal.SIGINT, self._hold)
        self.old = old

    def _hold(self, signum: int, frame: Any) -> None:
        self.got = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        old = self.old
        if old is None:
            return
        signal.signal(signal.SIGINT, old)
        if self.got is not None:
            old(*self.got)


def ring_capacity(threshold: int) -> int:
    """Data bytes of one direction's ring for ``threshold`` (see module docstring)."""
    return max(MIN_CAPACITY, align8(2 * threshold - HEADER_SIZE))


def default_pool_bytes(threshold: int) -> int:
    """Default cap of one direction's pool: 1 GiB, or 8 messages at the threshold."""
    return max(1 << 30, 8 * threshold)


@dataclass(frozen=True)
class ChannelSpec:
    """What the callee needs to attach to a channel the caller created.

    Plain data (it travels as JSON in the open request); the two ring
    segments and the callee's end of the pool socket pair travel beside it as
    descriptors (``Channel.peer_fds``), never by name.  ``secret`` opens every
    ZeroMQ message of the channel, in both directions: the ``ipc://`` endpoint
    is a file another process of the session could connect to, and a message
    without the secret is refused before it is decoded.  ``pool``: a socket
    pair for pool slots comes along; ``pool_bytes`` caps each side's pool.
    ``sealed``: every segment of the channel, both sides' pool slots included,
    is a memfd sealed against resizing (one side does not trust the other).
    """

    rings: bool
    endpoint: str
    caller_bell: str | None
    threshold: int
    secret: bytes
    pool: bool = False
    pool_bytes: int = 0
    sealed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"rings": self.rings, "endpoint": self.endpoint, "caller_bell": self.caller_bell,
                "threshold": self.threshold, "secret": self.secret.hex(), "pool": self.pool,
                "pool_bytes": self.pool_bytes, "sealed": self.sealed}

    @classmethod
    def from_dict(cls, d: Any) -> ChannelSpec:
        """Validate a spec received from a peer (``ProtocolError`` when malformed)."""
        try:
            spec = cls(d["rings"], d["endpoint"], d["caller_bell"], d["threshold"],
                       bytes.fromhex(d["secret"]), d["pool"], d["pool_bytes"], d["sealed"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("malformed channel spec") from None
        if not (type(spec.rings) is bool and type(spec.endpoint) is str
                and spec.endpoint.startswith("ipc://")
                and (spec.caller_bell is None or type(spec.caller_bell) is str)
                and type(spec.threshold) is int and spec.threshold >= 1
                and len(spec.secret) == SECRET_LEN and type(spec.pool) is bool
                and type(spec.pool_bytes) is int and 0 <= spec.pool_bytes < 1 << 48
                and type(spec.sealed) is bool):
            raise ProtocolError("malformed channel spec")
        return spec


class Outgoing(Protocol):
    """What :meth:`Channel.send` takes: the codec's ``Encoded`` is one.

    ``header``: bytes the receiver gets back verbatim.  ``buffers``: 1-D ``uint8`` numpy
    arrays or ``framing.BufferWriter`` objects.  ``nbytes``: header plus buffers, which
    decides the route.
    """

    header: bytes
    buffers: Sequence[Any]
    nbytes: int


class Received(NamedTuple):
    """One message as :meth:`Channel.try_recv` hands it up.

    ``borrowed``: ``buffers`` are views of a ring record the channel lends until
    :meth:`Channel.release` or its next receive; otherwise they are the receiver's (ZeroMQ
    frames, or a pool lease that frees its slot when the last view is gone).  ``header`` is
    always the receiver's: a copy from a ring record, a view of its own ZeroMQ frame.
    """

    tag: int
    header: bytes | memoryview
    buffers: list[np.ndarray]
    borrowed: bool
    route: str
    nbytes: int


_new_received = tuple.__new__  # Received(...) without NamedTuple's Python-level __new__


class _Route:
    __slots__ = ("bytes_in", "bytes_out", "msgs_in", "msgs_out")

    def __init__(self) -> None:
        self.msgs_out = self.bytes_out = self.msgs_in = self.bytes_in = 0

    def as_dict(self) -> dict[str, int]:
        return {"messages": self.msgs_out + self.msgs_in, "bytes": self.bytes_out + self.bytes_in,
                "sent_messages": self.msgs_out, "sent_bytes": self.bytes_out,
                "received_messages": self.msgs_in, "received_bytes": self.bytes_in}


class Channel:
    """One end of a channel.

    Make the caller's end with :meth:`create`, the callee's with :meth:`attach`.
    ``send`` is for one thread at a time, and so is ``recv``.
    """

    # Set when the ring's own framing is found corrupt: every later receive
    # raises it (the records behind a corrupt one cannot be found).
    failed: ProtocolError | None = None
    # How long the frames a BULK marker announces may take (see _recv_marked_bulk).
    frames_wait_s: float = BULK_FRAMES_S

    def __init__(self, *, tx: ShmRing | None, rx: ShmRing | None, bulk: BulkLink,
                 own_bell: Doorbell | None, owns_bell: bool, peer_bell: DoorbellWriter | None,
                 threshold: int, safe: bool, name: str, secret: bytes,
                 pool_sock: socket.socket | None = None, shm_dir: str | None = None,
                 pool_bytes: int = 0, peer_sock: socket.socket | None = None,
                 sealed: bool = False) -> None:
        self.tx, self.rx, self.bulk = tx, rx, bulk
        self.secret = secret
        # The pool: slots for our large messages, mappings of the peer's.
        self.pool_sock = pool_sock
        self._peer_sock = peer_sock  # caller side, until attached(): the callee's end
        self.pool_bytes = pool_bytes
        self.pool_tx = self.pool_rx = None
        self.sealed = sealed
        if pool_sock is not None and shm_dir is not None and pool_bytes > 0:
            self.pool_tx = TxPool(pool_sock, shm_dir, max_bytes=pool_bytes,
                                  max_slots=POOL_MAX_SLOTS, sealed=sealed)
            self.pool_rx = RxPool(pool_sock, shm_dir, sealed=sealed,
                                  max_bytes=pool_bytes if sealed else None)
        elif pool_sock is not None:
            # This end cannot map slots: closing the pair tells the peer's pool
            # (its next slot announcement fails), so it sends plain frames.
            pool_sock.close()
            self.pool_sock = None
        self._queued = False  # set once a BULK message's frames are queued
        self._lent = False  # a ring record is lent to the receiver (see release)
        self.own_bell, self._owns_bell, self.peer_bell = own_bell, owns_bell, peer_bell
        self.threshold = threshold
        self.safe = safe
        self.name = name
        self.closed = False
        self.peer_closed = False
        self.woke_peer = False  # the last send had to wake a sleeping reader
        self.routes = {"shm": _Route(), "zmq": _Route()}
        self.copy_ns = self.wait_ns = 0

    # -- construction --------------------------------------------------------
    @classmethod
    def create(cls, *, shm_dir: str, private_dir: str, name: str, threshold: int,
               safe: bool = False, pool_bytes: int | None = None,
               sealed: bool | None = None) -> Channel:
        """The caller's end: makes both rings, its doorbell and binds the ZeroMQ link.

        The rings are nameless segments (``ShmRing.create_anonymous``), and the
        pool's slots travel over a private socket pair: hand :meth:`peer_fds`
        to the callee, then call :meth:`attached`.  ``pool_bytes`` caps each
        direction's pool (default :func:`default_pool_bytes`; 0: no pool, large
        messages always go as ZeroMQ frames).

        ``sealed`` (default: ``safe``): every segment, rings and both sides' pool
        slots, is a memfd sealed against resizing (``Segment.create_sealed``),
        so neither side can truncate one under the other's mapping (SIGBUS).
        Needed whenever one side does not trust the other: the callee when the
        caller is untrusted (it refuses unsealed rings then), the caller when
        the callee is.  Sealed segments count against memory, not ``shm_dir``.
        """
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1 byte, got {threshold}")
        if pool_bytes is None:
            pool_bytes = default_pool_bytes(threshold)
        if sealed is None:
            sealed = safe
        tx = rx = None
        bell = bulk = None
        socks: tuple[socket.socket, socket.socket] | tuple[None, None] = (None, None)
        try:
            cap = ring_capacity(threshold)
            if sealed:
                tx = ShmRing.create_sealed(cap)
                rx = ShmRing.create_sealed(cap)
            else:
                tx = ShmRing.create_anonymous(shm_dir, cap)
                rx = ShmRing.create_anonymous(shm_dir, cap)
        except TransportError as exc:
            for ring in (tx, rx):
                if ring is not None:
                    ring.close()
            tx = rx = None
            _warn_fallback(exc)
        try:
            if rx is not None:
                bell = Doorbell(os.path.join(private_dir, f"{name}.bell"))
            if pool_bytes > 0:
                socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                socks[0].setblocking(False)
            bulk = BulkLink(f"ipc://{os.path.join(private_dir, name + '.zmq')}", bind=True)
            # Inside the try: the constructor can fail too (the pool's stat of shm_dir), and
            # rings left to GC would be unmapped while CUDA still holds them registered.
            return cls(tx=tx, rx=rx, bulk=bulk, own_bell=bell, owns_bell=True,
                       peer_bell=None, threshold=threshold, safe=safe, name=name,
                       secret=secrets.token_bytes(SECRET_LEN), pool_sock=socks[0],
                       shm_dir=shm_dir, pool_bytes=pool_bytes, peer_sock=socks[1],
                       sealed=sealed)
        except BaseException:
            for ring in (tx, rx):
                if ring is not None:
                    ring.close()
            if bell is not None:
                bell.close()
            for sock in socks:
                if sock is not None:
                    sock.close()
            if bulk is not None:
                bulk.close()
            raise

    def spec(self) -> ChannelSpec:
        return ChannelSpec(rings=self.tx is not None, endpoint=self.bulk.endpoint,
                           caller_bell=self.own_bell.path if self.own_bell else None,
                           threshold=self.threshold, secret=self.secret,
                           pool=self._peer_sock is not None, pool_bytes=self.pool_bytes,
                           sealed=self.sealed)

    def peer_fds(self) -> tuple[int, ...]:
        """Caller side, until :meth:`attached`: the descriptors the callee needs.

        The rings' (to callee, to caller) when the channel has rings, then the
        callee's end of the pool socket pair when it has a pool.
        """
        fds: tuple[int, ...] = ()
        if self.tx is not None:
            fds = (self.tx.segment.fd, self.rx.segment.fd)
        if self._peer_sock is not None:
            fds += (self._peer_sock.fileno(),)
        return fds

    def attached(self, callee_bell: str | None) -> None:
        """Caller side, once the callee has the descriptors: drop our copies.

        The segments have no name; from here on they live exactly as long as
        the two mappings do, so no crash of either process can leak them.
        """
        for ring in (self.tx, self.rx):
            if ring is not None:
                ring.segment.release_fd()
        if self._peer_sock is not None:
            self._peer_sock.close()
            self._peer_sock = None
        if self.tx is not None and callee_bell is not None:
            self.peer_bell = DoorbellWriter(callee_bell)

    @classmethod
    def attach(cls, spec: ChannelSpec, *, fds: tuple[int, ...] | list[int] = (),
               own_bell: Doorbell | None, safe: bool, name: str,
               shm_dir: str | None = None, limit: int | None = None) -> Channel:
        """The callee's end of a channel described by ``spec``; takes ownership of ``fds``.

        ``shm_dir`` is this process's own idea of the session's ``shm_dir``:
        the peer's pool slots must be files there.  Without it the callee uses
        no pool (its large messages go as frames, and it refuses the peer's
        slots).  With ``safe`` (the caller is untrusted) the rings must be
        sealed (``ProtocolError`` otherwise) and the channel is sealed whatever
        the spec says; a sealed channel's pool slots are sealed memfds both ways.

        Sizes an untrusted caller states are not its to choose: with ``safe`` its threshold
        may not exceed ``limit`` (this process's own; default: the spec's), its rings may
        not exceed that threshold's capacity, and its pool slots are capped at that
        threshold's default pool size, whatever ``spec.pool_bytes`` says.  (A sparse sealed
        memfd costs the peer nothing: a 96 GiB ring or slot made the copy-out raise
        ``MemoryError`` and end the trusted actor.)
        """
        tx = rx = bulk = sock = peer = None
        fds = list(fds)
        want = 2 * spec.rings + spec.pool
        pool_bytes = spec.pool_bytes
        try:
            if len(fds) != want:
                raise ProtocolError(f"channel spec needs {want} descriptors, {len(fds)} came")
            sealed = spec.sealed or safe
            bound = spec.threshold if limit is None else limit
            if safe and spec.threshold > bound:
                raise ProtocolError(f"threshold {spec.threshold} above this side's {bound}")
            if safe:
                pool_bytes = min(pool_bytes, default_pool_bytes(bound))
            if spec.rings:
                a, b = os.fstat(fds[0]), os.fstat(fds[1])
                if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                    # One segment for both directions: everything this side sent it would
                    # read back as the peer's (a trusted actor answering its own replies
                    # for ever, never idle long enough to notice the caller is gone).
                    raise ProtocolError("the channel's two rings are one segment")
                rx = ShmRing.from_fd(fds.pop(0), sealed=safe)
                tx = ShmRing.from_fd(fds.pop(0), sealed=safe)
                cap = ring_capacity(bound)
                if safe and max(rx.capacity, tx.capacity) > cap:
                    raise ProtocolError(f"rings of {max(rx.capacity, tx.capacity)} bytes for "
                                        f"threshold {bound} (at most {cap})")
            if spec.pool:
                sock = _pool_socket(fds.pop(0))
            bulk = BulkLink(spec.endpoint, bind=False)
            peer = DoorbellWriter(spec.caller_bell) if (tx is not None and spec.caller_bell) \
                else None
            # Inside the try, as in create(): a failing constructor (the pool's stat of
            # shm_dir) must not leave mapped, registered rings to GC.
            return cls(tx=tx, rx=rx, bulk=bulk, own_bell=own_bell if rx is not None else None,
                       owns_bell=False, peer_bell=peer, threshold=spec.threshold, safe=safe,
                       name=name, secret=spec.secret, pool_sock=sock, shm_dir=shm_dir,
                       pool_bytes=pool_bytes, sealed=sealed)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for ring in (tx, rx):
                if ring is not None:
                    ring.close()
            if sock is not None:
                sock.close()
            if bulk is not None:
                bulk.close()
            if peer is not None:
                peer.close()
            raise

    @property
    def mode(self) -> str:
        return "shm" if self.tx is not None else "zmq-only"

    # -- sending -------------------------------------------------------------
    def send(self, msg: Outgoing, *, tag: int = 0, deadline: float | None = None,
             check: Callable[[], None] | None = None,
             on_full: Callable[[], None] | None = None) -> str:
        """Send one message; returns the route taken ("shm" or "zmq").

        ``msg`` is a header plus buffers (:class:`Outgoing`: the codec's ``Encoded``, say).
        The route follows the real record: a message below the threshold whose
        record fits the ring (any record up to the ring's capacity fits once
        the ring is drained, see ``ring.py``) goes through the ring, anything
        else through ZeroMQ with a marker in the ring.  Each buffer is written
        as it chooses (``framing.write_record``): straight into the record or
        pool slot reserved for it.

        Blocks while the ring (or the ZeroMQ link) is full, until ``deadline``
        (``time.monotonic()`` value; ``DeadlineError``, a ``TimeoutError``), calling ``check``
        (which raises if the peer is gone) and ``on_full`` (e.g. drain
        replies) while it waits.  A send happens whole or not at all: an
        exception (a timeout, the peer's death, ``KeyboardInterrupt``) leaves
        the channel as it was, except that a message already handed over may
        still be delivered.
        """
        if self.closed:
            raise TransportError(f"channel {self.name} is closed")
        self.woke_peer = False
        t1 = time.perf_counter_ns()
        header = msg.header
        buffers = msg.buffers
        nbuf = len(buffers)
        tx = self.tx
        route = "zmq"
        if tx is not None and msg.nbytes < self.threshold:
            if nbuf:
                sizes, size = framing.measure(header, buffers)
            else:  # header only: the common small message, one write
                size = (_PREFIX_LEN + len(header) + 7) & ~7
            if size <= tx.capacity - 8:  # the ring's largest record
                addr = tx.reserve(size)
                if addr is None:
                    addr = self._wait_space(size, deadline, check, on_full)
                base = tx.address
                if nbuf:
                    framing.write_record(tx.view, base, addr - base, KIND_INLINE, tag,
                                         header=header, buffers=buffers, sizes=sizes)
                else:
                    framing.pack_bare_into(tx.view, addr - base, KIND_INLINE, tag, header)
                if faults.armed:
                    faults.hit("ring_before_flag")
                tx.commit()
                fence()
                if tx.reader_sleeping() and self.peer_bell is not None:
                    self._ring_peer(check)
                route = "shm"
        if route == "zmq" and not (nbuf and self.pool_tx is not None
                                   and self._send_pooled(msg, tag, deadline, check, on_full)):
            sizes = [b.nbytes for b in buffers]
            parts = [self.secret + framing.head_bytes(KIND_INLINE, tag, header, sizes),
                     *[framing.as_host(b) for b in buffers]]
            if tx is None:
                self.bulk.send(parts, deadline=deadline, check=check)
            else:
                self._send_bulk(parts, deadline, check, on_full)
        r = self.routes[route]
        r.msgs_out += 1
        r.bytes_out += msg.nbytes
        self.copy_ns += time.perf_counter_ns() - t1
        return route

    def _send_pooled(self, msg: Outgoing, tag: int, deadline: float | None,
                     check: Callable[[], None] | None,
                     on_full: Callable[[], None] | None) -> bool:
        """Send a large message with its buffers in a pool slot; False: use frames.

        The buffers are written once into the slot (a CPU copy through
        ``memcopy``, on several threads where that pays; a ``BufferWriter``
        writes itself); ZeroMQ carries one small frame.  A send that fails
        before the frame is queued gives the slot back.
        """
        buffers = msg.buffers
        sizes = [b.nbytes for b in buffers]
        offsets, span = layout(sizes)
        if span < POOL_MIN:
            return False
        slot = self.pool_tx.acquire(span)
        if slot is None:
            return False
        self._queued = False
        try:
            view = slot.segment.view
            start = slot.data_address - slot.segment.address
            for b, off in zip(buffers, offsets, strict=True):
                framing.write_buffer(view, slot.segment.address, start + off, b)
            parts = [self.secret + framing.head_bytes(KIND_POOL, tag, msg.header, sizes,
                                                      extra=PLACE.pack(slot.id, 0, 0))]
            if self.tx is None:
                self.bulk.send(parts, deadline=deadline, check=check, small=True)
                self._queued = True
            else:
                self._send_bulk(parts, deadline, check, on_full, small=True)
        except BaseException:
            if not self._queued:
                slot.release()
            raise
        return True

    def _send_bulk(self, parts: list, deadline: float | None,
                   check: Callable[[], None] | None,
                   on_full: Callable[[], None] | None, *, small: bool = False) -> None:
        """Frames on ZeroMQ, then their marker in the ring: both or neither.

        The marker's ring space is reserved first (waiting is harmless: nothing
        is sent yet); then queueing the frames and publishing the marker run as
        one step that neither ``KeyboardInterrupt`` nor a timeout can split --
        frames without their marker would be taken for the next message's, and
        the channel would run one message late from then on.  ``small``: the
        parts are small bytes, copied by ZeroMQ (nothing to wait for after).
        """
        tx = self.tx
        addr = tx.reserve(_PREFIX_LEN)
        if addr is None:
            addr = self._wait_space(_PREFIX_LEN, deadline, check, on_full)
        bulk = self.bulk
        while True:
            with _interrupts_held():
                tracker = bulk.try_send(parts, copy=small)
                if tracker is not None:
                    self._queued = True
                    faults.hit("zmq_send")
                    framing.pack_bare_into(tx.view, addr - tx.address, KIND_BULK, 0, b"")
                    tx.commit()
                    fence()
                    if tx.reader_sleeping() and self.peer_bell is not None:
                        self._ring_peer(check)
                    break
            bulk.pause(deadline, check, "send")
        if not small:
            bulk.wait_sent(tracker, deadline, check)

    def _send_marker(self, kind: int, deadline: float | None,
                     check: Callable[[], None] | None,
                     on_full: Callable[[], None] | None) -> None:
        tx = self.tx
        addr = tx.reserve(_PREFIX_LEN)
        if addr is None:
            if kind == KIND_CLOSE:
                return  # best effort: the peer also notices our death
            addr = self._wait_space(_PREFIX_LEN, deadline, check, on_full)
        framing.pack_bare_into(tx.view, addr - tx.address, kind, 0, b"")
        tx.commit()
        fence()
        if tx.reader_sleeping() and self.peer_bell is not None:
            self._ring_peer(check)

    def _ring_peer(self, check: Callable[[], None] | None) -> None:
        """Wake the reader; a doorbell that is gone usually means a dead peer."""
        self.woke_peer = True
        try:
            self.peer_bell.ring()
        except TransportError:
            if check is not None:
                check()  # raises the peer's death, which explains the missing doorbell
            raise

    def _wait_space(self, size: int, deadline: float | None, check: Callable[[], None] | None,
                    on_full: Callable[[], None] | None) -> int:
        t0 = time.perf_counter_ns()
        pause = 20e-6
        tx = self.tx
        while True:
            if on_full is not None:
                on_full()
            addr = tx.reserve(size)
            if addr is not None:
                self.wait_ns += time.perf_counter_ns() - t0
                return addr
            # Only the reader moving on frees space: make sure it is awake
            # (reserve may just have published a WRAP marker for it to pass).
            fence()
            if tx.reader_sleeping() and self.peer_bell is not None:
                self._ring_peer(check)
            if check is not None:
                check()
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineError(f"channel {self.name}: ring full until the deadline")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    # -- notes -----------------------------------------------------------------
    def set_note(self, note: bytes) -> bool:
        """Leave ``note`` for the peer to read whenever it looks (``ShmRing.write_note``).

        State beside the messages, not one of them: the latest note replaces the last, and
        ``b""`` clears it.  False (and nothing left) on a channel without rings.
        """
        if self.tx is None or self.closed:
            return False
        self.tx.write_note(note)
        return True

    def peer_note(self) -> bytes | None:
        """The peer's latest note (:meth:`set_note`), None when there is none.

        The peer writes it: an untrusted peer's note says whatever that peer likes.
        """
        if self.rx is None or self.closed:
            return None
        return self.rx.read_note()

    # -- receiving -----------------------------------------------------------
    def readable(self) -> bool:
        """True when a message (or a close record) is waiting."""
        if self.rx is not None:
            return self.rx.readable()
        return self.bulk.readable()

    def set_sleeping(self, flag: bool) -> None:
        if self.rx is not None:
            self.rx.set_sleeping(flag)

    def try_recv(self, *, deadline: float | None = None,
                 check: Callable[[], None] | None = None, lend: bool = True) -> Received | None:
        """Receive one message if one is waiting, else None.

        First gives back the ring record a previous receive lent (see
        :meth:`release`).  A ring message with buffers comes back *borrowed*: its
        buffers are views of the ring, valid until :meth:`release` or the next
        receive (``framing.copy_buffer`` copies one out to keep it); its header is
        a copy, and a header-only record is given back at once.  With
        ``lend=False`` the buffers are copied out here and the record given back
        at once too (``borrowed=False``): what a receiver that keeps nothing in
        place wants, in one pass.  A ZeroMQ message's buffers are its frames'
        memory, or views of a pool lease that keeps its slot until they are
        gone: the receiver's to keep.

        A close record from the peer sets ``peer_closed`` and returns None.  A
        malformed message raises ``ProtocolError`` after it has been consumed:
        the messages behind it are intact, and the exception's ``tag``
        attribute holds the sender's tag (None if unknown).
        """
        rx = self.rx
        if rx is None:
            if self.failed is not None:  # the link is out of step (see _recv_bulk)
                raise self.failed
            if not self.bulk.readable():
                return None
            return self._recv_bulk(deadline, check)
        if self._lent:
            self._lent = False
            rx.release()
        if self.failed is not None:
            raise self.failed
        try:
            rec = rx.peek()
        except ProtocolError as exc:
            # The ring's own framing is broken: nothing behind this point can
            # be found, so the channel is finished (the caller drops it).
            exc.tag = None
            self.failed = exc
            raise
        if rec is None:
            return None
        addr, length = rec
        # Copying out (``lend=False``) happens inside the parse: timed as ``copy_s`` when
        # the record is large enough for it to matter (two clock reads cost ~0.1 us, more
        # than parsing a header-only record).
        timed = not lend and length >= _TIMED_MIN
        if timed:
            t0 = time.perf_counter_ns()
        try:
            kind, tag, header, bufs, nbytes = framing.parse_record(
                rx.view, addr - rx.address, length, copy=not lend,
                max_nbuf=SAFE_MAX_BUFFERS if self.safe else None)
        except ProtocolError:
            rx.advance()
            raise
        if timed:
            self.copy_ns += time.perf_counter_ns() - t0
        if kind == KIND_INLINE:
            route = self.routes["shm"]
            route.msgs_in += 1
            route.bytes_in += nbytes
            if not bufs or not lend:
                # Header only (the common small message), or buffers copied out: nothing
                # to lend, the record goes back at once.
                rx.advance()
                return _new_received(Received, (tag, header, bufs, False, "shm", nbytes))
            # Noted before the ring holds it: an interrupt between the two must leave a
            # loan the next receive gives back, never a held record nobody releases.
            self._lent = True
            rx.hold()
            return _new_received(Received, (tag, header, bufs, True, "shm", nbytes))
        rx.advance()
        if kind == KIND_BULK:
            # Outside any handler: a defect of the ZeroMQ message must carry that
            # message's tag, not the marker's.
            return self._recv_marked_bulk(check)
        if kind == KIND_CLOSE:
            self.peer_closed = True
            return None
        exc = ProtocolError(f"unknown record kind {kind}")
        exc.tag = tag
        raise exc

    def release(self) -> None:
        """Give the ring record the last receive lent back to the sender (idempotent)."""
        if self._lent:
            self._lent = False
            self.rx.release()

    def _recv_marked_bulk(self, check: Callable[[], None] | None) -> Received:
        """The frames a consumed BULK marker announces.

        They were queued before the marker was published, so they are waited
        for whatever the caller's deadline: left behind, they would be taken
        for the next marker's.  Frames that never come mean a broken peer, or
        a hostile one: ``frames_wait_s`` (default :data:`BULK_FRAMES_S`) is how
        long that takes to tell, and the caller of an untrusted actor cuts it to
        its ``call_timeout``.
        """
        wait = self.frames_wait_s
        try:
            return self._recv_bulk(time.monotonic() + wait, check)
        except DeadlineError:
            self.failed = ProtocolError(f"channel {self.name}: a BULK marker without its "
                                        f"ZeroMQ frames within {wait:g} s")
            self.failed.tag = None
            raise self.failed from None

    def _recv_bulk(self, deadline: float | None, check: Callable[[], None] | None) -> Received:
        # Large messages come as frames while every slot is pinned by a fork (pool.py):
        # they too let slots go whose children are gone.
        release_pinned()
        try:
            frames = self.bulk.recv(deadline=deadline, check=check,
                                    max_parts=1 + SAFE_MAX_BUFFERS if self.safe else None)
        except ProtocolError as exc:  # the rest of that message is still in the socket
            self.failed = exc
            exc.tag = None
            raise
        meta = frames[0].buffer
        if len(meta) < SECRET_LEN + _PREFIX_LEN:
            raise ProtocolError(f"ZeroMQ message with a {len(meta)}-byte prefix")
        if not hmac.compare_digest(meta[:SECRET_LEN], self.secret):
            raise ProtocolError(f"channel {self.name}: a ZeroMQ message without the channel's "
                                f"secret (not from its peer) was refused")
        meta = meta[SECRET_LEN:]
        pooled = meta[0] == KIND_POOL
        head = framing.parse_head(meta, 0, len(meta), extra=PLACE.size if pooled else 0,
                                  max_nbuf=SAFE_MAX_BUFFERS if self.safe else None)
        try:
            if head.end != len(meta):
                raise ProtocolError(f"ZeroMQ header frame of {len(meta)} bytes, declared "
                                    f"{head.end}")
            if pooled:
                bufs = self._pooled_buffers(frames, meta, head)
            elif head.kind != KIND_INLINE:
                raise ProtocolError(f"unknown ZeroMQ message kind {head.kind}")
            else:
                bufs = _frame_buffers(frames, head.sizes)
        except ProtocolError as exc:
            exc.tag = head.tag
            raise
        route = self.routes["zmq"]
        route.msgs_in += 1
        nbytes = len(head.header) + sum(head.sizes)
        route.bytes_in += nbytes
        return _new_received(Received, (head.tag, head.header, bufs, False, "zmq", nbytes))

    def _pooled_buffers(self, frames: list, meta: Any, head: framing.Head) -> list[np.ndarray]:
        """The buffers of a message that lie in a slot of the peer's pool.

        Read in place from a trusted peer (views of one lease: the slot stays
        BUSY until they are all gone, see ``pool.py``); copied out, and the
        slot freed at once, from an untrusted one, which could change the bytes
        after they were checked.
        """
        if self.pool_rx is None:
            raise ProtocolError("a pool message on a channel without a pool")
        if len(frames) != 1:
            raise ProtocolError(f"pool message with {len(frames) - 1} buffer frames")
        slot_id, zero, offset = PLACE.unpack_from(meta, head.end - len(head.header) - PLACE.size)
        if zero:
            raise ProtocolError("malformed pool placement")
        t0 = time.perf_counter_ns()
        bufs, _ = self.pool_rx.buffers(slot_id, offset, head.sizes, copy=self.safe)
        self.copy_ns += time.perf_counter_ns() - t0
        return bufs

    def recv(self, *, deadline: float | None = None, check: Callable[[], None] | None = None,
             spin_s: float = SPIN_S, lend: bool = True,
             timeout: float | None = None) -> Received:
        """Block until a message arrives (``DeadlineError``, a ``TimeoutError``, at ``deadline``).

        ``deadline`` is a ``time.monotonic()`` value; ``timeout`` (seconds from now, issue 2's
        ``recv(timeout=...)``) is the same bound said the other way, the earlier of the two
        applying.  Spins ``spin_s`` first, then sleeps on the doorbell (or the ZeroMQ
        socket in ZeroMQ-only mode) in slices of at most 100 ms, calling
        ``check`` after each.  Raises ``TransportError`` if the peer closed.
        """
        deadline = _earlier(deadline, timeout)
        while True:
            got = self.try_recv(deadline=deadline, check=check, lend=lend)
            if got is not None:
                return got
            if self.peer_closed:
                raise TransportError(f"channel {self.name} was closed by the peer")
            self.wait(deadline=deadline, check=check, spin_s=spin_s)

    def wait(self, *, deadline: float | None, check: Callable[[], None] | None,
             spin_s: float = SPIN_S) -> None:
        """Return once something may be readable (spurious returns allowed)."""
        if spin_s > 0:
            end = time.perf_counter() + spin_s
            readable = self.readable if self.rx is None else self.rx.readable
            while time.perf_counter() < end:
                if readable():
                    return
                _yield()
        t0 = time.perf_counter_ns()
        timeout = SLICE_S
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineError(f"channel {self.name}: nothing received before the deadline")
        if self.rx is not None and self.own_bell is not None:
            self.rx.set_sleeping(True)
            fence()
            if not self.rx.readable():
                self.own_bell.wait(timeout)
            self.rx.set_sleeping(False)
        elif self.rx is None:
            self.bulk.socket.poll(max(1, int(timeout * 1000)))
        else:
            time.sleep(min(timeout, 1e-3))
        self.wait_ns += time.perf_counter_ns() - t0
        if check is not None:
            check()

    # -- statistics and lifecycle -------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = {
            "name": self.name, "mode": self.mode, "threshold": self.threshold,
            "sealed": self.sealed,
            "routes": {k: r.as_dict() for k, r in self.routes.items()},
            "copy_s": self.copy_ns / 1e9, "wait_s": self.wait_ns / 1e9,
        }
        if self.pool_tx is not None:
            out["pool"] = {**self.pool_tx.stats(), **self.pool_rx.stats()}
        return out

    def close(self, *, notify: bool = True) -> None:
        """Release this end (idempotent); with ``notify``, tell the peer first."""
        if self.closed:
            return
        self.closed = True
        self._lent = False  # unmapped below: whatever was lent is gone
        if notify and self.tx is not None:
            try:
                self._send_marker(KIND_CLOSE, None, None, None)
            except (TransportError, OSError):
                pass
        for ring in (self.tx, self.rx):
            if ring is not None:
                if ring.segment.owner:
                    ring.unlink()
                ring.close()
        if self.peer_bell is not None:
            self.peer_bell.close()
        if self._owns_bell and self.own_bell is not None:
            self.own_bell.close()
        for pool in (self.pool_tx, self.pool_rx):
            if pool is not None:
                pool.close()  # a slot a received tensor still uses stays mapped for it
        for sock in (self.pool_sock, self._peer_sock):
            if sock is not None:
                sock.close()
        self.bulk.close()


def _earlier(deadline: float | None, timeout: float | None) -> float | None:
    """The earlier of ``deadline`` (monotonic) and ``timeout`` seconds from now (None: none)."""
    if timeout is None:
        return deadline
    if not timeout >= 0:  # NaN too
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    until = time.monotonic() + timeout
    return until if deadline is None else min(deadline, until)


def _pool_socket(fd: int) -> socket.socket:
    """The callee's end of the pool socket pair, from a received descriptor."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise ProtocolError(f"the pool descriptor is not a socket: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.close()
        raise ProtocolError("the pool descriptor is not a Unix SOCK_SEQPACKET socket")
    sock.setblocking(False)
    return sock


def _frame_buffers(frames: list, sizes: Sequence[int]) -> list[np.ndarray]:
    """A plain large message's buffers: its frames' own memory, no copy."""
    if len(frames) != len(sizes) + 1:
        raise ProtocolError(f"ZeroMQ message has {len(frames) - 1} buffer frames, "
                            f"header declares {len(sizes)}")
    bufs = []
    for frame, nb in zip(frames[1:], sizes, strict=True):
        if len(frame.buffer) != nb:
            raise ProtocolError(f"ZeroMQ frame of {len(frame.buffer)} bytes, declared {nb}")
        bufs.append(np.frombuffer(frame, np.uint8))
    return bufs


def _warn_fallback(exc: TransportError) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("shared memory unavailable (%s); channels carry every message over "
                    "ZeroMQ", exc)
