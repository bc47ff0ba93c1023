"""One run of a sweep, wherever it executes: :class:`SweepJob` (what every run of a sweep shares,
plain data that pickles), :class:`RunContext` (the float model, tokenizer, reference and
calibration windows of a process) and :func:`execute_run` (quantize, evaluate, one record).

The local executor calls :func:`execute_run` in the sweep's own process with one context for all
runs (and the reference logits cached on disk); the Ray executor calls :func:`run_task` in each
worker, which keeps one context per process for the tasks it is given. Both produce the same
record for the same run (timings aside).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.report.runs import Run, uses_calibration
from polyquant.report.store import to_jsonable

__all__ = ["SweepJob", "RunContext", "CachedReference", "execute_run", "run_task", "environment", "size_info",
           "run_resources", "needs_gpu"]

log = logging.getLogger(__name__)

_SPEED_KEYS = ("prefill_tok_s", "prefill_tokens", "prefill_runs", "decode_tok_s", "decode_tokens", "decode_runs",
               "speed_seconds", "threads")


@dataclass(frozen=True)
class SweepJob:
    """What every run of one sweep shares (plain values: it travels to Ray workers).

    ``settings`` are the evaluation settings of :func:`polyquant.report.compare.run_compare`
    (model, text digest, seqlen, max_windows, threads, eval_threads, decode_tokens,
    slow_decode_tokens, measure_speed, seed); ``calibration`` the calibration settings given to the
    runs that use data; ``text`` / ``calib_text`` the user's texts (None: the built-in ones)."""

    model: str
    settings: dict[str, Any]
    calibration: dict[str, Any]
    text: str | None = None
    calib_text: str | None = None
    show_progress: bool = False
    device: str = "cpu"

    @property
    def threads(self) -> int | None:
        return self.settings.get("threads")

    @property
    def eval_threads(self) -> int | None:
        return self.settings.get("eval_threads") or self.settings.get("threads")

    def run_calibration(self, run: Run) -> dict[str, Any] | None:
        """The calibration settings a run is given (None for runs that use no data)."""
        return self.calibration if run.config is not None and uses_calibration(run.config) else None

    def identity(self) -> str:
        """A digest of the job (a worker reuses its context for tasks of the same job)."""
        blob = repr((self.model, sorted(self.settings.items()), sorted(self.calibration.items()),
                     hashlib.sha256((self.text or "").encode()).hexdigest(),
                     hashlib.sha256((self.calib_text or "").encode()).hexdigest(), self.device))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def needs_gpu(run: Run, device: str = "cpu") -> bool:
    """Whether a run needs a GPU: the sweep runs on CUDA, or the method says its quantization
    only runs there (``MethodSpec.extra["needs_gpu"]``)."""
    if str(device).startswith("cuda"):
        return run.config is not None
    if run.config is None:
        return False
    from polyquant.methods import get_method
    return bool(get_method(run.config.method).extra.get("needs_gpu"))


def run_resources(run: Run, job: SweepJob) -> dict[str, float]:
    """The resources one run asks of a cluster: its CPU threads (the larger of ``threads`` and
    ``eval_threads``) and one GPU when :func:`needs_gpu`."""
    cpus = max(job.threads or 1, job.eval_threads or 1)
    return {"num_cpus": float(cpus), "num_gpus": 1.0 if needs_gpu(run, job.device) else 0.0}


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


def reference_cache_fits(folder: Path, model: nn.Module, seqlen: int, windows: int | None) -> bool:
    """Whether the reference logits of ``windows`` windows fit on the disk of ``folder`` twice over."""
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


@dataclass
class RunContext:
    """The float model, tokenizer and reference of one process, and the calibration windows (drawn
    once, when the first run that uses data asks)."""

    job: SweepJob
    fp: nn.Module
    tok: Any
    reference: nn.Module
    env: dict[str, Any]
    calib_data: list[Any] = field(default_factory=list)

    @classmethod
    def load(cls, job: SweepJob) -> "RunContext":
        import polyquant.formats  # noqa: F401  (registers the loader of quantized folders)
        from polyquant.models import load_model
        fp, tok = load_model(job.model)
        if getattr(fp, "polyquant", None) is not None or getattr(fp.config, "quantization_config", None):
            raise ValueError(f"{job.model} is a quantized checkpoint; compare needs an unquantized model")
        return cls(job, fp, tok, fp, environment())

    def calibration(self, run: Run) -> list[Any]:
        if self.tok is None:
            raise ValueError(f"{run.method} needs calibration data but {self.job.model} has no tokenizer")
        if not self.calib_data:
            from polyquant.calibration import calibration_data
            c = self.job.calibration
            self.calib_data.extend(calibration_data(self.tok, text=self.job.calib_text, n_samples=c["samples"],
                                                    seqlen=c["seqlen"], seed=c["seed"]))
        return list(self.calib_data)


