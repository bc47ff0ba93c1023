"""Perplexity by the GPTQ protocol, and (optionally, on the same windows) KL divergence and top-1
agreement with a reference model.

Protocol: the text is tokenized once as a whole (see :mod:`polyquant.data`); it is cut into
``n = len(tokens) // seqlen`` non-overlapping windows from the start (capped by ``max_windows``,
the remainder dropped); each window is scored with the model's own loss with ``labels = inputs``
(the mean NLL of its ``seqlen - 1`` next-token predictions); ``ppl = exp(mean over windows)``.
Batch 1, ``torch.inference_mode()``, no KV cache.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from polyquant.eval.agreement import AgreementStats
from polyquant.nn.quantize import module_device
from polyquant.progress import progress

__all__ = ["make_windows", "is_causal_lm", "score_windows"]


def make_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` from the start of a 1-D token stream:
    ``n = len(tokens) // seqlen``, capped by ``max_windows``."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    tokens = tokens.reshape(-1)
    n = len(tokens) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than seqlen={seqlen}: no window to score")
    return tokens[: n * seqlen].reshape(n, seqlen)


def is_causal_lm(model: nn.Module) -> bool:
    """True for a model with a language-modelling head that predicts the next token."""
    can = getattr(model, "can_generate", None)
    if callable(can):
        try:
            return bool(can())
        except Exception:  # pragma: no cover - odd remote-code models
            pass
    get_out = getattr(model, "get_output_embeddings", None)
    return callable(get_out) and get_out() is not None and bool(getattr(model.config, "is_decoder", True))


def score_windows(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None,
                  show_progress: bool = True) -> dict:
    """Score each window; returns ``ppl``, ``nll`` (mean over windows), per-window ``nlls``,
    ``kl``/``top1`` (None without a reference) and ``eval_seconds``."""
    dev = module_device(model)
    ref_dev = module_device(reference) if reference is not None else None
    agree = AgreementStats()
    nlls: list[float] = []
    t0 = time.perf_counter()
    bar = progress(range(windows.shape[0]), desc="eval", enabled=show_progress)
    with torch.inference_mode():
        for i in bar:
            w = windows[i:i + 1]
            x = w.to(dev)
            out = model(input_ids=x, labels=x, use_cache=False)
            nll = float(out.loss)
            nlls.append(nll)
            if reference is not None:
                xr = w.to(ref_dev)
                ref_logits = reference(input_ids=xr, use_cache=False).logits
                agree.add(ref_logits, out.logits)
                del ref_logits
            del out
            bar.set_postfix_str(f"ppl {math.exp(sum(nlls) / len(nlls)):.3f}")
    mean_nll = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "nlls": nlls, "kl": agree.kl, "top1": agree.top1,
            "eval_seconds": time.perf_counter() - t0}
