"""Wait notes: how an actor tells a wait that can never end.

A blocking call carries the actors whose blocking calls led to it (the *chain*, see
``ProcessContext.serving``), so a call back into any of them is refused at once.  Two
cycles of two actors get past that check, because nothing links the calls that close
them:

* a ``.remote()`` carries no chain (its caller may never wait on it).  a, serving a
  call, sends ``f = b.m.remote()`` and waits on ``f``; ``b.m`` -- or a call b serves
  before it -- calls a back, blocking (or waits on a future of a call to a);
* two blocking calls that cross: a, serving one caller, calls b while b, serving
  another, calls a.

Each actor runs one call at a time; both waited for ever.

So the serving thread of a (trusted) actor, blocked without a timeout -- in a blocking
call, or waiting on a future -- for ``calls.WATCH_FIRST_S``, leaves a :class:`WaitNote`
in the header of the ring it sent that call on (``Channel.set_note``): the call's id,
when the wait began, and who waits.  It then reads the notes its inbound callers left,
and again at doubling intervals up to ``calls.WATCH_MAX_S``, until the wait ends (a
short call, most of them, pays for no note).  A note from the very actor it waits on,
blocked on a call to it that it has not answered, closes a cycle (:func:`closes_cycle`):
the wait fails with ``ActorRuntimeError``, once the channel of the call waited on holds
no reply left unread (the actor may have answered, then blocked, and its note be read
before its reply: see ``CallerChannel._nothing_unread``).

Why it is exact: the note's writer is blocked while its call is unanswered (a live
process's note is cleared when its wait ends), so it serves nothing, and the call waited
on -- its current call, or one queued behind it -- ends only after the note's call is
served, which needs the waiting thread.  Both see the cycle, each in the other's note:
the later wait fails (ties: the higher index), and the other then ends.  A note says
nothing of the writer's chain: a chain can outlive the waits it names (a member whose
wait failed, timed out or was interrupted is free while its call is still served with
it), and one from an untrusted caller is forged at will -- review L of this change
turned both into false cycles.

Not caught: cycles through a third actor (a waits on b, b calls c, c calls a), waits
with a timeout or under ``call_timeout`` (they end anyway), waits on other threads, and
anything through an untrusted actor: it leaves no note, and a note from an untrusted
caller is never read.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["BLOCKED", "WAITING", "WaitNote", "closes_cycle", "decode", "encode", "unanswered"]

BLOCKED = 1  # in a blocking call
WAITING = 2  # waiting on a future without a timeout
# version, kind, call id, started (monotonic ns), writer (actor index), bytes of its name
_HEAD = struct.Struct("<IIQQiI")
_VERSION = 1
MAX_NAME = 200  # bytes of the writer's name kept: 32 + 200 < ``ring.NOTE_MAX``
_IDS = 1 << 32  # call ids wrap here (``CallerChannel``: ``& 0xFFFFFFFF``)


class WaitNote(NamedTuple):
    """What the serving thread of actor ``writer`` is blocked on."""

    kind: int  # BLOCKED or WAITING
    call_id: int  # of the call it waits on, on the channel that carries this note
    started_ns: int  # time.monotonic_ns() when the wait began (one clock per host)
    writer: int  # the waiting actor's index
    name: str = ""  # its name, for the error text


def encode(note: WaitNote) -> bytes:
    name = note.name.encode("utf-8", "replace")[:MAX_NAME]
    return _HEAD.pack(_VERSION, note.kind, note.call_id, note.started_ns, note.writer,
                      len(name)) + name


def decode(raw: bytes | None) -> WaitNote | None:
    """The note in ``raw``, None when there is none or it is malformed."""
    if not raw or len(raw) < _HEAD.size:
        return None
    version, kind, call_id, started_ns, writer, k = _HEAD.unpack_from(raw)
    if version != _VERSION or kind not in (BLOCKED, WAITING) or writer < 0 \
            or k > MAX_NAME or len(raw) != _HEAD.size + k:
        return None
    return WaitNote(kind, call_id, started_ns, writer,
                    raw[_HEAD.size:].decode("utf-8", "replace"))


def unanswered(call_id: int, answered: int) -> bool:
    """Whether call ``call_id`` comes after ``answered``, the last call answered on its channel.

    Calls are served in the order of their ids, which wrap at 2**32: serial number
    arithmetic, as TCP's sequence numbers (review L: a maximum ignored every note after
    the wrap).
    """
    return 0 < (call_id - answered) % _IDS < _IDS // 2


def closes_cycle(note: WaitNote | None, answered: int, *, target: int, me: int,
                 mine: WaitNote, noted: bool) -> bool:
    """Whether a caller's ``note`` closes a cycle with this actor's wait ``mine``.

    ``answered``: the id of the last call this actor answered on the note's channel.
    ``target``: the actor waited on; ``me``: this one.  ``noted``: whether ``mine``
    reached the actor waited on (its channel has rings): only then may the failure be
    left to that actor, when its wait is the later.
    """
    if note is None or note.writer != target or not unanswered(note.call_id, answered):
        return False  # no wait, another actor's, or one that has ended
    if noted:  # the actor waited on sees this wait as this one sees its own
        return (note.started_ns, target) < (mine.started_ns, me)
    return True
