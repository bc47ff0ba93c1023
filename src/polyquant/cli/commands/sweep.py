"""``polyquant compare`` (a sweep of methods and settings, with its report) and ``polyquant report``."""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command, csv, positive
from polyquant.cli.paths import check_model_arg, check_output, read_text_arg
from polyquant.cli.render import err, out, text_table


def _description() -> str:
    from polyquant.report import compare as cmp
    return ("Run the unquantized baseline and a sweep of methods on MODEL, evaluate each the same way (same "
            "text, windows and threads), print a table and write DIR: results.json and runs.jsonl (one record "
            "per run), report.html (one self-contained page: sortable table, charts, compatibility matrices, "
            "diagrams), charts/ (PNG and SVG), matrix.md/.json and summary.md. With no --methods/--bits/"
            "--group-sizes every registered method runs at its headline setting (" +
            ", ".join(n for n, _, _ in cmp.HEADLINE) + "); --bits and/or --group-sizes run a grid per method "
            "instead, skipping the combinations a method refuses. Finished runs found in DIR are reused (an "
            "interrupted sweep resumes); a run that fails is recorded and the sweep goes on. The defaults "
            f"({cmp.DEFAULT_MAX_WINDOWS} windows of {cmp.DEFAULT_SEQLEN} tokens, {cmp.DEFAULT_CALIB_SAMPLES} x "
            f"{cmp.DEFAULT_CALIB_SEQLEN} calibration tokens, {cmp.DEFAULT_DECODE_TOKENS} decode tokens, "
            f"{cmp.SLOW_DECODE_TOKENS} on kernels that are not fast paths, 1 thread) keep the default sweep on "
            "the default model under 20 minutes on a 2-core CPU.")


def _args() -> list:
    from polyquant.report import compare as cmp
    return [
        arg("model", metavar="MODEL", nargs="?", default="default", help="default: 'default'"),
        arg("-o", "--output", default=cmp.DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {cmp.DEFAULT_OUT})"),
        arg("--methods", type=csv("str"), metavar="M1,M2",
            help="methods to run (default: every registered method; fp32 always runs)"),
        arg("--bits", type=csv("int"), metavar="B1,B2", help="weight bit widths of the grid, e.g. 2,3,4,8"),
        arg("--group-sizes", type=csv("int"), metavar="G1,G2", help="group sizes of the grid, e.g. 32,64,128 (-1: per channel)"),
        arg("--seqlen", type=positive, default=cmp.DEFAULT_SEQLEN, help=f"tokens per window (default {cmp.DEFAULT_SEQLEN})"),
        arg("--max-windows", type=positive, default=cmp.DEFAULT_MAX_WINDOWS, metavar="N",
            help=f"evaluation windows (default {cmp.DEFAULT_MAX_WINDOWS})"),
        arg("--text", metavar="FILE", help="evaluation text (default: the built-in pydoc text)"),
        arg("--calib-samples", type=positive, default=cmp.DEFAULT_CALIB_SAMPLES, metavar="N",
            help=f"calibration sequences for methods that use data (default {cmp.DEFAULT_CALIB_SAMPLES})"),
        arg("--calib-seqlen", type=positive, default=cmp.DEFAULT_CALIB_SEQLEN, metavar="L",
            help=f"tokens per calibration sequence (default {cmp.DEFAULT_CALIB_SEQLEN})"),
        arg("--calib-text", metavar="FILE", help="calibration text (default: the pydoc + enwiki mix's calibration "
                                                 "slices, never evaluated)"),
        arg("--threads", type=positive, default=1, metavar="N",
            help="torch threads for quantizing, the windows and the speed measurement (default 1: a sweep's "
                 "timings must not depend on what else runs; recorded in results.json)"),
        arg("--eval-threads", type=positive, metavar="N",
            help="torch threads for quantizing and the perplexity/KL windows (default: --threads; speed stays "
                 "at --threads)"),
        arg("--decode-tokens", type=positive, default=cmp.DEFAULT_DECODE_TOKENS, metavar="N",
            help=f"tokens to decode for speed (default {cmp.DEFAULT_DECODE_TOKENS})"),
        arg("--slow-decode-tokens", type=positive, default=cmp.SLOW_DECODE_TOKENS, metavar="N",
            help=f"tokens to decode on kernels that are not fast paths (default {cmp.SLOW_DECODE_TOKENS})"),
        arg("--no-speed", action="store_true", help="skip speed measurements"),
        arg("--fresh", action="store_true", help="redo every run: DIR's earlier records move to DIR/previous/"),
        arg("--executor", choices=("local", "ray"), default="local",
            help="where the runs execute: local (default: one after the other in this process) or ray (each run a "
                 "Ray task asking --threads CPUs, records streamed into DIR; needs pip install polyquant[ray])"),
        arg("--address", metavar="ADDR",
            help="the Ray cluster to join with --executor ray (auto, HOST:PORT, ray://HOST:PORT; default: start a "
                 "local cluster)"),
        arg("-q", "--quiet", action="store_true", help="no progress bar"),
    ]


