"""Generation state kept in the TEE: the KV cache, the sampler and the options.

The :class:`~actors.tee_driver.TEEDriver` runs the forward passes; this module holds what a
generation remembers between them.  None of it is ever sent to the GPU worker.

* :class:`KVCache` — per layer, the keys after RoPE and the values, ``[kv_heads, capacity, d]``
  each, allocated once for the prompt plus every new token (no copy per step).
* :class:`Sampler` — greedy at ``temperature == 0``; otherwise temperature, then top-k, then
  top-p (the order of transformers' logits processors), and a draw from the TEE's own
  ``torch.Generator`` seeded by ``seed`` (from the OS when ``None``).
* :class:`GenerationOptions` — the validated options of one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GenerationOptions", "GenerationState", "KVCache", "Sampler", "one_thread"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """The options of one ``generate`` call, checked at construction (``ValueError``)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @staticmethod
    def eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
        """``eos_token_id`` (``None``, one id or several) as a tuple, each in the vocabulary."""
        if eos_token_id is None:
            return ()
        ids = (eos_token_id,) if _is_int(eos_token_id) else tuple(eos_token_id)  # type: ignore[arg-type]
        for i in ids:
            if not _is_int(i) or not 0 <= i < vocab_size:
                raise ValueError(f"eos_token_id must be None or token id(s) in "
                                 f"[0, {vocab_size}), got {eos_token_id!r}")
        return ids


class KVCache:
    """Keys (after RoPE) and values of every layer, for up to ``capacity`` positions.

    ``append(layer, k, v)`` writes ``k, v [kv, T, d]`` at the current length (plus an
    ``offset``, for the chunks of a prefill) and returns views of everything cached for that
    layer so far, the new rows included; :meth:`advance` moves the length on once every layer
    has appended.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype)
                     for _ in range(layers)]
        self.values = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype)
                       for _ in range(layers)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [kv, T, d]`` at ``offset`` rows past the current length.

        (``offset``: a chunk of a prefill.)  Returns views of the layer's cache up to and
        including the new rows.
        """
        t = k.shape[1]
        lo = self.length + offset
        end = lo + t
        if end > self.capacity:
            raise ValueError(f"KV cache full: {lo} + {t} > {self.capacity} positions")
        self.keys[layer][:, lo:end] = k
        self.values[layer][:, lo:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def nbytes(self) -> int:
        """Bytes allocated for the whole capacity."""
        return sum(x.numel() * x.element_size() for x in (*self.keys, *self.values))


class Sampler:
    """Picks the next token from float32 logits ``[vocab]``, as transformers would.

    Greedy (``argmax``) at temperature 0.  Otherwise the logits are divided by the
    temperature, all but the ``top_k`` largest masked (0: no limit), then the smallest
    tokens whose cumulative probability stays within ``1 - top_p`` masked (the most likely
    token is always kept), and one token drawn with ``torch.multinomial`` from this sampler's
    own generator.
    """

    def __init__(self, options: GenerationOptions) -> None:
        self.options = options
        self.generator = torch.Generator()
        if options.seed is None:
            self.generator.seed()  # from the OS: not reproducible, by request
        else:
            self.generator.manual_seed(options.seed)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 scores a token is drawn from: scaled, masked tokens at ``-inf``."""
        o = self.options
        scores = logits.float() / o.temperature
        if 0 < o.top_k < scores.shape[-1]:
            kth = torch.topk(scores, o.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if o.top_p < 1.0:
            ordered, index = torch.sort(scores, descending=False, dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - o.top_p
            drop[..., -1] = False  # keep at least the most likely token
            scores = scores.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token of ``logits [vocab]``."""
        if self.options.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(self.scores(logits), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class one_thread:  # noqa: N801 - used like a function: ``with one_thread():``
    """Runs the block on one intra-op thread, then restores the setting.

    A decode step's TEE work is a few hundred tiny ops on one row (a 576-wide RMSNorm, a
    one-row attention): a second thread cannot speed them up, and waking it for each op
    costs more than the op.  Measured on the 2-core machine (SmolLM2-135M, loaded by other
    jobs): the one-row attention 368 us a layer on two threads, ~60 us on one.
    """

    __slots__ = ("prev",)

    def __init__(self) -> None:
        self.prev = 0

    def __enter__(self) -> int:
        """The thread count before (what the block may widen a big op back to)."""
        self.prev = torch.get_num_threads()
        if self.prev != 1:
            torch.set_num_threads(1)
        return self.prev

    def __exit__(self, *exc: object) -> None:
        if self.prev != 1:
            torch.set_num_threads(self.prev)


class GenerationState:
    """One generation in progress: options, sampler, cache, the tokens so far, accounting.

    ``pending`` is a token sampled but not yet handed out; ``done`` is set once the last token
    has been handed out (``stop`` says why: ``"eos"`` or ``"max_new_tokens"``).
    """

    def __init__(self, prompt: torch.Tensor, options: GenerationOptions,
                 cache: KVCache | None) -> None:
        self.prompt = prompt
        self.options = options
        self.sampler = Sampler(options)
        self.cache = cache
        self.tokens: list[int] = []
        self.pending: int | None = None
        self.done = False
        self.stop: str | None = None
        self.prefill_stats: dict | None = None
        self.rows: dict | None = None  # the decode steps' accounting rows
        self.compute_before: dict | None = None
        self.steps = 0
        self.decode_s = 0.0
        self.summary: dict | None = None
        self.lm_head_threads: dict | None = None  # the decode steps' lm_head threads choice

    def emit(self) -> int:
        """Hand out the pending token and note whether generation is over."""
        tok = self.pending
        if tok is None:
            raise RuntimeError("no token pending")
        self.pending = None
        self.tokens.append(tok)
        if tok in self.options.eos_token_id:
            self.done, self.stop = True, "eos"
        elif len(self.tokens) >= self.options.max_new_tokens:
            self.done, self.stop = True, "max_new_tokens"
        return tok
