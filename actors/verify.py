"""Freivalds checks of the untrusted GPU worker's results, before the TEE uses them.

Method.  For an offloaded linear op ``y = x Wᵀ`` (``x [T, n]``, ``W [m, n]``, ``y [T, m]``) the
TEE compares, row by row, ``y v`` with ``x (Wᵀ v)`` for a secret random ``v [m]``.  ``Wᵀ v`` is
precomputed at start-up, so a check costs two matrix-vector products (``T·(m + n)``
multiply-adds) where the worker spent ``T·m·n``; the TEE keeps no weight to do it.  For a matmul
of two operands the TEE knows (the attention matmuls ``q kᵀ`` and ``p v``), ``(A B) r`` is compared
with ``A (B r)`` for a fresh random ``r``.  An embedding lookup ``y = E[ids]`` is checked as
``y v`` against ``(E v)[ids]``.

Vectors: each entry a random sign times a magnitude uniform in ``[3/4, 1)`` (on a grid of
2^-22, exact in float32).  A wrong result ``y + e`` shifts row ``i``'s residual by exactly
``e_i · v``.  For an error in one element that is at least 3/4 of the element's error,
whatever ``v`` is: so "one element off by 1 % of its row's norm" is caught with certainty (not
just with probability 0.99) as long as the row's tolerance plus its honest residual stays
below 0.75 % of the row norm; in float32 the tolerance is ~1e-4 of it (below).  For any
error, condition on every entry of ``v`` but the one facing ``e_i``'s largest element: the
shift is then that element times a magnitude spread evenly over a quarter, so it comes
within ``t`` of zero with probability at most ``8·t / |e_i|_∞``, where ``t`` is the tolerance
plus the honest residual: a check misses an error whose largest element is 100 times the
tolerance with probability at most 8 %, 1000 times at most 0.8 %.  Why not plain ±1
(Rademacher) vectors, which catch one element at its full size: an error spread over two
elements, ``+d`` in both, shifts by ``d·(v_a + v_b)``, zero for every ±1 vector with
``v_a = -v_b``: half of them, whatever ``d`` is.  Vectors come from a pool that lasts hundreds
of checks, so a liar repeating such an error passed half of the checks of its weight, for
ever (an adversarial review measured 52 % of 40 prefills undetected with a pool of 16; now
0.3 %, ``d`` a fifth of the row's norm).  Why not Gaussian vectors, which never vanish on a
spread error either: a Gaussian entry is below 1 % in size with probability 0.008, so one
element's error would be caught only with some probability; magnitudes of at least 3/4 keep
the certainty, and at most 1 keeps every tolerance term below, derived for ``|v_j| <= 1``.
NaN and Inf always fail: they make the residual non-finite, and a check also fails when its
tolerance is not finite (a huge finite element would otherwise overflow the row norm to Inf).

Tolerance, per row ``i`` (``S`` the safety factor, 8).  Error bounds of the probabilistic kind
(Higham and Mary): a dot product of ``k`` terms ``a`` computed in unit roundoff ``u`` errs by
about ``u·√k·(|a|₂ + |Σa|)`` — rounding errors of random sign, added along partial sums that
stay within those two sizes.  The four sources:

* the worker's product, accumulated in float32 (``u_acc = 2^-24``; also for 16-bit inputs,
  as every BLAS and cuBLAS by default does), summed over the row with random signs:
  ``u_acc·√n·(ω·|x_i| + |y_i|)`` (``|y_i|``: see "Trusted norms"), where ``ω`` is the
  largest column norm of ``W`` (precomputed) so that ``ω·|x_i|`` bounds ``(Σ_j |x_i ⊙ W_j|²)^½``;
* rounding ``y`` to the dtype it crosses in and to the TEE's dtype: ``u_out·|y_i|`` with
  ``u_out`` the coarser of the two (2^-24 float32, 2^-8 bfloat16);
* the TEE's two dot products, in float32 (``u_t = 2^-24``; float64 for a float64 TEE):
  ``u_t·(√m·(|y_i| + |y_i·v|) + √n·|x_i·Wᵀv| + (√n + 1)·|Wᵀv|_∞·|x_i|)``, the last ``+1``
  for ``Wᵀv`` itself being rounded to float32 once.

``tol_i = S · (sum of those)``, all ``|·|`` Euclidean.

Trusted norms.  The first two sources bound errors of the *true* result, but ``|y_i|`` is
the received one: a liar that puts junk ``H`` where the TEE drops it (masked scores, gate
entries SiLU zeroes, logits never sampled) raised its own tolerance with it, and with a
16-bit wire (``S·u_out`` ~0.031) two such elements passed ~16 % of checks whatever ``H`` --
carrying any payload below ~4 % of ``H`` (an adversarial review).  Those two terms therefore
take ``min(|y_i|, trusted_i)`` (the TEE's own product over the received ``y`` keeps
``|y_i|``), ``trusted_i`` a bound on the true norm the worker cannot move:

* a linear op: ``KAPPA`` (3) times the root mean square of ``x_i·(Wᵀg)`` over ``SKETCH``
  (16) secret Gaussian vectors ``g``.  ``y_i·g`` is ``N(0, |y_i|²)`` for any ``y_i`` (a
  Gaussian is rotation-invariant: no row's shape can fool it, where ±m vectors see two
  equal elements with opposite signs as at most a quarter of them), so the estimate is
  ``|y_i|·√(χ²₁₆/16)``; an honest row needs it below 0.1 ``|y_i|`` to fail (its residual
  stays below 0.3 of the tolerance), probability 4e-14.  ``Wᵀg`` is built with the pool;
  it costs ``16·T·n`` per check, paid for every row with a 16-bit wire and otherwise only
  for rows that need it (no honest one);
* an embedding lookup: ``|E_t|``, exact, precomputed;
* an attention matmul ``a @ B``: ``sigma_max(B)·|a_i|``, exact, from the Gram matrix of ``B``'s
  shorter side (a head's width).

A liar then gains at most the slack between the true norm and the bound (the tolerance at
most ~3 times the honest one): junk of twice the row's norm in two elements passed 13 % of
bfloat16 checks, 1000 times it 0 of 400.

Gaussian columns (16-bit results of linear ops).  A bfloat16 tolerance is ~3 % of the row,
so ``+d`` in two elements about the row's size still passed one vector whenever
``|v_a ± v_b|`` was below ~5 %: 17-28 % of checks.  The first ``GAUSS_COLUMNS`` (4) sketch
vectors, scaled to ``|g|_inf = 1`` so that every tolerance term above holds as it is, check
the same result beside the vector (``y·g`` against ``x·(Wᵀg)``, which the sketch computes
anyway); the result passes only if every column does.  For such a lie a column passes about
as often as ``|g_a ± g_b|`` is below the tolerance over ``d``: the four together let 0 of 400
through from half the row's norm up, 2 of 400 at a fifth (``bench_liar.py --junk``).  A
Gaussian column alone would not do: one wrong element facing a small ``g_j`` passes it,
where the vector catches it with certainty.  Cost: ``4·T·m`` more multiply-adds per check,
with a 16-bit wire only.

The check uses exactly the tensors that
crossed (the wire-rounded ``x``) and the result exactly as the TEE then uses it.  Measured on
random-weight models, T = 1 … 1024 (``benchmarks/bench_verify.py``; the table is in
docs/design.md): the tolerance is ~1e-4 of the row norm in float32 and 3.13 % in bfloat16,
and honest residuals stay below 0.06 (float32) and 0.3 (bfloat16) of it — so a single
element off by 1 % (float32) or 10 % (bfloat16) of its row norm is always caught, and
bfloat16 needs no float32 results.  (The exception: a row whose norm nearly vanishes by
cancellation — a single score ``q·k`` at T = 1 — where the float32 error of the product
itself, which scales with ``|q|·|k|``, is a sizeable fraction of the row.)

Cost.  ``x·(Wᵀv)`` and ``|x_i|`` are computed before the call, while ``x`` is in the cache
(:meth:`Verifier.begin_linear`).  Only the ``|y_i|`` terms would need a second pass over ``y``;
rows whose residual is within the rest of the tolerance (which is smaller) pass as they
stand, and every honest float32 row does, so a float32 check reads ``y`` once.

Assumptions: the worker holds its weights in the TEE's dtype or finer and multiplies in
float32 or finer (TF32 matmuls would fail float32 checks: leave
``torch.backends.cuda.matmul.allow_tf32`` off, its default).

Pool and refresh policy.  Per offloaded weight (a fused group such as q|k|v counts as one: one
vector over the concatenated outputs, so swapping gate and up is an error like any other) the
TEE keeps ``pool_size`` (16) secret vectors with their ``Wᵀ v``, built at start-up by reading
each weight once, one at a time (from the checkpoint or the seed), and picks one uniformly at
random per check.  Sixteen, not four: with ±1 vectors a liar repeating one two-element error
passed the half of a pool its error was blind to, and with four vectors sometimes all of it
(72 % of 40 prefills undetected, against 52 % with sixteen); the continuous magnitudes above
removed that blind half, and sixteen vectors still make a pool that happens to be weak for
one error rarer.  Cost: ~40 % more build and refresh arithmetic than four (a memory-bound
product over each weight: 10 -> 14 ms for 8192 x 2048 in float64), small beside reading the
weight, and 16 x (m + n) floats a weight.  The randomness comes
from ``secrets`` / a torch generator seeded from it, never from the model seed.  A pool is
redrawn (its weights read again, one at a time):

* after any failed check — every pool, at its next use, and the generator is reseeded: a
  worker that learnt something from the failure learnt it about vectors no longer in use;
* after ``refresh_checks`` (1024) uses, each pool's own limit drawn from
  ``[refresh_checks/2, refresh_checks]`` so the redraws of different weights spread over
  many prefills instead of landing in one.

A passing check says nothing, and a failing one ends the prefill with
:class:`~actors.errors.VerificationError` and retires every vector.  Its *time* does depend on
the vectors: a row whose residual is past the first stage costs the rest of its tolerance
(float32, one row: ~13 us against ~130 us), which a worker can see in when the next call
comes (an adversarial review).  That reveals, for a probe that can never fail, whether
``|e·v|`` is above the first stage: a sign relation of some entries per check, far from the
16 x m secret entries a pool holds for 512-1024 checks.  Not closed (computing every row's
whole tolerance would cost every float32 check a second pass over ``y``).  Matmul checks draw
a fresh ``r`` each time.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from actors.errors import VerificationError
from actors.gpu_worker import Threads
from actors.llama import (
    EMBED,
    LM_HEAD,
    CheckpointReader,
    LlamaConfig,
    linear_name,
    load_weights,
)

__all__ = ["GROUPS", "U_ACC", "VerificationError", "Verifier", "unit_roundoff"]

# The driver's linear ops and the projections each one fuses, in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"), "o_proj": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
U_ACC = 2.0 ** -24  # the worker accumulates in float32 (or finer)
_EAGER_NORMS = 2.0 ** -20  # rounding coarser than this (16-bit): row norms always needed
SMALL_ROWS = 4  # checks of at most this many rows (decode steps) try numpy first
_SHRINK = 1 - 2.0 ** -20  # the one-row fast path's tolerance, a hair under the torch path's
# numpy sums y·v in another order than torch: over several rows or columns the two residuals
# differed by ~1e-5 of the tolerance (a review), so those numpy checks accept only below
# this share of it and leave the borderline to the torch path.
_SHRINK_NP = 1 - 2.0 ** -10
_MAG_MIN, _MAG_SPAN, _MAG_STEPS = 0.75, 0.25, 2 ** 20  # vector entries' magnitudes (_vectors)
# A result's row norm |y_i| sets part of its own tolerance; a liar could inflate it with junk
# the TEE then drops (masked scores, gate entries SiLU zeroes, logits never sampled).  So those
# terms use min(|y_i|, a bound the TEE trusts): for a linear op KAPPA times a sketch estimate of
# the true norm from SKETCH Gaussian vectors (module docstring, "Trusted norms").
SKETCH = 16
KAPPA = 3.0
# With a 16-bit wire the tolerance is coarse (~3 % of the row): a lie spread over two elements
# about the row's size passed ~20 % of checks by one vector.  The first GAUSS_COLUMNS sketch
# vectors (scaled to |g|_inf = 1) check such results as well, each like the vector: ~0.2 %.
GAUSS_COLUMNS = 4
_CAP_SLACK = 1 + 2.0 ** -10  # exact bounds (lookups, matmuls): room for rounding the bound


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: 2^-24 for float32, 2^-8 for bfloat16, 2^-11 for float16."""
    return torch.finfo(dtype).eps / 2


