"""Wait notes: how an actor tells a wait that can never end.

A blocking call carries the actors whose blocking calls led to it (the *chain*, see
``ProcessContext.serving``), so a call back into any of them is refused at once.  Two
cycles get past that check, because nothing links the calls that close them:

* a ``.remote()`` carries no chain (its caller may never wait on it).  a, serving a
  call, sends ``f = b.m.remote()`` and waits on ``f``; ``b.m`` -- or a call b serves
  before it -- calls a, blocking, directly or through c, d ...;
* two blocking calls that cross: a, serving one caller, calls b while b, serving
  another, calls a.

Each actor runs one call at a time; both wait for ever.

So the serving thread of a (trusted) actor, blocked without a timeout -- in a blocking
call, or waiting on a future -- for ``calls.WATCH_FIRST_S``, leaves a :class:`WaitNote`
in the header of the ring it sent that call on (``Channel.set_note``): the call's id,
when the wait began, its chain and its name.  It then reads the notes its inbound callers
left, and again at doubling intervals up to ``calls.WATCH_MAX_S``, until the wait ends
(a short call, most of them, pays for no note).  A note of a caller blocked on a call to
it that it has not answered, whose chain holds the actor it waits on, closes a cycle
(:func:`closes_cycle`): the wait fails with ``ActorRuntimeError``, once the channel of
the call waited on holds no reply left unread (a reply on the way would end the wait:
see ``CallerChannel._nothing_unread``).

Why it is exact: the note's writer stays blocked while its call is unanswered, and every
actor of its chain stays blocked in the calls that led to it; the actor waited on is one
of them, so the call waited on -- its current call, or one queued behind it -- cannot end
before the note's call is served, which needs the waiting thread.  When the note's
writer is the very actor waited on, it sees this wait as this one sees its own: the later
of the two fails (ties: the higher index), and the other then ends.

Not caught: cycles of three or more that no chain links (a calls b, b calls c, c calls
a, each serving a different caller), waits with a timeout or under ``call_timeout``
(they end anyway), waits on other threads, and anything through an untrusted actor: it
leaves no note, and a note from an untrusted caller is never read (a hostile one could
fail any wait).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["BLOCKED", "WAITING", "WaitNote", "closes_cycle", "decode", "encode"]

BLOCKED = 1  # in a blocking call
WAITING = 2  # waiting on a future without a timeout
# version, kind, call id, started (monotonic ns), actors n, bytes of the writer's name
_HEAD = struct.Struct("<IIQQII")
_VERSION = 1
# Actors a note names at most (``calls.MAX_CHAIN``), and bytes of the writer's name kept:
# 32 + 4 * 64 + 200 bytes < ``ring.NOTE_MAX``.
MAX_NOTE_CHAIN, MAX_NAME = 64, 200


class WaitNote(NamedTuple):
    """What the serving thread of the actor ``chain[-1]`` is blocked on."""

    kind: int  # BLOCKED or WAITING
    call_id: int  # of the call it waits on, on the channel that carries this note
    started_ns: int  # time.monotonic_ns() when the wait began (one clock per host)
    chain: tuple[int, ...]  # actors blocked on this wait, the writer last
    name: str = ""  # the writer's, for the error text


def encode(note: WaitNote) -> bytes:
    chain = note.chain[-MAX_NOTE_CHAIN:]
    name = note.name.encode("utf-8", "replace")[:MAX_NAME]
    return _HEAD.pack(_VERSION, note.kind, note.call_id, note.started_ns, len(chain),
                      len(name)) + struct.pack(f"<{len(chain)}i", *chain) + name


def decode(raw: bytes | None) -> WaitNote | None:
    """The note in ``raw``, None when there is none or it is malformed."""
    if not raw or len(raw) < _HEAD.size:
        return None
    version, kind, call_id, started_ns, n, k = _HEAD.unpack_from(raw)
    if version != _VERSION or kind not in (BLOCKED, WAITING) or not 0 < n <= MAX_NOTE_CHAIN \
            or k > MAX_NAME or len(raw) != _HEAD.size + 4 * n + k:
        return None
    chain = struct.unpack_from(f"<{n}i", raw, _HEAD.size)
    name = raw[_HEAD.size + 4 * n:].decode("utf-8", "replace")
    return WaitNote(kind, call_id, started_ns, chain, name)


def closes_cycle(note: WaitNote | None, answered: int, *, target: int, me: int,
                 mine: WaitNote, noted: bool) -> bool:
    """Whether a caller's ``note`` closes a cycle through this actor's wait ``mine``.

    ``answered``: the id of the last call this actor answered on the note's channel (calls
    are served in the order of their ids).  ``target``: the actor waited on; ``me``: this
    one.  ``noted``: whether ``mine`` reached the actor waited on (its channel has rings):
    only then may a later wait of that very actor on this one be left to fail instead.
    """
    if note is None or note.call_id <= answered or target not in note.chain:
        return False  # no wait, one that has ended, or one that waits on no part of ours
    if note.chain[-1] == target and noted:
        # The actor waited on waits on this one: it sees this wait as this one sees its
        # own.  The later of the two fails (one is enough: the other then ends).
        return (note.started_ns, target) < (mine.started_ns, me)
    return True
