"""The TEE driver: the model's control flow and non-linear ops, offloading the rest.

The driver keeps what the enclave must: the RMSNorm weights, the RoPE tables and, with
``private_io=True`` (the default), the embedding and lm_head.  It runs

======================  ==========  ==============================================
step                    where       crosses
======================  ==========  ==============================================
embedding lookup        TEE [#]_    (worker: ids ``[T]`` int64 → ``[T, hidden]``)
RMSNorm                 TEE         —
q, k, v projections     worker      x ``[T, hidden]`` → q, k, v
RoPE                    TEE         —
attention (fused)       ``"tee"``   —
scores ``q·kᵀ``         ``worker``  q ``[kv, g·T, d]``, k ``[kv, T, d]`` → ``[kv, g·T, T]``
causal softmax          TEE         —
context ``p·v``         ``worker``  p ``[kv, g·T, T]``, v ``[kv, T, d]`` → ``[kv, g·T, d]``
o projection            worker      ``[T, heads·d]`` → ``[T, hidden]``
residual add, RMSNorm   TEE         —
gate, up projections    worker      x → gate, up
SiLU·up                 TEE         —
down projection         worker      ``[T, intermediate]`` → ``[T, hidden]``
residual add            TEE         —
final RMSNorm           TEE         —
lm_head                 TEE [#]_    (worker: ``[rows, hidden]`` → float32 ``[rows, vocab]``)
======================  ==========  ==============================================

.. [#] On the worker with ``private_io=False``; lm_head then gets only the last row unless
   every position's logits are asked for, and answers in float32 whatever the wire dtype.

per layer for the middle rows.  Attention is batched per layer in grouped form: the ``g``
query heads that share a key/value head are stacked along the rows, so K and V cross once
per key/value head, never expanded to all heads; in the TEE one fused causal kernel
(``scaled_dot_product_attention`` with grouped KV) replaces scores, softmax and context.

Attention policy (``attention=``): ``"worker"`` sends the two attention matmuls to the worker,
``"tee"`` computes them in the TEE, ``"auto"`` decides per worker device:

* CPU worker: ``"tee"``.  The matmuls cost the same on either side, so offloading can only add
  the transport of the score and probability matrices (``heads·T²`` elements each way per
  layer, the largest messages of a prefill).  Measured on 2 cores, seed-bench, T=1024,
  float32, median of 7: 320 ms per prefill with ``"tee"``, 409 ms with ``"worker"``, whose
  attention moved 280 MiB: 79 ms of transport and 53 ms of worker compute, where the TEE
  needs 50 ms for the same matmuls — and the TEE's fused kernel now needs 39 ms for the
  whole attention (9.7 ms a layer against 46 ms materialised), the worker policy's results
  must be verified besides.
* CUDA worker: measured once, at construction.  Both the compute (``2·heads·T²·d`` FLOPs per
  matmul) and the bytes (``4·heads·T²`` per float32 matrix) grow as T², so their ratio is set
  by ``head_dim`` and the machine, not by T.  A GPU makes the compute nearly free, but the
  matrices still cross the channel and PCIe: in the measurement above the transport alone
  (79 ms) exceeds the TEE's compute (50 ms) in float32, and a bfloat16 wire (44 ms against
  55 ms) only breaks even.  So no fixed rule is right for every host: the driver times its
  own matmuls against a round trip through the worker on a probe of T=256 and picks the
  faster (:meth:`TEEDriver.policy_probe`).

Results from the worker are untrusted: every one is checked for type, shape and dtype before
use (:class:`WorkerResultError`) and, with ``verify=True`` (the default), for its value by a
Freivalds check (:mod:`actors.verify`; :class:`VerificationError`) before anything is
computed from it.

Overlap (``chunk_rows=``).  A prefill can run in row chunks as a wavefront (:meth:`_layers`):
each chunk goes through the layers as a coroutine that stops at every offload, the offloads
in flight form one FIFO (one call per chunk, sent with ``.remote``), and chunk ``j+1`` runs
one offload behind chunk ``j`` — so while the TEE computes one chunk, the worker computes
the others' offloads and the channel carries them.  :meth:`chunk_plan` and
:func:`auto_chunk_rows` say how a prompt is cut; ``prefill(trace=True)`` records a timeline
of both processes (:meth:`last_trace`, :mod:`actors.trace`).  Accounting is per call: exact
with several calls in flight.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from actors.errors import VerificationError, WorkerResultError
from actors.generation import GenerationOptions, GenerationState, KVCache, one_thread
from actors.gpu_worker import Threads, dtype_name, resolve_dtype, set_threads
from actors.llama import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    CheckpointReader,
    LlamaConfig,
    apply_rope,
    causal_softmax,
    load_weights,
    norm_names,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    silu_mul,
    tee_weight_names,
)
from actors.trace import TID_CALLS, TID_TEE, Recorder, chrome_trace, worker_spans
from actors.verify import GROUPS, Begun, Verifier
from runtime import actor
from runtime.transport import memcopy

__all__ = ["OPS", "POLICIES", "TEEDriver", "VerificationError", "WorkerResultError",
           "auto_chunk_rows"]

logger = logging.getLogger(__name__)

POLICIES = ("auto", "worker", "tee")
# A decode step's lm_head in the TEE takes the process's threads only for a weight this big,
# and only when they make it this many times faster (``TEEDriver._decode_lm_threads``).
LM_THREADS_MIN_BYTES = 16 << 20
LM_THREADS_GAIN = 1.1
# Rows of the per-op table, in pipeline order; the first set is what may go to the worker.
WORKER_OPS = ("embedding", "qkv", "scores", "context", "o_proj", "gate_up", "down", "lm_head")
# "attention" is the fused causal kernel of the "tee" policy; "scores", "softmax" and "context"
# the materialised path of the "worker" policy.
OPS = ("embedding", "rms_norm", "qkv", "rope", "kv_cache", "attention", "scores", "softmax",
       "context", "o_proj", "residual", "gate_up", "silu_mul", "down", "lm_head", "sample")


@dataclass
class _Row:
    where: str
    calls: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    routes: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "shm": {"messages": 0, "bytes": 0}, "zmq": {"messages": 0, "bytes": 0}})
    wait_s: float = 0.0
    tee_s: float = 0.0
    worker_s: float = 0.0
    checks: int = 0
    verify_s: float = 0.0  # part of tee_s
    in_flight_s: float = 0.0  # per call, send to reply; calls of one op may overlap

    def add_wire(self, wire: Any) -> None:
        """Count one call's wire record (``CallFuture.wire``): its message and its reply.

        ``None`` (an in-process worker: no channel), or a record without its reply's half,
        counts nothing.
        """
        if wire is not None and len(wire) == 4:
            for route, nbytes in (wire[:2], wire[2:]):
                r = self.routes.setdefault(route, {"messages": 0, "bytes": 0})
                r["messages"] += 1
                r["bytes"] += nbytes

    def add_counts(self, before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> None:
        """Count what a channel's route counters moved around one blocking call.

        For a worker handle that keeps no per-call record (``call_with_wire``): exact only
        when nothing else used the channel meanwhile.  ``None`` on either side counts nothing.
        """
        if before is not None and after is not None:
            for i, route in enumerate(("shm", "zmq")):
                r = self.routes.setdefault(route, {"messages": 0, "bytes": 0})
                r["messages"] += after[2 * i] - before[2 * i]
                r["bytes"] += after[2 * i + 1] - before[2 * i + 1]

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "calls": self.calls, "bytes_out": self.bytes_out,
                "bytes_in": self.bytes_in,
                "routes": {k: dict(v) for k, v in self.routes.items()},
                "wait_s": self.wait_s, "tee_s": self.tee_s, "worker_s": self.worker_s,
                "checks": self.checks, "verify_s": self.verify_s,
                "in_flight_s": self.in_flight_s}


def _route_counts(stats: Any) -> tuple[int, int, int, int] | None:
    """``(shm messages, shm bytes, zmq messages, zmq bytes)`` of ``stats()``, or None."""
    try:
        r = stats["routes"]
        return (int(r["shm"]["messages"]), int(r["shm"]["bytes"]),
                int(r["zmq"]["messages"]), int(r["zmq"]["bytes"]))
    except (KeyError, TypeError, ValueError):
        return None


def _timed_linear(x: torch.Tensor, w: torch.Tensor, threads: int) -> float:
    """Seconds of one ``F.linear(x, w)`` on ``threads`` intra-op threads."""
    with Threads(threads):
        t0 = time.perf_counter()
        F.linear(x, w)
        return time.perf_counter() - t0


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


class _TeeTimer:
    """Times a block into a row's ``tee_s``.

    A plain class: a decode step enters ~17 of these per layer, and a
    ``contextlib.contextmanager`` costs 1 us each where this costs 0.2 us.
    """

    __slots__ = ("row", "t0")

    def __init__(self, row: _Row) -> None:
        self.row = row
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.row.tee_s += time.perf_counter() - self.t0


class _TracedTeeTimer:
    """``_TeeTimer`` that also records the block as a span of a traced prefill."""

    __slots__ = ("args", "name", "rec", "row", "t0")

    def __init__(self, row: _Row, rec: Recorder, name: str, args: dict[str, Any]) -> None:
        self.row, self.rec, self.name, self.args = row, rec, name, args
        self.t0 = 0

    def __enter__(self) -> None:
        self.t0 = time.monotonic_ns()

    def __exit__(self, *exc: object) -> None:
        t1 = time.monotonic_ns()
        self.row.tee_s += (t1 - self.t0) * 1e-9
        self.rec.span(TID_TEE, self.name, self.t0, t1, self.args)


class _Call:
    """One offloaded call: sent, and either answered (``value``) or in flight (``fut``)."""

    __slots__ = ("arrived", "fut", "op", "sent", "value", "where")

    def __init__(self, op: str, sent: int, where: dict[str, Any]) -> None:
        self.op, self.sent, self.where = op, sent, where
        self.fut: Any = None
        self.value: Any = None
        self.arrived = 0  # monotonic ns when the reply was read (see _collect)

    def arrive(self, _fut: Any) -> None:
        self.arrived = time.monotonic_ns()


@dataclass
class _Linear:
    """A linear offload between its send and its check: what the check needs."""

    op: str
    layer: int
    xw: torch.Tensor
    widths: tuple[int, ...]
    begun: Begun | None
    call: _Call


def _union_s(intervals: list[tuple[int, int]]) -> float:
    """Seconds covered by the union of ``(start_ns, end_ns)`` intervals."""
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total * 1e-9


# Automatic chunking of a prefill (``chunk_rows=None``): see auto_chunk_rows.
AUTO_MIN_ROWS = 256
AUTO_MAX_CHUNKS = 4
_DRIVER_IDS = itertools.count()


def auto_chunk_rows(tokens: int, *, worker_device: str, cores: int, tee_threads: int,
                    worker_threads: int) -> int:
    """Rows per chunk of an automatically pipelined prefill (``tokens``: one chunk).

    ``min(AUTO_MAX_CHUNKS, tokens // AUTO_MIN_ROWS)`` chunks of equal size, at least one:
    a prompt shorter than ``2 · AUTO_MIN_ROWS`` is never cut, since each chunk adds one call
    per offloaded op and a call costs 50-250 us of fixed overhead, more than the overlap of
    a short chunk can hide.  A CPU worker overlaps only if the host has cores for both
    sides (``cores >= tee_threads + worker_threads``): otherwise the two processes take
    turns on the same cores anyway, and overlapping them only adds calls and contention
    (docs/design.md has the measurements).
    """
    if worker_device == "cpu" and cores < tee_threads + worker_threads:
        return tokens
    n = max(1, min(AUTO_MAX_CHUNKS, tokens // AUTO_MIN_ROWS))
    return -(-tokens // n)


def _plain_info(info: Any) -> dict[str, Any]:
    """The worker's ``device_info`` reduced to values safe to keep, print and compare.

    Its word, an untrusted worker's too: short strings, bools, finite floats and ints
    within 64 bits (a 5000-digit int cannot even be printed).
    """
    if not isinstance(info, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in info.items():
        if type(k) is not str or len(k) > 64:
            continue
        if (type(v) is bool or (type(v) is str and len(v) <= 200)
                or (type(v) is int and -(1 << 63) <= v < 1 << 63)
                or (type(v) is float and math.isfinite(v))):
            out[k] = v
    return out


def _refuse_coarse_worker(worker: Any, wire: torch.dtype, tee: torch.dtype,
                          private_io: bool) -> None:
    """Refuse a worker whose compute dtype no honest result of it could pass the checks with.

    A result is checked to the coarser of the wire's and the TEE's precision, and never
    finer than float32's (the checks accumulate in float32; ``verify.py``); offloaded logits
    cross as float32 and are checked to the TEE's precision.  A worker that rounds its
    weights coarser than that misses every check by its own rounding, and the first prefill
    would blame an honest worker with ``VerificationError``.  ``worker`` is the worker's own
    word (``device_info``): a liar gains nothing by it but this refusal.
    """
    try:
        dtype = resolve_dtype(worker) if isinstance(worker, str) else None
    except ValueError:  # no floating dtype's name: nothing to judge by
        return
    if dtype is None:
        return
    eps = torch.finfo(dtype).eps
    floor = torch.finfo(torch.float32).eps
    name = dtype_name(dtype)
    if eps > max(torch.finfo(wire).eps, torch.finfo(tee).eps, floor):
        raise ValueError(
            f"the worker computes in {name}, coarser than the {dtype_name(wire)} wire and the "
            f"{dtype_name(tee)} TEE its results are checked at: an honest worker fails "
            f"verification. Use wire_dtype=torch.{name} (checks at {name}'s precision), a "
            f"worker of the wire's dtype, or verify=False")
    if not private_io and eps > max(torch.finfo(tee).eps, floor):
        raise ValueError(
            f"the worker computes in {name}, and with private_io=False its logits are "
            f"checked at the TEE's {dtype_name(tee)}: an honest worker fails verification. Use "
            f"private_io=True (lm_head in the TEE), a worker of the TEE's dtype, or "
            f"verify=False")


def _cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def _progress_logging(enabled: bool) -> Iterator[None]:
    """Let INFO progress through for one prefill.

    Also in a process (an actor) whose logging was left at WARNING or never configured:
    asking for ``log_every`` is asking to see it.
    """
    if not enabled or logger.isEnabledFor(logging.INFO):
        yield
        return
    old_level = logger.level
    handler = None
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if handler is not None:
            logger.removeHandler(handler)


@actor
class TEEDriver:
    """Runs a LLaMA prefill with the GPU worker ``gpu``.

    ``gpu`` is an ``ActorHandle`` of a ``GPUWorker`` or, in-process, a plain ``GPUWorker``.
    ``dtype`` is the TEE's compute dtype; ``wire_dtype`` (default: ``dtype``) is what
    activations cross in — ``torch.bfloat16`` halves the bytes.  ``attention`` is the policy
    for the attention matmuls (see the module docstring).  Norm weights come from
    ``checkpoint`` or are drawn from ``seed``, exactly as the worker draws its own.

    ``private_io=True``: the embedding lookup and lm_head run here (the TEE holds the
    embedding, and lm_head when untied, in float32), so token ids and logits never cross;
    ``False`` offloads them as before.  ``verify=True``: every offloaded result is checked
    (:mod:`actors.verify`) before use and a failure raises :class:`VerificationError`.

    ``chunk_rows``: a prefill runs in chunks of this many rows, pipelined (see
    :meth:`_layers`); ``None`` chooses (:meth:`chunk_plan`), ``0`` keeps it whole.
    ``threads``: torch's intra-op threads for this process (``None``: its default), for an
    actor.
    """

    def __init__(self, config: LlamaConfig, gpu: Any,  # noqa: PLR0917 - the documented API
                 checkpoint: str | Path | None = None,
                 seed: int = 0, dtype: torch.dtype | str = torch.float32,
                 wire_dtype: torch.dtype | str | None = None, *, attention: str = "auto",
                 private_io: bool = True, verify: bool = True,
                 chunk_rows: int | None = None, threads: int | None = None) -> None:
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        if attention not in POLICIES:
            raise ValueError(f"attention must be one of {POLICIES}, got {attention!r}")
        for name, flag in (("private_io", private_io), ("verify", verify)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if chunk_rows is not None and (isinstance(chunk_rows, bool)
                                       or not isinstance(chunk_rows, int) or chunk_rows < 0):
            raise ValueError(f"chunk_rows must be None (automatic), 0 (no chunks) or an int "
                             f">= 1, got {chunk_rows!r}")
        set_threads(threads)
        self.config = config
        self.gpu = gpu
        self.chunk_rows = chunk_rows
        # A worker actor's handle answers ``.remote``: offloads can then be in flight while
        # the TEE computes.  A plain in-process worker runs every call synchronously.
        self._async = callable(getattr(getattr(gpu, "batch_linear", None), "remote", None))
        self._pipelined = False  # the current layer loop issues futures
        # Tags name this driver too, so the worker's per-tag counters stay exact when several
        # drivers share it.
        self._id = f"{os.getpid()}.{next(_DRIVER_IDS)}"
        self._tags = {op: f"{op}@{self._id}" for op in WORKER_OPS}
        self._flights: list[tuple[int, int]] = []  # in-flight intervals of pipelined calls
        self._rec: Recorder | None = None
        self._at: dict[str, Any] = {}  # layer and chunk of the current step, for the trace
        self._last_trace: dict[str, Any] | None = None
        c = config
        self._widths = {"qkv": (c.q_size, c.kv_size, c.kv_size), "o_proj": (c.hidden_size,),
                        "gate_up": (c.intermediate_size, c.intermediate_size),
                        "down": (c.hidden_size,)}
        self.dtype = resolve_dtype(dtype)
        self.wire_dtype = resolve_dtype(wire_dtype, self.dtype)
        self.private_io = private_io
        if checkpoint is not None and not isinstance(checkpoint, CheckpointReader):
            checkpoint = CheckpointReader(checkpoint, config)  # the file map, read once
        self._norms = load_weights(config, tee_weight_names(config), checkpoint, seed,
                                   self.dtype)
        self._io: dict[str, torch.Tensor] = {}
        if private_io:  # float32: logits are float32 whatever the dtypes (issue 8, item 6)
            self._io = load_weights(config, [EMBED, LM_HEAD], checkpoint, seed, torch.float32)
        self._verifier: Verifier | None = None
        if verify:
            ops: list[tuple[str, int | None]] = [
                (op, i) for i in range(config.num_hidden_layers) for op in GROUPS]
            if not private_io:
                ops += [("embedding", None), ("lm_head", None)]
                if self.dtype.itemsize < 4:
                    logger.warning(
                        "TEE dtype %s with private_io=False: the worker's logits are rounded "
                        "to it, so they are checked only to ~3 %% of a row's norm, and one "
                        "logit changed by less is never caught -- enough to choose the next "
                        "token. Use a float32 TEE dtype or private_io=True (docs/design.md).",
                        dtype_name(self.dtype))
            self._verifier = Verifier(config, ops, checkpoint, seed, dtype=self.dtype,
                                      wire_dtype=self.wire_dtype)
        self._inv_freq = rope_inv_freq(config)
        self._cos = self._sin = torch.empty(0)
        info = self.gpu.device_info()
        self.worker_device = _plain_info(info)
        if verify:
            _refuse_coarse_worker(self.worker_device.get("dtype"), self.wire_dtype, self.dtype,
                                  private_io)
        threads = self.worker_device.get("threads")  # sizes chunks: a count, or nothing
        if threads is not None and not (type(threads) is int and 0 < threads <= 1 << 16):
            logger.warning("the worker reports threads=%r: ignored", threads)
            del self.worker_device["threads"]
        self._probe: dict[str, Any] = {}
        if attention == "auto":
            if self.worker_device.get("type") == "cuda":
                self._probe = self._measure_attention()
                attention = self._probe["choice"]
                self.policy_reason = (
                    f"measured at T={self._probe['tokens']}: TEE "
                    f"{1e3 * self._probe['tee_s']:.2f} ms, worker round trip "
                    f"{1e3 * self._probe['worker_s']:.2f} ms")
            else:
                attention = "tee"
                self.policy_reason = ("CPU worker: the matmuls cost the same on either side, "
                                      "offloading only adds transport")
        else:
            self.policy_reason = "asked for"
        self.attention = attention
        self._rows: dict[str, _Row] = {}
        self._last: dict[str, Any] | None = None
        self._gen: GenerationState | None = None
        # The decode step's lm_head threads, measured once per thread count offered
        # (:meth:`_decode_lm_threads`): {offered: {"threads", "offered", "one_ms", "many_ms"}}.
        # Measured here for the process's own count, so that no generation pays for it.
        self._lm_choice: dict[int, dict[str, Any]] = {}
        offered = torch.get_num_threads()
        if private_io and offered > 1:
            # Any input times the same; ones leave the caller's random generator alone.
            self._decode_lm_threads(offered, torch.ones(1, config.hidden_size),
                                    self._io[LM_HEAD])

    # -- the attention policy probe -------------------------------------------------------------

    def _measure_attention(self, tokens: int = 256, rounds: int = 3) -> dict[str, Any]:
        """Time one layer's attention matmuls here and through the worker; pick the faster.

        Random inputs of ``tokens`` positions; the best of ``rounds`` after a warm-up.
        """
        c = self.config
        kv, g, d, t = c.num_key_value_heads, c.num_key_value_groups, c.head_dim, tokens
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(kv, n, d, generator=gen).to(self.dtype) for n in (g * t, t, t))
        p = torch.softmax(torch.randn(kv, g * t, t, generator=gen), -1).to(self.dtype)

        def here() -> None:  # the fused kernel the "tee" policy runs
            F.scaled_dot_product_attention(q.view(1, kv * g, t, d), k[None], v[None],
                                           is_causal=True, enable_gqa=g > 1)

        def there() -> None:  # what the "worker" policy costs the TEE: wait, softmax, checks
            w = self.wire_dtype
            qw, kw, pw, vw = q.to(w), k.to(w), p.to(w), v.to(w)
            s = self.gpu.matmul(qw, kw, transpose_b=True, tag="probe")
            s = self._expect(s, (kv, g * t, t), "probe scores").to(self.dtype)
            causal_softmax(s.view(kv, g, t, t), d ** -0.5)
            o = self.gpu.matmul(pw, vw, tag="probe")
            o = self._expect(o, (kv, g * t, d), "probe context").to(self.dtype)
            if self._verifier is not None:
                self._verifier.check_matmul("probe scores", qw, kw, s, transpose_b=True)
                self._verifier.check_matmul("probe context", pw, vw, o)

        def best(fn: Any) -> float:
            times = []
            for _ in range(rounds + 1):  # the first round warms up
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times[1:])

        tee_s, worker_s = best(here), best(there)
        return {"tokens": t, "tee_s": tee_s, "worker_s": worker_s,
                "choice": "worker" if worker_s < tee_s else "tee"}

    def policy_probe(self) -> dict[str, Any]:
        """The attention policy, why, and the probe's timings when one ran (CUDA, ``auto``)."""
        return {"policy": self.attention, "reason": self.policy_reason, **self._probe}

    # -- accounting ------------------------------------------------------------------------

    def _tee(self, op: str) -> _TeeTimer | _TracedTeeTimer:
        """``with self._tee(op):`` adds the block's time to ``op``'s TEE seconds."""
        if self._rec is not None:
            return _TracedTeeTimer(self._rows[op], self._rec, op, self._at)
        return _TeeTimer(self._rows[op])

    def _routes(self) -> tuple[int, int, int, int] | None:
        """The worker channel's route counters, or None (no ``stats()``: in process)."""
        stats = getattr(self.gpu, "stats", None)
        return _route_counts(stats()) if callable(stats) else None

    def _issue(self, op: str, method: str, *args: Any, **kwargs: Any) -> _Call:
        """Send one offload: a future when the layer loop pipelines, else a blocking call.

        Accounting is per call, so it stays exact with several calls in flight: bytes from
        the tensors sent and received, routes and encoded sizes from the call's own record
        (``CallFuture.wire``; a blocking call's from ``call_with_wire``).  Reading the
        channel's counters around a blocking call instead cost ~12 us of a decode-sized
        call's ~45 (two ``stats()``), and counted whatever else used the channel meanwhile;
        it is left for a worker handle that offers ``stats()`` but no per-call record.
        """
        row = self._rows[op]
        row.calls += 1
        row.bytes_out += _nbytes(args)
        fn = getattr(self.gpu, method)
        call = _Call(op, time.monotonic_ns(), self._at)
        if self._pipelined:
            call.fut = fn.remote(*args, tag=self._tags[op], **kwargs)
            if not hasattr(call.fut, "done_ns"):  # the runtime's futures note it themselves
                call.fut.add_done_callback(call.arrive)
            t1 = time.monotonic_ns()
            name = "send "
        else:
            with_wire = getattr(fn, "call_with_wire", None)
            if with_wire is not None:  # an actor: the call's own wire record
                call.value, wire = with_wire(*args, tag=self._tags[op], **kwargs)
                t1 = call.arrived = time.monotonic_ns()
                row.add_wire(wire)
            else:  # in process (no channel), or a handle-like without records: its counters
                before = self._routes()
                call.value = fn(*args, tag=self._tags[op], **kwargs)
                t1 = call.arrived = time.monotonic_ns()
                row.add_counts(before, self._routes())
            row.in_flight_s += (t1 - call.sent) * 1e-9
            row.bytes_in += _nbytes(call.value)
            name = "call "
        row.wait_s += (t1 - call.sent) * 1e-9
        if self._rec is not None:
            self._rec.span(TID_CALLS, name + op, call.sent, t1, self._at)
            if call.fut is None:
                self._rec.flight(op, call.sent, t1, self._at)
        return call

    def _collect(self, call: _Call) -> Any:
        """The result of an offload; waits for it if it is still in flight."""
        fut = call.fut
        if fut is None:
            return call.value
        row = self._rows[call.op]
        t0 = time.monotonic_ns()
        value = fut.result()
        t1 = time.monotonic_ns()
        row.wait_s += (t1 - t0) * 1e-9
        arrived = getattr(fut, "done_ns", 0) or call.arrived or t1
        row.in_flight_s += (arrived - call.sent) * 1e-9
        row.bytes_in += _nbytes(value)
        self._flights.append((call.sent, arrived))
        row.add_wire(getattr(fut, "wire", None))
        if self._rec is not None:
            self._rec.span(TID_CALLS, "wait " + call.op, t0, t1, call.where)
            self._rec.flight(call.op, call.sent, arrived, call.where)
        return value

    def _offload(self, op: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._collect(self._issue(op, method, *args, **kwargs))

    def _worker_compute(self) -> dict[str, Any] | None:
        """The worker's own compute counters, or None when they cannot be had.

        Bookkeeping only: a call that fails (a timeout, a refused reply, a dead worker)
        makes the worker's time unknown; it must not fail a prefill or a generation whose
        results were all checked.  A worker that is really gone fails the next offload.
        """
        fn = getattr(self.gpu, "compute_stats", None)
        if fn is None:
            return None
        try:
            stats = fn()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            logger.warning("the worker's compute_stats failed (%s: %s): its compute time is "
                           "unknown", type(exc).__name__, exc)
            return None
        return stats if isinstance(stats, dict) else None

    # -- validation of what the worker returns ------------------------------------------------

    def _expect(self, t: Any, shape: Sequence[int], what: str,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.wire_dtype
        if not isinstance(t, torch.Tensor):
            raise WorkerResultError(f"worker returned {type(t).__name__} for {what}, "
                                    f"expected a tensor")
        if not t.is_cpu:  # an in-process CUDA worker's result (an actor's arrives on the CPU)
            t = t.cpu()
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise WorkerResultError(
                f"worker returned {what} of shape {tuple(t.shape)} {t.dtype}, expected "
                f"{tuple(shape)} {dtype}")
        return t

    def _expect_many(self, ts: Any, shapes: Sequence[Sequence[int]], what: str
                     ) -> list[torch.Tensor]:
        if not isinstance(ts, (list, tuple)) or len(ts) != len(shapes):
            raise WorkerResultError(f"worker returned {type(ts).__name__} for {what}, "
                                    f"expected {len(shapes)} tensors")
        return [self._expect(t, s, f"{what}[{i}]")
                for i, (t, s) in enumerate(zip(ts, shapes, strict=True))]

    def _verify(self, op: str, check: str, *args: Any, **kwargs: Any) -> None:
        """Run the verifier's ``check_<check>`` on a result of ``op`` (inside ``_tee(op)``)."""
        if self._verifier is None:
            return
        row = self._rows[op]
        row.verify_s += getattr(self._verifier, f"check_{check}")(*args, **kwargs)
        row.checks += 1

    # -- the pieces of a layer ---------------------------------------------------------------

    def _linear_begin(self, op: str, layer: int, x: torch.Tensor) -> _Linear:
        """Send ``x`` for ``op``'s fused projections of ``layer``; :meth:`_linear_end` checks.

        With ``verify``, the check's first half (``x·Wᵀv``) runs here, while ``x`` is hot.
        """
        names = GROUPS[op]
        begun = None
        with self._tee(op):
            xw = x.to(self.wire_dtype).contiguous()
            if self._verifier is not None:
                begun = self._verifier.begin_linear(op, layer, xw)  # x·Wᵀv while x is hot
        call = self._issue(op, "batch_linear", layer, names, xw)
        return _Linear(op, layer, xw, self._widths[op], begun, call)

    def _linear_end(self, p: _Linear) -> list[torch.Tensor]:
        """The results of :meth:`_linear_begin`'s call, validated and verified, in the TEE dtype."""
        out = self._collect(p.call)
        with self._tee(p.op):
            t = p.xw.shape[0]
            ys = self._expect_many(out, [(t, w) for w in p.widths], p.op)
            ys = [y.to(self.dtype) for y in ys]
            self._verify(p.op, "linear", p.op, p.layer, p.xw, ys, begun=p.begun)
            return ys

    def _matmul(self, op: str, a: torch.Tensor, b: torch.Tensor, transpose_b: bool
                ) -> torch.Tensor:
        shape = (*a.shape[:-1], b.shape[-2] if transpose_b else b.shape[-1])
        if self.attention == "tee":
            with self._tee(op):
                self._rows[op].calls += 1
                return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b)
        with self._tee(op):
            aw = a.to(self.wire_dtype).contiguous()
            bw = b.to(self.wire_dtype).contiguous()
        out = self._offload(op, "matmul", aw, bw, transpose_b=transpose_b)
        with self._tee(op):
            y = self._expect(out, shape, op).to(self.dtype)
            self._verify(op, "matmul", op, aw, bw, y, transpose_b=transpose_b)
            return y

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Grouped causal attention: q ``[heads, T, d]``, k/v ``[kv, Tk, d]`` → ``[T, heads·d]``.

        ``Tk >= T``: the queries are the last ``T`` positions (a chunk of a prefill sees
        the keys of every chunk up to its own).

        ``"tee"``: one fused kernel (``scaled_dot_product_attention``, grouped KV, never
        expanded), no score matrix materialised: 9.7 ms against 46 ms per seed-bench layer
        at T=1024 on 2 cores.  ``"worker"``: the two matmuls cross, softmax stays here.
        """
        c = self.config
        nh, t, d = q.shape
        nkv, g = c.num_key_value_heads, c.num_key_value_groups
        if self.attention == "tee":
            with self._tee("attention"):
                self._rows["attention"].calls += 1
                tk = k.shape[-2]
                # Query i sits at position tk - t + i and sees keys up to it; is_causal aligns
                # the mask top-left, right only when t == tk.
                mask = None if t == tk else torch.ones(t, tk, dtype=torch.bool).tril_(tk - t)
                ctx = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                     is_causal=mask is None, enable_gqa=g > 1)[0]
                return ctx.transpose(0, 1).reshape(t, nh * d)
        tk = k.shape[-2]  # a chunk's queries see the keys of every chunk up to theirs
        qg = q.reshape(nkv, g * t, d)  # query heads of one kv head stacked along the rows
        scores = self._matmul("scores", qg, k, transpose_b=True)  # [kv, g*T, Tk]
        with self._tee("softmax"):
            self._rows["softmax"].calls += 1
            probs = causal_softmax(scores.view(nkv, g, t, tk), d ** -0.5).view(nkv, g * t, tk)
        ctx = self._matmul("context", probs, v, transpose_b=False)  # [kv, g*T, d]
        return ctx.view(nh, t, d).transpose(0, 1).reshape(t, nh * d)

    def _rope_tables(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < t:
            self._cos, self._sin = rope_cos_sin(self.config, max(t, 2 * self._cos.shape[0]),
                                                self.dtype, self._inv_freq)
        return self._cos[:t], self._sin[:t]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        with self._tee("rms_norm"):
            self._rows["rms_norm"].calls += 1
            return rms_norm(x, self._norms[name], self.config.rms_norm_eps)

    # -- public -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor | Sequence[int], all_logits: bool = False,
                log_every: int = 0, *, trace: bool = False) -> torch.Tensor:
        """Float32 logits of the last position ``[vocab]`` (``[T, vocab]`` with ``all_logits``).

        ``log_every=n`` logs progress at INFO every ``n`` layers.  ``trace=True`` records a
        timeline of this prefill, both processes, for :meth:`last_trace`.
        """
        ids = self._check_ids(input_ids)
        with _progress_logging(log_every > 0):
            return self._prefill(ids, all_logits, log_every, trace=trace)

    def last_trace(self) -> dict[str, Any]:
        """The Chrome trace (``{"traceEvents": [...]}``) of the last ``prefill(trace=True)``.

        Write it with ``json.dump`` and open it in Perfetto (ui.perfetto.dev) or
        ``chrome://tracing``; :mod:`actors.trace` describes the tracks.
        """
        if self._last_trace is None:
            raise RuntimeError("no traced prefill has run yet: call prefill(..., trace=True)")
        return self._last_trace

    def _build_trace(self, rec: Recorder, end_ns: int) -> dict[str, Any]:
        fn = getattr(self.gpu, "trace_events", None)
        worker = None
        if callable(fn):
            try:
                got = fn(reset=False, since_ns=rec.start_ns)
            except Exception as exc:  # noqa: BLE001 - a refused reply, a timeout, ...: the
                # prefill's results were checked; the timeline loses its worker track only
                logger.warning("the worker's trace_events call failed (%s: %s): the trace "
                               "shows the TEE only", type(exc).__name__, exc)
                got = None
            worker = got if isinstance(got, dict) else None
            if worker is not None and worker_spans(worker) is None:
                logger.warning("the worker's trace_events reply is malformed: the trace "
                               "shows the TEE only")
        st = self._last or {}
        meta = {"tokens": st.get("tokens"), "chunks": st.get("chunks"),
                "chunk_rows": st.get("chunk_rows"), "policy": self.attention,
                "private_io": self.private_io, "verify": self._verifier is not None,
                "wire_dtype": dtype_name(self.wire_dtype),
                "total_ms": round(1e3 * st.get("total_s", 0.0), 3),
                "worker_device": str(self.worker_device.get("device", ""))}
        # The worker's own account of its compute: a malformed one (trace.worker_spans)
        # costs the timeline its worker track, not the prefill (whose results were checked).
        return chrome_trace(rec, end_ns, worker, self._id, meta)

    def _check_ids(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"input_ids must have shape [T] with T >= 1, got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size})")
        return ids

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None
                 ) -> torch.Tensor:
        """The new tokens after ``input_ids [T]``, a 1-D int64 tensor.

        At most ``max_new_tokens`` ids; when ``eos_token_id`` (one id or several) is produced,
        it is the last one.
        A prefill fills a KV cache kept here in the TEE (keys after RoPE, and values, per
        layer; never sent to the worker), then each decode step runs one row through the
        layers, offloading what a prefill offloads, and attends to the cache in the TEE.
        Greedy at ``temperature == 0``; otherwise temperature, top-k (0: off), top-p (1: off)
        and a draw from the TEE's own generator seeded by ``seed`` (from the OS when
        ``None``).  The cache belongs to this call: the same prompt and options give the
        same tokens.  ``T + max_new_tokens`` beyond ``config.max_position_embeddings`` is a
        ``ValueError`` before any work.  To receive tokens as they are made, use
        :meth:`generate_start` and :meth:`generate_step`; this method is those two in a loop.
        """
        self.generate_start(input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, eos_token_id=eos_token_id)
        out: list[int] = []
        while step := self.generate_step(max(1, max_new_tokens)):
            out.extend(step)
        return torch.tensor(out, dtype=torch.long)

    @torch.no_grad()
    def generate_start(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 32,
                       *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None,
                       eos_token_id: int | Sequence[int] | None = None) -> None:
        """Begin a generation; :meth:`generate_step` then hands out its tokens.

        Same arguments as :meth:`generate`.  Checks everything, runs the prefill into a fresh
        KV cache and samples the first token.  A generation still in progress is dropped.
        """
        c = self.config
        ids = self._check_ids(input_ids)
        options = GenerationOptions(
            max_new_tokens, temperature, top_k, top_p, seed,
            GenerationOptions.eos_ids(eos_token_id, c.vocab_size))
        t = ids.numel()
        if t + max_new_tokens > c.max_position_embeddings:
            raise ValueError(
                f"prompt of {t} tokens + max_new_tokens={max_new_tokens} = "
                f"{t + max_new_tokens} positions exceeds the model's "
                f"max_position_embeddings={c.max_position_embeddings}")
        self._gen = None
        cache = None
        if max_new_tokens:
            # The last new token is never fed back: T + max_new_tokens - 1 positions.
            cache = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                            t + max_new_tokens - 1, self.dtype)
        state = GenerationState(ids, options, cache)
        if not max_new_tokens:
            state.done, state.stop = True, "max_new_tokens"
            self._gen = state
            return
        logits = self._prefill(ids, False, 0, cache)
        state.prefill_stats = self._last
        state.rows = self._new_rows(decode=True)
        state.compute_before = self._worker_compute()
        self._rows = state.rows
        with self._tee("sample"):
            self._rows["sample"].calls += 1
            state.pending = state.sampler(logits)
        self._gen = state

    @torch.no_grad()
    def generate_step(self, n: int = 1, *, start: int | None = None) -> list[int]:
        """Up to ``n`` more tokens of the current generation, as a list of ints.

        ``[]`` once it has finished (eos handed out, or ``max_new_tokens`` reached).  Each
        token is returned as soon as it is made: with ``n=1`` a caller in another process
        receives the tokens one by one (that is how ``make demo`` streams).

        ``start``: the index, among this generation's new tokens, of the first one wanted
        (default: the first not handed out yet).  Tokens already made are handed out again,
        so a caller whose pull was lost -- it timed out while this driver went on and made
        the token into a reply nobody read -- asks again from what it has and loses nothing.

        A step that fails (a worker call that raised, timed out or was caught lying) commits
        nothing: its KV rows are dropped, and the next call makes it again.  When earlier
        steps of the same call succeeded, their tokens are returned and the error is left
        to that next call.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        state = self._gen
        if state is None:
            raise RuntimeError("no generation in progress: call generate_start first")
        if start is None:
            out: list[int] = []
        else:
            if isinstance(start, bool) or not isinstance(start, int) \
                    or not 0 <= start <= len(state.tokens):
                raise ValueError(f"start must be an int in [0, {len(state.tokens)}] (the new "
                                 f"tokens handed out so far), got {start!r}")
            out = state.tokens[start:start + n]
        while len(out) < n and not state.done:
            if state.pending is None:
                try:
                    self._decode_step(state)
                except Exception:
                    if not out:
                        raise
                    break  # hand out what was made; the next call makes this step again
            out.append(state.emit())
        if state.done and state.summary is None:
            state.summary = self._generate_summary(state)
        return out

    def _decode_step(self, state: GenerationState) -> None:
        """Feed the last token through the model at the next position; sample the next.

        All or nothing: the KV rows a step wrote are committed by ``cache.advance`` before
        its logits are computed (on the worker with ``private_io=False``); a failure after
        that must not leave the cache a position ahead, or the retry would feed the token
        again at the next position and go on from a wrong cache, unnoticed.
        """
        self._rows = state.rows
        t0 = time.perf_counter()
        length = state.cache.length
        try:
            with one_thread() as offered:
                ids = torch.tensor(state.tokens[-1:], dtype=torch.long)
                h = self._embed(ids)
                h = self._layers(h, length, state.cache)
                x = self._norm(h, FINAL_NORM)
                logits = self._logits(x, offered)[0]
                if self.private_io and offered > 1:
                    state.lm_head_threads = self._lm_choice.get(offered)
                with self._tee("sample"):
                    self._rows["sample"].calls += 1
                    state.pending = state.sampler(logits)
        except BaseException:
            state.cache.length = length
            raise
        state.decode_s += time.perf_counter() - t0
        state.steps += 1

    def _generate_summary(self, state: GenerationState) -> dict[str, Any]:
        o = state.options
        out: dict[str, Any] = {
            "prompt_tokens": state.prompt.numel(), "new_tokens": len(state.tokens),
            "finished": state.done, "stop": state.stop,
            "options": {"max_new_tokens": o.max_new_tokens, "temperature": o.temperature,
                        "top_k": o.top_k, "top_p": o.top_p, "seed": o.seed,
                        "eos_token_id": list(o.eos_token_id)},
            "kv_cache_bytes": state.cache.nbytes() if state.cache is not None else 0,
            "prefill": state.prefill_stats, "decode": None, "steps": state.steps,
            "ms_per_token": None, "tokens_per_s": None, "calls_per_token": None,
            "tee_ms_per_token": None, "worker_ms_per_token": None,
            "transport_ms_per_token": None,
            "lm_head_threads": None if state.lm_head_threads is None
            else dict(state.lm_head_threads),
        }
        if state.rows is None:
            return out
        # Copies: a summary taken mid-generation must not be filled in by later steps.
        rows = {op: _Row(**{**vars(r), "routes": {k: dict(v) for k, v in r.routes.items()}})
                for op, r in state.rows.items()}
        decode = self._summary(rows, state.steps, state.decode_s, state.compute_before,
                               self._worker_compute())
        decode["sample_s"] = rows["sample"].tee_s
        out["decode"] = decode
        if state.steps:
            per = 1e3 / state.steps
            out.update(
                ms_per_token=decode["total_s"] * per,
                tokens_per_s=state.steps / decode["total_s"] if decode["total_s"] else None,
                calls_per_token=decode["calls"] / state.steps,
                tee_ms_per_token=decode["tee_s"] * per,
                worker_ms_per_token=None if decode["worker_s"] is None
                else decode["worker_s"] * per,
                transport_ms_per_token=None if decode["transport_s"] is None
                else decode["transport_s"] * per)
        return out

    def last_generate_stats(self) -> dict[str, Any]:
        """The accounting of the last (or current) generation, as plain dicts and numbers.

        Keys: ``prompt_tokens``, ``new_tokens``, ``finished``, ``stop`` (``"eos"``,
        ``"max_new_tokens"``, ``None`` while running), ``options``, ``kv_cache_bytes``,
        ``prefill`` (as :meth:`last_prefill_stats`), ``decode`` (the same keys over every
        decode step, ``tokens`` being the number of steps, plus ``sample_s``), ``steps``
        (decode steps: the first new token comes from the prefill), and per decode step:
        ``ms_per_token``, ``tokens_per_s``, ``calls_per_token`` (offloads),
        ``tee_ms_per_token``, ``worker_ms_per_token``, ``transport_ms_per_token``;
        ``lm_head_threads``: how a decode step's lm_head in the TEE was threaded
        (``{"threads", "offered", "one_ms", "many_ms"}``, the times of its one-off
        measurement, ``None`` when not measured), or ``None`` (``private_io=False``, or one
        thread offered).
        """
        state = self._gen
        if state is None:
            raise RuntimeError("no generation has run yet")
        return state.summary if state.summary is not None else self._generate_summary(state)

    def _new_rows(self, decode: bool = False) -> dict[str, _Row]:
        """Fresh accounting rows; a decode step's attention is always in the TEE."""
        def where(op: str) -> str:
            if op not in WORKER_OPS:
                return "tee"
            if op in ("scores", "context"):
                return "tee" if decode else self.attention
            return "worker"

        return {op: _Row(where=where(op)) for op in OPS}

    def chunk_plan(self, tokens: int) -> list[tuple[int, int]]:
        """The row ranges ``[lo, hi)`` a prefill of ``tokens`` positions is pipelined in.

        One range: no pipeline.  ``chunk_rows=None`` (automatic): one chunk with an
        in-process worker (nothing can overlap), else :func:`auto_chunk_rows` for the
        worker's device and threads and this host's cores.  ``0``: one chunk; ``n``:
        chunks of ``n`` rows, the last one shorter.
        """
        rows = self.chunk_rows
        if rows is None:
            if not self._async:
                return [(0, tokens)]
            info = self.worker_device
            rows = auto_chunk_rows(
                tokens, worker_device=str(info.get("type", "")), cores=_cores(),
                tee_threads=torch.get_num_threads(),
                worker_threads=int(info.get("threads", 1) or 1))
        elif rows == 0:
            rows = tokens
        return [(lo, min(lo + rows, tokens)) for lo in range(0, tokens, max(1, rows))]

    def _prefill(self, ids: torch.Tensor, all_logits: bool, log_every: int,
                 cache: KVCache | None = None, trace: bool = False) -> torch.Tensor:
        self._rows = self._new_rows()
        self._flights = []
        t = ids.numel()
        compute_before = self._worker_compute()
        t_start = time.perf_counter()
        start_ns = time.monotonic_ns()
        self._rec = Recorder(start_ns) if trace else None
        self._at = {}
        try:
            h = self._embed(ids)
            h = self._layers(h, 0, cache, log_every, t_start)
            last = h if all_logits else h[-1:]
            x = self._norm(last, FINAL_NORM)
            logits = self._logits(x)
            total = time.perf_counter() - t_start
            end_ns = time.monotonic_ns()
        finally:
            rec, self._rec = self._rec, None
            self._at = {}
        self._finish(t, all_logits, total, compute_before)
        if rec is not None:
            self._last_trace = self._build_trace(rec, end_ns)
        return logits if all_logits else logits[0]

    def _layers(self, h: torch.Tensor, start: int, cache: KVCache | None = None,
                log_every: int = 0, t_start: float = 0.0) -> torch.Tensor:
        """Every decoder layer over ``h [T, hidden]`` at positions ``start .. start+T-1``.

        Without ``cache``: a plain prefill (``start`` must be 0).  With one: the new keys and
        values are appended to it; at ``start == 0`` (a prefill filling the cache) attention
        is the prefill's, later (decode steps) the new rows attend to everything cached
        (:meth:`_attention_step`).

        A prefill runs in the row chunks of :meth:`chunk_plan`, as a wavefront.  Each chunk
        is a coroutine (:meth:`_chunk_layers`) that goes through the layers and stops at each
        offload; the calls in flight form one FIFO, one call per chunk, in the order the
        worker serves them.  The loop takes the oldest call's result (waiting if it is not
        there yet), resumes its chunk — which does the TEE's work on it and sends its next
        offload to the back of the FIFO — and starts chunk ``j+1`` once chunk ``j`` has
        passed its first offload.  So chunk ``j`` runs one offload ahead of chunk ``j+1``:
        while the TEE computes one chunk's attention the worker computes other chunks'
        gate_up and down, and the channel carries what is between them.  Attention of chunk
        ``j`` needs the keys and values of chunks ``<= j`` of its layer; every step of chunk
        ``j`` is sent, hence resumed, before the same step of chunk ``j+1``, so they are in
        place.  With a worker actor and several chunks the offloads are futures
        (``.remote``); otherwise each is a blocking call and the loop degenerates to the
        plain layer-by-layer order.
        """
        c = self.config
        t = h.shape[0]
        chunks = self.chunk_plan(t) if start == 0 else [(0, t)]
        with self._tee("rope"):
            cos, sin = self._rope_tables(start + t)
            cos, sin = cos[start:], sin[start:]
        store = cache
        if cache is None and len(chunks) > 1:  # K and V of every layer, chunk by chunk
            store = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, t,
                            self.dtype)
        out: list[torch.Tensor] = [h] * len(chunks)
        fifo: collections.deque[tuple[int, Any, _Linear]] = collections.deque()

        def resume(j: int, steps: Any, value: Any) -> None:
            try:
                fifo.append((j, steps, steps.send(value)))
            except StopIteration as done:
                out[j] = done.value

        def begin(j: int) -> None:
            lo, hi = chunks[j]
            resume(j, self._chunk_layers(j, h[lo:hi], lo, start, cos[lo:hi], sin[lo:hi],
                                         store, log_every if j + 1 == len(chunks) else 0,
                                         t_start), None)

        self._pipelined = self._async and len(chunks) > 1
        try:
            begin(0)
            started = 1
            while fifo:
                j, steps, pending = fifo.popleft()
                if self._rec is not None:
                    self._at = pending.call.where
                result = self._linear_end(pending)
                resume(j, steps, result)
                if j + 1 == started < len(chunks):  # the newest chunk passed an offload
                    begin(started)
                    started += 1
        finally:
            self._pipelined = False
            self._at = {}
        if cache is not None:
            cache.advance(t)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _chunk_layers(self, j: int, h: torch.Tensor, lo: int, start: int,  # noqa: PLR0917
                      cos: torch.Tensor, sin: torch.Tensor, store: KVCache | None,
                      log_every: int, t_start: float) -> Any:
        """One chunk's rows (``h``, from row ``lo``) through every layer, as a coroutine.

        Yields each offload it sends (a :class:`_Linear`), is resumed with its checked
        result, returns the chunk's final hidden states.  ``store``: where each layer's keys
        and values go (the KV cache, or the prefill's own), or ``None`` (a single chunk
        without cache: attention uses its own keys and values).
        """
        c = self.config
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        n = h.shape[0]
        trace = self._rec is not None
        for i in range(c.num_hidden_layers):
            in_norm, post_norm = norm_names(i)
            if trace:
                self._at = {"layer": i, "chunk": j}
            q, k, v = yield self._linear_begin("qkv", i, self._norm(h, in_norm))
            if trace:
                self._at = {"layer": i, "chunk": j}
            with self._tee("rope"):
                self._rows["rope"].calls += 1
                # q and k heads rotated together: one pass of RoPE's ops instead of two (a
                # decode row: 22 us a layer instead of 32).
                qk = torch.cat((q.view(n, nh, d), k.view(n, nkv, d)), dim=1).transpose(0, 1)
                qk = apply_rope(qk, cos, sin)
                q, k = qk[:nh], qk[nh:]
                v = v.view(n, nkv, d).transpose(0, 1)
            if store is not None:
                with self._tee("kv_cache"):
                    self._rows["kv_cache"].calls += 1
                    k, v = store.append(i, k, v, offset=lo)
            attn = self._attention(q, k, v) if start == 0 else self._attention_step(q, k, v)
            (o,) = yield self._linear_begin("o_proj", i, attn)
            if trace:
                self._at = {"layer": i, "chunk": j}
            with self._tee("residual"):
                self._rows["residual"].calls += 1
                h = h + o
            gate, up = yield self._linear_begin("gate_up", i, self._norm(h, post_norm))
            if trace:
                self._at = {"layer": i, "chunk": j}
            with self._tee("silu_mul"):
                self._rows["silu_mul"].calls += 1
                a = silu_mul(gate, up)
            (down,) = yield self._linear_begin("down", i, a)
            if trace:
                self._at = {"layer": i, "chunk": j}
            with self._tee("residual"):
                self._rows["residual"].calls += 1
                h = h + down
            if log_every and ((i + 1) % log_every == 0 or i + 1 == c.num_hidden_layers):
                logger.info("prefill T=%d: layer %d/%d done, %.2f s", lo + n, i + 1,
                            c.num_hidden_layers, time.perf_counter() - t_start)
        return h

    def _attention_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                        ) -> torch.Tensor:
        """The newest rows against the cache, in the TEE.

        q ``[heads, Tq, d]``, k/v ``[kv, Tk, d]`` (the cache, newest last) → ``[Tq, heads·d]``.

        Always computed in the TEE, whatever the prefill's attention policy: the cache never
        crosses.  Offloading could not pay anyway: a step's two matmuls do ``g`` multiply-adds
        (``g`` query heads per key/value head) per cached element they would have to send.
        One fused ``scaled_dot_product_attention``, counted in the ``attention`` row: at one
        query row, scores + softmax + context as three ops cost ~150 us a layer on the 2-core
        machine, the fused op 60 us.
        """
        c = self.config
        nh, tq, d = q.shape
        nkv, g, tk = c.num_key_value_heads, c.num_key_value_groups, k.shape[1]
        with self._tee("attention"):
            self._rows["attention"].calls += 1
            qg = q.reshape(nkv, g * tq, d)  # query heads of one kv head stacked along the rows
            mask = None
            if tq > 1:  # row i of each head is at position tk - tq + i
                mask = torch.ones(tq, tk, dtype=torch.bool).tril_(tk - tq).repeat(g, 1)
            ctx = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=d ** -0.5)
        return ctx.view(nh, tq, d).transpose(0, 1).reshape(tq, nh * d)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids [T]``: ``[T, hidden]`` in the TEE's dtype.

        In the TEE with ``private_io``, else looked up by the worker (and verified).
        """
        row = self._rows["embedding"]
        if self.private_io:
            row.where = "tee"
            with self._tee("embedding"):
                row.calls += 1
                return F.embedding(ids, self._io[EMBED]).to(self.dtype)
        out = self._offload("embedding", "embedding", ids, dtype=str(self.wire_dtype))
        with self._tee("embedding"):
            h = self._expect(out, (ids.numel(), self.config.hidden_size), "embedding")
            h = h.to(self.dtype)
            self._verify("embedding", "lookup", "embedding", ids, h)
            return h

    def _logits(self, x: torch.Tensor, offered: int = 0) -> torch.Tensor:
        """Float32 logits ``[rows, vocab]`` of final-normed states ``x [rows, hidden]``.

        In the TEE with ``private_io``, else by the worker (asked for float32 whatever the
        wire dtype: a bf16 wire flipped greedy choices on a real model) and verified.
        ``offered``: in a decode step (which runs on one thread), the threads the process
        had before it: the TEE's product may use them where that pays
        (:meth:`_decode_lm_threads`).
        """
        row = self._rows["lm_head"]
        if self.private_io:
            row.where = "tee"
            with self._tee("lm_head"):
                row.calls += 1
                xf, w = x.float(), self._io[LM_HEAD]
                if offered > 1:
                    with Threads(self._decode_lm_threads(offered, xf, w)):
                        return F.linear(xf, w)
                return F.linear(xf, w)
        with self._tee("lm_head"):
            xw = x.to(self.wire_dtype).contiguous()
        out = self._offload("lm_head", "lm_head", xw, dtype="float32")
        with self._tee("lm_head"):
            logits = self._expect(out, (x.shape[0], self.config.vocab_size), "lm_head",
                                  torch.float32)
            self._verify("lm_head", "linear", "lm_head", None, xw, [logits],
                         out_dtype=torch.float32)
            return logits

    def _decode_lm_threads(self, offered: int, x: torch.Tensor, w: torch.Tensor) -> int:
        """Threads for a decode step's lm_head in the TEE: 1, or ``offered`` where faster.

        The one big op of a decode step with ``private_io``: a matrix-vector product over the
        whole vocabulary (113 MB for SmolLM2-135M, 1.05 GB for Llama-3.2-1B in float32),
        bound by memory bandwidth.  One thread reaches all of it on the 2-core machine (6.8
        ms on one thread or two); a server's bandwidth needs several threads.  So it is
        measured, once per driver and thread count -- when the driver is made for the
        process's own count (no generation pays for it), else at the first step that offers
        another -- the better of two runs each way, alternated, and ``offered`` threads only
        if at least ``LM_THREADS_GAIN`` faster.  Below ``LM_THREADS_MIN_BYTES`` of weight,
        one thread (waking others costs more than they save).  The choice is kept, so a
        driver's generations stay alike; the logits came out the same bits on one thread and
        two here.
        """
        choice = self._lm_choice.get(offered)
        if choice is None:
            if w.numel() * w.element_size() < LM_THREADS_MIN_BYTES:
                choice = {"threads": 1, "offered": offered, "one_ms": None, "many_ms": None}
            else:
                one = many = math.inf
                for _ in range(2):
                    one = min(one, _timed_linear(x, w, 1))
                    many = min(many, _timed_linear(x, w, offered))
                choice = {"threads": offered if many * LM_THREADS_GAIN < one else 1,
                          "offered": offered, "one_ms": one * 1e3, "many_ms": many * 1e3}
            self._lm_choice[offered] = choice
        return choice["threads"]

    def _finish(self, t: int, all_logits: bool, total: float,
                compute_before: dict[str, Any] | None) -> None:
        self._last = self._summary(self._rows, t, total, compute_before,
                                   self._worker_compute(), self._flights)
        self._last["all_logits"] = all_logits
        chunks = self.chunk_plan(t)
        self._last["chunks"] = len(chunks)
        self._last["chunk_rows"] = chunks[0][1] - chunks[0][0]

    def _summary(self, rows_in: dict[str, _Row], t: int, total: float,  # noqa: PLR0917
                 compute_before: dict[str, Any] | None,
                 compute_after: dict[str, Any] | None,
                 flights: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """The stats dict of ``rows_in``; ``flights``: the pipelined calls' intervals."""
        worker_known = compute_before is not None and compute_after is not None
        if worker_known:
            for op in WORKER_OPS:
                tag = self._tags[op]
                after = compute_after.get(tag, {})
                before = compute_before.get(tag, {})
                try:
                    rows_in[op].worker_s = max(
                        0.0, float(after.get("seconds", 0.0)) - float(before.get("seconds", 0.0)))
                except (AttributeError, TypeError, ValueError, OverflowError):
                    worker_known = False
        rows = {op: r.as_dict() for op, r in rows_in.items()}
        routes_known = callable(getattr(self.gpu, "stats", None))
        routes = {k: {"messages": sum(r["routes"].get(k, {}).get("messages", 0)
                                      for r in rows.values()),
                      "bytes": sum(r["routes"].get(k, {}).get("bytes", 0)
                                   for r in rows.values())}
                  for k in sorted({k for r in rows.values() for k in r["routes"]})}
        wait = sum(r["wait_s"] for r in rows.values())
        worker = sum(r["worker_s"] for r in rows.values()) if worker_known else None
        # Blocking calls never overlap anything; pipelined ones overlap each other.
        flights = flights or []
        in_flight = (sum(r["in_flight_s"] for r in rows.values())
                     - sum(e - s for s, e in flights) * 1e-9 + _union_s(flights))
        return {
            "tokens": t, "layers": self.config.num_hidden_layers,
            "policy": self.attention, "policy_reason": self.policy_reason,
            "dtype": dtype_name(self.dtype),
            "wire_dtype": dtype_name(self.wire_dtype),
            "worker_device": dict(self.worker_device),
            "total_s": total, "tee_s": sum(r["tee_s"] for r in rows.values()),
            "wait_s": wait, "worker_s": worker,
            "in_flight_s": in_flight,
            "transport_s": None if worker is None else max(0.0, in_flight - worker),
            "hidden_s": max(0.0, in_flight - wait),
            "calls": sum(r["calls"] for op, r in rows.items()
                         if op in WORKER_OPS and r["where"] == "worker"),
            "bytes_out": sum(r["bytes_out"] for r in rows.values()),
            "bytes_in": sum(r["bytes_in"] for r in rows.values()),
            "routes": routes if routes_known else None,
            "private_io": self.private_io,
            "verify": self._verify_stats(rows),
            "copies": memcopy.measured(),
            "ops": rows,
        }

    def _verify_stats(self, rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        if self._verifier is None:
            return None
        return {"checks": sum(r["checks"] for r in rows.values()),
                "seconds": sum(r["verify_s"] for r in rows.values()),
                "lifetime": self._verifier.stats()}

    def last_prefill_stats(self) -> dict[str, Any]:
        """The accounting of the last prefill, as plain dicts and numbers.

        Keys: ``tokens``, ``layers``, ``policy`` (attention), ``dtype``, ``wire_dtype``,
        ``worker_device``, ``chunks`` and ``chunk_rows`` (the pipeline, :meth:`chunk_plan`),
        ``total_s``, ``tee_s`` (TEE compute), ``wait_s`` (the driver blocked on the worker,
        sending included), ``worker_s`` (the worker's own compute, its calls from this
        driver only), ``in_flight_s`` (time during which at least one offload was between
        its send and its reply), ``transport_s`` (``in_flight_s - worker_s``: the channel,
        dispatch, and queueing behind other drivers' calls), ``hidden_s`` (``in_flight_s -
        wait_s``: offload time the TEE spent computing instead of waiting), ``calls``,
        ``bytes_out``, ``bytes_in`` (tensor payload), ``routes`` (shm/zmq messages and encoded
        bytes, per call as the channel counts them; ``None`` for an in-process worker),
        ``private_io``, ``verify`` (``None`` with ``verify=False``, else ``checks`` and
        ``seconds`` of this prefill and ``lifetime``: the verifier's counters since start-up
        — checks, failures, refreshes, worst residual/tolerance...), ``copies`` (how this
        process makes its large host copies, per size class: ``memcopy.measured()``) and
        ``ops``: per op
        ``where``, ``calls``, ``bytes_out``, ``bytes_in``, ``routes``, ``wait_s``,
        ``in_flight_s`` (summed over its calls), ``tee_s``, ``worker_s``, ``checks``,
        ``verify_s`` (part of ``tee_s``).
        """
        if self._last is None:
            raise RuntimeError("no prefill has run yet")
        return self._last
