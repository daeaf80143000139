"""The runtime's exception hierarchy.

Every error the runtime itself raises derives from :class:`ActorRuntimeError`.
Exceptions raised by user code inside an actor are *not* runtime errors: they
reach the caller with their own type, mixed with :class:`RemoteError` (see
:func:`make_remote_exception`).
"""

from __future__ import annotations

import contextlib
import copyreg
import threading
import types
from collections.abc import Iterator

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

    def __setstate__(self, state: dict) -> None:
        # The state comes after the instance is made (see exception_reduction): the
        # traceback it holds becomes the cause again, as make_remote_exception set it.
        super().__setstate__(state)
        _set_remote_cause(self)


def _set_remote_cause(exc: BaseException) -> None:
    exc.__cause__ = RemoteTraceback(str(getattr(exc, "remote_traceback", "")))


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
_ORIGINAL: dict[type, type] = {}  # mixed class -> the class it was made for
# Per thread: the mixed instances inside their class's copyreg reducer (see _mixed_class),
# and the lists collecting what rebuild_exception builds (see rebuilt()).
_LOCAL = threading.local()


def _mixed_class(cls: type[BaseException]) -> type[BaseException] | None:
    """Return a class deriving from both ``cls`` and ``RemoteError`` (cached).

    The class pickles itself as ``cls`` rebuilt by :func:`rebuild_exception` with
    ``remote=True``, so a remote exception that travels again (an actor lets an
    exception from another actor through) is still an instance of ``cls`` and of
    ``RemoteError`` at the far end.
    """
    if cls in _MIXED:
        return _MIXED[cls]
    def setstate(self: BaseException, state: dict | tuple) -> None:
        if type(state) is tuple:  # (__dict__, slot values): see reduce
            _set_state(self, state)  # which comes back here with the dict
            return
        cls.__setstate__(self, state)  # the class's own, or BaseException's
        _set_remote_cause(self)

    def reduce(self: BaseException) -> tuple:
        # A reducer registered for the class comes first, as for the class itself: the
        # state it strips (a lock, a handle) cannot travel, so without it the next hop
        # got a plain RemoteError.  It rebuilds the class itself; the receiver mixes it.
        # A reducer that starts from the default reduction (``e.__reduce__()``) gets it:
        # asking the reducer again recursed for ever (review Q), and one that cannot take
        # the mixed class leaves the default to it.
        reducer = copyreg.dispatch_table.get(cls)
        inside = _LOCAL.__dict__.setdefault("reducing", set())
        if reducer is not None and id(self) not in inside:
            inside.add(id(self))
            try:
                return reducer(self)
            except Exception:  # noqa: BLE001 - the default reduction, as if none were registered
                pass
            finally:
                inside.discard(id(self))
        # The state in the reduction's state slot, as exception_reduction does; slot
        # values beside the dict in a tuple that ``setstate`` takes (not pickle's state
        # setter, which Python 3.11's copy module cannot apply: review Q).
        state = getattr(self, "__dict__", None) or None
        slots = _slot_values(self)
        return (rebuild_exception, (cls, self.args, None, True, _os_fields(self)),
                (state, slots) if slots else state)

    try:
        mixed = type(cls.__name__, (cls, RemoteError), {
            "__module__": cls.__module__,
            "__qualname__": getattr(cls, "__qualname__", cls.__name__),
            "__str__": _remote_text,
            "__reduce__": reduce,
            "__setstate__": setstate,
        })
    except TypeError:  # final classes, incompatible layouts
        mixed = None
    else:
        _ORIGINAL[mixed] = cls
    _MIXED[cls] = mixed
    return mixed


def _blank(cls: type[BaseException], args: tuple) -> BaseException:
    """An instance of ``cls`` made without calling ``__init__``, with ``args`` set.

    ``cls.__new__(cls, *args)`` first (what ``BaseException.__new__`` and classes such as
    ``ExceptionGroup`` expect), then ``cls.__new__(cls)`` for a ``__new__`` that takes
    other arguments.
    """
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:
        exc = cls.__new__(cls)
    if isinstance(exc, OSError):
        # OSError.__new__ leaves errno, strerror and filename to __init__ when a subclass
        # has its own: OSError's (not the subclass's) sets them from the args.
        try:
            OSError.__init__(exc, *args)
        except (TypeError, ValueError):
            pass
    exc.args = args
    return exc


