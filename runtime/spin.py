"""How long to spin before sleeping: twice the recent typical wait, bounded.

Waking a blocked process costs ~85 us here (more on a busy machine), so a
waiter that expects its message soon should spin; one that expects a long
wait should sleep at once, or it steals the core the other side computes on
(two cores: a 200 ms call must cost the callee nothing).  The typical wait
is not known in advance -- a no-op call returns in ~35 us, a 1 MiB echo in
~600 us, a matmul in 200 ms -- so each waiter keeps a moving average of what
it waited recently and spins for twice that, at least ``floor``.  When twice
the average exceeds ``cap`` the waits are long: a wake-up costs little next
to them, while spinning through them steals a core from whoever computes
(the split LLaMA prefill: the TEE waiting 2-30 ms per offloaded op while the
worker multiplies on both cores), so the window drops back to ``floor``.
"""

from __future__ import annotations

__all__ = ["SpinPolicy"]


class SpinPolicy:
    """An exponentially weighted average of recent waits, turned into a spin window."""

    __slots__ = ("_avg", "cap", "floor")

    def __init__(self, floor: float, cap: float) -> None:
        self.floor = floor
        self.cap = cap
        self._avg = floor / 2

    def observe(self, waited: float) -> None:
        """Record one wait (seconds); long outliers count as ``4 * cap`` at most."""
        self._avg += 0.25 * (min(waited, 4 * self.cap) - self._avg)

    @property
    def window(self) -> float:
        """Seconds to spin before sleeping."""
        w = 2 * self._avg
        return self.floor if (w < self.floor or w > self.cap) else w
