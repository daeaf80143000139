"""The runtime's exception hierarchy.

Every error the runtime itself raises derives from :class:`ActorRuntimeError`.
Exceptions raised by user code inside an actor are *not* runtime errors: they
reach the caller with their own type, mixed with :class:`RemoteError` (see
:func:`make_remote_exception`).
"""

from __future__ import annotations

__all__ = [
    "ActorDiedError",
    "ActorRuntimeError",
    "ActorStartError",
    "CallTimeoutError",
    "DeadlineError",
    "ProtocolError",
    "RemoteError",
    "TransportError",
]


class ActorRuntimeError(Exception):
    """Base class of every error raised by the runtime itself."""


class ActorStartError(ActorRuntimeError):
    """An actor could not be started: its ``__init__`` raised or its process died."""


class ActorDiedError(ActorRuntimeError):
    """The actor's process died before or during the call."""


class CallTimeoutError(ActorRuntimeError, TimeoutError):
    """No reply arrived within the system's ``call_timeout``."""


class DeadlineError(ActorRuntimeError, TimeoutError):
    """A transport wait reached its deadline.

    The runtime catches this, never the built-in ``TimeoutError``: one raised by a signal
    handler during a wait (an alarm-based timeout) reaches the caller, as Ctrl-C does.
    """


class TransportError(ActorRuntimeError):
    """A channel, ring, segment or ZeroMQ link failed."""


class ProtocolError(TransportError):
    """A frame or encoded message was malformed, truncated or oversized."""


class RemoteError(Exception):
    """An exception raised by user code in another process.

    Instances carry ``remote_type`` (the qualified type name), ``remote_message``
    and ``remote_traceback`` as strings.  Exceptions that could be rebuilt are
    instances of both their original type and ``RemoteError``.
    """

    remote_type: str = ""
    remote_message: str = ""
    remote_traceback: str = ""

    def __str__(self) -> str:
        return _remote_text(self)


class RemoteTraceback(Exception):
    """Carries the remote traceback text; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _remote_text(exc: BaseException) -> str:
    msg = getattr(exc, "remote_message", "")
    tb = getattr(exc, "remote_traceback", "")
    return f"{msg}\n\nRemote traceback:\n{tb}" if tb else msg


_MIXED: dict[type, type] = {}


def _mixed_class(cls: type[BaseException]) -> type[BaseException] | None:
    """Return a class deriving from both ``cls`` and ``RemoteError`` (cached)."""
    if cls in _MIXED:
        return _MIXED[cls]
    try:
        mixed = type(cls.__name__, (cls, RemoteError), {
            "__module__": cls.__module__,
            "__qualname__": getattr(cls, "__qualname__", cls.__name__),
            "__str__": _remote_text,
            "__reduce__": lambda self: (
                make_remote_exception, (None, self.remote_type, self.remote_message,
                                        self.remote_traceback)),
        })
    except TypeError:  # final classes, incompatible layouts
        mixed = None
    _MIXED[cls] = mixed
    return mixed


def make_remote_exception(exc: BaseException | None, type_name: str, message: str,
                          traceback_text: str) -> RemoteError:
    """Build the exception a caller sees for a remote failure.

    With ``exc`` (the rebuilt original) the result is an instance of
    ``type(exc)`` and ``RemoteError``; without it, a plain ``RemoteError``.
    The remote traceback is in the text and, as :class:`RemoteTraceback`, in
    ``__cause__``.
    """
    out: BaseException | None = None
    if exc is not None and isinstance(exc, Exception):
        mixed = _mixed_class(type(exc))
        if mixed is not None:
            try:
                out = mixed.__new__(mixed)
                out.__dict__.update(getattr(exc, "__dict__", {}))
                out.args = exc.args
            except Exception:  # noqa: BLE001 - any failure means: fall back
                out = None
    if out is None:
        out = RemoteError(message)
    out.remote_type = type_name
    out.remote_message = message
    out.remote_traceback = traceback_text
    out.__cause__ = RemoteTraceback(traceback_text)
    return out  # type: ignore[return-value]
