"""Evaluation: ``evaluate(model, tokenizer)`` -> one flat, JSON-serialisable dict with accuracy
(perplexity; KL divergence and top-1 agreement against a reference), size (weight bytes, peak
RSS) and speed (prefill / decode tokens per second), plus what was measured (method, bits,
group size, format, kernel).

The parts live in :mod:`.perplexity`, :mod:`.agreement`, :mod:`.memory` and :mod:`.speed`;
the text and its token slices in :mod:`polyquant.data`.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant import data
from polyquant.eval.agreement import AgreementStats, kl_top1
from polyquant.eval.memory import memory_report, peak_rss_bytes, quantized_layer_bytes, runtime_bytes, weight_bytes
from polyquant.eval.perplexity import is_causal_lm, make_windows, score_windows
from polyquant.eval.speed import decode_tok_s, greedy_decode, prefill_tok_s
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import get_record, kernel_summary, module_device

__all__ = ["evaluate", "describe_model", "REQUIRED_KEYS", "AgreementStats", "kl_top1", "make_windows",
           "score_windows", "is_causal_lm", "weight_bytes", "runtime_bytes", "quantized_layer_bytes",
           "peak_rss_bytes", "memory_report", "prefill_tok_s", "decode_tok_s", "greedy_decode"]

log = logging.getLogger(__name__)

#: Keys every result of :func:`evaluate` has (values may be None where they do not apply).
REQUIRED_KEYS = ("model", "method", "bits", "group_size", "format", "kernel", "ppl", "tokens", "seqlen",
                 "kl", "top1", "weight_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s", "threads")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_PROMPT_TOKENS = 32


def _float_dtype(model: nn.Module) -> torch.dtype:
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__


def describe_model(model: nn.Module) -> dict[str, Any]:
    """``model``, ``method``, ``bits``, ``group_size``, ``format``, ``kernel``, ``kernels``, ``dtype``.

    A quantized model reads them from ``model.polyquant`` (falling back to its QuantLinear layers);
    an unquantized one reports its float dtype as method and kernel (e.g. ``fp32``), its bits
    (32) and ``group_size``/``format`` None. ``kernel`` is one name when every QuantLinear uses the
    same kernel, else ``name:count`` pairs, most used first."""
    dtype = _float_dtype(model)
    dname = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    kernels = kernel_summary(model)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    rec = get_record(model)
    info: dict[str, Any] = {"model": _model_name(model), "dtype": dname, "kernels": kernels}
    if not qls and rec is None:
        info.update(method=dname, bits=torch.finfo(dtype).bits, group_size=None, format=None, kernel=dname)
        return info
    cfg = dict(rec.config) if rec is not None else {}
    bits = cfg.get("bits")
    group = cfg.get("group_size")
    if qls:
        qws = [m.quantized_weight for m in qls]
        if bits is None:
            bits = Counter(q.bits for q in qws).most_common(1)[0][0]
        if group is None:
            group = Counter(q.group_size for q in qws).most_common(1)[0][0]
    method = rec.method if rec is not None else (qls[0].method or "unknown")
    ordered = sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))
    kernel = ordered[0][0] if len(ordered) == 1 else ",".join(f"{k}:{n}" for k, n in ordered) or None
    info.update(method=method, bits=bits, group_size=group, format=rec.format if rec is not None else None,
                kernel=kernel)
    return info


def _eval_stream(tokenizer, text, tokens, holdout) -> torch.Tensor:
    if tokens is not None:
        stream = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    elif tokenizer is None:
        raise ValueError("evaluate needs a tokenizer (or pre-tokenized `tokens`)")
    else:
        if isinstance(text, (os.PathLike, Path)):
            text = data.load_text(text)
        stream = data.eval_tokens(tokenizer, text, holdout=holdout)
    if stream.numel() < 2:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens: nothing to evaluate")
    return stream


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def evaluate(model: nn.Module, tokenizer=None, *, text: str | os.PathLike | None = None, seqlen: int = 512,
             max_windows: int | None = None, reference: nn.Module | None = None, threads: int | None = None,
             decode_tokens: int = 64, measure_speed: bool = True, prompt: str | None = None,
             tokens: torch.Tensor | None = None, holdout: bool | None = None,
             show_progress: bool = True, runtime: str = "plain") -> dict[str, Any]:
    """Evaluate a (quantized or float) model; returns one flat JSON-serialisable dict.

    Args:
        model: a causal LM (perplexity, KL, top-1, prefill, decode) or an encoder (prefill only;
            the accuracy and decode keys are None).
        tokenizer: its tokenizer.
        text: the evaluation text (a string, or a path to a UTF-8 file, used whole); default: the
            first 90% of the tokens of CPython's pydoc topics (see :mod:`polyquant.data`).
        seqlen: window length; windows are non-overlapping, ``len(tokens) // seqlen`` of them.
        max_windows: score only the first ``max_windows`` windows.
        reference: the unquantized model: adds ``kl`` (mean over positions of
            ``KL(P_ref || P_model)``) and ``top1`` (share of positions whose argmax agrees).
        threads: ``torch.set_num_threads`` for the whole call (restored afterwards).
        decode_tokens: new tokens per timed decode run.
        measure_speed: measure prefill / decode (about 15 s for the default model at 1 thread).
        prompt: decode prompt (default: the first 32 evaluation tokens).
        tokens: pre-tokenized evaluation tokens (instead of ``text``).
        holdout: leave the last 10% of the text's tokens (the calibration slice) out; default:
            yes for the default text, no for a user's text.
        show_progress: progress bar over windows.
        runtime: decode runtime, ``plain`` (the model's own forward), ``fast``
            (:class:`polyquant.nn.decode.FastDecoder`: same tokens, less per-token overhead) or
            ``graph`` (:class:`polyquant.nn.graph_decode.GraphDecoder`: one CUDA graph launch per
            token on a GPU).

    Returns keys (None where they do not apply): ``model method bits group_size format kernel
    kernels dtype`` (what was measured), ``ppl nll kl top1`` (accuracy), ``windows``, ``tokens``
    (``windows * seqlen`` fed to the model), ``seqlen``, ``text_tokens`` (the evaluation token
    stream), ``weight_bytes runtime_bytes weight_bytes_quantized_layers weight_bytes_ideal
    peak_rss_bytes`` (size), ``prefill_tok_s prefill_tokens prefill_runs decode_tok_s
    decode_tokens decode_runs threads`` (speed), ``eval_seconds speed_seconds total_seconds device
    torch_version platform``.

    ``peak_rss_bytes`` is the peak resident set of the whole *process* (run one configuration
    per process to attribute it); ``weight_bytes`` counts stored weights (tied ones once),
    ``runtime_bytes`` everything resident including kernel buffers.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode_tokens must be a positive integer, got {decode_tokens!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        stream = _eval_stream(tokenizer, text, tokens, holdout)
        causal = is_causal_lm(model)
        res: dict[str, Any] = describe_model(model)
        res.update(ppl=None, nll=None, kl=None, top1=None, windows=0, tokens=0, seqlen=seqlen,
                   text_tokens=int(stream.numel()), eval_seconds=None)
        if causal:
            maxpos = _max_positions(model)
            if maxpos is not None and seqlen > maxpos:
                log.warning("seqlen %d exceeds the model's max_position_embeddings %d", seqlen, maxpos)
            windows = make_windows(stream, seqlen, max_windows)
            scored = score_windows(model, windows, reference, show_progress=show_progress)
            res.update(ppl=scored["ppl"], nll=scored["nll"], kl=scored["kl"], top1=scored["top1"],
                       windows=int(windows.shape[0]), tokens=int(windows.numel()),
                       eval_seconds=scored["eval_seconds"])
        else:
            log.info("%s has no language-modelling head: perplexity, KL, top-1 and decode are skipped",
                     type(model).__name__)
        res.update(memory_report(model))
        res.update(prefill_tok_s=None, prefill_tokens=None, prefill_runs=None, decode_tok_s=None,
                   decode_tokens=None, decode_runs=None, speed_seconds=None)
        if measure_speed:
            from polyquant.progress import progress
            t0 = time.perf_counter()
            phases = progress(None, desc="speed", total=2 if causal else 1, enabled=show_progress, unit="phase")
            phases.set_postfix_str("prefill")
            plen = min(seqlen, stream.numel())
            if not causal:  # learned position tables: stay within them
                plen = min(plen, _max_positions(model) or plen)
            res.update(prefill_tok_s(model, stream[:plen]))
            phases.update(1)
            if causal:
                phases.set_postfix_str(f"decode {decode_tokens} tokens")
                if prompt is not None:
                    if tokenizer is None:
                        raise ValueError("a text prompt needs a tokenizer")
                    p = data.tokenize(tokenizer, prompt)
                else:
                    p = stream[:_PROMPT_TOKENS]
                if p.numel() == 0:
                    raise ValueError("the decode prompt is empty")
                try:
                    res.update(decode_tok_s(model, p, decode_tokens, runtime=runtime))
                except (TypeError, ValueError, AttributeError) as e:  # a model without a usable KV cache
                    log.warning("decode speed not measured for %s: %s", type(model).__name__, e)
                phases.update(1)
            phases.close()
            res["speed_seconds"] = time.perf_counter() - t0
        res.update(threads=torch.get_num_threads(), device=str(module_device(model)),
                   torch_version=torch.__version__, platform=platform.machine(),
                   peak_rss_bytes=peak_rss_bytes(), total_seconds=time.perf_counter() - t_start)
        return res
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        if was_training:
            model.train()