def execute_run(ctx: RunContext, run: Run, key: str, executor: str = "local") -> dict[str, Any]:
    """Quantize (unless the baseline) and evaluate one run; returns its JSON-able record. A run
    that raises is recorded (``status: failed`` with the error and traceback), never raised."""
    job, st = ctx.job, ctx.job.settings
    seed = st["seed"]
    rec: dict[str, Any] = {"key": key, "name": run.name, "method": run.method, "setting": run.setting,
                           "config": run.config.to_dict() if run.config else None, "model": job.model,
                           "settings": st, "calibration": job.run_calibration(run), "seed": seed,
                           "device": job.device, "versions": ctx.env, "executor": executor,
                           "host": platform.node(), "started": _now()}
    t0, c0 = time.perf_counter(), time.process_time()
    q = hook = target = ref = None
    threads, eval_threads = job.threads, job.eval_threads
    try:
        torch.manual_seed(seed)
        if run.config is None:
            target, ref, quant_s, quant_cpu_s = ctx.fp, None, 0.0, 0.0
            if isinstance(ctx.reference, CachedReference):
                hook = ctx.reference.recording_hook()
        else:
            calib = ctx.calibration(run) if rec["calibration"] is not None else None
            torch.manual_seed(seed)
            t1, c1 = time.perf_counter(), time.process_time()
            q = _quantize(ctx.fp, run.config, calib, job.show_progress)
            quant_s, quant_cpu_s = time.perf_counter() - t1, time.process_time() - c1
            target, ref = q, ctx.reference
            qextra = getattr(getattr(q, "polyquant", None), "extra", None)
            if qextra:  # what quantization chose at run time (e.g. the calibration autocast)
                rec["quantization"] = to_jsonable(qextra)
        rec["kernel"] = _kernels(target) or {"dense": 1}
        rec["size"] = size_info(target)
        dec, slow_dec = st["decode_tokens"], st["slow_decode_tokens"]
        if _slow(rec["kernel"]) and dec > slow_dec:
            dec = slow_dec  # each step dequantizes every layer: time a few steps only
            rec["notes"] = [f"decode timed over {dec} tokens: the {', '.join(sorted(rec['kernel']))} "
                            f"kernel is not a fast path"]
        measure_speed = st["measure_speed"]
        split = measure_speed and eval_threads != threads
        t1 = time.perf_counter()
        metrics = _evaluate(target, ctx.tok, text=job.text, seqlen=st["seqlen"], max_windows=st["max_windows"],
                            reference=ref, threads=eval_threads, decode_tokens=dec,
                            measure_speed=measure_speed and not split, show_progress=job.show_progress)
        if split:  # speed at `threads`, the accuracy pass above at `eval_threads`
            speed = _evaluate(target, ctx.tok, text=job.text, seqlen=st["seqlen"], max_windows=1, reference=None,
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
        q = target = ref = None  # free this run's model before the next copy is made
        gc.collect()
    rec["timings"] = {**rec.get("timings", {}), "total_s": time.perf_counter() - t0,
                      "total_cpu_s": time.process_time() - c0}
    rec["finished"] = _now()
    return to_jsonable(rec)


_WORKER: dict[str, RunContext] = {}


def run_task(job: SweepJob, run: Run, key: str, executor: str = "ray") -> dict[str, Any]:
    """A run in a worker process (a Ray task): the process keeps the context of the last job it
    ran, so the tasks a worker is given load the model once. A model that does not load is the
    run's failed record."""
    if job.eval_threads:
        torch.set_num_threads(job.eval_threads)
    ctx = _WORKER.get(job.identity())
    if ctx is None:
        _WORKER.clear()
        gc.collect()
        try:
            ctx = RunContext.load(job)
        except Exception as e:
            return to_jsonable({"key": key, "name": run.name, "method": run.method, "setting": run.setting,
                                "config": run.config.to_dict() if run.config else None, "model": job.model,
                                "settings": job.settings, "status": "failed", "executor": executor,
                                "host": platform.node(), "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc(limit=8), "finished": _now()})
        _WORKER[job.identity()] = ctx
    return execute_run(ctx, run, key, executor)
