"""Speed: prefill and decode tokens per second, batch 1.

* Prefill: one forward of a ``1 x seqlen`` window (no KV cache); after one warm-up forward,
  timed runs (up to 3, within a small time budget); tokens / median time.
* Decode: greedy, with a KV cache, from a short prompt. The prompt's forward is not timed; the
  timed part is ``n`` single-token forward steps (each appends one token to the cache and picks
  the argmax), so ``decode_tok_s = n / median time``. A manual loop is used rather than
  ``generate()``: it times only the model (no logits processors, stopping criteria or input
  preparation), and :func:`greedy_decode` yields the same tokens as ``generate(do_sample=False)``.
  A short warm-up run comes first.

The budgets keep the whole measurement near 15 s for the default model at 1 thread.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch
from torch import nn

from polyquant.nn.quantize import module_device

__all__ = ["prefill_tok_s", "greedy_decode", "decode_tok_s"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":  # pragma: no cover
        torch.xpu.synchronize(device)
    elif device.type == "mps":  # pragma: no cover
        torch.mps.synchronize()


def _timed_runs(fn, device: torch.device, runs: int, budget_s: float) -> list[float]:
    """Time ``fn`` up to ``runs`` times; stop early once another run would exceed the budget."""
    times: list[float] = []
    while len(times) < runs:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) + times[-1] > budget_s:
            break
    return times


def prefill_tok_s(model: nn.Module, window: torch.Tensor, runs: int = 3, budget_s: float = 3.0) -> dict:
    """Prefill throughput of one ``[1, L]`` window: ``{"prefill_tok_s", "prefill_tokens", "prefill_runs"}``."""
    dev = module_device(model)
    x = window.reshape(1, -1).to(dev)
    kw = {"use_cache": False} if _accepts(model, "use_cache") else {}
    with torch.inference_mode():
        fn = lambda: model(input_ids=x, **kw)  # noqa: E731
        fn()  # warm-up
        times = _timed_runs(fn, dev, runs, budget_s)
    return {"prefill_tok_s": x.shape[1] / statistics.median(times), "prefill_tokens": int(x.shape[1]),
            "prefill_runs": len(times)}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return name in params


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.x names the KV cache argument ``cache``; older versions ``past_key_values``."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def greedy_decode(model: nn.Module, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding with a KV cache, batch 1. Returns ``(new_tokens [n], seconds)`` where the
    seconds cover the ``n`` single-token steps after the (untimed) prompt forward. The first new
    token comes from the prompt forward; the n-th step's output token is not returned."""
    dev = module_device(model)
    ids = prompt.reshape(1, -1).to(dev)
    cache_kw = _cache_kwarg(model)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    new: list[torch.Tensor] = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **extra)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = _out_cache(out)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            new.append(tok)
            out = model(input_ids=tok, use_cache=True, **{cache_kw: cache})
            cache = _out_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        seconds = time.perf_counter() - t0
    return torch.cat(new, dim=1).reshape(-1).cpu(), seconds


RUNTIMES = ("plain", "fast", "graph")


def decode_tok_s(model: nn.Module, prompt: torch.Tensor, n: int = 64, runs: int = 3, budget_s: float = 9.0,
                 warmup_tokens: int = 8, runtime: str = "plain") -> dict:
    """Decode throughput: ``{"decode_tok_s", "decode_tokens", "decode_runs", "decode_runtime"}``.

    ``runtime="fast"`` decodes with :class:`polyquant.nn.decode.FastDecoder` (static KV cache, fused
    projections; same tokens); a model it cannot run is measured on its own forward and the reason
    is recorded as ``decode_runtime_fallback``. ``runtime="graph"``:
    :class:`polyquant.nn.graph_decode.GraphDecoder` (the one-token step as one CUDA graph launch on a
    GPU; the same static step eagerly elsewhere, the reason in ``decode_runtime_fallbacks``)."""
    if n < 1:
        raise ValueError(f"decode_tokens must be >= 1, got {n}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    extra: dict = {"decode_runtime": "plain"}
    run = lambda k: greedy_decode(model, prompt, k)  # noqa: E731
    if runtime in ("fast", "graph"):
        from polyquant.nn.decode import FastDecoder, fast_decode_reason, fast_greedy_decode
        from polyquant.nn.graph_decode import GraphDecoder, graph_greedy_decode
        make, loop = (FastDecoder, fast_greedy_decode) if runtime == "fast" else (GraphDecoder, graph_greedy_decode)
        max_len = int(prompt.numel()) + n + 1
        reason = fast_decode_reason(model, max_len)
        if reason is None:
            dec = make(model, max_len=max_len)
            run = lambda k: loop(dec, prompt, k)  # noqa: E731
            extra = {"decode_runtime": runtime, "decode_runtime_fallbacks": list(dec.fallbacks)}
        else:
            extra["decode_runtime_fallback"] = reason
    run(min(n, warmup_tokens))  # warm-up (the graph runtime captures its step here)
    times: list[float] = []
    while len(times) < runs:
        times.append(run(n)[1])
        if sum(times) + times[-1] > budget_s:
            break
    return {"decode_tok_s": n / statistics.median(times), "decode_tokens": n, "decode_runs": len(times), **extra}