_ROUNDOFF: dict[torch.dtype, float] = {}


def _roundoff(dtype: torch.dtype) -> float:
    """:func:`unit_roundoff`, cached: ``torch.finfo`` costs ~1 us, three times a check."""
    u = _ROUNDOFF.get(dtype)
    if u is None:
        u = _ROUNDOFF[dtype] = unit_roundoff(dtype)
    return u


@dataclass
class _Pool:
    """Secret vectors of one weight and what the TEE precomputed from them."""

    v: torch.Tensor       # [P, m] entries ±[3/4, 1), in the check dtype
    u: torch.Tensor       # [P, n] Wᵀv (linear) or [P, vocab] E v (lookup), in the check dtype
    u_max: list[float]    # |u|_∞ per vector (linear)
    omega: float          # largest column norm of W (linear)
    gu: torch.Tensor | None  # [SKETCH, n] Wᵀg for Gaussian g/|g|_inf (linear)
    rownorm: torch.Tensor | None  # [vocab] |E_t| per token (lookup): the true |y| exactly
    limit: int            # uses before it is redrawn
    gv: torch.Tensor | None = None  # [SKETCH, m] those g/|g|_inf, in the check dtype
    gscale: torch.Tensor | None = None  # [SKETCH] |g|_inf: y·g = gscale·(x·gu)
    gu_max: list[float] | None = None  # |gu|_inf per vector
    uses: int = 0
    stale: bool = False
    v_np: np.ndarray | None = None  # v and u as numpy views (CPU): a decode step's checks
    u_np: np.ndarray | None = None  # index them without a torch call each
    gu_np: np.ndarray | None = None
    gv_np: np.ndarray | None = None
    gscale_np: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.v.device.type == "cpu" and self.u.device.type == "cpu":
            self.v_np, self.u_np = self.v.numpy(), self.u.numpy()
            if self.gu is not None:
                self.gu_np, self.gv_np = self.gu.numpy(), self.gv.numpy()
                self.gscale_np = self.gscale.numpy()


