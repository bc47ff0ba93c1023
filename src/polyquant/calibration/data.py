"""Calibration samples: random token windows (the GPTQ protocol) and the normalisation of whatever
a user passes as calibration data into a list of model inputs.

By default the windows come from :func:`polyquant.data.calibration_tokens` (the end of the default
text, disjoint from the evaluation slice); a user's text or text file is used whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["calibration_data", "window_offsets", "as_samples"]


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


def calibration_data(tokenizer, text: str | os.PathLike | None = None, n_samples: int = 128,
                     seqlen: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seqlen`` tokens, each a LongTensor ``[1, seqlen]``.

    Args:
        tokenizer: the model's tokenizer (texts are tokenized whole, without special tokens).
        text: None for the default calibration slice (the last 10% of the default text's tokens,
            never overlapping the evaluation tokens); a string of text, or a path
            (``pathlib.Path`` / ``os.PathLike``) to a UTF-8 text file, used whole.
        n_samples: number of windows (GPTQ uses 128).
        seqlen: tokens per window (GPTQ uses 2048; 512 is enough for small models).
        seed: windows are deterministic per seed.
    """
    from polyquant import data

    if text is None:
        ids = data.calibration_tokens(tokenizer)
    elif isinstance(text, os.PathLike):
        ids = data.tokenize(tokenizer, data.load_text(Path(text)))
    elif isinstance(text, str):
        if not text.strip():
            raise ValueError("calibration text is empty")
        ids = data.tokenize(tokenizer, text)
    else:
        raise ValueError(f"text must be None, a string or a path, got {type(text).__name__}")
    offsets = window_offsets(len(ids), n_samples, seqlen, seed)
    return [ids[o:o + seqlen].unsqueeze(0).clone() for o in offsets]


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
