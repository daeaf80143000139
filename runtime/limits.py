"""Descriptors: the soft limit raised once, and room kept for what libzmq must accept.

A caller binds each channel's ZeroMQ socket; the actor connects, and libzmq's I/O thread
accepts the connection later, on its own.  libzmq 4.3.5 asserts when that ``accept`` fails
with ``EMFILE``: the whole process aborts (SIGABRT), pending calls, TEE state and all.  A
channel costs about eight descriptors, plus one per pool slot mapped (up to 40), so a driver
talking to a few dozen actors meets the common soft limit of 1024.  So the limit is raised
to the hard one (at most :data:`SOFT_CAP`) when an ``ActorSystem`` starts, and a channel is
opened only with :data:`HEADROOM` descriptors to spare -- otherwise the call fails with a
``TransportError`` that says why, and the process lives on.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from runtime.errors import TransportError

__all__ = ["HEADROOM", "SOFT_CAP", "OutOfDescriptors", "check_fd_headroom", "raise_fd_limit"]

log = logging.getLogger(__name__)

SOFT_CAP = 1 << 20
HEADROOM = 64  # descriptors a channel open leaves free: its own, its pool's, libzmq's


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (capped); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = SOFT_CAP if hard == resource.RLIM_INFINITY else min(hard, SOFT_CAP)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError) as exc:
            log.debug("could not raise the descriptor limit to %d: %s", want, exc)
    return soft


class OutOfDescriptors(TransportError):
    """Too few file descriptors are left to open what was asked for."""


CALLER_ADVICE = ("raise the limit, ulimit -n, or talk to fewer actors: handle.kill() closes "
                 "a channel")


def check_fd_headroom(what: str, need: int = HEADROOM, *, advice: str = CALLER_ADVICE) -> None:
    """Raise :class:`OutOfDescriptors` unless ``need`` more descriptors can be opened now."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        return
    try:
        used = len(os.listdir("/proc/self/fd"))  # takes a descriptor itself
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return  # no /proc: nothing to measure by
        used = soft
    if soft - used < need:
        raise OutOfDescriptors(
            f"cannot open {what}: {used} of {soft} file descriptors in use, fewer than {need} "
            f"left ({advice})")
