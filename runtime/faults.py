"""Fault injection for tests: named points where a process kills itself.

A test sets ``RT_FAULT=<point>`` (or ``<point>@<n>`` to fire on the n-th hit)
and ``RT_FAULT_ACTOR=<actor name>`` in the environment of the driver before
``spawn``; the actor process of that name arms itself at start-up and sends
itself SIGKILL when it reaches the point.  Other processes never arm, so the
driver that set the variables is safe.  Disarmed, a point costs one global
load and a comparison; a hot path tests ``faults.armed`` first and skips even the call.

Points: ``init`` (inside the actor, before ``__init__`` runs),
``before_reply`` (a result is ready, nothing sent), ``ring_before_flag``
(payload copied into a ring record, ``write_pos`` not yet stored),
``zmq_send`` (a large message handed to ZeroMQ, its marker not yet written).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "arm", "hit"]

POINTS = frozenset({"init", "before_reply", "ring_before_flag", "zmq_send"})
armed: str | None = None  # the point armed in this process, if any
_remaining = 0


def arm(process_name: str) -> None:
    """Arm the point named in ``RT_FAULT`` if ``RT_FAULT_ACTOR`` names this process."""
    global armed, _remaining
    spec = os.environ.get("RT_FAULT")
    if not spec or os.environ.get("RT_FAULT_ACTOR") != process_name:
        return
    point, _, count = spec.partition("@")
    if point not in POINTS:
        raise ValueError(f"RT_FAULT names unknown point {point!r}; known: {sorted(POINTS)}")
    armed, _remaining = point, int(count or 1)


def hit(point: str) -> None:
    """Kill this process with SIGKILL if ``point`` is armed and its count is reached."""
    global _remaining
    if armed is not point and armed != point:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
