"""``compare``: run a float baseline and a sweep of quantization configs on one model, evaluate
each with the same text, windows and threads, and keep one record per run.

Each record is appended to the store (``runs.jsonl``) the moment its run finishes and
``results.json`` is rewritten atomically, so an interrupted sweep resumes where it stopped
(finished runs are not redone). A run that raises is recorded with its error and the sweep goes
on. :func:`summary_rows` turns the records into the table the CLI prints.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from torch import nn

from polyquant.methods import MethodConfig, RTNConfig
from polyquant.progress import progress
from polyquant.report.store import ResultsStore, to_jsonable

__all__ = ["Run", "default_runs", "run_compare", "summary_rows", "SUMMARY_HEADERS", "DEFAULT_OUT",
           "environment", "CachedReference"]

log = logging.getLogger(__name__)

DEFAULT_OUT = "polyquant-report"
#: Decode steps timed for a model running on a kernel that is not a fast path (the reference
#: kernel dequantizes every layer at every step: 64 steps of W3 take minutes on a CPU core).
SLOW_DECODE_TOKENS = 8
_SPEED_KEYS = ("prefill_tok_s", "prefill_tokens", "prefill_runs", "decode_tok_s", "decode_tokens", "decode_runs",
               "speed_seconds", "threads")
SUMMARY_HEADERS = ["method", "setting", "ppl", "Δppl %", "KL", "top1", "weight MB", "decode tok/s",
                   "vs fp32", "kernel", "status"]


@dataclass(frozen=True)
class Run:
    """One entry of a sweep: ``config=None`` is the unquantized baseline."""

    name: str
    config: MethodConfig | None = None

    @property
    def method(self) -> str:
        return self.config.method if self.config is not None else "fp32"

    @property
    def setting(self) -> str:
        return self.config.describe() if self.config is not None else "unquantized"


def default_runs() -> list[Run]:
    """The first sweep: fp32 and RTN at 8/4/3 bits (lm_head kept in float in every run)."""
    return [
        Run("fp32"),
        Run("rtn-w8-pc", RTNConfig(bits=8, group_size=-1, sym=True)),
        Run("rtn-w4-pc", RTNConfig(bits=4, group_size=-1, sym=True)),
        Run("rtn-w4-g64-sym", RTNConfig(bits=4, group_size=64, sym=True)),
        Run("rtn-w4-g64-asym", RTNConfig(bits=4, group_size=64, sym=False)),
        Run("rtn-w3-g64", RTNConfig(bits=3, group_size=64, sym=True)),
    ]


def environment() -> dict[str, Any]:
    """Versions and the machine a run was measured on."""
    import polyquant
    env: dict[str, Any] = {"polyquant": polyquant.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("transformers", "safetensors", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        env[mod] = getattr(m, "__version__", None)
    env["cpu"] = _cpu_name()
    env["cpu_count"] = os.cpu_count()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CachedReference(nn.Module):
    """The reference model with its logits kept on disk (exact float32, one ``.npy`` per input),
    so each evaluation window's reference forward runs once per sweep instead of once per run
    (and not at all when the baseline's own evaluation filled the cache, see ``recording_hook``).

    Only plain ``model(input_ids=..., use_cache=...)`` calls are cached; anything else goes to the
    wrapped model, and so do attribute look-ups (``config``, ``parameters()`` ...).
    """

    def __init__(self, model: nn.Module, folder: str | os.PathLike) -> None:
        super().__init__()
        self.inner = model
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def _path(self, input_ids: torch.Tensor) -> Path:
        ids = input_ids.detach().cpu().contiguous()
        key = hashlib.sha256(ids.numpy().tobytes() + repr(tuple(ids.shape)).encode()).hexdigest()[:32]
        return self.folder / f"{key}.npy"

    def store(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep the logits the reference produced for ``input_ids`` (written atomically)."""
        import numpy as np
        path = self._path(input_ids)
        if path.is_file():
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, logits.detach().float().cpu().numpy(), allow_pickle=False)
        os.replace(tmp, path)

    def recording_hook(self):
        """A forward hook for the reference model itself: while the baseline is evaluated, its
        no-cache forwards fill the cache, so the quantized runs never run the reference again.
        Returns the hook handle (call ``.remove()``)."""
        def hook(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            logits = getattr(output, "logits", None)
            if (isinstance(ids, torch.Tensor) and logits is not None and kwargs.get("use_cache") is False
                    and not kwargs.get("past_key_values") and set(kwargs) <= {"input_ids", "labels", "use_cache"}):
                self.store(ids, logits)
        return self.inner.register_forward_hook(hook, with_kwargs=True)

    def forward(self, input_ids: torch.Tensor | None = None, **kw):
        if input_ids is None or set(kw) - {"use_cache"}:
            return self.inner(input_ids=input_ids, **kw)
        import numpy as np
        from transformers.modeling_outputs import CausalLMOutputWithPast
        path = self._path(input_ids)
        if path.is_file():
            self.hits += 1
            logits = torch.from_numpy(np.load(path, allow_pickle=False)).to(input_ids.device)
            return CausalLMOutputWithPast(logits=logits)
        self.misses += 1
        out = self.inner(input_ids=input_ids, **kw)
        self.store(input_ids, out.logits)
        return out


def _reference_cache_fits(folder: Path, model: nn.Module, seqlen: int, windows: int | None) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or not windows:
        return False
    need = windows * seqlen * vocab * 4
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    if free < 2 * need + (1 << 30):
        log.info("not caching reference logits (%.1f GB needed, %.1f GB free)", need / 1e9, free / 1e9)
        return False
    return True


def _kernels(model: torch.nn.Module) -> dict[str, int]:
    from polyquant.nn import kernel_summary
    return kernel_summary(model)


def _slow(kernels: dict[str, int]) -> bool:
    from polyquant.kernels import KERNELS
    return any(k in KERNELS and not KERNELS[k].fast for k in kernels)


def _run_key(run: Run, settings: dict[str, Any]) -> str:
    blob = json.dumps({"run": run.name, "config": run.config.to_dict() if run.config else None,
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _evaluate(model, tokenizer, **kw) -> dict[str, Any]:
    from polyquant import eval as peval  # looked up per call (tests count the calls)
    return peval.evaluate(model, tokenizer, **kw)


def run_compare(model: str | os.PathLike = "default", out_dir: str | os.PathLike = DEFAULT_OUT,
                runs: list[Run] | None = None, *, text: str | None = None, text_name: str | None = None,
                seqlen: int = 512, max_windows: int | None = 40, threads: int | None = 1,
                eval_threads: int | None = None, decode_tokens: int = 64, measure_speed: bool = True,
                seed: int = 0, resume: bool = True, cache_reference: bool = True,
                show_progress: bool = True) -> dict[str, Any]:
    """Run the sweep and return the ``results.json`` payload (``runs``: one record per run, in
    sweep order).

    Args:
        model: ``default``, a local HF folder or a .gguf (an unquantized model).
        out_dir: where ``runs.jsonl`` and ``results.json`` go; finished runs found there with the
            same config and settings are reused, not redone.
        runs: the sweep (default :func:`default_runs`); the unquantized baseline, when present,
            is run first and is the reference for KL / top-1 and Δppl.
        text: evaluation text (default: the built-in pydoc text); ``text_name`` labels it.
        seqlen, max_windows, threads, decode_tokens, measure_speed: passed to ``evaluate``.
        eval_threads: torch threads for the perplexity / KL windows (default: ``threads``); when
            it differs, speed is measured in a second, speed-only ``evaluate`` at ``threads``.
            A run on a kernel that is not a fast path times ``SLOW_DECODE_TOKENS`` decode steps.
        seed: torch seed set before each run.
        resume: reuse finished runs found in ``out_dir`` (False: redo every run).
        cache_reference: keep the reference logits of each window on disk (in ``out_dir``, removed
            at the end) so the reference runs once per window, not once per run (exact; needs
            ``windows * seqlen * vocab * 4`` bytes of disk, skipped when that is not free).
    """
    from polyquant.models import load_model
    from polyquant.nn import quantize_model

    runs = list(default_runs() if runs is None else runs)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    runs.sort(key=lambda r: r.config is not None)  # the baseline first: it is the reference
    eval_threads = eval_threads or threads
    store = ResultsStore(out_dir)
    text_sha = hashlib.sha256(text.encode()).hexdigest()[:16] if text is not None else "default"
    settings = {"model": str(model), "text": text_name or ("default (pydoc topics)" if text is None else "user"),
                "text_sha256": text_sha, "seqlen": seqlen, "max_windows": max_windows, "threads": threads,
                "eval_threads": eval_threads,
                "decode_tokens": decode_tokens, "measure_speed": measure_speed, "seed": seed}
    keys = {r.name: _run_key(r, settings) for r in runs}
    done = store.finished() if resume else {}
    records: dict[str, dict[str, Any]] = {r.name: done[keys[r.name]] for r in runs if keys[r.name] in done}
    if records:
        log.info("resuming: %d of %d runs already finished in %s", len(records), len(runs), store.folder)
    env = environment()
    device = "cpu"
    payload = lambda: {"created": _now(), "model": str(model), "settings": settings, "environment": env,  # noqa: E731
                       "runs": [records[r.name] for r in runs if r.name in records]}

    todo = [r for r in runs if r.name not in records]
    fp = tok = reference = None
    cache_dir = store.folder / ".reference-logits"
    shutil.rmtree(cache_dir, ignore_errors=True)  # left by an interrupted sweep
    prev_threads = torch.get_num_threads()
    if eval_threads:
        torch.set_num_threads(eval_threads)
    try:
        if todo:
            fp, tok = load_model(model)
            if getattr(fp, "polyquant", None) is not None or getattr(fp.config, "quantization_config", None):
                raise ValueError(f"{model} is a quantized checkpoint; compare needs an unquantized model")
            reference = fp
            store.folder.mkdir(parents=True, exist_ok=True)
            n_quant = sum(r.config is not None for r in todo)
            if (cache_reference and n_quant and n_quant + (len(todo) > n_quant) > 1
                    and _reference_cache_fits(store.folder, fp, seqlen, max_windows)):
                reference = CachedReference(fp, cache_dir)
        bar = progress(runs, desc="compare", enabled=show_progress, unit="run")
        for run in bar:
            bar.set_postfix_str(run.name)
            if run.name in records:
                continue
            rec: dict[str, Any] = {"key": keys[run.name], "name": run.name, "method": run.method,
                                   "setting": run.setting, "config": run.config.to_dict() if run.config else None,
                                   "model": str(model), "settings": settings, "seed": seed, "device": device,
                                   "versions": env, "started": _now()}
            t0 = time.perf_counter()
            q = hook = target = ref = None
            try:
                torch.manual_seed(seed)
                if run.config is None:
                    target, ref, quant_s = fp, None, 0.0
                    if isinstance(reference, CachedReference):
                        hook = reference.recording_hook()
                else:
                    t1 = time.perf_counter()
                    q = quantize_model(fp, run.config, inplace=False, show_progress=False)
                    quant_s = time.perf_counter() - t1
                    target, ref = q, reference
                rec["kernel"] = _kernels(target) or {"dense": 1}
                dec = decode_tokens
                if _slow(rec["kernel"]) and decode_tokens > SLOW_DECODE_TOKENS:
                    dec = SLOW_DECODE_TOKENS  # each step dequantizes every layer: time a few steps only
                    rec["notes"] = [f"decode timed over {dec} tokens: the {', '.join(sorted(rec['kernel']))} "
                                    f"kernel is not a fast path"]
                split = measure_speed and eval_threads != threads
                t1 = time.perf_counter()
                metrics = _evaluate(target, tok, text=text, seqlen=seqlen, max_windows=max_windows,
                                    reference=ref, threads=eval_threads, decode_tokens=dec,
                                    measure_speed=measure_speed and not split, show_progress=show_progress)
                if split:  # speed at `threads`, the accuracy pass above at `eval_threads`
                    speed = _evaluate(target, tok, text=text, seqlen=seqlen, max_windows=1, reference=None,
                                      threads=threads, decode_tokens=dec, measure_speed=True, show_progress=False)
                    metrics.update({k: speed.get(k) for k in _SPEED_KEYS})
                    metrics["eval_threads"] = eval_threads
                rec["metrics"] = metrics
                rec["timings"] = {"quantize_s": quant_s, "eval_s": time.perf_counter() - t1}
                rec["status"] = "ok"
            except Exception as e:  # recorded; the sweep goes on
                rec["status"] = "failed"
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=8)
                log.warning("run %s failed: %s", run.name, rec["error"])
            finally:
                if hook is not None:
                    hook.remove()
                    hook = None
                q = target = ref = None  # free this run's model before the next copy is made
                gc.collect()
            rec["timings"] = {**rec.get("timings", {}), "total_s": time.perf_counter() - t0}
            rec["finished"] = _now()
            rec = to_jsonable(rec)
            store.append(rec)
            records[run.name] = rec
            store.write_results(payload())
        bar.close()
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(cache_dir, ignore_errors=True)
    result = payload()
    store.write_results(result)
    return result


# -- the summary table ------------------------------------------------------------------------

def _m(rec: dict[str, Any] | None, key: str) -> Any:
    return ((rec or {}).get("metrics") or {}).get(key)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table (see ``SUMMARY_HEADERS``) from a ``run_compare`` result."""
    recs = result.get("runs", [])
    base = next((r for r in recs if r.get("config") is None and r.get("status") == "ok"), None)
    rows = []
    base_ppl, base_dec = _m(base, "ppl"), _m(base, "decode_tok_s")
    for r in recs:
        ppl, dec, wb = _m(r, "ppl"), _m(r, "decode_tok_s"), _m(r, "weight_bytes")
        kernel = _m(r, "kernel") or ",".join(sorted(r.get("kernel") or {})) or "-"
        rows.append([
            r.get("method", "?"), r.get("setting", ""),
            _fmt(ppl, ".3f"),
            _fmt(100 * (ppl / base_ppl - 1) if ppl is not None and base_ppl else None, "+.2f"),
            _fmt(_m(r, "kl"), ".4f"),
            _fmt(_m(r, "top1"), ".3f"),
            _fmt(wb / 1e6 if wb is not None else None, ".1f"),
            _fmt(dec, ".1f"),
            _fmt(dec / base_dec if dec is not None and base_dec else None, ".2f"),
            kernel,
            "ok" if r.get("status") == "ok" else f"FAILED: {r.get('error', '')}"[:80],
        ])
    return rows
