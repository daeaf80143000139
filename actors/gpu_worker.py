"""The untrusted GPU worker: holds every linear weight and does the heavy linear algebra.

It knows nothing of the model's control flow: the TEE driver sends activations, names the
projections of a layer it wants, and gets the products back.  Inputs arrive on the CPU in the
wire dtype; results go back on the CPU in that same dtype, computed in the worker's ``dtype``.

Fused groups.  The projections that always share an input are concatenated once at load, so
one matmul serves the group:

==================  ===============================  =====================
group               rows of the fused weight         request
==================  ===============================  =====================
``qkv``             q_size + kv_size + kv_size       ``("q", "k", "v")``
``gate_up``         2 x intermediate_size            ``("gate", "up")``
``o``, ``down``     hidden_size                      ``("o",)``, ``("down",)``
==================  ===============================  =====================

Any other request (``("k", "v")``, ``("q",)``) is served by row slices of the fused weights
(views: no second copy), one matmul per run of neighbours.

On CUDA no call stages anything through host memory of its own.  The worker is an
``@actor(borrow_args=True)``: its inputs arrive as views of the ring record or pool slot that
carried them, and are copied host-to-device straight from there; its results go back as device
tensors, which the codec hands to the transport as ``DeviceBuffer``s, copied device-to-host
straight into the reply record reserved for them.  Both copies run at DMA speed because every
transport mapping of the worker's process is registered with CUDA once, when it is mapped
(``runtime/transport/hostmem.py``).  One host copy per direction remains -- the TEE's own,
into or out of shared memory -- where there were three.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from actors.llama import (
    EMBED,
    LINEAR_NAMES,
    LM_HEAD,
    CheckpointReader,
    LlamaConfig,
    linear_name,
    load_weights,
)
from runtime import actor
from runtime.actor import serving
from runtime.codec import DeferredTensor
from runtime.transport import hostmem

__all__ = ["FUSED_GROUPS", "GPUWorker", "Threads", "resolve_dtype", "set_threads"]

DECODE_ROWS = 4  # calls with at most this many input rows count as decode-sized
DEFER_MIN_BYTES = 256 << 10  # a CPU worker computes results at least this big into the reply
TRACE_CAPACITY = 65536  # per-call spans kept for trace_events (oldest dropped first)
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
_GROUP_OF = {name: g for g in FUSED_GROUPS for name in g}

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "float64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype | None = None
                  ) -> torch.dtype | None:
    """A floating dtype from a ``torch.dtype`` or a name such as ``"bfloat16"``."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return dtype


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` unless ``None``; refuses anything but an int >= 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def _optional_int(name: str, value: Any, least: int) -> int | None:
    """``value`` if it is ``None`` or an int >= ``least``; ``ValueError`` naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < least):
        raise ValueError(f"{name} must be None or an int >= {least}, got {value!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: the name :func:`resolve_dtype` reads back."""
    return str(dtype).removeprefix("torch.")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {str(device)!r}")
    return dev


@actor(untrusted=True, borrow_args=True)
class GPUWorker:
    """Embedding, batched projections, attention matmuls and lm_head of one LLaMA model.

    ``device="auto"`` is CUDA when available, else the CPU; ``dtype`` is the compute dtype and
    the dtype the weights are held in.  Weights come from ``checkpoint`` (a folder of
    safetensors, only the worker's tensors read) or are drawn from ``seed``.
    ``decode_threads``: intra-op threads of a CPU worker for calls of at most
    ``DECODE_ROWS`` rows (``None``: leave torch's setting alone); see :meth:`_threads_for`.
    ``threads``: torch's intra-op threads for this process (``None``: its default); meant for
    an actor, e.g. to give a CPU worker cores of its own beside the TEE's.
    ``defer_min_bytes``: a CPU worker serving an actor call computes results of at least
    this many bytes straight into the reply record (``None``: never; see :meth:`_defers`).
    """

    def __init__(self, config: LlamaConfig, checkpoint: str | Path | None = None, seed: int = 0,
                 device: str | torch.device = "auto", dtype: torch.dtype | str = torch.float32,
                 *, decode_threads: int | None = 1, threads: int | None = None,
                 defer_min_bytes: int | None = DEFER_MIN_BYTES) -> None:
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        set_threads(threads)
        self.config = config
        self.device = _resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self._cuda = self.device.type == "cuda"
        self._registrar: hostmem.CudaRegistrar | None = None
        if self._cuda:
            # Every ring and pool slot this process maps, now and later, is page-locked
            # for CUDA: arguments copy to the device and results back at DMA speed.
            # On this worker's device: the registering threads chose none (GPU 0 otherwise).
            self._registrar = hostmem.cuda_registrar(device=self.device.index)
        self._stats: dict[str, list] = {}  # key -> [calls, seconds, deferred results]
        # (tag, start ns, end ns, rows) of each call, CLOCK_MONOTONIC (shared by the processes
        # of one host): ~0.3 us a call, bounded.
        self._spans: collections.deque[list] = collections.deque(
            maxlen=TRACE_CAPACITY)
        self._decode_threads = _optional_int("decode_threads", decode_threads, 1)
        self._defer_min = _optional_int("defer_min_bytes", defer_min_bytes, 0)
        c = config
        if checkpoint is not None:
            checkpoint = CheckpointReader(checkpoint, c)  # the file map, read once
        self._embed, self._lm_head = self._load([EMBED, LM_HEAD], checkpoint, seed)
        # Per layer: fused weight of each group plus the row offsets of its members.
        self._fused: list[dict[tuple[str, ...], torch.Tensor]] = []
        self._rows: dict[str, tuple[int, int]] = {}
        for i in range(c.num_hidden_layers):
            layer: dict[tuple[str, ...], torch.Tensor] = {}
            for group in FUSED_GROUPS:
                names = [linear_name(i, s) for s in group]
                parts = self._load_cpu(names, checkpoint, seed)
                if i == 0:
                    start = 0
                    for short, p in zip(group, parts, strict=True):
                        self._rows[short] = (start, start + p.shape[0])
                        start += p.shape[0]
                fused = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                layer[group] = fused.to(self.device, self.dtype).contiguous()
                del parts, fused
            self._fused.append(layer)

    def _load_cpu(self, names: list[str], checkpoint: CheckpointReader | None, seed: int
                  ) -> list[torch.Tensor]:
        w = load_weights(self.config, names, checkpoint, seed, self.dtype)
        return [w[n] for n in names]

    def _load(self, names: list[str], checkpoint: CheckpointReader | None, seed: int
              ) -> list[torch.Tensor]:
        moved: dict[int, torch.Tensor] = {}  # a tied lm_head stays one tensor on the device
        out = []
        for t in self._load_cpu(names, checkpoint, seed):
            if id(t) not in moved:
                moved[id(t)] = t.to(self.device)
            out.append(moved[id(t)])
        return out

    # -- introspection ------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        """Where and how this worker computes, as plain values."""
        info: dict[str, Any] = {"type": self.device.type, "device": str(self.device),
                                "dtype": dtype_name(self.dtype),
                                "threads": torch.get_num_threads()}
        if self._cuda:
            info["name"] = torch.cuda.get_device_name(self.device)
            info["host_memory"] = self._registrar.stats()
        else:
            import platform

            info["name"] = platform.processor() or platform.machine()
        return info

    def compute_stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Per op ``{"calls", "seconds", "deferred"}`` of this worker's own work.

        Copies to the device count as work, transport does not -- and the copy back is the
        transport's: it writes each result straight into the reply record.  A CPU worker's
        products computed straight into the reply (``deferred``: how many results were) count
        as work too, though they run while the reply is written.  ``reset`` clears the
        counters after reading.  Ops are keyed by the caller's ``tag`` when given.
        """
        out = {k: {"calls": int(v[0]), "seconds": v[1], "deferred": int(v[2])}
               for k, v in self._stats.items()}
        if reset:
            self._stats.clear()
        return out

    def _threads_for(self, rows: int) -> contextlib.AbstractContextManager[None]:
        """On the CPU, run calls of at most ``DECODE_ROWS`` rows on ``decode_threads`` threads.

        A decode step's products are matrix-vector products, bound by memory bandwidth, which
        a second thread barely raises; it does take the core the TEE process runs on, and its
        wake-up costs more than it saves.  Measured on the 2-core machine, SmolLM2-135M's 90
        per-token projections: 35 ms on one thread, 45 ms on two.  The previous setting is
        restored after the call (an in-process worker shares its threads with the caller);
        ``set_num_threads`` costs 0.1 us.
        """
        if self._cuda or self._decode_threads is None or rows > DECODE_ROWS:
            return contextlib.nullcontext()
        return Threads(self._decode_threads)

    def trace_events(self, reset: bool = True, since_ns: int = 0) -> dict[str, Any]:
        """The calls this worker served, as spans on the host's monotonic clock.

        ``{"pid", "clock": "CLOCK_MONOTONIC", "events": [[tag, start_ns, end_ns, rows], ...]}``
        for the calls that ended at or after ``since_ns`` (``time.monotonic_ns()`` of any
        process on this host), oldest first; the last :data:`TRACE_CAPACITY` calls are kept.
        A span is a method's own work, as :meth:`compute_stats` counts it; for a call whose
        results were computed into the reply, from the first such product's start to the
        last one's end (the reply's encoding before them is the transport's).  ``reset``
        forgets every span after reading.
        """
        events = [list(e) for e in self._spans if e[2] >= since_ns]
        if reset:
            self._spans.clear()
        return {"pid": os.getpid(), "clock": "CLOCK_MONOTONIC", "events": events}

    def _account(self, key: str, t0: int, rows: int) -> tuple[list, list]:
        """Count one call of ``key``, from ``t0`` until now; its stats entry and trace span."""
        t1 = time.monotonic_ns()
        entry = self._stats.get(key)
        if entry is None:
            entry = self._stats[key] = [0, 0.0, 0]
        entry[0] += 1
        entry[1] += (t1 - t0) * 1e-9
        span = [key, t0, t1, rows]
        self._spans.append(span)
        return entry, span

    # -- results written into the reply ---------------------------------------------------------

    def _defers(self, method: Any, dtype: torch.dtype, nbytes: int) -> bool:
        """Whether ``method`` computes its results straight into the reply (``DeferredTensor``).

        On the CPU a result was computed into fresh memory, then copied into the record; on
        the 2-core machine that copy and the fresh pages cost 10 % of a seed-bench layer's
        projections (35.4 -> 31.8 ms, ``benchmarks/bench_llama.py``).  Only when ``method``
        is what the runtime called for a remote caller (in-process callers, an override
        calling it through ``super()``, need real tensors), for results in the compute
        dtype, and big ones: a decode-sized result's copy costs less than the deferral.
        """
        return (not self._cuda and self._defer_min is not None and nbytes >= self._defer_min
                and dtype == self.dtype and serving(self, method))

    def _deferred(self, key: str, t0: int, rows: int, dtype: torch.dtype,
                  parts: Sequence[tuple[tuple[int, ...], Any]]) -> list[DeferredTensor]:
        """Results that each ``compute(out)`` of ``parts`` writes when the reply is sent.

        The call is accounted now; each product adds its time to the call's entry and span
        when it runs (see :class:`_Fills`).
        """
        fills = _Fills(*self._account(key, t0, rows))

        def deferred(shape: tuple[int, ...], compute: Any) -> DeferredTensor:
            def fill(out: torch.Tensor) -> None:
                start = time.monotonic_ns()
                with torch.no_grad(), self._threads_for(rows):
                    compute(out)
                fills.done(start, time.monotonic_ns())
            return DeferredTensor(shape, dtype, fill)

        return [deferred(shape, compute) for shape, compute in parts]

    # -- device copies --------------------------------------------------------------------------

    def _in(self, t: Any, what: str) -> torch.Tensor:
        """``t`` on the worker's device.

        A borrowed view of the received record, copied host-to-device straight from it
        (registered memory: DMA, no staging).
        """
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        if not self._cuda:
            return t
        return t.to(self.device)

    def _out(self, ts: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Results in ``dtype``, computed.

        On CUDA they stay on the device; the transport copies them device-to-host straight
        into the reply record (``codec.DeviceBuffer``).
        """
        outs = [t.to(dtype) for t in ts]
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the one sync of the call
        return outs

    # -- the offloaded ops ----------------------------------------------------------------------

    @torch.no_grad()
    def embedding(self, ids: torch.Tensor, dtype: torch.dtype | str | None = None,
                  tag: str | None = None) -> torch.Tensor:
        """Embedding rows of token ``ids [T]``: ``[T, hidden]`` in ``dtype`` (default: mine)."""
        t0 = time.monotonic_ns()
        out_dtype = resolve_dtype(dtype, self.dtype)
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 1:
            raise TypeError("ids must be a 1-D integer tensor")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        key = tag or "embedding"
        rows = ids.numel()
        shape = (rows, self._embed.shape[1])
        if self._defers(GPUWorker.embedding, out_dtype,
                        rows * self._embed.shape[1] * out_dtype.itemsize):
            idx = ids.long()
            return self._deferred(  # type: ignore[return-value]  # a tensor at the caller
                key, t0, rows, out_dtype,
                [(shape, lambda o: torch.index_select(self._embed, 0, idx, out=o))])[0]
        with self._threads_for(rows):
            y = F.embedding(self._in(ids.long(), "ids"), self._embed)
        (out,) = self._out([y], out_dtype)
        self._account(key, t0, rows)
        return out

    @torch.no_grad()
    def batch_linear(self, layer: int, names: Sequence[str], x: torch.Tensor,
                     tag: str | None = None) -> tuple[torch.Tensor, ...]:
        """``x @ W.T`` for each projection ``names`` of ``layer``, e.g. ``("q", "k", "v")``.

        ``x`` is ``[..., in]``; one result per name, in ``x``'s dtype.  Names of one group
        must share their input width (``o`` and ``down`` take other inputs than q/k/v).
        """
        t0 = time.monotonic_ns()
        if isinstance(layer, bool) or not isinstance(layer, int) \
                or not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer must be an int in [0, {self.config.num_hidden_layers}), "
                             f"got {layer!r}")
        if isinstance(names, str) or not names:
            raise ValueError(f"names must be a non-empty sequence of {LINEAR_NAMES}, "
                             f"got {names!r}")
        unknown = [n for n in names if n not in _GROUP_OF]
        if unknown:
            raise ValueError(f"unknown projection(s) {unknown}; choose from {LINEAR_NAMES}")
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
            raise TypeError("x must be a floating tensor [..., in]")
        fused = self._fused[layer]
        for n in names:
            if fused[_GROUP_OF[n]].shape[1] != x.shape[-1]:
                raise ValueError(f"projection {n!r} takes inputs of width "
                                 f"{fused[_GROUP_OF[n]].shape[1]}, x has {x.shape[-1]}")
        xd = self._in(x, "x").to(self.dtype)
        key = tag or "batch_linear:" + "+".join(names)
        rows = x.numel() // max(1, x.shape[-1])
        widths = [self._rows[n][1] - self._rows[n][0] for n in names]
        if self._defers(GPUWorker.batch_linear, x.dtype, rows * sum(widths) * x.dtype.itemsize):
            # One product per name, each straight into its place in the reply: the fused
            # matmul's split results would need a copy each.
            x2 = xd.reshape(rows, x.shape[-1])
            parts = []
            for n, width in zip(names, widths, strict=True):
                lo, hi = self._rows[n]
                w = fused[_GROUP_OF[n]][lo:hi]
                parts.append(((*x.shape[:-1], width),
                              lambda o, w=w: torch.mm(x2, w.t(), out=o.view(rows, -1))))
            return tuple(self._deferred(key, t0, rows, x.dtype, parts))  # type: ignore[return-value]
        results: list[torch.Tensor] = []
        with self._threads_for(rows):
            for run in _runs(names):
                group = _GROUP_OF[run[0]]
                w = fused[group]
                lo, hi = self._rows[run[0]][0], self._rows[run[-1]][1]
                if (lo, hi) != (0, w.shape[0]):
                    w = w[lo:hi]  # a row slice of a contiguous tensor: still contiguous
                y = F.linear(xd, w)
                if len(run) == 1:
                    results.append(y)
                else:
                    sizes = [self._rows[n][1] - self._rows[n][0] for n in run]
                    results.extend(p.contiguous() if self._cuda else p
                                   for p in y.split(sizes, dim=-1))
        out = tuple(self._out(results, x.dtype))
        self._account(key, t0, rows)
        return out

    @torch.no_grad()
    def matmul(self, a: torch.Tensor, b: torch.Tensor, transpose_b: bool = False,
               tag: str | None = None) -> torch.Tensor:
        """Batched ``a @ b``, or ``a @ b.transpose(-1, -2)`` with ``transpose_b``.

        E.g. the attention scores ``q @ kᵀ`` and the context ``p @ v``; the result is in
        ``a``'s dtype.
        """
        t0 = time.monotonic_ns()
        for what, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() < 2:
                raise TypeError(f"{what} must be a floating tensor with at least 2 dims")
        inner_b = b.shape[-1] if transpose_b else b.shape[-2]
        if a.shape[-1] != inner_b:
            raise ValueError(f"matmul shapes do not match: a {tuple(a.shape)}, "
                             f"b {tuple(b.shape)}{' transposed' if transpose_b else ''}")
        key = tag or "matmul"
        rows = a.numel() // max(1, a.shape[-1])
        if a.dim() == 2 and b.dim() == 2:
            shape = (a.shape[0], b.shape[0] if transpose_b else b.shape[1])
        else:
            shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2],
                     b.shape[-2] if transpose_b else b.shape[-1])
        if self._defers(GPUWorker.matmul, a.dtype, math.prod(shape) * a.dtype.itemsize) \
                and b.dtype == self.dtype:
            bt = b.transpose(-1, -2) if transpose_b else b
            return self._deferred(  # type: ignore[return-value]  # a tensor at the caller
                key, t0, rows, a.dtype, [(shape, lambda o: torch.matmul(a, bt, out=o))])[0]
        with self._threads_for(rows):
            ad = self._in(a, "a").to(self.dtype)
            bd = self._in(b, "b").to(self.dtype)
            y = torch.matmul(ad, bd.transpose(-1, -2) if transpose_b else bd)
        (out,) = self._out([y], a.dtype)
        self._account(key, t0, rows)
        return out

    @torch.no_grad()
    def lm_head(self, x: torch.Tensor, dtype: torch.dtype | str | None = torch.float32,
                tag: str | None = None) -> torch.Tensor:
        """Logits ``[..., vocab]`` of final-normed states ``x [..., hidden]``, in ``dtype``.

        Float32 by default (``None`` too), whatever the wire dtype (issue 8, item 6): a
        bfloat16 reply rounded two of SmolLM2's logits 0.08 apart to one value and flipped a
        greedy choice.  Another ``dtype`` is the caller's explicit choice.
        """
        t0 = time.monotonic_ns()
        out_dtype = resolve_dtype(dtype, torch.float32)
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point \
                or x.dim() < 1 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must be a floating tensor [..., hidden_size="
                             f"{self.config.hidden_size}]")
        key = tag or "lm_head"
        rows = x.numel() // max(1, x.shape[-1])
        vocab = self._lm_head.shape[0]
        if self._defers(GPUWorker.lm_head, out_dtype, rows * vocab * out_dtype.itemsize) \
                and x.dtype == self.dtype:
            x2 = x.reshape(rows, x.shape[-1])
            return self._deferred(  # type: ignore[return-value]  # a tensor at the caller
                key, t0, rows, out_dtype,
                [((*x.shape[:-1], vocab),
                  lambda o: torch.mm(x2, self._lm_head.t(), out=o.view(rows, vocab)))])[0]
        with self._threads_for(rows):
            y = F.linear(self._in(x, "x").to(self.dtype), self._lm_head)
        (out,) = self._out([y], out_dtype)
        self._account(key, t0, rows)
        return out


class _Fills:
    """The products of one call computed into its reply: their time is the call's work.

    ``entry`` and ``span`` are the call's in ``compute_stats`` and ``trace_events``; each
    product adds its time to the entry, and the span runs from the first product's start
    to the last one's end (until one runs, it is the method's own).
    """

    __slots__ = ("entry", "span", "started")

    def __init__(self, entry: list, span: list) -> None:
        self.entry = entry
        self.span = span
        self.started = False

    def done(self, t0: int, t1: int) -> None:
        self.entry[1] += (t1 - t0) * 1e-9
        self.entry[2] += 1
        if not self.started:
            self.started = True
            self.span[1] = t0
        self.span[2] = t1


class Threads:
    """``with Threads(n):`` runs the block on ``n`` intra-op threads, then restores.

    A class, not a ``contextlib`` generator: ~0.4 us where that costs ~2, on every decode
    call and every check.
    """

    __slots__ = ("n", "prev")

    def __init__(self, n: int) -> None:
        self.n = n
        self.prev = 0

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if self.prev != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.prev != self.n:
            torch.set_num_threads(self.prev)


def _runs(names: Sequence[str]) -> list[list[str]]:
    """Split ``names`` into runs of neighbours within one fused group, in order."""
    runs: list[list[str]] = []
    for n in names:
        if runs:
            prev = runs[-1][-1]
            group = _GROUP_OF[n]
            if _GROUP_OF[prev] is group and group.index(n) == group.index(prev) + 1:
                runs[-1].append(n)
                continue
        runs.append([n])
    return runs
