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

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from polyquant.progress import progress
from polyquant.report.execute import CachedReference, SweepJob, environment, size_info  # noqa: F401
from polyquant.report.executors import LocalExecutor, RayExecutor, make_executor  # noqa: F401
from polyquant.report.resume import (SweepLock, identity_differences, read_identity, source_fingerprint,
                                     write_identity)
from polyquant.report.runs import (Run, build_runs, default_runs, headline, run_name,  # noqa: F401
                                   uses_calibration)
from polyquant.report.store import ResultsStore, to_jsonable
from polyquant.report.summary import (SUMMARY_HEADERS, baseline_record, bits_per_weight, summary_markdown,  # noqa: F401
                                      summary_rows)

__all__ = ["Run", "HEADLINE", "headline", "build_runs", "default_runs", "run_name", "run_compare", "summary_rows",
           "summary_markdown", "baseline_record", "bits_per_weight", "size_info", "SweepMismatch",
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


class SweepMismatch(ValueError):
    """A rerun into a sweep folder whose settings or source model differ (each difference named)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_key(run: Run, settings: dict[str, Any], calibration: dict[str, Any] | None) -> str:
    """What makes two measurements the same: the exact config, the evaluation settings and, for a
    run given calibration data, the calibration settings (the run's name is a label, not part)."""
    blob = json.dumps({"config": run.config.to_dict() if run.config else None, "settings": settings,
                       **({"calibration": calibration} if calibration is not None else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _archive(store: ResultsStore) -> None:
    """``fresh``: move the folder's earlier records aside (``previous/``), so ``runs.jsonl`` holds
    this sweep's runs only; nothing measured is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    for path in (store.jsonl_path, store.results_path, store.folder / "sweep.json"):
        if path.is_file():
            prev = store.folder / "previous"
            prev.mkdir(exist_ok=True)
            os.replace(path, prev / f"{stamp}-{path.name}")


def _check_identity(store: ResultsStore, identity: dict[str, Any], resume: bool) -> bool:
    """Refuse a rerun whose settings or source model differ from the folder's sweep
    (:class:`SweepMismatch`); returns whether the folder has no identity yet (written with the
    first record, so a sweep refused before it ran anything does not claim the folder)."""
    stored = read_identity(store.folder) if resume else None
    if stored is not None:
        diffs = identity_differences(stored, identity)
        if diffs:
            raise SweepMismatch(f"{store.folder} holds a sweep with other settings: " + "; ".join(diffs) +
                                ". Rerun with the same arguments to resume it, --fresh to start it over (the "
                                "earlier records move to previous/), or give another output folder")
        return False
    if not resume:
        _archive(store)
    return True


def run_compare(model: str | os.PathLike = "default", out_dir: str | os.PathLike = DEFAULT_OUT,
                runs: list[Run] | None = None, *, text: str | None = None, text_name: str | None = None,
                seqlen: int = DEFAULT_SEQLEN, max_windows: int | None = DEFAULT_MAX_WINDOWS, threads: int | None = 1,
                eval_threads: int | None = None, decode_tokens: int = DEFAULT_DECODE_TOKENS,
                slow_decode_tokens: int = SLOW_DECODE_TOKENS, measure_speed: bool = True,
                calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seqlen: int = DEFAULT_CALIB_SEQLEN,
                calib_text: str | None = None, calib_text_name: str | None = None,
                seed: int = 0, resume: bool = True, cache_reference: bool = True,
                skipped: list[dict[str, str]] | None = None, run_list: str | None = None,
                show_progress: bool = True, executor: str | LocalExecutor | RayExecutor | None = None,
                address: str | None = None) -> dict[str, Any]:
    """Run the sweep and return the ``results.json`` payload (``runs``: one record per run, in
    sweep order; ``settings``; ``environment``; ``skipped``: combinations left out of the run list;
    ``sweep``: this call's start, wall and CPU seconds, runs and reused runs; ``invocations``: the
    same for every call that wrote this folder's results.json, this one last).

    Args:
        model: ``default``, a local HF folder or a .gguf (an unquantized model).
        out_dir: where ``runs.jsonl``, ``results.json`` and ``sweep.json`` go; finished runs found
            there with the same config and settings are reused, not redone. The folder's sweep
            (``sweep.json``: the evaluation settings and a fingerprint of the source model) must
            match: otherwise :class:`SweepMismatch` names every difference (``resume=False`` starts
            over). Calibration settings key only the runs given data: other calibration settings
            redo those runs and reuse the rest. One sweep at a time writes a folder (a second is
            refused).
        runs: the sweep (default :func:`default_runs`); the unquantized baseline, when present,
            is run first and is the reference for KL / top-1 and Δppl. Two runs of one config are
            refused (they would be one record).
        text: evaluation text (default: the built-in pydoc text); ``text_name`` labels it.
        seqlen, max_windows, threads, decode_tokens, measure_speed: passed to ``evaluate``.
        eval_threads: torch threads for the perplexity / KL windows (default: ``threads``); when
            it differs, speed is measured in a second, speed-only ``evaluate`` at ``threads``.
        slow_decode_tokens: decode steps timed for a run on a kernel that is not a fast path.
        calib_samples, calib_seqlen, calib_text: the calibration windows given to the runs that
            use data (:func:`uses_calibration`); default text: the calibration slice of the
            built-in text (never evaluated). Drawn once per sweep with ``seed``.
        seed: torch seed set before each run.
        resume: reuse finished runs found in ``out_dir`` (False: redo every run; the folder's
            earlier records move to ``out_dir/previous/``).
        cache_reference: (local executor) keep the reference logits of each window on disk (in
            ``out_dir``, removed at the end) so the reference runs once per window, not once per
            run (exact; needs ``windows * seqlen * vocab * 4`` bytes of disk, skipped when that is
            not free).
        skipped, run_list: stored in ``results.json`` as they are (what the run list left out,
            and how it was chosen).
        executor: ``local`` (default: the runs one after the other in this process), ``ray``
            (each run a Ray task, :class:`~polyquant.report.executors.RayExecutor`) or an executor
            object. Records are the same (timings aside); a folder may be resumed with either.
        address: the Ray cluster to join (``ray`` only; default: a local cluster).
    """
    runs = list(default_runs() if runs is None else runs)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    for field_name, v in (("calib_samples", calib_samples), ("calib_seqlen", calib_seqlen),
                          ("slow_decode_tokens", slow_decode_tokens), ("decode_tokens", decode_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{field_name} must be a positive integer, got {v!r}")
    ex = make_executor(executor, address=address, cache_reference=cache_reference)
    ex.check()  # e.g. Ray not installed: refused before anything runs
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
    source = source_fingerprint(model)
    settings["source_sha256"] = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    job = SweepJob(model=str(model), settings=settings, calibration=calib_settings, text=text,
                   calib_text=calib_text, show_progress=show_progress)
    keys = {r.name: _run_key(r, settings, job.run_calibration(r)) for r in runs}
    twins = [(a.name, b.name) for i, a in enumerate(runs) for b in runs[i + 1:] if keys[a.name] == keys[b.name]]
    if twins:
        raise ValueError("runs " + ", ".join(f"{a} and {b}" for a, b in twins) + " have the same config (one record)")
    # what every run depends on; the calibration settings key only the runs given data, so a rerun
    # with other calibration settings redoes those runs and reuses the rest
    identity = {**{k: v for k, v in settings.items() if k != "source_sha256"}, "source": source}

    with SweepLock(store.folder):
        unclaimed = [_check_identity(store, identity, resume)]

        def claim() -> None:
            if unclaimed[0]:
                write_identity(store.folder, identity, created=_now(), executor=ex.name)
                unclaimed[0] = False
        done = store.finished() if resume else {}
        records: dict[str, dict[str, Any]] = {r.name: {**done[keys[r.name]], "name": r.name}
                                              for r in runs if keys[r.name] in done}
        if records:
            log.info("resuming: %d of %d runs already finished in %s", len(records), len(runs), store.folder)
        env = environment()
        started, t_start, c_start = _now(), time.perf_counter(), time.process_time()
        n_reused = len(records)
        history = _previous_invocations(store) if resume else []

        def sweep_now() -> dict[str, Any]:
            return {"started": started, "wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start,
                    "runs": len(runs), "reused": n_reused, "executor": ex.name}

        def payload() -> dict[str, Any]:
            return {"created": _now(), "model": str(model),
                    "settings": {**settings, "calibration": calib_settings, "run_list": run_list or "custom"},
                    "environment": env, "skipped": list(skipped or []),
                    "sweep": sweep_now(), "invocations": [*history, sweep_now()],
                    "runs": [records[r.name] for r in runs if r.name in records]}

        def on_record(run: Run, rec: dict[str, Any]) -> None:
            rec = to_jsonable({**rec, "name": run.name})
            if rec.get("key") != keys[run.name]:
                raise RuntimeError(f"run {run.name} came back with key {rec.get('key')!r}, not {keys[run.name]!r}")
            claim()
            store.append(rec)  # durable before anything else: a kill after this keeps the run
            records[run.name] = rec
            store.write_results(payload())

        todo = [(r, keys[r.name]) for r in runs if r.name not in records]
        bar = progress(None, desc="compare", total=len(runs), initial=n_reused, enabled=show_progress, unit="run")
        try:
            ex.run(job, todo, on_record, store.folder, bar)
        finally:
            bar.close()
        claim()
        result = payload()
        store.write_results(result)
    return result
