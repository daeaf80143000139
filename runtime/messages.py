"""Messages: the codec over a transport channel -- objects in, objects out.

The layers, bottom up: ``transport/framing.py`` lays out a header and buffers;
``transport/channel.py`` routes frames (ring, ZeroMQ, pool) and lends what it receives;
``codec.py`` turns objects into a header and buffers and back; this module joins the two
for the call layer (``calls.py``, ``worker.py``), so the channel never sees an object and
the codec never sees a transport.

A ring record with buffers can be lent (``Channel.try_recv(lend=True)``).  This end asks
for a loan only when it *borrows*; otherwise the channel copies the buffers out and gives
the record back at once, and they are decoded over the copies.  Borrowing, the decoded
tensors are views of the record itself
(no copy at all; a GPU worker copies them host-to-device straight from it), valid until
:meth:`MessageChannel.release`, which the actor's loop calls when the method returns.
Borrowing is never done for an untrusted peer, who could change the bytes after they were
checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from runtime import codec
from runtime.errors import ProtocolError, TransportError
from runtime.transport.channel import Channel, Received

__all__ = ["MessageChannel"]

_clock = time.perf_counter_ns
_NOTHING = object()  # no message held
_encode = codec.encode
_decode = codec.decode


class MessageChannel:
    """One end of a channel that speaks objects (see the module docstring).

    ``send_envelope`` / ``recv_envelope``: containers of the call layer wrapping the values
    of a message each way (a call tuple, say): the codec's depth limit applies inside them.
    ``borrow``: decode ring messages in place (see the module docstring); ignored when the
    peer is untrusted (``channel.safe``).  ``redeliver``: a received message stays this
    end's until :meth:`ack` -- an exception that is not the message's fault (a Ctrl-C
    while it is decoded or handed on) leaves it to the next :meth:`try_recv`, since the
    transport cannot take it back (the caller's end: a reply lost so would leave its call
    waiting for ever).  Anything else -- ``readable``, ``wait``, ``close``,
    ``routes``, ``failed``... -- is the transport channel's own (attribute access falls
    through to it).
    """

    __slots__ = ("_held", "_last", "_ns", "_try_recv", "borrow", "readable", "recv_envelope",
                 "redeliver", "send_encoded", "send_envelope", "set_sleeping", "transport",
                 "wait")
    _OWN = frozenset(__slots__)

    def __init__(self, channel: Channel, *, send_envelope: int = 0, recv_envelope: int = 0,
                 borrow: bool = False, redeliver: bool = False) -> None:
        own = object.__setattr__
        own(self, "transport", channel)
        own(self, "redeliver", redeliver)
        # With ``redeliver``: [received, not yet decoded; decoded, not yet acknowledged],
        # mutated in place (no attribute stores on the hot path).
        own(self, "_held", [None, _NOTHING])
        own(self, "send_envelope", send_envelope)
        own(self, "recv_envelope", recv_envelope)
        own(self, "borrow", borrow and not channel.safe)
        # Nanoseconds encoding and decoding (mutated in place: no attribute stores on the
        # hot path), and the route and size of the last receive.
        own(self, "_ns", [0, 0])
        own(self, "_last", [None, 0])
        # The transport's methods a waiting loop calls every pass, bound once (a slot read
        # instead of ``__getattr__`` each time).
        own(self, "_try_recv", channel.try_recv)
        own(self, "readable", channel.readable)
        own(self, "wait", channel.wait)
        own(self, "set_sleeping", channel.set_sleeping)
        # Sending an encoded message is the transport's send itself: ``send_encoded(enc, *,
        # tag, deadline, check, on_full)`` returns the route taken; see ``Channel.send``.
        own(self, "send_encoded", channel.send)

    def __getattr__(self, name: str) -> Any:
        try:
            transport = object.__getattribute__(self, "transport")
        except AttributeError:
            raise AttributeError(name) from None
        return getattr(transport, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # The transport's attributes (``own_bell``, say) stay the transport's.
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.transport, name, value)

    # The transport's state the call layer reads on its hot path (properties: cheaper than
    # ``__getattr__``).
    peer_closed = property(lambda self: self.transport.peer_closed)
    woke_peer = property(lambda self: self.transport.woke_peer)
    failed = property(lambda self: self.transport.failed)
    closed = property(lambda self: self.transport.closed)
    safe = property(lambda self: self.transport.safe)

    @property
    def last_in(self) -> tuple[str, int] | None:
        """``(route, bytes)`` of the last message received, or None."""
        route, nbytes = self._last
        return None if route is None else (route, nbytes)

    # -- sending -----------------------------------------------------------------------
    def encode(self, obj: Any, *, plain_only: bool = False) -> codec.Encoded:
        """Encode ``obj`` for :meth:`send_encoded`; nothing is sent.

        With ``plain_only`` nothing is pickled: a message the plain format
        cannot express is refused with ``TypeError`` (or ``ValueError`` for
        nesting too deep), since a safe-mode peer would have to unpickle it;
        see ``codec``.  Any other exception is the value's own (a
        ``__reduce__`` that raises, say): nothing is sent either way.
        """
        t0 = time.perf_counter_ns()
        enc = codec.encode(obj, plain_only=plain_only, envelope=self.send_envelope)
        self._ns[0] += time.perf_counter_ns() - t0
        return enc

    def send(self, obj: Any, *, tag: int = 0, deadline: float | None = None,
             check: Callable[[], None] | None = None,
             on_full: Callable[[], None] | None = None, plain_only: bool = False) -> str:
        """Encode and send ``obj``; returns the route taken."""
        transport = self.transport
        if transport.closed:
            raise TransportError(f"channel {transport.name} is closed")
        t0 = _clock()
        enc = _encode(obj, plain_only=plain_only, envelope=self.send_envelope)
        self._ns[0] += _clock() - t0
        return transport.send(enc, tag=tag, deadline=deadline, check=check, on_full=on_full)

    # -- receiving ---------------------------------------------------------------------
    def try_recv(self, *, deadline: float | None = None,
                 check: Callable[[], None] | None = None) -> tuple[bool, Any]:
        """Receive and decode one message if one is waiting: ``(True, obj)`` or ``(False, None)``.

        A malformed message raises ``ProtocolError`` with the sender's tag
        (``exc.tag``) after it has been consumed; see ``Channel.try_recv``.
        """
        # ``borrow`` is checked against the peer's trust on every receive, not only at
        # construction: an untrusted peer's record is never decoded in place, whatever
        # was set since.  Not borrowing, the channel copies the buffers out itself.
        if not self.redeliver:
            got = self._try_recv(deadline=deadline, check=check,
                                 lend=self.borrow and not self.transport.safe)
            if got is None:
                return False, None
            return True, self._decode(got)
        held = self._held
        if held[1] is not _NOTHING:
            return True, held[1]  # not acknowledged: handed on again
        got = held[0]
        if got is None:
            got = self._try_recv(deadline=deadline, check=check,
                                 lend=self.borrow and not self.transport.safe)
            if got is None:
                return False, None
            held[0] = got
        # An exception that is not the message's (a signal handler's, say) leaves it held, to
        # be decoded again by the next reader, and goes on untouched.
        try:
            held[1] = self._decode(got)
        except ProtocolError:  # the message's own fault (tagged): it is done with
            held[0] = None
            raise
        except MemoryError as exc:  # no room to decode it: done with, and its call hears why
            held[0] = None
            err = ProtocolError(f"a message of {got.nbytes} bytes could not be decoded: out "
                                f"of memory")
            err.tag = got.tag  # a fresh error: a foreign exception is never marked
            raise err from exc
        held[0] = None
        return True, held[1]

    def ack(self) -> None:
        """The message :meth:`try_recv` returned last has been handled (``redeliver``)."""
        self._held[1] = _NOTHING

    def recv(self, *, deadline: float | None = None, check: Callable[[], None] | None = None,
             **kw: Any) -> Any:
        """Block until a message arrives and decode it; see ``Channel.recv``.

        ``timeout=`` (seconds) may stand for ``deadline`` (issue 2's ``recv(timeout=...)``).
        """
        if self.redeliver:
            raise TypeError("a redelivering end receives with try_recv (and acknowledges)")
        return self._decode(self.transport.recv(
            deadline=deadline, check=check, lend=self.borrow and not self.transport.safe, **kw))

    def _decode(self, got: Received) -> Any:
        tag, header, bufs, _, route, nbytes = got
        last = self._last
        last[0] = route
        last[1] = nbytes
        t0 = _clock()
        try:
            obj = _decode(header, bufs, safe=self.transport.safe, envelope=self.recv_envelope)
        except ProtocolError as exc:
            exc.tag = tag
            raise
        self._ns[1] += _clock() - t0
        return obj

    def release(self) -> None:
        """Give back the record a borrowing receive decoded in place (idempotent)."""
        self.transport.release()

    def stats(self) -> dict[str, Any]:
        out = self.transport.stats()
        out["encode_s"] = self._ns[0] / 1e9
        out["decode_s"] = self._ns[1] / 1e9
        return out