@dataclass
class Begun:
    """The half of a linear check done before the call: the vector drawn, ``x·(Wᵀv)``.

    Done while ``x`` is still in the cache (``x`` cold costs ~0.15 ms more per check at
    T=1024); the worker never sees which vector.
    """

    pool: _Pool
    j: int
    x: torch.Tensor      # as sent, in the check dtype
    rhs: torch.Tensor    # x·(Wᵀv)
    xnorm: torch.Tensor  # |x_i|
    seconds: float
    small: tuple[np.ndarray, np.ndarray] | None = None  # rhs, xnorm in numpy: the fast path
    sketch: torch.Tensor | None = None  # [rows, SKETCH] x·(Wᵀg) (16-bit wire)
    sketch_np: np.ndarray | None = None


class Verifier:
    """The TEE's Freivalds checks: secret vector pools, tolerances, timings and counters.

    ``ops`` names the pools to build: ``(op, layer)`` for the linear groups of :data:`GROUPS`,
    ``("embedding", None)`` and ``("lm_head", None)``.  Weights come from ``checkpoint`` (a
    folder or a :class:`~actors.llama.CheckpointReader`) or ``seed``, in ``dtype`` (the TEE's,
    which is what the worker must compute in); ``wire_dtype`` is what results cross in.
    Every ``check_*`` returns the seconds it took and raises :class:`VerificationError` on a
    mismatch.
    """

    def __init__(self, config: LlamaConfig, ops: Sequence[tuple[str, int | None]],
                 checkpoint: str | Path | CheckpointReader | None = None, seed: int = 0, *,
                 dtype: torch.dtype = torch.float32, wire_dtype: torch.dtype | None = None,
                 pool_size: int = 16, refresh_checks: int = 1024, safety: float = 8.0,
                 threads: int | None = None) -> None:
        if pool_size < 1 or refresh_checks < 1 or not safety > 0:
            raise ValueError("pool_size and refresh_checks must be >= 1, safety > 0")
        self.config = config
        self._source = checkpoint
        self._seed = seed
        self.dtype = dtype
        self.wire_dtype = wire_dtype or dtype
        self.check_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.u_check = unit_roundoff(self.check_dtype)
        self.u_out = max(unit_roundoff(self.wire_dtype), unit_roundoff(dtype))
        self.pool_size = pool_size
        self.refresh_checks = refresh_checks
        self.safety = safety
        # Checks are a few memory-bound passes.  On 2 cores one thread costs ~10 % more than
        # two when the machine is idle, and saves a scheduler quantum (~8 ms) per parallel
        # region whenever another process holds the other core: per-layer checks at T=1024
        # measured 31 ms median with two threads under a neighbour's load, 3.8 ms with one.
        n = torch.get_num_threads()
        self.threads = threads or (1 if n <= 2 else n)
        self._gen = torch.Generator()
        self._reseed()
        self.checks = 0
        self.failures = 0
        self.seconds = 0.0
        self.refreshes = 0
        self.refresh_s = 0.0
        self.worst_ratio = 0.0  # largest |residual| / tolerance of any passed row it computed
        self.full_margins = False  # compute every row's whole tolerance (to measure margins)
        # Called as observer(what, residuals, tolerances, y row norms) for rows whose whole
        # tolerance was computed (benchmarks/bench_verify.py).
        self.observer: Any = None
        self._cached: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        t0 = time.perf_counter()
        self._pools: dict[tuple[str, int | None], _Pool] = {}
        for key in ops:
            self._pools[key] = self._build(key)
        self._cached = None
        self.build_s = time.perf_counter() - t0

    # -- pools ----------------------------------------------------------------------------------

    def _reseed(self) -> None:
        self._gen.manual_seed(secrets.randbits(63))

    def _vectors(self, *shape: int) -> torch.Tensor:
        """Secret check vectors: a random sign times a magnitude uniform in ``[3/4, 1)``.

        The magnitudes lie on a grid of 2^-22, so every entry is exact in float32 and ``Wᵀv``
        computed in float64 is for the very vector the check multiplies ``y`` by.
        """
        signs = torch.randint(0, 2, shape, generator=self._gen, dtype=torch.float64)
        steps = torch.randint(0, _MAG_STEPS, shape, generator=self._gen, dtype=torch.float64)
        return steps.mul_(_MAG_SPAN / _MAG_STEPS).add_(_MAG_MIN).mul_(signs.mul_(2).sub_(1))

    def _weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One weight in float64, and its column norms.

        The last one read is kept: a tied embedding serves two pools.
        """
        if name == LM_HEAD and self.config.tie_word_embeddings:
            name = EMBED
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        self._cached = None  # drop the last one before reading the next: one at a time
        w = load_weights(self.config, [name], self._source, self._seed, self.dtype)[name]
        colnorm = torch.linalg.vector_norm(  # no narrowing: a float64 TEE keeps float64
            w, dim=0, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32)
        pair = (w.to(torch.float64), colnorm)
        self._cached = (name, pair)
        return pair

    def _build(self, key: tuple[str, int | None]) -> _Pool:
        op, layer = key
        p = self.pool_size
        if op == "embedding":
            e, _ = self._weight(EMBED)  # [vocab, hidden]
            v = self._vectors(p, e.shape[1])
            u = v @ e.T  # [P, vocab]: E v for every token
            u_max, omega = [float(a) for a in u.abs().amax(-1)], 0.0
            gu, rownorm = None, torch.linalg.vector_norm(e, dim=1).to(self.check_dtype)
        else:
            if op == "lm_head":
                names = [LM_HEAD]
            elif op in GROUPS and layer is not None:
                names = [linear_name(layer, s) for s in GROUPS[op]]
            else:
                raise ValueError(f"no pool for {key!r}")
            parts, gparts, u, colsq, gu, rownorm = [], [], None, None, None, None
            for name in names:
                w, colnorm = self._weight(name)  # [m_part, n]
                vp = self._vectors(p, w.shape[0])
                gp = torch.randn(SKETCH, w.shape[0], generator=self._gen, dtype=torch.float64)
                up = torch.cat([vp, gp]) @ w  # [P + SKETCH, n]: (Wᵀ v)ᵀ, then (Wᵀ g)ᵀ
                cs = colnorm.square()
                u = up if u is None else u + up
                colsq = cs if colsq is None else colsq + cs
                parts.append(vp)
                gparts.append(gp)
                del w
            if op != "lm_head":
                self._cached = None
            v = torch.cat(parts, dim=1)
            g = torch.cat(gparts, dim=1)
            gscale = g.abs().amax(-1)  # entries of g / |g|_inf lie in [-1, 1], like v's
            u, gu = u[:p], u[p:] / gscale[:, None]
            u_max = [float(a) for a in u.abs().amax(-1)]
            omega = float(colsq.max().sqrt())
            extra = {"gv": (g / gscale[:, None]).to(self.check_dtype),
                     "gscale": gscale.to(self.check_dtype),
                     "gu_max": [float(a) for a in gu.abs().amax(-1)]}
            gu = gu.to(self.check_dtype)
        lo = max(1, self.refresh_checks // 2)
        limit = lo + secrets.randbelow(self.refresh_checks - lo + 1)
        return _Pool(v=v.to(self.check_dtype), u=u.to(self.check_dtype), u_max=u_max,
                     omega=omega, gu=gu, rownorm=rownorm, limit=limit,
                     **(extra if op not in ("embedding",) else {}))

    def _pool(self, key: tuple[str, int | None]) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            raise KeyError(f"no verification pool for {key!r}")
        if pool.stale or pool.uses >= pool.limit:
            t0 = time.perf_counter()
            pool = self._pools[key] = self._build(key)
            self._cached = None
            self.refreshes += 1
            self.refresh_s += time.perf_counter() - t0
        pool.uses += 1
        return pool

    # -- judging -----------------------------------------------------------------------------------

    def _coefficients(self, n: int, m: int, u_out: float) -> tuple[Any, Any, float, float]:
        """``((a1, a2), (b1, b2), c, d)``, the safety factor included, of the row tolerance.

        ``tol_i = (a1·ω + a2·|Wᵀv|_∞)·|x_i| + b1·min(|y_i|, trusted_i) + b2·|y_i|
        + c·|y_i·v| + d·|x_i·Wᵀv|`` (the module docstring derives each term) for ``n``
        inputs and ``m`` outputs.  ``b1`` covers errors of the true result (the worker's sum,
        rounding it), so it takes a bound on the true ``|y_i|`` the TEE trusts; ``b2``, the
        TEE's own product over the ``y`` it received.
        """
        sn, sm, ut, s = math.sqrt(n), math.sqrt(m), self.u_check, self.safety
        return ((U_ACC * sn * s, ut * (sn + 1) * s),  # worker's sum; TEE's x·u, u rounded
                ((U_ACC * sn + u_out) * s,            # worker's sum, rounding y
                 ut * sm * s),                        # TEE's y·v
                ut * sm * s,                          # TEE's y·v
                ut * sn * s)                          # TEE's x·u

    @staticmethod
    def _capped(b1: float, b2: float, yn: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
        """``b1·min(|y_i|, trusted_i) + b2·|y_i|``: the tolerance's ``|y_i|`` terms."""
        return torch.minimum(yn, trusted).mul_(b1).add_(yn, alpha=b2)

    def _decide(self, what: str, lhs: torch.Tensor, rhs: torch.Tensor, cheap: torch.Tensor, *,
                rest: Any, ynorm: Any, cols: int = 1) -> None:
        """Accept, or raise :class:`VerificationError`.

        ``lhs``, ``rhs``: ``y·v`` and ``x·(Wᵀv)`` per row, flat.  ``cheap``: the terms of the
        tolerance at hand; ``rest(rows, ynorm(rows))``: the other terms for those rows, given
        the norms of their ``y`` rows (norms cost a pass over ``x`` or ``y`` each).  Since
        ``cheap`` is below the tolerance, a row whose finite residual is within it passes as
        it stands: with a float32 wire every honest row of a linear check does (``cheap``
        lacks only the ``|y_i|`` terms there), so such a check costs one pass over ``y`` and
        one sync.  NaN or Inf in a residual, or a tolerance that is not finite (one huge
        element overflows a norm), fail the check.
        ``worst_ratio`` follows the rows whose whole tolerance was computed: every row with
        ``full_margins`` (for measurements; the decisions are the same).  ``cols``: check
        vectors per row, side by side in the flat vectors (``ynorm`` and ``rest`` get rows).
        """
        r = (lhs - rhs).abs_().reshape(-1)  # rows of a batched x: flat, as ``rest`` takes them
        cheap = cheap.reshape(-1)
        # ``cheap`` holds |y·v| (and, computed eagerly, |y_i|): it is not finite only when
        # ``y`` holds NaN, Inf or overflowing values, which fail at once (an infinite
        # residual would otherwise be "within" an infinite ``cheap``).
        if not math.isfinite(cheap.sum().item()):
            self._fail(what, "the result holds NaN or Inf (or overflows)")
        if self.full_margins:
            rows = torch.arange(r.numel())
        else:  # the fast path: every residual within ``cheap`` (NaN never is)
            rows = (~(r <= cheap)).nonzero().flatten()
            if not rows.numel():
                return
        rows_y = rows if cols == 1 else torch.div(rows, cols, rounding_mode="floor")
        yn = ynorm(rows_y)
        tol = cheap.index_select(0, rows).add_(rest(rows_y, yn))
        res = r.index_select(0, rows)
        if self.observer is not None:
            self.observer(what, res, tol, yn)
        if not (math.isfinite(float(tol.sum())) and bool(torch.isfinite(res).all())):
            self._fail(what, "the result holds NaN or Inf (or overflows)")
        if bool((res <= tol).all()):
            if res.numel():
                ratio = float((res / tol.clamp_min(torch.finfo(r.dtype).tiny)).max())
                self.worst_ratio = max(self.worst_ratio, ratio)
            return
        i = int((res - tol).argmax())
        where = f"row {int(rows[i])}" if cols == 1 else \
            f"row {int(rows[i]) // cols}, vector {int(rows[i]) % cols}"
        self._fail(what, f"{where}: residual {float(res[i]):.3g} > tolerance "
                         f"{float(tol[i]):.3g}; {int((res > tol).sum())} of {r.numel()} "
                         f"checks fail")

    def _fail(self, what: str, detail: str) -> NoReturn:
        """Count the failure, retire every vector, and raise."""
        self.failures += 1
        for pool in self._pools.values():
            pool.stale = True
        self._reseed()
        raise VerificationError(f"the worker's {what} result failed its Freivalds check: "
                                f"{detail}")

    @staticmethod
    def _row_norms(ts: Sequence[torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
        """Euclidean norms of the rows of ``[..., w_j]`` tensors side by side, flat."""
        sq = None
        for t in ts:
            flat = t.reshape(-1, t.shape[-1])
            part = torch.linalg.vector_norm(
                flat if rows is None else flat.index_select(0, rows), dim=-1)
            sq = part.square_() if sq is None else sq.add_(part.square_())
        if sq is None:
            raise ValueError("no tensor to take row norms of")
        return sq.sqrt_()

    def _as_check(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.check_dtype else t.to(self.check_dtype)

    # -- the checks ------------------------------------------------------------------------------

    def begin_linear(self, op: str, layer: int | None, x: torch.Tensor) -> Begun:
        """The first half of :meth:`check_linear`, best done right before ``x`` is sent."""
        t0 = time.perf_counter()
        pool = self._pool((op, layer))
        j = secrets.randbelow(self.pool_size)
        xc = self._as_check(x)
        # A 16-bit wire needs every row's trusted norm (the |y_i| terms dominate): done here,
        # with x in the cache.  Otherwise only rows a check cannot pass at once need it.
        eager = self.u_out > _EAGER_NORMS
        if self._small(xc) and pool.u_np is not None:
            # A decode step: numpy's calls cost ~1 us where torch's cost ~5.
            xn = xc.numpy()  # 2-D and contiguous (see _small)
            rhs_np = xn @ pool.u_np[j]
            xnorm_np = np.sqrt(np.einsum("ij,ij->i", xn, xn))
            sketch_np = xn @ pool.gu_np.T if eager else None
            return Begun(pool, j, xc, torch.from_numpy(rhs_np), torch.from_numpy(xnorm_np),
                         time.perf_counter() - t0, (rhs_np, xnorm_np), None, sketch_np)
        with self._threads():
            rhs = xc @ pool.u[j]
            xnorm = torch.linalg.vector_norm(xc, dim=-1)
            sketch = xc.reshape(-1, xc.shape[-1]) @ pool.gu.T if eager else None
        return Begun(pool, j, xc, rhs, xnorm, time.perf_counter() - t0, None, sketch)

    @staticmethod
    def _sketch(pool: _Pool, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``x_i·(Wᵀg)`` for the pool's sketch vectors ``g`` (scaled), ``[rows, SKETCH]``."""
        flat = x.reshape(-1, x.shape[-1])
        if rows is not None:
            flat = flat.index_select(0, rows)
        return flat @ pool.gu.T

    @staticmethod
    def _trusted(pool: _Pool, sketch: torch.Tensor) -> torch.Tensor:
        """``KAPPA`` times the sketch estimate of the true ``|y_i|``, from ``x`` alone.

        ``x_i·(Wᵀg) = y_i·g`` for a Gaussian ``g`` is ``N(0, |y_i|²)`` whatever ``y_i`` is,
        so the mean square over ``SKETCH`` vectors estimates ``|y_i|²`` (module docstring).
        """
        return torch.linalg.vector_norm(sketch * pool.gscale, dim=-1).mul_(
            KAPPA / math.sqrt(sketch.shape[-1]))

    def _small(self, xc: torch.Tensor) -> bool:
        """A check of a few rows, done with numpy on the fast path (see ``_accept_small``)."""
        return (xc.dim() == 2 and xc.shape[0] <= SMALL_ROWS and xc.is_cpu
                and xc.is_contiguous() and not self.full_margins and self.observer is None)

    def _accept_small(self, begun: Begun, ycs: Sequence[torch.Tensor], *, a: list[float],
                      b: tuple[float, float], c: float, d: float, eager: bool) -> bool:
        """True when every row's residual is within the tolerance terms at hand.

        The same acceptance as :meth:`_decide`'s fast path, in numpy: a decode step's check
        costs ~15 torch calls of ~5 us each at T=1, the same maths in numpy ~1 us a call.
        False means "not shown here": the torch path then decides, rejections included.
        ``a``: the ``|x_i|`` coefficient per check vector (the vector's, then with ``eager``
        the Gaussian columns').
        """
        if eager and begun.sketch_np is None:
            return False  # 16-bit results the begin did not expect: the torch path judges
        with np.errstate(all="ignore"):  # NaN, Inf and overflow are judged below, not warned
            return self._accept_small_quiet(begun, ycs, a=a, b=b, c=c, d=d, eager=eager)

    def _accept_small_quiet(self, begun: Begun, ycs: Sequence[torch.Tensor], *,
                            a: list[float], b: tuple[float, float], c: float, d: float,
                            eager: bool) -> bool:
        b1, b2 = b
        pool = begun.pool
        v = pool.v_np[begun.j]
        rhs, xnorm = begun.small
        if eager:  # the vector and the Gaussian columns: lhs, rhs [rows, len(a)]
            k = len(a) - 1
            v = np.concatenate([v[:, None], pool.gv_np[:k].T], axis=1)
            rhs = np.concatenate([rhs[:, None], begun.sketch_np[:, :k]], axis=1)
            a_col = np.array(a, dtype=rhs.dtype)
        lhs = None
        ysq = None
        off = 0
        for yc in ycs:
            yn = (yc if yc.dim() == 2 else yc.reshape(-1, yc.shape[-1])).numpy()
            w = yn.shape[-1]
            part = yn @ v[off:off + w]
            lhs = part if lhs is None else lhs + part
            if eager:
                sq = np.einsum("ij,ij->i", yn, yn)
                ysq = sq if ysq is None else ysq + sq
            off += w
        # An infinite ``cheap`` would let an infinite residual through: never accept one; a
        # NaN fails every comparison, so it is never accepted either.
        if not eager and lhs.shape[0] == 1:  # one row (batch-1 decode): Python floats
            left, right = float(lhs[0]), float(rhs[0])
            tol = float(xnorm[0]) * a[0] + c * abs(left) + d * abs(right)
            # In float64 this tolerance can come out an ulp of float32 above the check dtype's:
            # shrink it by far more, so this path never accepts what the torch path would not.
            return math.isfinite(tol) and abs(left - right) <= tol * _SHRINK
        if eager:
            sk = begun.sketch_np * pool.gscale_np
            trusted = np.sqrt(np.einsum("ij,ij->i", sk, sk)) * (KAPPA / math.sqrt(sk.shape[1]))
            yn = np.sqrt(ysq)
            cheap = (xnorm[:, None] * a_col + c * np.abs(lhs) + d * np.abs(rhs)
                     + (b1 * np.minimum(yn, trusted) + b2 * yn)[:, None])
            return bool(np.isfinite(cheap).all()
                        and (np.abs(lhs - rhs) <= cheap * _SHRINK_NP).all())
        cheap = xnorm * a[0] + c * np.abs(lhs) + d * np.abs(rhs)
        return bool(np.isfinite(cheap).all() and (np.abs(lhs - rhs) <= cheap * _SHRINK_NP).all())

    def check_linear(self, op: str, layer: int | None, x: torch.Tensor,
                     ys: Sequence[torch.Tensor], *, out_dtype: torch.dtype | None = None,
                     begun: Begun | None = None) -> float:
        """Check the results ``ys`` of one linear op against its input ``x [T, n]``.

        ``ys`` are the outputs of ``op``'s fused projections, ``[T, m_j]`` each, as the TEE
        will use them; ``x`` is the input exactly as it was sent.  ``out_dtype``: the dtype
        the results crossed in (default: the wire dtype).  ``begun``: what
        :meth:`begin_linear` returned for this ``x`` (else it is done here).  Returns the
        seconds spent, ``begin_linear``'s included.
        """
        begun = begun or self.begin_linear(op, layer, x)
        return self._run(self._check_linear, op, layer, begun, ys, out_dtype) + begun.seconds

    def check_lookup(self, op: str, ids: torch.Tensor, y: torch.Tensor) -> float:
        """Check embedding rows ``y [T, hidden]`` (as used) of token ``ids [T]``."""
        return self._run(self._check_lookup, op, ids, y)

    def check_matmul(self, what: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
                     transpose_b: bool = False, out_dtype: torch.dtype | None = None) -> float:
        """Check ``out`` (as used) against ``a @ b``, or ``a @ bᵀ`` with ``transpose_b``.

        The operands exactly as they were sent: batched ``[..., R, n]``, ``[..., n, C]``.
        """
        return self._run(self._check_matmul, what, a, b, out, transpose_b=transpose_b,
                         out_dtype=out_dtype)

    def _run(self, check: Any, *args: Any, **kwargs: Any) -> float:
        """Run one check on ``self.threads`` threads; count it and return its seconds."""
        t0 = time.perf_counter()
        try:
            with self._threads():
                check(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.checks += 1
            self.seconds += dt
        return dt

    def _threads(self) -> Threads:
        """``with self._threads():`` runs the block on ``self.threads`` intra-op threads."""
        return Threads(self.threads)

    def _check_linear(self, op: str, layer: int | None, begun: Begun,
                      ys: Sequence[torch.Tensor], out_dtype: torch.dtype | None) -> None:
        what = op if layer is None else f"{op} (layer {layer})"
        pool, j, xc, rhs = begun.pool, begun.j, begun.x, begun.rhs
        v = pool.v[j]
        ycs = [self._as_check(y) for y in ys]
        rows = xc.shape[:-1]
        for y in ycs:  # one result row per input row: numpy would broadcast a single one
            if y.dim() < 1 or y.shape[:-1] != rows:
                self._fail(what, f"a result of shape {tuple(y.shape)} for an input of shape "
                                 f"{tuple(xc.shape)}")
        m = sum(y.shape[-1] for y in ycs)
        if not ycs or m != v.numel():
            self._fail(what, f"results of total width {m}, expected {v.numel()}")
        n = xc.shape[-1]
        u_out = max(_roundoff(out_dtype or self.wire_dtype), _roundoff(ys[0].dtype),
                    _roundoff(self.dtype))  # a worker computing in the TEE's dtype rounds
        (a1, a2), (b1, b2), c, d = self._coefficients(n, m, u_out)
        # With a 16-bit wire the rounding of y dominates: its norms are needed for every row,
        # and first, since a cold tensor streams into the cache faster through the norm than
        # through the matrix-vector product, which then reads it hot (gate_up at T=1024, one
        # thread: 0.50 + 0.22 ms instead of 0.88 + 0.29 ms).  Its tolerance is coarse, so
        # GAUSS_COLUMNS Gaussian columns check it besides the vector (module docstring).
        eager = u_out > _EAGER_NORMS
        k = min(GAUSS_COLUMNS, pool.gv.shape[0]) if eager else 0
        a = [a1 * pool.omega + a2 * pool.u_max[j]]
        a += [a1 * pool.omega + a2 * g for g in pool.gu_max[:k]]
        if begun.small is not None and self._small(xc) \
                and self._accept_small(begun, ycs, a=a, b=(b1, b2), c=c, d=d, eager=eager):
            return
        ynorm = self._row_norms(ycs, None) if eager else None
        sketch = None
        if eager:
            sketch = (begun.sketch if begun.sketch is not None
                      else torch.from_numpy(begun.sketch_np) if begun.sketch_np is not None
                      else self._sketch(pool, xc))
            # [1 + k, m], used transposed: y @ [m, 5] row-major took MKL's slow path (1.9 ms
            # at T=1024, m=1408, one thread), y @ [5, m]ᵀ 0.5 ms.
            vecs = torch.cat([v[None, :], pool.gv[:k]], dim=0)
            rhs = torch.cat([rhs.reshape(-1, 1), sketch[:, :k]], dim=1)
        lhs = None
        off = 0
        for yc in ycs:
            w = yc.shape[-1]
            part = yc @ vecs[:, off:off + w].T if eager else yc @ v[off:off + w]
            lhs = part if lhs is None else lhs.add_(part)
            off += w
        cols = 1 + k
        if eager:
            lhs = lhs.reshape(-1, cols)
            cheap = begun.xnorm.reshape(-1, 1) * torch.tensor(a, dtype=lhs.dtype)
            cheap.add_(lhs.abs(), alpha=c).add_(rhs.abs(), alpha=d)
            cheap.add_(self._capped(b1, b2, ynorm, self._trusted(pool, sketch))[:, None])
            lhs, rhs, cheap = lhs.reshape(-1), rhs.reshape(-1), cheap.reshape(-1)
        else:
            cheap = begun.xnorm * a[0]
            cheap.add_(lhs.abs(), alpha=c).add_(rhs.abs(), alpha=d)

        def norms(rows: torch.Tensor) -> torch.Tensor:
            return ynorm.index_select(0, rows) if ynorm is not None \
                else self._row_norms(ycs, rows)

        def rest(rows: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
            if eager:
                return torch.zeros_like(yn)
            return self._capped(b1, b2, yn, self._trusted(pool, self._sketch(pool, xc, rows)))

        self._decide(what, lhs, rhs, cheap, rest=rest, ynorm=norms, cols=cols)

    def _check_lookup(self, op: str, ids: torch.Tensor, y: torch.Tensor) -> None:
        pool = self._pool((op, None))
        j = secrets.randbelow(self.pool_size)
        yc = self._as_check(y)
        lhs = yc @ pool.v[j]
        rhs = pool.u[j][ids]
        # No product on the worker: the rounding of y, the TEE's y·v, and E v rounded once.
        # The true |y_i| is |E_t|, known exactly: the rounding term takes it when smaller.
        sm, ut, sf = math.sqrt(yc.shape[-1]), self.u_check, self.safety
        cheap = lhs.abs().mul_(ut * sm * sf).add_(rhs.abs(), alpha=ut * sf)
        b1, b2 = self.u_out * sf, ut * sm * sf
        true = pool.rownorm[ids].reshape(-1)

        def rest(rows: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
            return self._capped(b1, b2, yn, true.index_select(0, rows) * _CAP_SLACK)

        self._decide(op, lhs, rhs, cheap, rest=rest,
                     ynorm=lambda rows: self._row_norms([yc], rows))

    def _check_matmul(self, what: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
                      transpose_b: bool, out_dtype: torch.dtype | None) -> None:
        ac, oc = self._as_check(a), self._as_check(out)
        cols = oc.shape[-1]
        r = self._vectors(cols)
        bd = b.to(torch.float64)
        if transpose_b:  # b [..., C, n]: B r = bᵀ r, and W (out = a Wᵀ) is b itself
            w = (r @ bd) if bd.dim() == 2 else torch.einsum("c,...cn->...n", r, bd)
            colsq = bd.square().sum(-2)
        else:  # b [..., n, C]: W = bᵀ
            w = bd @ r
            colsq = bd.square().sum(-1)
        wc = w.to(self.check_dtype)
        n = ac.shape[-1]
        u_out = max(unit_roundoff(out_dtype or self.wire_dtype), unit_roundoff(out.dtype),
                    unit_roundoff(self.dtype))
        (a1, a2), (b1, b2), c, d = self._coefficients(n, cols, u_out)
        # Per batch: ω and |B r|_∞, spread over that batch's rows.
        a_row = (colsq.amax(-1).sqrt().to(self.check_dtype) * a1
                 + wc.abs().amax(-1) * a2)[..., None].expand(ac.shape[:-1]).reshape(-1)
        eager = u_out > _EAGER_NORMS
        ynorm = self._row_norms([oc], None) if eager else None
        lhs = (oc @ r.to(self.check_dtype)).reshape(-1)
        rhs = (ac @ wc[..., None]).reshape(-1)
        cheap = lhs.abs().mul_(c).add_(rhs.abs(), alpha=d)
        sigma: list[torch.Tensor] = []

        def bound(anorm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            """The true |out_i| <= sigma_max(B)·|a_i|: exact, from the operands the TEE sent."""
            if not sigma:
                sigma.append(self._spectral(bd, transpose_b)[..., None]
                             .expand(ac.shape[:-1]).reshape(-1))
            s_rows = sigma[0] if rows is None else sigma[0].index_select(0, rows)
            return anorm * s_rows

        anorm_all = None
        if ynorm is not None:
            anorm_all = self._row_norms([ac], None)
            cheap.add_(self._capped(b1, b2, ynorm, bound(anorm_all, None)))

        def norms(rows: torch.Tensor) -> torch.Tensor:
            return ynorm.index_select(0, rows) if ynorm is not None \
                else self._row_norms([oc], rows)

        def rest(rows: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
            anorm = (anorm_all.index_select(0, rows) if anorm_all is not None
                     else self._row_norms([ac], rows))
            more = anorm * a_row.index_select(0, rows)
            return more if eager else more.add_(self._capped(b1, b2, yn, bound(anorm, rows)))

        self._decide(what, lhs, rhs, cheap, rest=rest, ynorm=norms)

    def _spectral(self, bd: torch.Tensor, transpose_b: bool) -> torch.Tensor:
        """An upper bound on sigma_max of each ``B`` (``out = a @ B``), per batch, check dtype.

        From the Gram matrix of ``B``'s shorter side (``d x d`` for attention: a head's
        width), in float64; the slack covers its rounding and that of ``|a_i|``.
        """
        rows_side, cols_side = (-1, -2) if transpose_b else (-2, -1)  # B = bᵀ when transposed
        if bd.shape[cols_side] <= bd.shape[rows_side]:  # BᵀB over B's columns
            gram = bd.transpose(-1, -2) @ bd if not transpose_b else bd @ bd.transpose(-1, -2)
        else:  # B Bᵀ over B's rows
            gram = bd @ bd.transpose(-1, -2) if not transpose_b else bd.transpose(-1, -2) @ bd
        top = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)
        return top.sqrt_().mul_(_CAP_SLACK).to(self.check_dtype)

    # -- reporting ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Lifetime counters, as plain values."""
        return {"checks": self.checks, "failures": self.failures, "seconds": self.seconds,
                "refreshes": self.refreshes, "refresh_s": self.refresh_s,
                "build_s": self.build_s, "worst_ratio": self.worst_ratio,
                "pools": len(self._pools), "pool_size": self.pool_size,
                "refresh_checks": self.refresh_checks, "safety": self.safety,
                "u_out": self.u_out}