def _write_report_files(folder: Path, result: dict) -> list[Path]:
    from polyquant.report.html import write_report
    return write_report(folder, result)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the sweep like Ctrl-C (clean-up runs, the finished runs are kept either way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def _run(folder: Path, fn, *a, **kw):
    from polyquant.cli.commands.quantize import Interrupted
    try:
        return fn(*a, **kw)
    except KeyboardInterrupt:
        jsonl = folder / "runs.jsonl"
        kept = sum(1 for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()) if jsonl.is_file() else 0
        raise Interrupted(f"interrupted; {jsonl} keeps the {kept} finished run record(s): rerun the same command to "
                          "resume") from None


@command("compare", help="sweep methods and settings, write a report", description=_description, args=_args,
         order=30)
def cmd_compare(args) -> int:
    from polyquant.report.compare import SUMMARY_HEADERS, build_runs, run_compare, summary_rows
    if args.address is not None and args.executor != "ray":
        raise UsageError("--address is for --executor ray (the local executor runs in this process)")
    if args.executor == "ray":
        from polyquant.report.executors import ExecutorUnavailable, RayExecutor
        try:
            RayExecutor(address=args.address).check()
        except (ExecutorUnavailable, ValueError) as e:
            raise UsageError(str(e)) from None
    check_model_arg(args.model, allow_checkpoint=False)
    text = read_text_arg(args.text, "--text")
    calib_text = read_text_arg(args.calib_text, "--calib-text")
    folder = Path(args.output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output {folder} exists and is not a folder")
    if not folder.exists():
        check_output(folder, overwrite=False)  # a writable parent (an existing sweep folder resumes)
    try:
        runs, skipped = build_runs(args.methods, args.bits, args.group_sizes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for s in skipped:
        err(f"polyquant: skipping {s['method']} {s['setting']}: {s['reason']}")
    if len(runs) < 2:
        raise UsageError("no setting of the chosen methods applies (see the skipped combinations above)")
    grid = args.bits is not None or args.group_sizes is not None
    run_list = ("grid" if grid else "headline") + ("" if args.methods is None else f" of {','.join(args.methods)}")
    t0 = time.perf_counter()
    with _sigterm_as_interrupt():
        result = _run(folder, run_compare, args.model, folder, runs, text=text, text_name=args.text,
                      seqlen=args.seqlen, max_windows=args.max_windows, threads=args.threads,
                      eval_threads=args.eval_threads, decode_tokens=args.decode_tokens,
                      slow_decode_tokens=args.slow_decode_tokens, calib_samples=args.calib_samples,
                      calib_seqlen=args.calib_seqlen, calib_text=calib_text, calib_text_name=args.calib_text,
                      skipped=skipped, run_list=run_list,
                      measure_speed=not args.no_speed, resume=not args.fresh, show_progress=not args.quiet,
                      executor=args.executor, address=args.address)
    runs_done = result["runs"]
    failed = [r for r in runs_done if r.get("status") != "ok"]
    out(text_table(SUMMARY_HEADERS, summary_rows(result)))
    windows_threads = f" ({args.eval_threads} for the windows)" if args.eval_threads else ""
    out(f"\n{len(runs_done)} runs ({len(failed)} failed) on {args.model}, seqlen {args.seqlen}, "
        f"{args.max_windows} windows, {args.threads} thread(s){windows_threads}, "
        f"in {time.perf_counter() - t0:.0f} s; records: {folder / 'results.json'}")
    paths = _write_report_files(folder, result)
    out(f"report: {folder / 'report.html'} ({len(paths)} files written)")
    if failed:
        err(f"polyquant: {len(failed)} run(s) failed: " + "; ".join(f"{r['name']}: {r.get('error')}" for r in failed))
        return 1
    return 0


@command("report", help="regenerate a sweep's report from its results.json", order=31,
         description="Rewrite DIR/report.html, DIR/charts/, DIR/matrix.md/.json and DIR/summary.md from "
                     "DIR/results.json (written by polyquant compare) without running anything.",
         args=[arg("dir", metavar="DIR", help="the output folder of a polyquant compare run")])
def cmd_report(args) -> int:
    from polyquant.report.advisor import load_results
    folder = Path(args.dir).expanduser()
    path = folder / "results.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist (give the -o DIR of a polyquant compare run)")
    try:
        result = load_results(path)  # refuses a file that is not JSON or has no 'runs' list
    except ValueError as e:
        raise UsageError(str(e)) from None
    paths = _write_report_files(folder, result)
    out(f"wrote {folder / 'report.html'} and {len(paths) - 1} other files from {len(result['runs'])} records")
    return 0
