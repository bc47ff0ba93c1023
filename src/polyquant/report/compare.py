"""``compare``: run a float baseline and a sweep of quantization configs on one model, evaluate
each with the same text, windows and threads, and keep one record per run.

The sweep is built from the method registry (:func:`build_runs`, :mod:`polyquant.report.runs`): by default every registered
method at its presets (``MethodSpec.presets``, read from the registry; a method without one runs
its config's defaults), or a grid of bits x group sizes per named method, skipping the combinations a method's
config refuses (its ``ValueError`` is kept as the reason). Calibration-based methods share one
set of calibration windows, taken from the calibration slice of the text (never the windows that
are evaluated).

Each record is appended to the store (``runs.jsonl``) the moment its run finishes and
``results.json`` is rewritten atomically, so an interrupted sweep resumes where it stopped
(finished runs are not redone). A run that raises is recorded with its error and the sweep goes
on. :func:`summary_rows` (:mod:`polyquant.report.summary`) turns the records into the table the CLI prints; ``report/charts.py``
and ``report/html.py`` turn them into charts and the HTML report.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from torch import nn

from polyquant.progress import progress
from polyquant.report.runs import (Run, build_runs, default_runs, headline, run_name,  # noqa: F401
                                   uses_calibration)
from polyquant.report.store import ResultsStore, to_jsonable
from polyquant.report.summary import (SUMMARY_HEADERS, baseline_record, bits_per_weight, summary_markdown,  # noqa: F401
                                      summary_rows)

__all__ = ["Run", "HEADLINE", "headline", "build_runs", "default_runs", "run_name", "run_compare", "summary_rows",
           "summary_markdown", "baseline_record", "bits_per_weight", "size_info",
           "SUMMARY_HEADERS", "DEFAULT_OUT", "environment", "CachedReference", "uses_calibration"]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name == "HEADLINE":  # the registry's presets, read when asked (plug-ins included)
        return headline()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_OUT = "polyquant-report"
# The defaults of ``polyquant compare`` (and of run_compare): chosen so that the default sweep
# (every registered method at its headline setting) on the default model finishes well within
# 20 minutes on a 2-core CPU at 1 thread (measured: 22 runs in 6.8 min of CPU time, 13.2 min of
# wall time on a machine shared with other jobs, AWQ failing early, about 70 s of CPU when it
# runs; with 8 windows and 32 decode tokens the first 11 runs projected to about 14 min of CPU
# time). They are stated in the CLI help and in results.json's settings.
DEFAULT_SEQLEN = 512
DEFAULT_MAX_WINDOWS = 5
DEFAULT_DECODE_TOKENS = 16
DEFAULT_CALIB_SAMPLES = 8
DEFAULT_CALIB_SEQLEN = 512
#: Decode steps timed for a model running on a kernel that is not a fast path (the reference
#: kernel dequantizes every layer at every step: W3 decodes below 1 token/s on a CPU core).
SLOW_DECODE_TOKENS = 4
_SPEED_KEYS = ("prefill_tok_s", "prefill_tokens", "prefill_runs", "decode_tok_s", "decode_tokens", "decode_runs",
               "speed_seconds", "threads")

def environment() -> dict[str, Any]:
    """Versions and the machine a run was measured on."""
    from polyquant.version import __version__
    env: dict[str, Any] = {"polyquant": __version__, "torch": torch.__version__,
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


def _run_key(run: Run, settings: dict[str, Any], calibration: dict[str, Any] | None) -> str:
    """What makes two measurements the same: the exact config, the evaluation settings and, for a
    run given calibration data, the calibration settings (the run's name is a label, not part)."""
    blob = json.dumps({"config": run.config.to_dict() if run.config else None, "settings": settings,
                       **({"calibration": calibration} if calibration is not None else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _evaluate(model, tokenizer, **kw) -> dict[str, Any]:
    from polyquant import eval as peval  # looked up per call (tests count the calls)
    return peval.evaluate(model, tokenizer, **kw)


def _quantize(model, config, calibration, show_progress: bool):
    from polyquant.methods import apply  # looked up per call (tests count the calls)
    return apply.quantize_model(model, config, calibration, inplace=False, show_progress=show_progress)


def size_info(model: nn.Module) -> dict[str, Any]:
    """Effective size of the quantized layers: ``quantized_layers``, ``quantized_params``
    (``out * in`` summed), ``quantized_bytes`` (their stored tensors: codes, scales, zeros, index,
    extras; no bias) and ``bits_per_weight`` (``quantized_bytes * 8 / quantized_params``). An
    unquantized model reports the Linears a default quantization would take, at their dtype."""
    from polyquant.nn import QuantLinear, select_linears
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if qls:
        params = sum(int(m.quantized_weight.shape[0]) * int(m.quantized_weight.shape[1]) for m in qls)
        nbytes = sum(int(m.quantized_weight.nbytes()) for m in qls)
        n = len(qls)
    else:
        lins = [lin for _, lin in select_linears(model)]
        params = sum(lin.weight.numel() for lin in lins)
        nbytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in lins)
        n = len(lins)
    return {"quantized_layers": n, "quantized_params": params, "quantized_bytes": nbytes,
            "bits_per_weight": nbytes * 8 / params if params else None}


def _previous_invocations(store: ResultsStore) -> list[dict[str, Any]]:
    """The ``invocations`` of the results.json already in the folder (each earlier call that
    wrote it: start, wall and CPU seconds, runs, reused), so a resumed sweep keeps its history."""
    try:
        prev = json.loads(store.results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    inv = prev.get("invocations") if isinstance(prev, dict) else None
    if not isinstance(inv, list):
        inv = [prev["sweep"]] if isinstance(prev, dict) and isinstance(prev.get("sweep"), dict) else []
    return [x for x in inv if isinstance(x, dict)]


def run_compare(model: str | os.PathLike = "default", out_dir: str | os.PathLike = DEFAULT_OUT,
                runs: list[Run] | None = None, *, text: str | None = None, text_name: str | None = None,
                seqlen: int = DEFAULT_SEQLEN, max_windows: int | None = DEFAULT_MAX_WINDOWS, threads: int | None = 1,
                eval_threads: int | None = None, decode_tokens: int = DEFAULT_DECODE_TOKENS,
                slow_decode_tokens: int = SLOW_DECODE_TOKENS, measure_speed: bool = True,
                calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seqlen: int = DEFAULT_CALIB_SEQLEN,
                calib_text: str | None = None, calib_text_name: str | None = None,
                seed: int = 0, resume: bool = True, cache_reference: bool = True,
                skipped: list[dict[str, str]] | None = None, run_list: str | None = None,
                show_progress: bool = True) -> dict[str, Any]:
    """Run the sweep and return the ``results.json`` payload (``runs``: one record per run, in
    sweep order; ``settings``; ``environment``; ``skipped``: combinations left out of the run list;
    ``sweep``: this call's start, wall and CPU seconds, runs and reused runs; ``invocations``: the
    same for every call that wrote this folder's results.json, this one last).

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
        slow_decode_tokens: decode steps timed for a run on a kernel that is not a fast path.
        calib_samples, calib_seqlen, calib_text: the calibration windows given to the runs that
            use data (:func:`uses_calibration`); default text: the calibration slice of the
            built-in text (never evaluated). Drawn once per sweep with ``seed``.
        seed: torch seed set before each run.
        resume: reuse finished runs found in ``out_dir`` (False: redo every run).
        cache_reference: keep the reference logits of each window on disk (in ``out_dir``, removed
            at the end) so the reference runs once per window, not once per run (exact; needs
            ``windows * seqlen * vocab * 4`` bytes of disk, skipped when that is not free).
        skipped, run_list: stored in ``results.json`` as they are (what the run list left out,
            and how it was chosen).
    """
    import polyquant.formats  # noqa: F401  (registers the loader of quantized folders)
    from polyquant.models import load_model

    runs = list(default_runs() if runs is None else runs)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    for field_name, v in (("calib_samples", calib_samples), ("calib_seqlen", calib_seqlen),
                          ("slow_decode_tokens", slow_decode_tokens), ("decode_tokens", decode_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{field_name} must be a positive integer, got {v!r}")
    runs.sort(key=lambda r: r.config is not None)  # the baseline first: it is the reference
    eval_threads = eval_threads or threads
    store = ResultsStore(out_dir)
    text_sha = hashlib.sha256(text.encode()).hexdigest()[:16] if text is not None else "default"
    settings = {"model": str(model), "text": text_name or ("default (pydoc topics)" if text is None else "user"),
                "text_sha256": text_sha, "seqlen": seqlen, "max_windows": max_windows, "threads": threads,
                "eval_threads": eval_threads, "decode_tokens": decode_tokens,
                "slow_decode_tokens": slow_decode_tokens, "measure_speed": measure_speed, "seed": seed}
    calib_settings = {"samples": calib_samples, "seqlen": calib_seqlen, "seed": seed,
                      "text": calib_text_name or ("default (calibration slice of the pydoc topics)"
                                                  if calib_text is None else "user"),
                      "text_sha256": (hashlib.sha256(calib_text.encode()).hexdigest()[:16]
                                      if calib_text is not None else "default")}
    run_calib = {r.name: calib_settings if r.config is not None and uses_calibration(r.config) else None
                 for r in runs}
    keys = {r.name: _run_key(r, settings, run_calib[r.name]) for r in runs}
    done = store.finished() if resume else {}
    records: dict[str, dict[str, Any]] = {r.name: {**done[keys[r.name]], "name": r.name}
                                          for r in runs if keys[r.name] in done}
    if records:
        log.info("resuming: %d of %d runs already finished in %s", len(records), len(runs), store.folder)
    env = environment()
    device = "cpu"
    started, t_start, c_start = _now(), time.perf_counter(), time.process_time()
    payload = lambda: {"created": _now(), "model": str(model),  # noqa: E731
                       "settings": {**settings, "calibration": calib_settings, "run_list": run_list or "custom"},
                       "environment": env, "skipped": list(skipped or []),
                       "sweep": sweep_now(), "invocations": [*history, sweep_now()],
                       "runs": [records[r.name] for r in runs if r.name in records]}
    n_reused = len(records)
    sweep_now = lambda: {"started": started, "wall_s": time.perf_counter() - t_start,  # noqa: E731
                         "cpu_s": time.process_time() - c_start, "runs": len(runs), "reused": n_reused}
    history = _previous_invocations(store) if resume else []

    todo = [r for r in runs if r.name not in records]
    fp = tok = reference = None
    calib_data: list[Any] = []
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
                                   "model": str(model), "settings": settings, "calibration": run_calib[run.name],
                                   "seed": seed, "device": device, "versions": env, "started": _now()}
            t0, c0 = time.perf_counter(), time.process_time()
            q = hook = target = ref = None
            try:
                torch.manual_seed(seed)
                if run.config is None:
                    target, ref, quant_s, quant_cpu_s = fp, None, 0.0, 0.0
                    if isinstance(reference, CachedReference):
                        hook = reference.recording_hook()
                else:
                    calib = None
                    if run_calib[run.name] is not None:
                        if tok is None:
                            raise ValueError(f"{run.method} needs calibration data but {model} has no tokenizer")
                        if not calib_data:
                            from polyquant.calibration import calibration_data
                            calib_data.extend(calibration_data(tok, text=calib_text, n_samples=calib_samples,
                                                               seqlen=calib_seqlen, seed=seed))
                        calib = list(calib_data)
                    torch.manual_seed(seed)
                    t1, c1 = time.perf_counter(), time.process_time()
                    q = _quantize(fp, run.config, calib, show_progress)
                    quant_s, quant_cpu_s = time.perf_counter() - t1, time.process_time() - c1
                    target, ref = q, reference
                    qextra = getattr(getattr(q, "polyquant", None), "extra", None)
                    if qextra:  # what quantization chose at run time (e.g. the calibration autocast)
                        rec["quantization"] = to_jsonable(qextra)
                rec["kernel"] = _kernels(target) or {"dense": 1}
                rec["size"] = size_info(target)
                dec = decode_tokens
                if _slow(rec["kernel"]) and decode_tokens > slow_decode_tokens:
                    dec = slow_decode_tokens  # each step dequantizes every layer: time a few steps only
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
                rec["timings"] = {"quantize_s": quant_s, "quantize_cpu_s": quant_cpu_s, "eval_s": time.perf_counter() - t1}
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
            rec["timings"] = {**rec.get("timings", {}), "total_s": time.perf_counter() - t0,
                              "total_cpu_s": time.process_time() - c0}
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


