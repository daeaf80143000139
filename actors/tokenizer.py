"""Text in and out: a tokenizer for a checkpoint, chat formatting, streaming decode.

The tokenizer is transformers' ``AutoTokenizer``, read from a Hugging Face folder or from a
GGUF file's own vocabulary (``tokenizer.ggml.*`` metadata, with its chat template).  Building
one from a GGUF file takes seconds (7 s for SmolLM2's 49152 tokens on two cores), so the
result is saved next to the weights' conversion in the user's cache
(``$XDG_CACHE_HOME/tee-actors/gguf/<stem>-<key>-tokenizer/``) and loaded from there
afterwards, with the GGUF file's special-token ids beside it (``gguf_special_tokens.json``),
which the tokenizer is made to match: transformers 5.17's conversion made the bos token the
eos too (5.24's does not), so the tokenizer's eos, and ``eos_token_ids``, named the bos.

Tokenising runs wherever the caller is: in the split it belongs to the TEE side (the text
never reaches the GPU worker, which sees token ids at most).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.gguf_checkpoint import (
    SPECIAL_TOKEN_KEYS,
    conversion_dir,
    find_gguf,
    gguf_config_dict,
    gguf_special_token_ids,
)

__all__ = ["StreamDecoder", "chat_ids", "eos_token_ids", "generation_eos_ids", "load_tokenizer"]

log = logging.getLogger(__name__)


def _auto_tokenizer() -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("tokenizers need the 'transformers' package: "
                          "pip install 'tee-actors[text]'") from e
    return AutoTokenizer


def tokenizer_cache_dir(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the tokenizer built from ``gguf_path`` is kept."""
    weights = conversion_dir(gguf_path, cache_dir)
    return weights.with_name(weights.name + "-tokenizer")


def load_tokenizer(checkpoint: str | Path, cache_dir: str | Path | None = None) -> Any:
    """A tokenizer (transformers') for a Hugging Face folder, a GGUF file or a folder with one.

    ``cache_dir`` overrides ``$XDG_CACHE_HOME/tee-actors/gguf`` for GGUF conversions.  The
    tokenizer's ``chat_template`` is the model's when the checkpoint has one; a GGUF file's
    tokenizer has the bos, eos, unk and pad tokens the file names, whatever transformers'
    conversion made of them.
    """
    auto = _auto_tokenizer()
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    gguf = find_gguf(path)
    if gguf is None:
        return auto.from_pretrained(str(path))
    saved = tokenizer_cache_dir(gguf, cache_dir)
    ids = _saved_ids(saved)
    if ids is not None:
        try:
            tok = auto.from_pretrained(str(saved))
        except (OSError, ValueError):  # swapped by another process as it was read
            pass
        else:
            _match_special_tokens(tok, ids, gguf)
            return tok
    ids = gguf_special_token_ids(gguf)
    tok = auto.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _match_special_tokens(tok, ids, gguf)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(f".{saved.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(str(tmp))
        (tmp / SPECIAL_IDS_FILE).write_text(json.dumps(ids))
        if _saved_ids(saved) is None:  # not since saved by another process
            # A folder saved without the ids (before they were kept) may hold a wrong
            # eos: moved aside, then removed, so that no reader sees it half deleted.
            stale = saved.with_name(f".{saved.name}.stale-{os.getpid()}")
            try:
                saved.rename(stale)
            except OSError:  # none there (or another process moved it first)
                pass
            shutil.rmtree(stale, ignore_errors=True)
            try:
                tmp.rename(saved)
            except OSError:  # another process saved it first
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


SPECIAL_IDS_FILE = "gguf_special_tokens.json"


def _saved_ids(saved: Path) -> dict[str, int] | None:
    """The special-token ids kept beside a cached tokenizer; None if it must be converted.

    None for a folder without them (saved before they were kept), or with a file that is not
    what this module writes (a damaged cache is converted again, not a load that fails for
    ever).
    """
    if not (saved / "tokenizer_config.json").is_file():
        return None
    try:
        ids = json.loads((saved / SPECIAL_IDS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(ids, dict) or not all(
            k in SPECIAL_TOKEN_KEYS and _token_ids(v) == [v] for k, v in ids.items()):
        return None
    return ids


def _match_special_tokens(tok: Any, ids: dict[str, int], gguf: Path) -> None:
    """Make ``tok``'s bos/eos/unk/pad tokens those of ``ids`` (a GGUF file's own).

    transformers 5.17's GGUF conversion gave the tokenizer the bos token as its eos: an
    answer then also stopped at a bos (``eos_token_ids`` named it beside the file's own stop
    ids), and the tokenizer's eos was wrong for whatever else reads it.  An id the tokenizer
    cannot name by its string alone (none there, or a string the vocabulary holds twice:
    real GGUF files have such duplicates) is left as converted, with a warning.
    """
    for name, i in ids.items():
        if getattr(tok, f"{name}_token_id", None) == i:
            continue
        try:
            token = tok.convert_ids_to_tokens(i)
        except (IndexError, OverflowError, TypeError, ValueError):
            token = None
        before = getattr(tok, f"{name}_token", None)
        if isinstance(token, str):
            setattr(tok, f"{name}_token", token)
            if getattr(tok, f"{name}_token_id", None) == i:
                continue
            setattr(tok, f"{name}_token", before)
        log.warning("%s names %s token id %d, which its tokenizer cannot take (%s); it keeps "
                    "%r", gguf, name, i, "no such token" if token is None else
                    f"{token!r} stands at another id too", before)


def _as_ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding (transformers 5)
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


def chat_ids(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ready for the assistant's answer.

    With the model's chat template when it has one (and ``system`` as a system turn when
    given; otherwise the template's default, if any); plain encoding otherwise.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True))
    text = prompt if system is None else f"{system}\n\n{prompt}"
    return _as_ids(tokenizer(text)["input_ids"])


def eos_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """The ids that end an answer: the tokenizer's eos plus ``extra``, without repeats."""
    out: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for i in ([eos] if isinstance(eos, int) else list(eos or [])) + list(extra):
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def generation_eos_ids(checkpoint: str | Path) -> list[int]:
    """The ids the checkpoint says end an answer, beyond what its tokenizer may know.

    transformers' ``generate`` stops at any of them, and they may be more than the
    tokenizer's eos: Llama-3 Instruct ends a chat turn with ``<|eot_id|>`` (128009) while its
    tokenizer's eos is ``<|end_of_text|>`` (128001).  A Hugging Face folder names them in
    ``generation_config.json`` (``[]`` without one; ``ValueError`` for one that is not
    JSON); a GGUF file in its metadata, as eos, end-of-turn and end-of-message tokens.
    """
    gguf = find_gguf(checkpoint)
    if gguf is not None:
        return _token_ids(gguf_config_dict(gguf).get("eos_token_id"))
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as JSON: {e}") from e
    return _token_ids(data.get("eos_token_id") if isinstance(data, dict) else None)


def _token_ids(value: Any) -> list[int]:
    """An id or a list of ids from a config, keeping only non-negative ints."""
    ids = value if isinstance(value, list) else [value]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


class StreamDecoder:
    """Turns tokens arriving one by one into text, printable piece by piece.

    Each :meth:`push` returns the text the new token completes.  A token may end inside a
    multi-byte character (decoded as U+FFFD); that piece is held back until the next token
    completes it.  Special tokens (eos, chat markers) are skipped.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def text(self) -> str:
        """Everything decoded so far."""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)
