"""Shared helpers for the benchmarks: running one configuration per subprocess, finding the peer
virtualenv, and measuring a model the same way whatever library quantized it.

Measurements (batch 1, the thread count set by the caller):

* perplexity: ``polyquant.eval.evaluate`` (the GPTQ protocol on the default pydoc text: first
  ``windows`` non-overlapping windows of ``seqlen`` tokens, no special tokens) under
  ``torch.inference_mode``; models that fail under inference mode (optimum-quanto's qint4) use
  :func:`ppl_no_grad`, the same protocol under ``torch.no_grad``.
* decode: greedy, KV cache, ``n`` new tokens after a 32-token prompt (the first evaluation
  tokens); the timed part is the ``n`` single-token steps (as ``polyquant.eval.speed``). Several
  runs; reported: median and best wall-clock tok/s and the median *thread CPU time* tok/s (less
  sensitive to other processes on a shared machine), plus the load average around the runs.
* prefill: one forward of a ``seqlen`` window without cache, median of a few runs.
* weight bytes: every parameter, tensor subclasses (torchao, quanto) flattened to their inner
  tensors, each storage counted once (tied weights); polyquant models use
  ``polyquant.eval.memory`` (quantized tensors of each QuantLinear).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS_ENV_VAR = "POLYQUANT_PEERS_VENV"
DEFAULT_PEERS_VENV = ROOT / ".venv-peers"
PROMPT_TOKENS = 32


# -- environment ---------------------------------------------------------------------------

def peers_python() -> tuple[Path | None, str]:
    """The peer virtualenv's python and where it came from (env var or default path)."""
    venv = os.environ.get(PEERS_ENV_VAR)
    src = f"${PEERS_ENV_VAR}" if venv else "default path"
    venv_path = Path(venv) if venv else DEFAULT_PEERS_VENV
    py = venv_path / "bin" / "python"
    return (py if py.is_file() else None), f"{venv_path} ({src})"


def probe_python(python: str | Path, modules: list[str]) -> dict[str, str]:
    """Versions of torch and ``modules`` importable by ``python`` (``'missing: ...'`` when not)."""
    code = ("import importlib, json, warnings\nwarnings.filterwarnings('ignore')\nout = {}\n"
            f"for m in {['torch', *modules]!r}:\n"
            "    try:\n        mod = importlib.import_module(m)\n"
            "        out[m] = getattr(mod, '__version__', 'unknown')\n"
            "    except Exception as e:\n        out[m] = 'missing: ' + type(e).__name__ + ': ' + str(e)[:200]\n"
            "print(json.dumps(out))\n")
    try:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - report, never crash the benchmark
        return {m: f"missing: probe failed ({e})" for m in ["torch", *modules]}


def single_thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_worker(python: str | Path, script: Path, args: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    """Run ``python script --worker ...`` in a fresh process; the worker prints one JSON line
    prefixed ``RESULT `` as its last result. Returns the parsed dict, or ``{"error": ...}``."""
    cmd = [str(python), str(script), *args]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=single_thread_env(threads),
                           cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)[-800:]}
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


# -- measurements --------------------------------------------------------------------------

def grad_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    return {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}[name]


def eval_stream(tokenizer) -> torch.Tensor:
    from polyquant import data
    return data.eval_tokens(tokenizer)


def add_text_args(ap) -> None:
    """``--calib`` (which built-in text the calibration windows come from) and ``--texts`` (the texts
    perplexity is measured on): pydoc calibration makes enwiki out of domain."""
    ap.add_argument("--calib", choices=("pydoc", "enwiki", "mix"), default="pydoc",
                    help="calibration windows (pydoc: enwiki is then out of domain)")
    ap.add_argument("--texts", default="pydoc,enwiki", help="built-in texts to evaluate on (held-back windows)")


def calibration_windows(tokenizer, calib: str, n_samples: int, seqlen: int, seed: int) -> list:
    """``polyquant.calibration_data`` from one built-in text, or the default mix (``calib == "mix"``)."""
    from polyquant.calibration import calibration_data
    mix = {} if calib == "mix" else {"mix": (calib,)}
    return calibration_data(tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed, **mix)


def ppl_by_text(model, tokenizer, texts: list[str], windows: int, seqlen: int = 512) -> dict[str, float]:
    """``polyquant.evaluate``'s perplexity on the held-back windows of each built-in text (``pydoc``:
    the default text's evaluation slice)."""
    import polyquant
    from polyquant import data
    return {t: polyquant.evaluate(model, tokenizer, text=None if t == "pydoc" else data.builtin_text(t), holdout=True,
                                  seqlen=seqlen, max_windows=windows, measure_speed=False, show_progress=False)["ppl"]
            for t in texts}


