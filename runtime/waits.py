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
blocked on a call to it that it has not answered, closes a cycle (the walk below, two
links long): the wait fails with ``ActorRuntimeError``, once the channel of the call
waited on holds no reply left unread (the actor may have answered, then blocked, and its
note be read before its reply: see ``CallerChannel._nothing_unread``).

Why it is exact: the note's writer is blocked while its call is unanswered (a live
process's note is cleared when its wait ends), so it serves nothing, and the call waited
on -- its current call, or one queued behind it -- ends only after the note's call is
served, which needs the waiting thread.  Both see the cycle, each in the other's note:
the later wait fails (ties: the higher index), and the other then ends.  A note says
nothing of the writer's chain: a chain can outlive the waits it names (a member whose
wait failed, timed out or was interrupted is free while its call is still served with
it), and one from an untrusted caller is forged at will -- review L of this change
turned both into false cycles.

Cycles through more actors (a waits on b, b on c, c on a) are caught by passing waits
along, as in Chandy, Misra and Haas's edge chasing.  A note also carries the waits its
writer found waiting on it, directly or further up (:class:`Link`: who waits, on which
call, to whom, since when): at each look an actor takes the notes of its callers blocked
on a call it has not answered (each such note a :class:`Link` to it, checked by the one
actor that can: the one waited on), adds the links those notes carry, and leaves them in
its own note (:func:`upstream`).  A cycle through this actor's wait shows once its
target's wait comes back among them, and the next one's, around to a caller of its own
(:func:`cycle_through`).  Why a link passed along still holds: it was checked by the
actor waited on, during that actor's current wait (a new wait starts a new note, with no
links); that actor serves nothing until the wait ends, so the call linked stays
unanswered, and its caller's wait -- without a timeout -- ends only by an exception in
it (an interrupt, its process's death, or its own wait failing as the cycle's latest).
Of the waits in a cycle the latest fails (ties: the higher index): every member comes
to see the same cycle.  (A wait whose own note could not be written fails itself, since
nobody else sees its link; a ring-less channel, where no note can be written, cannot
conclude at all: see ``CallerChannel._nothing_unread``.)

