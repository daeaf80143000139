"""The public contract's names, signatures and layering, as ../shared/DESIGN.md and the issues
write them: outside checks rely on them exactly, so a rename or a moved default fails here
first.  (Behaviour is pinned where it is exercised: tests/integration/test_actors.py and the
llama tests.)  From an API review that found these statements held but unpinned.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch

import runtime
from actors import GPUWorker, LlamaConfig, TEEDriver, VerificationError
from actors.tee_driver import WorkerResultError
from runtime.actor import actor_options

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMPTY = inspect.Parameter.empty
KW = inspect.Parameter.KEYWORD_ONLY


def _params(fn) -> list[tuple[str, object, bool]]:
    """(name, default, keyword-only) of each named parameter but ``self``."""
    return [(p.name, p.default, p.kind is KW)
            for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_actor_system_and_spawn_signatures():
    assert _params(runtime.ActorSystem.__init__) == [
        ("shm_threshold", None, True), ("shm_dir", None, True), ("call_timeout", None, True)]
    assert _params(runtime.ActorSystem.spawn) == [
        ("cls", EMPTY, False), ("name", None, True), ("max_restarts", None, True),
        ("untrusted", None, True)]
    kinds = [p.kind for p in inspect.signature(runtime.ActorSystem.spawn).parameters.values()]
    assert inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds


def test_split_llama_signatures():
    assert _params(GPUWorker.__init__)[:5] == [
        ("config", EMPTY, False), ("checkpoint", None, False), ("seed", 0, False),
        ("device", "auto", False), ("dtype", torch.float32, False)]
    assert _params(TEEDriver.__init__)[:9] == [
        ("config", EMPTY, False), ("gpu", EMPTY, False), ("checkpoint", None, False),
        ("seed", 0, False), ("dtype", torch.float32, False), ("wire_dtype", None, False),
        ("attention", "auto", True), ("private_io", True, True), ("verify", True, True)]
    assert _params(TEEDriver.prefill)[:2] == [("input_ids", EMPTY, False),
                                              ("all_logits", False, False)]
    sampling = [("input_ids", EMPTY, False), ("max_new_tokens", 32, False),
                ("temperature", 0.0, True), ("top_k", 0, True), ("top_p", 1.0, True),
                ("seed", None, True), ("eos_token_id", None, True)]
    assert _params(TEEDriver.generate) == sampling
    assert _params(TEEDriver.generate_start) == sampling
    assert _params(GPUWorker.lm_head)[:2] == [("x", EMPTY, False),
                                              ("dtype", torch.float32, False)]
    for method in ("embedding", "batch_linear", "matmul", "lm_head"):
        assert callable(getattr(GPUWorker, method))
    assert actor_options(GPUWorker).untrusted is True
    assert actor_options(TEEDriver).untrusted is False
    for preset in ("tiny", "seed-bench", "llama-3.2-1b"):
        assert isinstance(LlamaConfig.preset(preset), LlamaConfig)


def test_error_hierarchy():
    for name in ("ActorStartError", "ActorDiedError", "CallTimeoutError", "TransportError",
                 "ProtocolError"):
        assert issubclass(getattr(runtime, name), runtime.ActorRuntimeError), name
    assert issubclass(runtime.ProtocolError, runtime.TransportError)
    assert issubclass(runtime.CallTimeoutError, TimeoutError)
    assert not issubclass(runtime.RemoteError, runtime.ActorRuntimeError)  # the user's type
    assert issubclass(VerificationError, WorkerResultError)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included).

    Relative imports are resolved against ``path``'s package (a module's or an
    ``__init__``'s: its parts but the last).
    """
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base:
                found.add(base)
            found.update(f"{base}.{a.name}" if base else a.name for a in node.names)
    return found


def _under(names: set[str], *packages: str) -> set[str]:
    return {n for n in names for p in packages if n == p or n.startswith(p + ".")}


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_layers_import_only_downwards(path):
    """The guide's layering: ``runtime`` never imports ``actors``; ``runtime/transport``
    knows nothing of actors, calls or the codec; the codec imports no transport."""
    names = _imports(path)
    assert not _under(names, "actors", "benchmarks", "examples", "tests")
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("runtime/transport/"):
        above = {"runtime.actor", "runtime.calls", "runtime.worker", "runtime.system",
                 "runtime.supervisor", "runtime.codec", "runtime.messages", "runtime.waits",
                 "runtime.control", "runtime.zygote"}
        assert not _under(names, *above), rel
    if rel == "runtime/codec.py":
        assert not _under(names, "runtime.transport.channel", "runtime.transport.ring",
                          "runtime.transport.pool", "runtime.messages", "runtime.calls")
