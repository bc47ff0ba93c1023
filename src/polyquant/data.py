"""Text data: the default text (CPython's pydoc topics), loading a user's text file, and the
token slices that evaluation and calibration draw from.

The slices are defined once, here. A text is tokenized once, as a whole, without special tokens;
then

* evaluation uses tokens ``[0, split)`` and
* calibration uses tokens ``[split, end)``,

with ``split = int(EVAL_FRACTION * n_tokens)`` (90%), so the two never overlap. For the default
text with SmolLM2's tokenizer that is 113,108 tokens: 101,797 for evaluation (198 windows of
512) and 11,311 for calibration (22 windows of 512).

A text the user supplies for evaluation (``--text FILE``) is used whole by default
(``holdout=False``): it is the user's test set, and calibration is expected to come from
elsewhere. Pass ``holdout=True`` to keep its last 10% out of evaluation.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["EVAL_FRACTION", "DEFAULT_TEXT_CHARS", "default_text", "load_text", "tokenize",
           "split_index", "eval_tokens", "calibration_tokens"]

#: Share of a text's tokens (from the start) reserved for evaluation; the rest (the end) is the
#: calibration slice.
EVAL_FRACTION = 0.9

#: Length of :func:`default_text` on CPython 3.11 (differs slightly across Python versions).
DEFAULT_TEXT_CHARS = 465_126


@functools.lru_cache(maxsize=1)
def default_text() -> str:
    """CPython's pydoc topics, joined in sorted key order with blank lines (465,126 chars on 3.11).

    Ships with every CPython, so evaluation and calibration need no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | os.PathLike | None = None) -> str:
    """Read a UTF-8 text file, or return :func:`default_text` when ``path`` is None."""
    if path is None:
        return default_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {p} is empty")
    return text


def _encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: a whole text is longer than model_max_length on purpose; no warning.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _default_ids(tokenizer) -> torch.Tensor:
    return _encode(tokenizer, default_text())


def tokenize(tokenizer, text: str | None = None) -> torch.Tensor:
    """Token ids of a whole text (1-D LongTensor, no special tokens). The default text's
    tokenization is cached in memory per tokenizer object; the returned tensor is a copy."""
    if text is None:
        try:
            return _default_ids(tokenizer).clone()
        except TypeError:  # an unhashable tokenizer: no cache
            return _encode(tokenizer, default_text())
    if not isinstance(text, str):
        raise ValueError(f"text must be a string (use load_text for a file), got {type(text).__name__}")
    return _encode(tokenizer, text)


def split_index(n_tokens: int) -> int:
    """First calibration token: ``int(EVAL_FRACTION * n_tokens)``."""
    return int(EVAL_FRACTION * n_tokens)


def eval_tokens(tokenizer, text: str | None = None, *, holdout: bool | None = None) -> torch.Tensor:
    """Evaluation tokens. Default text: the first 90% of its tokens (disjoint from
    :func:`calibration_tokens`). A user text: all of it, unless ``holdout=True``."""
    ids = tokenize(tokenizer, text)
    if holdout is None:
        holdout = text is None
    return ids[:split_index(len(ids))] if holdout else ids


def calibration_tokens(tokenizer, text: str | None = None) -> torch.Tensor:
    """Calibration tokens: the last 10% of the text's tokens (``[split, end)``)."""
    ids = tokenize(tokenizer, text)
    return ids[split_index(len(ids)):]
