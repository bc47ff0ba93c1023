"""Where the runs of a sweep execute: :class:`LocalExecutor` (one after the other in this process,
the default) and :class:`RayExecutor` (each run a Ray task on a local or remote cluster; Ray is
an optional extra, imported only when this executor runs).

An executor is given the sweep's :class:`~polyquant.report.execute.SweepJob`, the runs still to do
(each with its store key) and ``on_record(run, record)``, which it calls once per run as soon as
the run's record exists (the sweep appends it to the results store there). Both executors build
the record with :func:`~polyquant.report.execute.execute_run`.
"""
from __future__ import annotations

import logging
import platform
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from polyquant.report.execute import (CachedReference, RunContext, SweepJob, execute_run, reference_cache_fits,
                                      run_resources, run_task)
from polyquant.report.runs import Run

__all__ = ["LocalExecutor", "RayExecutor", "ExecutorUnavailable", "make_executor", "EXECUTORS", "RAY_HINT"]

log = logging.getLogger(__name__)

RAY_HINT = "pip install polyquant[ray]"
EXECUTORS = ("local", "ray")
OnRecord = Callable[[Run, dict[str, Any]], None]


class ExecutorUnavailable(RuntimeError):
    """The executor cannot run here (its package is missing): the message says what to install."""


class LocalExecutor:
    """The runs one after the other in this process, with one float model for all of them and the
    reference logits cached on disk (``out_dir/.reference-logits``, removed at the end) when more
    than one run needs them."""

    name = "local"

    def __init__(self, cache_reference: bool = True) -> None:
        self.cache_reference = cache_reference

    def check(self) -> None:
        """Nothing to check: the local executor always runs."""

    def run(self, job: SweepJob, todo: list[tuple[Run, str]], on_record: OnRecord, out_dir: Path, bar=None) -> None:
        if not todo:
            return
        cache_dir = Path(out_dir) / ".reference-logits"
        shutil.rmtree(cache_dir, ignore_errors=True)  # left by an interrupted sweep
        prev_threads = torch.get_num_threads()
        if job.eval_threads:
            torch.set_num_threads(job.eval_threads)
        try:
            ctx = RunContext.load(job)
            n_quant = sum(r.config is not None for r, _ in todo)
            if (self.cache_reference and n_quant and n_quant + (len(todo) > n_quant) > 1
                    and reference_cache_fits(Path(out_dir), ctx.fp, job.settings["seqlen"],
                                             job.settings["max_windows"])):
                ctx.reference = CachedReference(ctx.fp, cache_dir)
            for run, key in todo:
                if bar is not None:
                    bar.set_postfix_str(run.name)
                rec = execute_run(ctx, run, key, self.name)
                on_record(run, rec)
                if bar is not None:
                    bar.update(1)
        finally:
            torch.set_num_threads(prev_threads)
            shutil.rmtree(cache_dir, ignore_errors=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailable(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


class RayExecutor:
    """Each run a Ray task (``num_cpus``: the run's threads; ``num_gpus``: 1 when the run needs a
    GPU, see :func:`~polyquant.report.execute.run_resources`), records handed to ``on_record`` in
    the order the tasks finish.

    Args:
        address: the cluster to join (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None starts a
            local cluster for the sweep (or uses the one this process already initialised).
        init_kwargs: more arguments of ``ray.init`` (e.g. ``num_cpus`` of a local cluster).
        max_retries: how often Ray reruns a task whose worker died (the record is the last try's).

    Every node needs polyquant installed and the model at the same path (each worker loads it
    once and keeps it for the tasks it is given); the records come back to this process, which
    alone writes the results store.
    """

    name = "ray"

    def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None,
                 max_retries: int = 1) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"address must be a non-empty string (auto, HOST:PORT or ray://HOST:PORT), got {address!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        self.address = address.strip() if address else None
        self.init_kwargs = dict(init_kwargs or {})
        self.max_retries = max_retries

    def check(self) -> None:
        """Refuse up front when Ray is not installed (:class:`ExecutorUnavailable`)."""
        _import_ray()

    def _check_fits(self, ray, job: SweepJob, todo: list[tuple[Run, str]]) -> None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
        for run, _ in todo:
            need = run_resources(run, job)
            if not any(n.get("CPU", 0) >= need["num_cpus"] and n.get("GPU", 0) >= need["num_gpus"] for n in nodes):
                have = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
                raise ValueError(f"run {run.name} needs {need['num_cpus']:g} CPU(s) and {need['num_gpus']:g} GPU(s) "
                                 f"on one node; the Ray cluster has {have} (lower --threads / --eval-threads)")

    def run(self, job: SweepJob, todo: list[tuple[Run, str]], on_record: OnRecord, out_dir: Path, bar=None) -> None:
        if not todo:
            return
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            ray.init(address=self.address, **kw)
            started = True
        pending: dict[Any, Run] = {}
        try:
            self._check_fits(ray, job, todo)
            job_ref = ray.put(job)
            task = ray.remote(run_task)
            for run, key in todo:
                res = run_resources(run, job)
                ref = task.options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
                                   max_retries=self.max_retries).remote(job_ref, run, key, self.name)
                pending[ref] = run
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    run = pending.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except Exception as e:  # the worker died (out of memory, killed ...): a failed run
                        rec = {"key": _key_of(todo, run), "name": run.name,
                               "method": run.method, "setting": run.setting,
                               "config": run.config.to_dict() if run.config else None, "model": job.model,
                               "settings": job.settings, "status": "failed", "executor": self.name,
                               "host": platform.node(), "error": f"{type(e).__name__}: {_first_line(e)}",
                               "traceback": traceback.format_exc(limit=4)}
                        log.warning("run %s failed on the Ray cluster: %s", run.name, rec["error"])
                    on_record(run, rec)
                    if bar is not None:
                        bar.set_postfix_str(run.name)
                        bar.update(1)
        finally:
            for ref in pending:  # interrupted: the runs still going are of no use to anyone
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001  (already finished, or the cluster is gone)
                    pass
            if started:
                ray.shutdown()


def _key_of(todo: list[tuple[Run, str]], run: Run) -> str:
    return next(k for r, k in todo if r.name == run.name)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def make_executor(executor: str | LocalExecutor | RayExecutor | None = None, *, address: str | None = None,
                  cache_reference: bool = True):
    """The executor named ``executor`` (``local``, the default, or ``ray``), or the object given.
    ``address`` is for ``ray`` only (a ValueError otherwise)."""
    if executor is None:
        executor = "local"
    if not isinstance(executor, str):
        if address is not None:
            raise ValueError("address goes to RayExecutor(address=...), not next to an executor object")
        return executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "local":
        if address is not None:
            raise ValueError("address is for executor 'ray' (the local executor runs in this process)")
        return LocalExecutor(cache_reference=cache_reference)
    return RayExecutor(address=address)
