"""The ZeroMQ link that carries messages at or above the size threshold.

One PAIR socket per channel over ``ipc://`` in the session's private 0700
directory: the caller binds, the callee connects.  Buffers go as separate
frames with ``copy=False`` (ZeroMQ reads the tensor's memory directly) and
``track=True``: :meth:`BulkLink.send` returns only once ZeroMQ has released
the buffers, so a caller may modify or free its tensor as soon as the call
returns.  Frames are received with ``copy=False`` and handed on as
``uint8`` arrays over the frame's own memory: no further copy.

High-water marks bound what a slow reader can make the writer queue.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import zmq

from runtime.errors import DeadlineError, ProtocolError, TransportError

__all__ = ["BulkLink"]

HWM = 64  # messages queued per direction before send blocks


class BulkLink:
    """One end of a channel's ZeroMQ PAIR link."""

    def __init__(self, endpoint: str, *, bind: bool) -> None:
        self.endpoint = endpoint
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        try:
            if bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise TransportError(f"cannot {'bind' if bind else 'connect'} {endpoint}: "
                                 f"{exc}") from exc
        self.socket = sock
        self._bound_path = endpoint[len("ipc://"):] if bind and endpoint.startswith("ipc://") \
            else None

    def send(self, parts: Sequence[object], *, deadline: float | None,
             check: Callable[[], None] | None, slice_s: float = 0.05,
             small: bool = False) -> None:
        """Send ``parts`` as one multipart message; wait until ZeroMQ let go of them.

        ``small``: the parts are a few bytes, copied by ZeroMQ (no waiting after).
        """
        while True:
            tracker = self.try_send(parts, copy=small)
            if tracker is not None:
                break
            self.pause(deadline, check, "send", slice_s)
        if not small:
            self.wait_sent(tracker, deadline, check, slice_s)

    def try_send(self, parts: Sequence[object], *,
                 copy: bool = False) -> zmq.MessageTracker | bool | None:
        """Queue ``parts`` as one message without blocking: None if the link is full.

        Zero-copy (the default) returns the message's tracker; with ``copy``
        ZeroMQ copies the parts at once and this returns True.
        """
        try:
            if copy:
                self.socket.send_multipart(parts, flags=zmq.NOBLOCK)
                return True
            return self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise TransportError(f"ZeroMQ send on {self.endpoint} failed: {exc}") from exc

    def wait_sent(self, tracker: zmq.MessageTracker, deadline: float | None,
                  check: Callable[[], None] | None, slice_s: float = 0.05) -> None:
        """Wait until ZeroMQ has let go of a queued message's buffers."""
        while not tracker.done:
            try:
                tracker.wait(slice_s)
            except zmq.NotDone:
                self.pause(deadline, check, "send", 0)

    def recv(self, *, deadline: float | None, check: Callable[[], None] | None,
             slice_s: float = 0.05, max_parts: int | None = None) -> list[zmq.Frame]:
        """Receive one multipart message as frames (no copy).

        ``max_parts``: refuse (``ProtocolError``) a message of more parts, as soon as the
        next one shows, leaving the rest in the socket -- the link is then out of step and
        must be given up.  ZeroMQ has the whole message once the first part is readable.
        """
        sock = self.socket
        while True:
            try:
                if max_parts is None:
                    return sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                return self._recv_at_most(max_parts)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise TransportError(f"ZeroMQ receive on {self.endpoint} failed: "
                                     f"{exc}") from exc
            timeout = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
            if timeout <= 0 or not sock.poll(int(timeout * 1000) or 1, zmq.POLLIN):
                self.pause(deadline, check, "receive", 0)

    def _recv_at_most(self, max_parts: int) -> list[zmq.Frame]:
        sock = self.socket
        parts = [sock.recv(flags=zmq.NOBLOCK, copy=False)]
        while parts[-1].more:
            if len(parts) >= max_parts:
                raise ProtocolError(f"a ZeroMQ message of more than {max_parts} parts on "
                                    f"{self.endpoint}")
            parts.append(sock.recv(copy=False))  # there: ZeroMQ delivers messages whole
        return parts

    def readable(self) -> bool:
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    @staticmethod
    def pause(deadline: float | None, check: Callable[[], None] | None, what: str,
              sleep_s: float = 0.05) -> None:
        """Between attempts: raise if the peer is gone or ``deadline`` passed, else nap."""
        if check is not None:
            check()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineError(f"ZeroMQ {what} timed out")
        if sleep_s:
            time.sleep(min(sleep_s, 0.001))

    def close(self) -> None:
        """Close the socket; the binding end also removes its ``ipc://`` file."""
        if not self.socket.closed:
            self.socket.close(0)
            if self._bound_path is not None:
                try:
                    os.unlink(self._bound_path)
                except FileNotFoundError:
                    pass
