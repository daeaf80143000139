"""What a worker call that fails in a generation leaves behind: nothing, and no token lost.

Found by an adversarial review: a step that failed after its KV rows were committed left the
cache a position ahead, tokens made earlier in the same call were dropped with the error, and
a failing bookkeeping call cost a generation whose tokens had all been checked.
"""

from __future__ import annotations

import pytest
import torch

from actors import GPUWorker, LlamaConfig, TEEDriver
from actors.errors import WorkerResultError


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.preset("tiny")


def _ids(config: LlamaConfig, t: int = 9) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(1))


class _FailsOnce(GPUWorker):
    """Honest, except that its ``fail_at``-th call of ``method`` fails once.

    ``how="lie"``: one element of that result is off by 1 % of its row (caught);
    ``how="raise"``: the call raises, as a reply past ``call_timeout`` would.
    """

    def __init__(self, config, method, fail_at, how, **kw):
        super().__init__(config, **kw)
        self.method, self.fail_at, self.how, self.n = method, fail_at, how, 0

    def _maybe(self, method, out):
        if method != self.method:
            return out
        self.n += 1
        if self.n != self.fail_at:
            return out
        if self.how == "raise":
            raise TimeoutError("slow, once")
        y = out.clone()
        y[0, 0] += 0.01 * y[0].norm()
        return y

    def lm_head(self, x, dtype=None, tag=None):
        return self._maybe("lm_head", super().lm_head(x, dtype=dtype, tag=tag))


@pytest.mark.parametrize("how", ["lie", "raise"])
def test_a_decode_step_that_failed_in_lm_head_does_not_corrupt_the_generation(config, how):
    """private_io=False: lm_head is called after the step's KV rows were committed
    (``cache.advance``).  A step that fails there (a caught lie, a timeout) left the cache one
    position ahead; the next ``generate_step`` fed the same token again at the next position
    and went on, unnoticed, with the wrong tokens."""
    ids, n = _ids(config), 12
    want = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0,
                     private_io=False).generate(ids, n).tolist()
    # lm_head call 1 is the prefill's; call 3 is the second decode step's.
    worker = _FailsOnce(config, "lm_head", 3, how, seed=0, device="cpu")
    drv = TEEDriver(config, worker, seed=0, private_io=False)
    drv.generate_start(ids, n)
    got = drv.generate_step(2)
    with pytest.raises(Exception):
        drv.generate_step(1)
    try:
        while step := drv.generate_step(1):
            got += step
            assert got == want[:len(got)], "the generation went on from a corrupted KV cache"
    except (RuntimeError, WorkerResultError):
        return  # refusing to go on is fine
    assert got == want


class _StatsFailOnce(GPUWorker):
    """Honest in every result; its ``fail_at``-th ``compute_stats`` (bookkeeping) raises."""

    def __init__(self, config, fail_at, **kw):
        super().__init__(config, **kw)
        self.fail_at, self.n = fail_at, 0

    def compute_stats(self, reset=False):
        self.n += 1
        if self.n == self.fail_at:
            raise TimeoutError("bookkeeping, slow once")
        return super().compute_stats(reset)


def test_a_failed_bookkeeping_call_does_not_lose_verified_tokens(config):
    """compute_stats #4 is the one ``generate_step`` makes for the summary after the last
    token.  It raised out of ``generate_step`` after the tokens were emitted: ``generate``
    lost the whole (verified) generation, and a streaming caller that retried got ``[]``
    (finished) without the tokens of the failed call."""
    ids, n = _ids(config), 6
    want = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0).generate(ids, n)
    drv = TEEDriver(config, _StatsFailOnce(config, 4, seed=0, device="cpu"), seed=0)
    drv.generate_start(ids, n)
    got = drv.generate_step(n - 1)
    try:
        got += drv.generate_step(1)
    except Exception:
        got += drv.generate_step(1)
    assert got == want.tolist()


class _DecodeFailsOnce(GPUWorker):
    """Honest, except that its ``fail_at``-th one-row ``batch_linear`` raises once (a reply
    past call_timeout, a dropped connection...) or, with ``lie``, is caught lying."""

    def __init__(self, config, fail_at, lie=False, **kw):
        super().__init__(config, **kw)
        self.fail_at, self.lie, self.n = fail_at, lie, 0

    def batch_linear(self, layer, names, x, tag=None):
        out = super().batch_linear(layer, names, x, tag=tag)
        if x.shape[0] != 1:
            return out
        self.n += 1
        if self.n != self.fail_at:
            return out
        if not self.lie:
            raise TimeoutError("slow, once")
        out = [o.clone() for o in out]
        out[0][0, 0] += 0.01 * out[0][0].norm()
        return out


@pytest.mark.parametrize("lie", [False, True])
def test_tokens_made_before_a_failed_step_of_the_same_call_are_not_lost(config, lie):
    """Defaults.  ``generate_step(n)`` appends each token to the state as it is made; when a
    later step of the same call fails (one worker call: 4 per layer, so the 4th step here),
    the exception drops the tokens already made, and a retry goes on after them."""
    ids, n = _ids(config), 8
    want = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0).generate(ids, n)
    worker = _DecodeFailsOnce(config, 3 * 4 * config.num_hidden_layers + 1, lie, seed=0,
                              device="cpu")
    drv = TEEDriver(config, worker, seed=0)
    drv.generate_start(ids, n)
    got: list[int] = []
    errors = 0
    while True:  # a caller that retries after an error (a timeout, say)
        try:
            step = drv.generate_step(n)
        except Exception:
            errors += 1
            assert errors < 3
            continue
        if not step:
            break
        got += step
    assert got == want.tolist()


def test_start_hands_out_tokens_again_and_is_checked(config):
    """``generate_step(n, start=k)``: the new tokens from index ``k``, made where needed."""
    ids, n = _ids(config), 6
    drv = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0)
    want = drv.generate(ids, n).tolist()
    drv.generate_start(ids, n)
    assert drv.generate_step(2) == want[:2]
    assert drv.generate_step(3, start=0) == want[:3]  # two again, one made
    assert drv.generate_step(1, start=1) == want[1:2]  # made already: nothing new
    assert drv.generate_step(10, start=3) == want[3:]
    assert drv.generate_step(1, start=n) == []
    assert drv.generate_step(2, start=4) == want[4:]
    for bad in (-1, n + 1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="start must be"):
            drv.generate_step(1, start=bad)
    drv.generate_start(ids, n)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 0\]"):
        drv.generate_step(1, start=1)  # none handed out yet: cannot skip ahead


def test_a_trace_whose_worker_call_fails_keeps_the_prefill(config):
    """``trace_events`` that raises (not only a refused reply) costs the timeline its worker
    track; the prefill's checked logits are returned."""

    class TraceFails(GPUWorker):
        def trace_events(self, reset=False, since_ns=None):
            raise TimeoutError("slow")

    ids = _ids(config)
    want = TEEDriver(config, GPUWorker(config, seed=0, device="cpu"), seed=0).prefill(ids)
    drv = TEEDriver(config, TraceFails(config, seed=0, device="cpu"), seed=0)
    got = drv.prefill(ids, trace=True)
    assert torch.equal(got, want)
    assert drv.last_trace()["traceEvents"]