def ppl_no_grad(model, tokenizer, seqlen: int, windows: int) -> dict[str, Any]:
    """``polyquant.eval``'s perplexity protocol under ``torch.no_grad`` (for models that fail under
    inference mode)."""
    from polyquant.eval import make_windows
    w = make_windows(eval_stream(tokenizer), seqlen, windows)
    nlls = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(w.shape[0]):
            x = w[i:i + 1]
            nlls.append(float(model(input_ids=x, labels=x, use_cache=False).loss))
    mean = sum(nlls) / len(nlls)
    import math
    return {"ppl": math.exp(mean), "windows": int(w.shape[0]), "eval_seconds": time.perf_counter() - t0}


def measure_ppl(model, tokenizer, seqlen: int, windows: int, grad: str) -> dict[str, Any]:
    if grad == "inference_mode":
        from polyquant.eval import evaluate
        r = evaluate(model, tokenizer, seqlen=seqlen, max_windows=windows, measure_speed=False,
                     show_progress=False)
        return {"ppl": r["ppl"], "windows": r["windows"], "eval_seconds": r["eval_seconds"]}
    return ppl_no_grad(model, tokenizer, seqlen, windows)


def _cache_kw(model) -> str:
    """transformers 5.x names the KV cache argument ``cache``; older versions ``past_key_values``."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def _decode_once(model, prompt: torch.Tensor, n: int, ctx) -> tuple[float, float, torch.Tensor]:
    """Greedy decode with a KV cache; returns (wall s, thread-CPU s) of the ``n`` steps and the tokens."""
    ids = prompt.reshape(1, -1)
    kw = _cache_kw(model)
    with ctx():
        out = model(input_ids=ids, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = _out_cache(out)
        new = []
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            new.append(tok)
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: cache})
            cache = _out_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        w, c = time.perf_counter() - w0, time.thread_time() - c0
    return w, c, torch.cat(new, 1).reshape(-1)


def measure_decode(model, prompt: torch.Tensor, n: int, runs: int, grad: str, warmup: bool = True) -> dict[str, Any]:
    ctx = grad_context(grad)
    if warmup:
        _decode_once(model, prompt, min(8, n), ctx)
    load0 = os.getloadavg()[0]
    walls, cpus = [], []
    tokens = None
    for _ in range(runs):
        w, c, tokens = _decode_once(model, prompt, n, ctx)
        walls.append(w)
        cpus.append(c)
    return {"decode_tok_s": n / statistics.median(walls), "decode_tok_s_best": n / min(walls),
            "decode_tok_s_cpu": n / statistics.median(cpus), "decode_ms_per_token": 1e3 * statistics.median(walls) / n,
            "decode_runs_tok_s": [round(n / w, 2) for w in walls], "decode_tokens": n, "decode_runs": runs,
            "loadavg_decode": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "decode_first_tokens": tokens[:16].tolist() if tokens is not None else None}


def measure_prefill(model, window: torch.Tensor, runs: int, grad: str) -> dict[str, Any]:
    ctx = grad_context(grad)
    x = window.reshape(1, -1)
    times = []
    with ctx():
        model(input_ids=x, use_cache=False)  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            times.append(time.perf_counter() - t0)
    return {"prefill_tok_s": x.shape[1] / statistics.median(times), "prefill_tokens": int(x.shape[1])}


def _leaf_tensors(t: torch.Tensor):
    """Plain tensors inside ``t`` (tensor subclasses are flattened recursively)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner)
    else:
        yield t


def generic_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters (subclasses flattened; each storage once)."""
    seen, total = set(), 0
    for p in model.parameters():
        for t in _leaf_tensors(p):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def current_rss_bytes(trim: bool = False) -> int:
    """Resident set now (Linux ``/proc``); ``trim`` first runs ``gc`` and glibc's ``malloc_trim`` so
    that memory freed during quantization is not counted. 0 where unavailable."""
    import gc
    gc.collect()
    if trim:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt(v, f: str = "{:.2f}") -> str:
    """``f.format(v)``, or a right-aligned ``-`` of the same width for a missing value (tables)."""
    return "-".rjust(len(f.format(0.0))) if v is None else f.format(v)


def emit(result: dict[str, Any]) -> None:
    """Worker side: print the result line the parent reads."""
    print("RESULT " + json.dumps(result), flush=True)
