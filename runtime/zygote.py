"""The zygote: a warm process that forks new actors.

Starting an actor as a fresh interpreter costs ~1 s on 2 cores, nearly all
of it ``import torch``; every restart pays it again.  The supervisor starts
one zygote per session (``python -m runtime.zygote``) with the actors'
environment.  It imports torch, numpy, ZeroMQ, cloudpickle and the runtime --
and does nothing else: it never runs a torch op, never touches CUDA, creates
no ZeroMQ context and starts no thread of its own (numpy's OpenBLAS starts
its pool at import; OpenBLAS re-creates it after ``fork`` through its own
``pthread_atfork`` handlers).  ``gc.freeze()`` then keeps the collector from
touching, and so copying, the imported objects in every child.

Protocol (JSON frames, ``wire.py``, over a socket pair with the supervisor):
the zygote says ``["ready", pid]``; the supervisor asks ``["fork", boot]``
with two descriptors (the actor's status pipe and its constructor memfd) and
gets ``["forked", pid]`` or ``["failed", text]``.

Each actor is forked twice: the zygote forks an intermediate process, which
forks the actor and exits at once, so the actor is re-parented to the
supervisor (a child subreaper) and the supervisor reaps it like any child.
The actor waits for that re-parenting, sets ``PR_SET_PDEATHSIG`` (it must die
with the supervisor), checks its parent once more, then runs exactly what
``python -m runtime.worker`` runs (``runtime.worker.run``).  Its own threads,
ZeroMQ context, CUDA and channels are all made after the fork.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
import warnings

from runtime.wire import FrameReader, write_frame

__all__ = ["main"]

PR_SET_PDEATHSIG = 1
REPARENT_WAIT_S = 5.0


def _warm_up() -> None:
    """Import what every actor imports; run nothing."""
    import cloudpickle  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import zmq  # noqa: F401

    import runtime.calls
    import runtime.worker  # noqa: F401


def _become_actor(boot: dict, status_fd: int, spec_fd: int, table_fd: int,
                  sock: socket.socket) -> None:
    """In the grandchild: detach from the zygote, then run the actor.  Never returns."""
    code = 71
    try:
        os.close(sock.detach())
        supervisor = boot["supervisor_pid"]
        deadline = time.monotonic() + REPARENT_WAIT_S
        while os.getppid() != supervisor:  # the intermediate process is exiting
            if time.monotonic() > deadline:
                os._exit(70)
            time.sleep(0.0002)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != supervisor:  # the supervisor died before the prctl
            os._exit(70)
        gc.unfreeze()
        boot = dict(boot, status_fd=status_fd, spec_fd=spec_fd, table_fd=table_fd)
        if boot.get("cwd"):
            os.chdir(boot["cwd"])
        sys.argv = [sys.argv[0], json.dumps(boot)]
        from runtime.worker import run

        run(boot)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the actor's stderr is the only place to say it
        traceback.print_exc()
    finally:
        os._exit(code)


def _fork_actor(boot: dict, status_fd: int, spec_fd: int, table_fd: int,
                sock: socket.socket) -> int:
    """Fork the actor through an intermediate process; return the actor's pid."""
    r, w = os.pipe()
    mid = os.fork()
    if mid == 0:
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_actor(boot, status_fd, spec_fd, table_fd, sock)
            os.write(w, struct.pack("<i", pid))
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        while len(data) < 4:
            chunk = os.read(r, 4 - len(data))
            if not chunk:
                raise OSError("the intermediate process died before the fork")
            data += chunk
    finally:
        os.close(r)
        os.waitpid(mid, 0)
    return struct.unpack("<i", data)[0]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if os.getppid() != cfg["supervisor_pid"]:
        os._exit(70)
    sock = socket.socket(fileno=cfg["sock_fd"])
    _warm_up()
    # Python 3.12 warns at every fork of a process with several threads; this one's are
    # OpenBLAS's idle pool, which OpenBLAS's own atfork handlers re-create (docstring).
    warnings.filterwarnings("ignore", r"This process .* is multi-threaded",
                            DeprecationWarning)
    gc.freeze()
    reader = FrameReader(sock)
    write_frame(sock, ["ready", os.getpid()])
    while True:
        msgs = reader.feed()
        if reader.eof:
            os._exit(0)
        for msg in msgs:
            fds = reader.take_fds(2)
            try:
                pid = _fork_actor(msg[1], fds[0], fds[1], cfg["table_fd"], sock)
            except OSError as exc:
                write_frame(sock, ["failed", str(exc)])
            else:
                write_frame(sock, ["forked", pid])
            finally:
                for fd in fds:
                    os.close(fd)


if __name__ == "__main__":
    main()
