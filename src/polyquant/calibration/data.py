"""Calibration samples: random token windows (the GPTQ protocol) and the normalisation of whatever
a user passes as calibration data into a list of model inputs.

By default the windows come from a mix of built-in texts of different kinds (``DEFAULT_MIX``: the
pydoc text and the enwiki excerpt, see :mod:`polyquant.data`), half of the windows from each, each
drawn from that text's calibration slice (its last 10%, disjoint from its evaluation slice). A mix
generalizes better than one domain: a model calibrated only on Python documentation and run on
encyclopedic prose (or the reverse) loses more than one calibrated on both. Calibrating on text of
the domain the model will serve is best; pass it as ``text`` (``--calib-text FILE``), used whole.
When the enwiki excerpt is not on the machine the default falls back to the pydoc text alone,
with a warning (:func:`default_sources` says which).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["calibration_data", "calibration_stream", "window_offsets", "as_samples", "DEFAULT_MIX", "default_sources"]

log = logging.getLogger(__name__)

#: Built-in texts the default calibration windows are drawn from (equal shares, in this order).
DEFAULT_MIX = ("pydoc", "enwiki")
#: Seed offset of the k-th text of a mix (the first keeps ``seed``: a one-text mix of ``pydoc``
#: gives exactly the windows of the pydoc-only default of earlier releases).
_MIX_SEED_STRIDE = 1_000_003


def window_offsets(n_tokens: int, n_samples: int, seqlen: int, seed: int = 0) -> list[int]:
    """Start offsets of ``n_samples`` random windows of ``seqlen`` tokens in a stream of
    ``n_tokens`` (uniform over ``[0, n_tokens - seqlen]``, deterministic per seed)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")
    if seqlen > n_tokens:
        raise ValueError(f"seqlen={seqlen} is longer than the calibration text ({n_tokens} tokens); "
                         "use a shorter seqlen or a longer text")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_tokens - seqlen + 1, (n_samples,), generator=gen).tolist()


def default_sources() -> tuple[str, ...]:
    """The built-in texts the default calibration uses on this machine: ``DEFAULT_MIX``, or
    ``("pydoc",)`` when the enwiki excerpt cannot be found."""
    from polyquant import data
    return DEFAULT_MIX if data.enwiki_available() else ("pydoc",)


def _split_counts(n: int, k: int) -> list[int]:
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def _resolve_mix(mix: Sequence[str] | None, doing: str) -> tuple[str, ...]:
    """``mix`` checked (distinct built-in text names), or :func:`default_sources` with a warning when the
    enwiki excerpt is missing."""
    from polyquant import data
    if mix is None:
        mix = default_sources()
        if mix != DEFAULT_MIX:
            warnings.warn(f"the enwiki excerpt is not on this machine: {doing} on the pydoc text alone "
                          f"(install it with `pip install --no-deps gensim==4.4.0`, or set ${data.ENWIKI_ENV_VAR})",
                          RuntimeWarning, stacklevel=3)
    mix = tuple(mix)
    if not mix or len(set(mix)) != len(mix):
        raise ValueError(f"mix must name distinct built-in texts, got {mix!r}")
    for name in mix:
        if name not in data.BUILTIN_TEXTS:
            raise ValueError(f"unknown built-in text {name!r} in mix; known: {sorted(data.BUILTIN_TEXTS)}")
    return mix