def exception_reduction(exc: BaseException) -> tuple | None:
    """A pickle reduction of ``exc`` that does not call its ``__init__``, or None.

    Python pickles an exception as ``(type(exc), exc.args, exc.__dict__)`` and
    rebuilds it with ``type(exc)(*args)``, which fails (or builds something else) for
    the many exceptions whose ``__init__`` takes other arguments than the ``args`` it
    passes up (``def __init__(self, a, b): super().__init__(f"{a}/{b}")``, a
    keyword-only ``code``).  This reduction carries the same three things but rebuilds
    with :func:`rebuild_exception`.  None for a class that defines its own
    ``__reduce__``/``__reduce_ex__`` (a user class may): its own reduction is used
    then; ``OSError``'s own is replaced too (it rebuilds as ``cls(errno, strerror,
    filename)``, changing ``args``): its filenames travel beside them (:func:`_os_fields`).
    """
    cls = type(exc)
    if cls.__reduce_ex__ is not object.__reduce_ex__ or \
            cls.__reduce__ not in (BaseException.__reduce__, OSError.__reduce__):
        return None
    # The state goes in the reduction's state slot, not among the arguments: pickle
    # applies it after memoising the instance, so state that refers back to the
    # exception (``exc.items = [exc]``) finds it (as an argument, the inner reference
    # was rebuilt first, from the still empty state, and the state was lost).
    return _with_state((rebuild_exception, (cls, exc.args, None, False, _os_fields(exc))), exc)


def _with_state(reduction: tuple, exc: BaseException) -> tuple:
    """``reduction`` with ``exc``'s state: its ``__dict__``, and its ``__slots__`` if any.

    ``BaseException.__setstate__`` takes a dict alone, so slot values go through a state
    setter of their own (:func:`_set_state`; pickle protocol 5's sixth item).  Python's
    own reduction of an exception drops them.
    """
    state = getattr(exc, "__dict__", None) or None
    slots = _slot_values(exc)
    if not slots:
        return (*reduction, state)
    return (*reduction, (state, slots), None, None, _set_state)


def _slot_descriptors(cls: type) -> dict[str, types.MemberDescriptorType]:
    """Every ``__slots__`` member of ``cls`` and its bases, by the name it is stored under.

    Taken from the classes' dicts, not derived from ``__slots__``: a private name is
    mangled with the class's name at creation (a class renamed since, or named with
    underscores alone, derived it wrongly: review Q).  Only classes that declare
    ``__slots__``: built-in ones (``OSError.errno``) keep their fields their own way.
    """
    out: dict[str, types.MemberDescriptorType] = {}
    for klass in reversed(cls.__mro__):
        if "__slots__" not in klass.__dict__:
            continue
        for name, member in klass.__dict__.items():
            if isinstance(member, types.MemberDescriptorType) and member.__objclass__ is klass:
                out[name] = member
    return out


def _slot_values(exc: BaseException) -> dict[str, object]:
    """The values set in ``exc``'s slots.

    Read through the members themselves: a subclass's property of the same name is not
    asked.
    """
    values = {}
    for name, member in _slot_descriptors(type(exc)).items():
        try:
            values[name] = member.__get__(exc, type(exc))
        except AttributeError:  # never set
            pass
    return values


def _set_state(exc: BaseException, state: tuple) -> None:
    """Apply a ``(__dict__, slot values)`` state (see :func:`_with_state`)."""
    state, slots = state
    if state:
        exc.__setstate__(state)
    members = _slot_descriptors(type(exc))
    for name, value in (slots or {}).items():
        member = members.get(name)
        if member is not None:
            member.__set__(exc, value)


_OS_FIELDS = (OSError.filename, OSError.filename2, OSError.characters_written)


def _os_fields(exc: BaseException) -> tuple | None:
    """What an ``OSError`` keeps outside ``args`` and ``__dict__``, or None.

    ``filename`` and ``filename2`` (``args`` holds errno and strerror alone) and a
    ``BlockingIOError``'s ``characters_written`` (a third argument means a filename to
    any subclass of it, the mixed remote class included).  Read and written through
    OSError's own descriptors: a subclass may hide them behind a read-only property.
    """
    if not isinstance(exc, OSError):
        return None
    out = []
    for field in _OS_FIELDS:
        try:
            out.append(field.__get__(exc))
        except AttributeError:  # characters_written not set
            out.append(None)
    return tuple(out)


def _set_os_fields(exc: BaseException, fields: tuple | None) -> None:
    """Give a rebuilt ``OSError`` the fields :func:`_os_fields` read from the original.

    A field that was None is unset, not set to None: ``OSError.__str__`` shows a filename
    that is set at all (``: None -> None``), and the rebuild may have derived one from
    the arguments.
    """
    if fields is None or not isinstance(exc, OSError):
        return
    filename, filename2, written = fields
    for field, value in ((OSError.filename, filename), (OSError.filename2, filename2)):
        if value is None:
            field.__delete__(exc)
        else:
            field.__set__(exc, value)
    if written is not None:
        OSError.characters_written.__set__(exc, written)


