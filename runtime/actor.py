"""The ``@actor`` decorator: marks a class as spawnable, with its options.

The decorator only marks: the class is returned unchanged and stays usable
in-process.  Misuse is rejected at decoration time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, overload

__all__ = ["ActorOptions", "actor", "actor_options"]

T = TypeVar("T", bound=type)

# Attribute names of ActorHandle that a method must not shadow.
RESERVED_NAMES = frozenset({"pid", "name", "kill", "stats"})
_MARK = "__rt_actor_options__"


@dataclass(frozen=True)
class ActorOptions:
    """Options attached to an actor class by ``@actor(...)``."""

    max_restarts: int = 0
    untrusted: bool = False


def _check_options(max_restarts: Any, untrusted: Any) -> None:
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
    if not isinstance(untrusted, bool):
        raise ValueError(f"untrusted must be a bool, got {untrusted!r}")


def _mark(cls: Any, options: ActorOptions) -> Any:
    if not inspect.isclass(cls):
        raise TypeError(f"@actor decorates classes, not {type(cls).__name__} {cls!r}")
    clash = sorted(n for n in RESERVED_NAMES if callable(getattr(cls, n, None))
                   or n in cls.__dict__)
    if clash:
        raise TypeError(
            f"@actor class {cls.__qualname__} defines {', '.join(clash)}, which "
            f"{'is' if len(clash) == 1 else 'are'} reserved for ActorHandle attributes "
            f"({', '.join(sorted(RESERVED_NAMES))}); rename the method")
    setattr(cls, _MARK, options)
    return cls


@overload
def actor(cls: T) -> T: ...
@overload
def actor(*, max_restarts: int = 0, untrusted: bool = False) -> Callable[[T], T]: ...


def actor(cls: Any = None, *, max_restarts: int = 0, untrusted: bool = False) -> Any:
    """Mark ``cls`` as an actor class; use bare or as ``@actor(max_restarts=2)``."""
    _check_options(max_restarts, untrusted)
    options = ActorOptions(max_restarts=max_restarts, untrusted=untrusted)
    if cls is None:
        return lambda c: _mark(c, options)
    return _mark(cls, options)


def actor_options(cls: Any) -> ActorOptions:
    """The options of an ``@actor`` class; ``TypeError`` for an unmarked class."""
    options = getattr(cls, _MARK, None) if inspect.isclass(cls) else None
    if not isinstance(options, ActorOptions):
        raise TypeError(f"{cls!r} is not an @actor class: decorate it with @actor")
    return options