Only links seen since this actor's wait began are walked: a wait that ended by an
exception (the cycle's own failed one, a process killed) stays in notes until their
writers' next looks, and a later wait walked it as if it still held (review P).  A cycle
broken by such an exception less than a look a hop before the verdict may still fail
its latest wait -- the links say what held until then, as for any detector racing a
timeout (review R).  An actor shown with two waits is followed through the later one (a
nested wait blocks the thread; an ended one is the older).  A note keeps the waits of
actors that others wait on first: a crowd of waits on a member, none of them waited on,
hid a cycle's links (review P).

Not caught: waits with a timeout or under ``call_timeout`` (they end anyway), waits on
other threads, cycles of more than :data:`MAX_LINKS` waits -- or with more waits of
actors that others wait on than that upstream of a member -- and anything through an
untrusted actor: it leaves no note, and a note from an untrusted caller is never read.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["BLOCKED", "MAX_LINKS", "WAITING", "Link", "WaitNote", "cycle_through", "decode",
           "encode", "fails", "unanswered", "upstream"]

BLOCKED = 1  # in a blocking call
WAITING = 2  # waiting on a future without a timeout
# version, kind, call id, started (monotonic ns), writer (actor index), bytes of its name,
# number of links
_HEAD = struct.Struct("<IIQQiII")
_LINK = struct.Struct("<iiIQQ")  # waiter, target, call id, started, seen
_VERSION = 2
MAX_NAME = 200  # bytes of the writer's name kept
MAX_LINKS = 24  # links a note carries: 36 + 200 + 24 * 28 < ``ring.NOTE_MAX``
# A link passed along but not seen by the actor waited on for this long is dropped.  In a
# cycle of notes the links go round and round: without an age, one that ended never left.
# Each look of the actor waited on renews it (every WATCH_MAX_S at most), and a copy
# passed along ages a look's interval a hop: MAX_LINKS hops of 0.25 s fit.
LINK_TTL_NS = 10_000_000_000
_IDS = 1 << 32  # call ids wrap here (``CallerChannel``: ``& 0xFFFFFFFF``)


class Link(NamedTuple):
    """One wait: actor ``waiter``'s serving thread on its call ``call_id`` to ``target``.

    ``seen_ns``: when ``target`` last found it in ``waiter``'s note (the one actor that
    can tell the call is unanswered).  Not part of the wait's identity (:attr:`wait`).
    """

    waiter: int
    target: int
    call_id: int
    started_ns: int
    seen_ns: int

    @property
    def wait(self) -> tuple[int, int, int, int]:
        return self[:4]


class WaitNote(NamedTuple):
    """What the serving thread of actor ``writer`` is blocked on, and who waits on it."""

    kind: int  # BLOCKED or WAITING
    call_id: int  # of the call it waits on, on the channel that carries this note
    started_ns: int  # time.monotonic_ns() when the wait began (one clock per host)
    writer: int  # the waiting actor's index
    name: str = ""  # its name, for the error text
    links: tuple[Link, ...] = ()  # the waits found waiting on this one (see upstream)


def encode(note: WaitNote) -> bytes:
    name = note.name.encode("utf-8", "replace")[:MAX_NAME]
    links = note.links[:MAX_LINKS]
    return b"".join([_HEAD.pack(_VERSION, note.kind, note.call_id, note.started_ns,
                                note.writer, len(name), len(links)), name,
                     *(_LINK.pack(*link) for link in links)])


def decode(raw: bytes | None) -> WaitNote | None:
    """The note in ``raw``, None when there is none or it is malformed."""
    if not raw or len(raw) < _HEAD.size:
        return None
    version, kind, call_id, started_ns, writer, k, n = _HEAD.unpack_from(raw)
    if version != _VERSION or kind not in (BLOCKED, WAITING) or writer < 0 \
            or k > MAX_NAME or n > MAX_LINKS or len(raw) != _HEAD.size + k + n * _LINK.size:
        return None
    at = _HEAD.size + k
    links = tuple(Link(*_LINK.unpack_from(raw, at + i * _LINK.size)) for i in range(n))
    if any(link.waiter < 0 or link.target < 0 for link in links):
        return None
    return WaitNote(kind, call_id, started_ns, writer,
                    raw[_HEAD.size:at].decode("utf-8", "replace"), links)


def unanswered(call_id: int, answered: int) -> bool:
    """Whether call ``call_id`` comes after ``answered``, the last call answered on its channel.

    Calls are served in the order of their ids, which wrap at 2**32: serial number
    arithmetic, as TCP's sequence numbers (review L: a maximum ignored every note after
    the wrap).
    """
    return 0 < (call_id - answered) % _IDS < _IDS // 2


def upstream(waiting: list[tuple[WaitNote, Link]], me: int, target: int,
             now_ns: int) -> tuple[Link, ...]:
    """The waits that wait, directly or further up, on actor ``me``'s (on ``target``).

    ``waiting``: the notes of this actor's callers blocked on a call it has not answered,
    each with the link to this actor that it proves (seen now).  Those links, then the
    links their notes carry, each wait once (its latest ``seen_ns``), less those not seen
    for :data:`LINK_TTL_NS` and this actor's own (a wait of its own comes back to it only
    through a cycle, which :func:`cycle_through` finds from the target's side).

    At most :data:`MAX_LINKS`, the waits of actors that others wait on first: a member of
    a cycle is one, so a crowd of waits on a member, none waited on, cannot push the
    cycle's links out (review P: 23 callers blocked on one member hid a cycle of three).
    """
    out: dict[tuple[int, int, int, int], Link] = {}
    for _, link in waiting:
        out[link.wait] = link
    for note, _ in waiting:
        for link in note.links:
            if link.waiter == me or now_ns - link.seen_ns > LINK_TTL_NS:
                continue
            known = out.get(link.wait)
            if known is None or known.seen_ns < link.seen_ns:
                out[link.wait] = link
    links = list(out.values())
    if len(links) > MAX_LINKS:
        waited_on = {link.target for link in links} | {target}
        links.sort(key=lambda link: link.waiter not in waited_on)  # stable: order kept
    return tuple(links[:MAX_LINKS])


def cycle_through(mine: Link, links: tuple[Link, ...]) -> tuple[Link, ...] | None:
    """The cycle of waits that ``mine`` closes, as ``links`` (this actor's upstream) show.

    Each actor's serving thread blocks on one call at a time, so from ``mine`` the waits
    lead on one way: to its target's wait, to that one's target's, and so on.  A cycle
    when they come back to ``mine.waiter``; None when they end or loop elsewhere.  An
    actor shown with two waits is walked through the later one: a wait nested in another
    (a signal handler's call) is what blocks the thread, the outer one cannot end before
    it, and of an ended wait and a new one the new one is the later.  (Giving up instead,
    as the first version did, left a cycle through a nested wait hanging for ever while
    both waits were renewed: review R.)

    Only links seen since ``mine`` began count.  One seen before may have ended before
    it (review P): a wait of the same cycle that failed, its stale link still in a
    note, made the walk from a later wait go round as if it still waited; so did the
    wait of a process killed and restarted since.  A link seen during this wait held
    then, while this one waited.
    """
    by_waiter: dict[int, Link] = {}
    for link in links:
        if link.waiter == mine.waiter or link.seen_ns < mine.started_ns:
            continue
        known = by_waiter.get(link.waiter)
        if known is None or (known.started_ns, known.call_id, known.target) < \
                (link.started_ns, link.call_id, link.target):
            by_waiter[link.waiter] = link
    path = [mine]
    at = mine.target
    while at != mine.waiter:
        link = by_waiter.pop(at, None)  # popped: a loop elsewhere ends the walk
        if link is None:
            return None
        path.append(link)
        at = link.target
    return tuple(path)


def fails(cycle: tuple[Link, ...], *, noted: bool) -> bool:
    """Whether the wait ``cycle[0]`` (this actor's) is the one of ``cycle`` to fail.

    The latest (ties: the higher waiter index): every member sees the same cycle, so
    one wait of it fails.  (An actor with a wait nested in another, a signal handler's,
    may be in two cycles at once, one through each: each fails its own latest.)  Without
    ``noted`` (this wait's note reached nobody) no other member can see the cycle, and this
    wait fails.
    """
    if not noted:
        return True
    latest = max(cycle, key=lambda link: (link.started_ns, link.waiter))
    return latest.wait == cycle[0].wait