def rebuild_exception(cls: type[BaseException], args: tuple, state: dict | None = None,
                      remote: bool = False, os_fields: tuple | None = None) -> BaseException:
    """Rebuild an exception from its class, ``args`` and ``__dict__``, without ``__init__``.

    What unpickling a ``BaseException`` does, less the call to ``cls(*args)``: the
    instance is made with ``__new__``, ``args`` set and ``state`` applied with
    ``__setstate__``.  With ``remote`` the instance is of ``cls`` mixed with
    :class:`RemoteError` (a :class:`RemoteError` if no such class can be made), and its
    ``__cause__`` carries ``remote_traceback`` again, as :func:`make_remote_exception`
    set it.
    """
    target: type[BaseException] = cls
    if remote:
        target = (_mixed_class(cls) if isinstance(cls, type) and issubclass(cls, Exception)
                  else None) or RemoteError
    exc = _blank(target, tuple(args))
    for built in _LOCAL.__dict__.get("collecting", ()):
        built.append(exc)
    try:
        _set_os_fields(exc, os_fields)
    except (AttributeError, TypeError, ValueError):  # malformed: the fields are extras
        pass
    if state:
        exc.__setstate__(state)
    if remote:
        exc.__cause__ = RemoteTraceback(str(getattr(exc, "remote_traceback", "")))
    return exc


@contextlib.contextmanager
def rebuilt() -> Iterator[list[BaseException]]:
    """Collect the exceptions :func:`rebuild_exception` builds in this thread meanwhile.

    What ``make_remote_exception(..., adopt=True)`` may take over: an unpickled
    exception can also be an object the process already held (a ``__reduce__`` that
    returns a cached instance, or a global), which must not become a remote one.
    """
    stack = _LOCAL.__dict__.setdefault("collecting", [])
    built: list[BaseException] = []
    stack.append(built)
    try:
        yield built
    finally:
        stack.remove(built)


def make_remote_exception(exc: BaseException | None, type_name: str, message: str,
                          traceback_text: str, *, adopt: bool = False) -> RemoteError:
    """Build the exception a caller sees for a remote failure.

    With ``exc`` (the rebuilt original) the result is an instance of
    ``type(exc)`` and ``RemoteError``; without it, a plain ``RemoteError``.
    The remote traceback is in the text and, as :class:`RemoteTraceback`, in
    ``__cause__``.

    Only an ``Exception`` keeps its type.  Any other ``BaseException`` (the
    ``SystemExit`` or ``KeyboardInterrupt`` of a method end the actor and never get
    here; ``asyncio.CancelledError``, ``GeneratorExit``, a user's subclass) arrives as
    a plain ``RemoteError`` naming it in ``remote_type``: such exceptions steer the
    task, generator or process that raised them, and raised again in the caller an
    ``except CancelledError`` or asyncio itself would take the remote failure for the
    caller's own cancellation.  (A class mixed with ``RemoteError`` would also be an
    ``Exception``, which such a class means not to be.)

    ``adopt``: ``exc`` is the caller's to change (just built by :func:`rebuild_exception`,
    see :func:`rebuilt`).  It then becomes the result itself where its class allows
    (``__class__`` set to the mixed class), so what refers back to it -- in its
    ``__dict__``, its slots, its ``args`` -- still does; a copy kept pointing at the
    original.
    """
    out: BaseException | None = None
    if exc is not None and isinstance(exc, Exception):
        cls = _ORIGINAL.get(type(exc), type(exc))  # a remote one, relayed
        mixed = _mixed_class(cls)
        if mixed is not None and adopt:
            try:
                exc.__class__ = mixed
                out = exc
            except TypeError:  # a built-in class, or another layout: copied below
                pass
        if mixed is not None and out is None:
            try:
                out = _blank(mixed, exc.args)
                _set_os_fields(out, _os_fields(exc))
                out.__dict__.update(getattr(exc, "__dict__", {}))
                members = _slot_descriptors(mixed)
                for name, value in _slot_values(exc).items():
                    if name in members:
                        members[name].__set__(out, value)
            except Exception:  # noqa: BLE001 - any failure means: fall back
                out = None
    if out is None:
        out = RemoteError(message)
    out.remote_type = type_name
    out.remote_message = message
    out.remote_traceback = traceback_text
    out.__cause__ = RemoteTraceback(traceback_text)
    return out  # type: ignore[return-value]
