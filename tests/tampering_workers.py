"""GPU workers that lie, and one that spies: subclasses of ``GPUWorker`` for the trust tests.

An importable module (not a test module) so the same classes run in-process and, spawned in
the worker's place, as actor processes.
"""

from __future__ import annotations

from typing import Any

import torch

from actors import GPUWorker

LIES = ("one_element", "noise_row", "swap", "zeros", "nan", "inf", "huge", "stale")


class TamperingWorker(GPUWorker):
    """Honest, except that every result of ``target`` (a method name) is altered by ``lie``.

    * ``one_element`` — one element (random row and column) off by ``rel`` (1 %) of its
      row's norm;
    * ``noise_row`` — one row replaced by Gaussian noise of the row's own norm;
    * ``swap`` — gate and up returned swapped (``batch_linear``), else the first two entries
      of the leading dimension swapped (kv heads of a matmul, rows of an embedding);
    * ``zeros``; ``nan`` / ``inf`` / ``huge`` — one element NaN, Inf or 1e30;
    * ``stale`` — the result of an earlier call of the same shape (the first call is honest).
    """

    def __init__(self, config: Any, lie: str, target: str = "batch_linear", rel: float = 0.01,
                 **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if lie not in LIES:
            raise ValueError(f"unknown lie {lie!r}")
        self.lie, self.target, self.rel = lie, target, rel
        self._earlier: dict[Any, list[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(1234)
        self.lies_told = 0

    def _alter(self, key: Any, outs: list[torch.Tensor], names: Any = None
               ) -> list[torch.Tensor]:
        if self.lie == "stale":
            if key not in self._earlier:
                self._earlier[key] = [o.clone() for o in outs]
                return outs
            self.lies_told += 1
            return [o.clone() for o in self._earlier[key]]
        if self.lie == "swap":
            if names is not None:
                if tuple(names) != ("gate", "up"):
                    return outs
                self.lies_told += 1
                return [outs[1], outs[0]]
            y = outs[0].clone(memory_format=torch.contiguous_format)
            y[[0, 1]] = outs[0][[1, 0]]
            self.lies_told += 1
            return [y, *outs[1:]]
        self.lies_told += 1
        y = outs[0].clone(memory_format=torch.contiguous_format)
        if self.lie == "zeros":
            return [torch.zeros_like(o) for o in outs]
        rows = y.reshape(-1, y.shape[-1])  # a view: every row of every batch
        i = int(torch.randint(rows.shape[0], (1,), generator=self._gen))
        j = int(torch.randint(rows.shape[1], (1,), generator=self._gen))
        norm = rows[i].float().norm()
        if self.lie == "one_element":
            rows[i, j] += self.rel * norm
        elif self.lie == "noise_row":
            noise = torch.randn(rows.shape[1], generator=self._gen)
            rows[i] = noise * norm / noise.norm()
        else:
            rows[i, j] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}[self.lie]
        return [y, *outs[1:]]

    def batch_linear(self, layer, names, x, tag=None):
        out = super().batch_linear(layer, names, x, tag=tag)
        if self.target != "batch_linear":
            return out
        key = (tuple(names), tuple(x.shape))
        return tuple(self._alter(key, list(out), names))

    def matmul(self, a, b, transpose_b=False, tag=None):
        out = super().matmul(a, b, transpose_b=transpose_b, tag=tag)
        if self.target != "matmul":
            return out
        return self._alter((tag, tuple(out.shape)), [out])[0]

    def embedding(self, ids, dtype=None, tag=None):
        out = super().embedding(ids, dtype=dtype, tag=tag)
        if self.target != "embedding":
            return out
        return self._alter(tuple(out.shape), [out])[0]

    def lm_head(self, x, dtype=None, tag=None):
        out = super().lm_head(x, dtype=dtype, tag=tag)
        if self.target != "lm_head":
            return out
        return self._alter(tuple(out.shape), [out])[0]

    def told(self) -> int:
        """How many results were altered so far."""
        return self.lies_told


def _describe(obj: Any) -> list[str]:
    """``tensor[<dtype>]`` for every tensor in ``obj`` (nested), the type name of anything else."""
    if isinstance(obj, torch.Tensor):
        return [f"tensor[{str(obj.dtype).removeprefix('torch.')}]"]
    if isinstance(obj, (list, tuple)):
        return [d for o in obj for d in _describe(o)]
    if isinstance(obj, dict):
        return [d for o in obj.values() for d in _describe(o)]
    return [type(obj).__name__]


class SpyWorker(GPUWorker):
    """Honest, and records every call: the method and the dtype/type of each argument."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.calls: list[tuple[str, list[str]]] = []

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, _describe(list(args)) + _describe(kwargs)))

    def embedding(self, ids, dtype=None, tag=None):
        self._record("embedding", ids, dtype=dtype, tag=tag)
        return super().embedding(ids, dtype=dtype, tag=tag)

    def batch_linear(self, layer, names, x, tag=None):
        self._record("batch_linear", layer, names, x, tag=tag)
        return super().batch_linear(layer, names, x, tag=tag)

    def matmul(self, a, b, transpose_b=False, tag=None):
        self._record("matmul", a, b, transpose_b=transpose_b, tag=tag)
        return super().matmul(a, b, transpose_b=transpose_b, tag=tag)

    def lm_head(self, x, dtype=None, tag=None):
        self._record("lm_head", x, dtype=dtype, tag=tag)
        return super().lm_head(x, dtype=dtype, tag=tag)

    def device_info(self):
        self._record("device_info")
        return super().device_info()

    def seen(self) -> list[tuple[str, list[str]]]:
        """Every call recorded so far."""
        return list(self.calls)
