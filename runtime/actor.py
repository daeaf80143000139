"""``@actor`` marks a class as spawnable; ``ActorHandle`` calls a spawned one.

The decorator only marks: the class is returned unchanged and stays usable
in-process.  Misuse is rejected at decoration time.  A handle turns attribute
access into method proxies: ``h.m(...)`` blocks, ``h.m.remote(...)`` returns
a future; unknown methods fail with ``AttributeError`` before anything is sent.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar, overload

__all__ = ["ActorHandle", "ActorOptions", "actor", "actor_options", "serving"]

T = TypeVar("T", bound=type)

_MARK = "__rt_actor_options__"


@dataclass(frozen=True)
class ActorOptions:
    """Options attached to an actor class by ``@actor(...)``."""

    max_restarts: int = 0
    untrusted: bool = False
    borrow_args: bool = False
    untrusted_callers: bool = False


def _check_options(max_restarts: Any, untrusted: Any, borrow_args: Any = False,
                   untrusted_callers: Any = False) -> None:
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
    for name, value in (("untrusted", untrusted), ("borrow_args", borrow_args),
                        ("untrusted_callers", untrusted_callers)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_reserved(cls: type, what: str) -> None:
    """Reject a class whose methods a handle could not reach (``what``: "... {} ...").

    ``handle.m`` finds ``ActorHandle``'s own attributes before ``__getattr__`` turns a
    name into a remote call, so a method named like one of them (``pid``, ``kill``, but
    also the internals ``_context``, ``_ref``, ...) would never be called: the handle's
    attribute would answer instead, silently.  ``RESERVED_NAMES`` is every such name.
    Data attributes of those names are fine (a dataclass's ``name`` field, say): a handle
    reaches methods only, so it shadows nothing a caller could have reached.
    """
    clash = sorted(n for n in RESERVED_NAMES if callable(getattr(cls, n, None)))
    if clash:
        public = ", ".join(sorted(n for n in RESERVED_NAMES if not n.startswith("_")))
        raise TypeError(
            f"{what.format(cls.__qualname__)} defines {', '.join(clash)}, which "
            f"{'is' if len(clash) == 1 else 'are'} reserved for ActorHandle attributes "
            f"({public}; internals: "
            f"{', '.join(sorted(n for n in RESERVED_NAMES if n.startswith('_')))}); "
            f"rename the method")


def _mark(cls: Any, options: ActorOptions) -> Any:
    if not inspect.isclass(cls):
        raise TypeError(f"@actor decorates classes, not {type(cls).__name__} {cls!r}")
    _check_reserved(cls, "@actor class {}")
    setattr(cls, _MARK, options)
    return cls


@overload
def actor(cls: T) -> T: ...
@overload
def actor(*, max_restarts: int = 0, untrusted: bool = False, borrow_args: bool = False,
          untrusted_callers: bool = False) -> Callable[[T], T]: ...


def actor(cls: Any = None, *, max_restarts: int = 0, untrusted: bool = False,
          borrow_args: bool = False, untrusted_callers: bool = False) -> Any:
    """Mark ``cls`` as an actor class; use bare or as ``@actor(max_restarts=2)``.

    ``untrusted_callers=True``: a trusted actor of this class also serves actors spawned
    ``untrusted`` (their calls decoded in safe mode).  Off by default: an untrusted actor
    can build a handle to any actor of its session from the table it maps, and a TEE
    driver that served it would hand it tokens, logits and its control flow.  An
    untrusted actor serves untrusted callers whatever this says (nothing to protect).

    ``borrow_args=True``: tensor and array arguments from a trusted caller that arrive in
    shared memory are views of the received message, not copies, and stay valid only
    until the method's reply is sent (a ``codec.DeferredTensor`` result may still read them
    while it is written) -- a method that keeps one must copy it.  Saves a host copy
    per call; a GPU worker copies its inputs host-to-device straight from the message.
    """
    _check_options(max_restarts, untrusted, borrow_args, untrusted_callers)
    options = ActorOptions(max_restarts=max_restarts, untrusted=untrusted,
                           borrow_args=borrow_args, untrusted_callers=untrusted_callers)
    if cls is None:
        return lambda c: _mark(c, options)
    return _mark(cls, options)


def actor_options(cls: Any) -> ActorOptions:
    """The options of an ``@actor`` class; ``TypeError`` for an unmarked class.

    An undecorated subclass of an ``@actor`` class inherits the mark (and its options)
    and may be spawned, but ``@actor`` never saw the subclass's own methods: the
    reserved-name check runs again here, on the class itself, so ``spawn`` rejects a
    subclass that adds a method the handle would shadow.
    """
    options = getattr(cls, _MARK, None) if inspect.isclass(cls) else None
    if not isinstance(options, ActorOptions):
        raise TypeError(f"{cls!r} is not an @actor class: decorate it with @actor")
    if _MARK not in cls.__dict__:
        _check_reserved(cls, "class {} (an undecorated subclass of an @actor class)")
    return options


# (thread id, instance) of the actor this process serves, set by runtime.worker once the
# instance is built, and the function of the method its current call runs (set per call).
# Globals, not thread-locals: read on every call, one served instance per process.
_SERVED: tuple[int, object] | None = None
_CALLED: object = None


def serving(instance: object, method: Callable[..., Any]) -> bool:
    """True when the running code is ``method``, called by the runtime for a remote caller.

    That is: this process is an actor serving ``instance``, this is the thread its calls
    run on, and ``method`` (a function, e.g. ``GPUWorker.batch_linear``) is what the call
    being served resolved to -- not an override that calls it through ``super()``, nor
    another method that calls it.  Then the method's return value goes to the reply
    encoder and nowhere else, so it may return a ``runtime.codec.DeferredTensor`` computed
    straight into the reply record.  In-process, or called by other code, it must return
    real tensors: there ``serving`` is False.
    """
    served = _SERVED
    return (_CALLED is method and served is not None and served[1] is instance
            and served[0] == threading.get_ident())


def _set_served(instance: object) -> None:
    global _SERVED  # one per process, set once by the serve loop
    _SERVED = (threading.get_ident(), instance)


def _set_called(fn: object) -> None:
    """The bound method (or other callable) the serve loop is about to run, or None."""
    global _CALLED  # set and cleared around each call by the serve loop
    _CALLED = getattr(fn, "__func__", fn)


# -- handles -------------------------------------------------------------------


class _Method:
    """``handle.method``: call it to block, or ``.remote()`` for a future."""

    __slots__ = ("_handle", "_name")

    def __init__(self, handle: ActorHandle, name: str) -> None:
        self._handle = handle
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        return h._context().call(h._ref, self._name, args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Future:
        """Send the call and return a ``concurrent.futures.Future`` of its result."""
        h = self._handle
        return h._context().call_async(h._ref, self._name, args, kwargs)

    def call_with_wire(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Any]]:
        """Block as a plain call does; return ``(result, wire)``.

        ``wire`` is the call's own record, as ``CallFuture.wire`` has it: ``[route sent,
        bytes sent, route received, bytes received]``.  Per-call accounting of a blocking
        call without reading the channel's counters around it (two ``stats()`` cost ~12 us,
        a decode-sized call ~45 us), and exact whatever else uses the channel meanwhile.
        """
        h = self._handle
        wire: list[Any] = []
        return h._context().call(h._ref, self._name, args, kwargs, wire=wire), wire

    def __repr__(self) -> str:
        return f"<method {self._name} of {self._handle!r}>"


class ActorHandle:
    """A reference to a running actor; methods are called through it.

    Thread-safe.  Pickles as plain connection data: unpickled in another
    process of the same system it opens its own channel on first use.
    """

    __slots__ = ("_ctx", "_methods", "_ref")

    def __init__(self, ref: Any, ctx: Any = None) -> None:
        self._ref = ref
        self._ctx = ctx
        self._methods: dict[str, _Method] = {}

    def _context(self) -> Any:
        if self._ctx is None or self._ctx.closed:
            from runtime.calls import context_for

            self._ctx = context_for(self._ref.sid)
        return self._ctx

    def __getattr__(self, attr: str) -> _Method:
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            return self._methods[attr]
        except KeyError:
            pass
        if attr not in self._ref.methods:
            raise AttributeError(f"actor {self._ref.name!r} (class {self._ref.cls_name}) has "
                                 f"no method {attr!r}")
        m = self._methods[attr] = _Method(self, attr)
        return m

    @property
    def name(self) -> str:
        return self._ref.name

    @property
    def pid(self) -> int:
        """The pid of the actor's current process (a restart changes it)."""
        return self._context().table.read(self._ref.index).pid

    def kill(self) -> None:
        """Kill the actor's process; returns once it is gone.  It is not restarted."""
        self._context().kill(self._ref)

    def stats(self) -> dict[str, Any]:
        """Route counts and timings of this process's channel to the actor."""
        from runtime.calls import summarize

        ch = self._context().channel_stats(self._ref.index)
        return summarize([ch] if ch else [])

    def __reduce__(self) -> tuple:
        return (ActorHandle, (self._ref,))

    def __repr__(self) -> str:
        return f"<ActorHandle {self._ref.name!r} ({self._ref.cls_name})>"


# Every attribute of ActorHandle but the dunders (``__getattr__`` never turns a dunder into a
# call): a method with one of these names would be shadowed by the handle's own attribute,
# so ``@actor`` -- and ``spawn``, for an undecorated subclass -- rejects it.  Derived from the
# class, so an attribute added to the handle is reserved at once.
RESERVED_NAMES = frozenset(n for n in dir(ActorHandle) if not n.startswith("__"))