def calibration_data(tokenizer, text: str | os.PathLike | None = None, n_samples: int = 128,
                     seqlen: int = 2048, seed: int = 0, *, mix: Sequence[str] | None = None
                     ) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seqlen`` tokens, each a LongTensor ``[1, seqlen]``.

    Args:
        tokenizer: the model's tokenizer (texts are tokenized whole, without special tokens).
        text: None for the default mix of built-in texts (``mix``); a string of text, or a path
            (``pathlib.Path`` / ``os.PathLike``) to a UTF-8 text file, used whole.
        n_samples: number of windows (GPTQ uses 128).
        seqlen: tokens per window (GPTQ uses 2048; 512 is enough for small models).
        seed: windows are deterministic per seed.
        mix: built-in text names (``polyquant.data.BUILTIN_TEXTS``) to draw from when ``text`` is
            None; default :func:`default_sources` (``DEFAULT_MIX`` when all of it is on this
            machine). Each contributes an equal share of the windows (the first ones get the
            remainder; with fewer windows than texts, the first texts only) from its calibration slice (its last 10%, never overlapping its evaluation
            tokens); windows alternate between the texts. ``("pydoc",)`` is the pydoc-only default
            of earlier releases, window for window.
    """
    from polyquant import data

    if text is None:
        mix = _resolve_mix(mix, "calibrating")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        per_text = []
        for k, (name, count) in enumerate(zip(mix, _split_counts(n_samples, len(mix)))):
            if count == 0:  # fewer windows than texts: the first texts only
                continue
            ids = data.builtin_tokens(tokenizer, name)
            ids = ids[data.split_index(len(ids)):]  # its calibration slice, as calibration_tokens cuts it
            offsets = window_offsets(len(ids), count, seqlen, seed + k * _MIX_SEED_STRIDE)
            per_text.append([ids[o:o + seqlen].unsqueeze(0).clone() for o in offsets])
        out = []
        for j in range(max(len(w) for w in per_text)):  # alternate: p0 e0 p1 e1 ...
            out.extend(w[j] for w in per_text if j < len(w))
        return out
    if mix is not None:
        raise ValueError("mix chooses built-in texts; it cannot be combined with text")
    if isinstance(text, os.PathLike):
        ids = data.tokenize(tokenizer, data.load_text(Path(text)))
    elif isinstance(text, str):
        if not text.strip():
            raise ValueError("calibration text is empty")
        ids = data.tokenize(tokenizer, text)
    else:
        raise ValueError(f"text must be None, a string or a path, got {type(text).__name__}")
    offsets = window_offsets(len(ids), n_samples, seqlen, seed)
    return [ids[o:o + seqlen].unsqueeze(0).clone() for o in offsets]


def calibration_stream(tokenizer, mix: Sequence[str] | None = None) -> torch.Tensor:
    """One 1-D token stream for training (the fine-tuning modes draw windows from it): the calibration
    slices (last 10%, never evaluated) of the built-in texts of ``mix`` (default :func:`default_sources`,
    as ``calibration_data``), concatenated in that order."""
    from polyquant import data
    parts = []
    for name in _resolve_mix(mix, "training"):
        ids = data.builtin_tokens(tokenizer, name)
        parts.append(ids[data.split_index(len(ids)):])
    return torch.cat(parts)


def _check_ids(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a tensor of token ids, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] == 0:
        raise ValueError(f"{what} must be [batch, seqlen] token ids, got shape {tuple(t.shape)}")
    return t.long()


def as_samples(calibration: Any) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration data to a list of model-input dicts (``input_ids`` [+ ``attention_mask``]).

    Accepts a LongTensor ``[n, seqlen]`` (one sample per row), a list of LongTensors (``[seqlen]`` or
    ``[batch, seqlen]``), or a list of dicts with ``input_ids`` (and optionally ``attention_mask``).
    """
    if calibration is None:
        raise ValueError("this method needs calibration data: pass calibration="
                         "polyquant.calibration_data(tokenizer) (or a list of token-id tensors)")
    if isinstance(calibration, torch.Tensor):
        t = _check_ids(calibration, "calibration")
        items: list[Any] = [row.unsqueeze(0) for row in t]
    elif isinstance(calibration, (list, tuple)):
        items = list(calibration)
    else:
        raise ValueError("calibration must be a tensor of token ids, a list of tensors or a list of dicts, "
                         f"got {type(calibration).__name__}")
    if not items:
        raise ValueError("no calibration samples (the calibration list is empty)")
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict) or hasattr(item, "keys"):
            if "input_ids" not in item:
                raise ValueError(f"calibration sample {k} has no 'input_ids'")
            sample = {"input_ids": _check_ids(item["input_ids"], f"calibration sample {k}")}
            if item.get("attention_mask") is not None:
                sample["attention_mask"] = torch.as_tensor(item["attention_mask"])
            out.append(sample)
        else:
            out.append({"input_ids": _check_ids(item, f"calibration sample {k}")})
    return out
