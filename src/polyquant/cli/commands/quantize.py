"""``polyquant quantize``: check the whole plan, quantize, save (whole or not at all)."""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command, group, positive
from polyquant.cli.paths import check_model_arg, check_output, dir_bytes, read_text_arg, resume_dir_for, source_of
from polyquant.cli.render import err, out

log = logging.getLogger("polyquant.cli")

#: CPU-sized calibration defaults. On the default model (benchmarks/README.md, exact fp32 forwards,
#: one core) GPTQ W4 g64 act-order scored ppl 16.108 in 140 s with 32 x 512 tokens and 16.155 in
#: 446 s with 128 x 512: the larger set bought nothing for three times the time. (GPTQ's paper
#: default, 128 x 2048, would take about 35 minutes at one thread.)
CALIB_SAMPLES = 32
CALIB_SEQLEN = 512
AUTOCAST = {"auto": "auto", "float32": None, "bfloat16": "bfloat16"}
BUILTIN_CALIB = "built-in text (calibration slice, never evaluated)"


class Interrupted(Exception):
    """Ctrl-C during a command, with what the user can do about it (exit 130)."""


def _defaults_line() -> str:
    from polyquant.methods import list_methods
    from polyquant.methods.options import option_defaults
    parts = []
    for s in list_methods():
        d = option_defaults(s.config_cls)
        bits = d.get("bits", s.bits[0] if len(s.bits) == 1 else None)
        g = d.get("group_size")
        parts.append(s.name + (f" w{bits}" if bits is not None else "") +
                     ("" if g is None else " per-channel" if g == -1 else f" g{g}"))
    return ", ".join(parts)


def _description() -> str:
    return (f"Quantize MODEL with a method and save the checkpoint to -o DIR (written whole or not at all). "
            f"Before the first layer is touched, every distinct Linear shape is checked against the method, "
            f"the kernel and the format; a group size that does not fit the model and was not given is "
            f"replaced by the largest smaller one that fits (said on stderr), and a setting that cannot work "
            f"is refused with the reason. Defaults (bits, group size) per method: {_defaults_line()}. "
            f"Methods that use data calibrate on {CALIB_SAMPLES} x {CALIB_SEQLEN} tokens of the built-in "
            f"mix: half pydoc, half the enwiki excerpt, their calibration slices (seed 0). Expected cost on the default model at one thread: seconds "
            f"for the calibration-free methods; GPTQ W4 g64 about 2-3 minutes (125-140 s measured, "
            f"benchmarks/README.md), growing with samples x seqlen. Methods that use data keep per-block "
            f"checkpoints in .DIR.calibration-resume beside DIR: after Ctrl-C, rerunning the same command "
            f"resumes there; --overwrite clears one left by different settings. Flags a method has no field "
            f"for are refused; `polyquant methods --json` lists each method's options.")


def _args() -> list:
    return [
        arg("model", metavar="MODEL", help="'default', a local HF folder, or a .gguf file"),
        arg("--method", "-m", default="rtn", help="method name (default: rtn)"),
        arg("--bits", "-b", type=int, help="weight bits (default: the method's; see above)"),
        arg("--group-size", "-g", type=int,
            help="weights per scale (input columns; bitsandbytes' blocksize; N x N FP8 blocks), -1: per channel "
                 "(default: the method's, made to fit the model)"),
        group(arg("--sym", dest="sym", action="store_const", const=True, default=None, help="symmetric"),
              arg("--asym", dest="sym", action="store_const", const=False, help="asymmetric (zero points)")),
        arg("--act-order", action=argparse.BooleanOptionalAction, default=None,
            help="quantize columns in order of decreasing activation (GPTQ)"),
        arg("--clip-search", action=argparse.BooleanOptionalAction, default=None, help="search clipping ranges (RTN)"),
        arg("--format", "-f", help="checkpoint format (default: the method's first format)"),
        arg("--include", action="append", default=[], metavar="RE",
            help="quantize only modules whose name matches (repeatable)"),
        arg("--exclude", action="append", default=[], metavar="RE",
            help="keep modules whose name matches in float (repeatable)"),
        arg("--lm-head", action="store_true", help="also quantize the output head (kept float by default)"),
        arg("--kernel", default="auto", help="kernel to run the layers with, a runtime choice recorded in "
                                             "polyquant.json (default: auto)"),
        arg("--threads", type=positive, metavar="N",
            help="torch threads (default: OMP_NUM_THREADS, else the cores that are idle now: one on a busy "
                 "machine); recorded in polyquant.json"),
        arg("--calib-text", metavar="FILE", help="calibration text file, best from the domain the model will serve (default: "
                                                 "the pydoc + enwiki mix's calibration slices)"),
        arg("--calib-samples", type=positive, metavar="N",
            help=f"calibration sequences (default {CALIB_SAMPLES})"),
        arg("--calib-seqlen", type=positive, metavar="L",
            help=f"tokens per calibration sequence (default {CALIB_SEQLEN})"),
        arg("--seed", type=int, metavar="S", help="random seed (default 0)"),
        arg("--calib-dtype", choices=sorted(AUTOCAST), default="auto",
            help="dtype of the calibration forwards: auto (bf16 on a CUDA GPU, exact float32 on a CPU), "
                 "float32, bfloat16 (about 1.6x faster on CPUs with AMX; statistics stay float32)"),
        arg("--opt", action="append", default=[], metavar="KEY=VALUE",
            help="set any field of the method's config, e.g. --opt clip_grid=40 (repeatable)"),
        arg("-o", "--output", required=True, metavar="DIR", help="output folder"),
        arg("--overwrite", action="store_true",
            help="replace an existing output folder (and a resume folder left by different settings)"),
        arg("-q", "--quiet", action="store_true", help="no progress bars"),
        arg("--stream", action=argparse.BooleanOptionalAction, default=None,
            help="read, quantize and write one decoder layer at a time (memory bounded by one layer; resumable "
                 "from DIR.partial after any interruption). Default: streamed when the float model would not "
                 "fit in the memory available; recorded in polyquant.json"),
    ]


def _quiet_loaders() -> None:
    """Hide transformers' and huggingface_hub's own progress bars ("Loading weights")."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers absent or changed
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


def _values(args) -> dict:
    from polyquant.methods.options import config_values
    try:
        return config_values(args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                             act_order=args.act_order, clip_search=args.clip_search, include=args.include,
                             exclude=args.exclude, lm_head=args.lm_head, opts=args.opt)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_kernel(name: str) -> None:
    if name != "auto":
        from polyquant.kernels import get_kernel
        try:
            get_kernel(name)
        except ValueError as e:
            raise UsageError(str(e)) from None


@command("quantize", help="quantize a model and save a checkpoint", description=_description, args=_args, order=10)
def cmd_quantize(args) -> int:
    import torch

    import polyquant
    import polyquant.formats as formats
    from polyquant.cli.threads import apply_threads
    from polyquant.methods import get_method
    from polyquant.nn import kernel_summary

    values = _values(args)  # every check that needs no model comes first
    spec = get_method(args.method)
    try:
        config = spec.config_cls(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid {args.method} config: {e}") from None
    _check_kernel(args.kernel)
    check_model_arg(args.model, allow_checkpoint=False)
    out_dir = Path(args.output).expanduser()
    from polyquant.formats.partial import clear_stale_partial, partial_dir_for
    if clear_stale_partial(out_dir):
        err(f"polyquant: removed {partial_dir_for(out_dir)}, left by a finished run of {out_dir} killed before it "
            "cleaned up")
    check_output(out_dir, args.overwrite)
    fmt = args.format or spec.default_format
    if fmt not in formats.FORMATS:
        raise UsageError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(formats.FORMATS))}")
    if fmt not in spec.formats:
        raise UsageError(f"method {spec.name!r} results cannot be saved as {fmt!r}; its formats: {', '.join(spec.formats)}")
    calib_flags = {"--calib-text": args.calib_text, "--calib-samples": args.calib_samples,
                   "--calib-seqlen": args.calib_seqlen}
    if not spec.needs_calibration and any(v is not None for v in calib_flags.values()):
        log.warning("%s needs no calibration data; ignoring %s", spec.name,
                    ", ".join(k for k, v in calib_flags.items() if v is not None))
    calib_text = read_text_arg(args.calib_text, "--calib-text") if spec.needs_calibration else None
    threads = apply_threads(args.threads)
    if args.quiet:
        _quiet_loaders()

    from polyquant.cli.stream import choose, run_stream
    streaming, why = choose(args, spec, fmt, out_dir)
    if streaming:  # before the plan check's stand-in quantization: its heap would stay for the whole run
        from polyquant.formats.stream import bound_heap
        bound_heap(spec)
    skeleton = _skeleton(args.model)  # shapes from config.json: the plan is checked before the weights load
    if skeleton is not None:
        config = _plan(skeleton, config, values, fmt, args.kernel)
    log.info("%s (%s)", "streaming" if streaming else "in memory", why)
    if streaming:
        return run_stream(args, spec, config, fmt, out_dir, calib_text, threads, _calib_settings, Interrupted)
    t0 = time.perf_counter()
    model, tok = polyquant.load_model(args.model)
    if getattr(model, "polyquant", None) is not None:
        raise UsageError(f"{args.model} is already quantized")
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - t0)
    if skeleton is None:
        config = _plan(model, config, values, fmt, args.kernel)

    calibration, calib_record = None, None
    if spec.needs_calibration:
        if tok is None:
            raise UsageError(f"{spec.name} needs calibration data but {args.model} has no tokenizer")
        n, L = args.calib_samples or CALIB_SAMPLES, args.calib_seqlen or CALIB_SEQLEN
        seed = args.seed if args.seed is not None else 0
        samples = polyquant.calibration_data(tok, text=calib_text, n_samples=n, seqlen=L, seed=seed)
        from polyquant.calibration import Calibration
        from polyquant.calibration.data import default_sources
        ac = AUTOCAST[args.calib_dtype]
        calibration = Calibration(samples, resume_dir=resume_dir_for(out_dir),
                                  autocast=getattr(torch, ac) if ac == "bfloat16" else ac)
        calib_record = {"text": str(Path(args.calib_text).expanduser().resolve()) if args.calib_text else
                        BUILTIN_CALIB.replace("text", "texts " + "+".join(default_sources()), 1),
                        "samples": n, "seqlen": L, "seed": seed, "dtype": args.calib_dtype}
    torch.manual_seed(args.seed if args.seed is not None else 0)
    t1 = time.perf_counter()
    q = _quantize(model, config, calibration, args)
    quant_s = time.perf_counter() - t1
    rec = q.polyquant
    rec.source, rec.format = source_of(args.model), fmt
    rec.extra["runtime"] = {"kernel": args.kernel, **threads, "stream": False}
    if calib_record is not None:
        rec.extra["calibration"] = {**calib_record, **(rec.extra.get("calibration") or {})}
    saved = False
    try:
        _save(formats, q, out_dir, fmt, tok, args.overwrite)
        saved = True
        if calibration is not None:
            shutil.rmtree(calibration.resume_dir, ignore_errors=True)
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(kernel_summary(q).items()))
        out(f"quantized {len(rec.modules)} layers of {args.model} with {config.describe()} in {quant_s:.1f} s "
            f"({threads['threads']} thread(s))")
        out(f"saved {fmt} checkpoint to {out_dir} ({dir_bytes(out_dir) / 1e6:.1f} MB); kernels: {kernels}")
    except KeyboardInterrupt:
        if not saved:
            raise Interrupted(f"interrupted while saving; {out_dir} was not written" +
                              (f" (the calibrated blocks are kept in {calibration.resume_dir}: rerun the same "
                               "command to resume)" if calibration is not None else "")) from None
        err(f"polyquant: interrupted after the checkpoint was saved to {out_dir}; it is complete")
    return 0


def _calib_settings(args):
    """(samples, seqlen, seed, the built-in text's record) of a calibration run."""
    from polyquant.calibration.data import default_sources
    return (args.calib_samples or CALIB_SAMPLES, args.calib_seqlen or CALIB_SEQLEN,
            args.seed if args.seed is not None else 0,
            BUILTIN_CALIB.replace("text", "texts " + "+".join(default_sources()), 1))


def _plan(model, config, values: dict, fmt: str, kernel: str):
    """The plan check (``polyquant.formats.preflight``): the config to run, notes on stderr."""
    from polyquant.formats.preflight import PlanError, plan_config
    t0 = time.perf_counter()
    try:
        config, notes = plan_config(model, config, explicit=values, format=fmt, kernel=kernel)
    except PlanError as e:
        raise UsageError(str(e)) from None
    log.info("plan checked in %.2f s", time.perf_counter() - t0)
    for note in notes:
        err(f"polyquant: {note}")
    return config


def _skeleton(spec: str):
    """The model built from its config.json on the meta device (no weights read), or None when
    that is not cheap (a .gguf, the default model before its first conversion) or fails."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from polyquant import models
        if spec == "default":
            folder = models.cache_dir() / "gguf" / models._gguf_key(models.default_model_path())
        else:
            folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            return None
        cfg = AutoConfig.from_pretrained(str(folder))
        cls = models._model_class(cfg, False)
        with init_empty_weights():
            return cls.from_config(cfg) if hasattr(cls, "from_config") and cls.__name__.startswith("Auto") \
                else cls(cfg)
    except Exception as e:  # noqa: BLE001 - the loaded model is checked instead
        log.debug("no meta skeleton for %s: %s", spec, e)
        return None


def _save(formats, model, out_dir: Path, fmt: str, tok, overwrite: bool) -> None:
    """``formats.save`` (atomic: the folder is complete or absent); parents made for it are
    removed again when it fails."""
    made = [p for p in [out_dir.absolute().parent, *out_dir.absolute().parent.parents] if not p.exists()]
    empty = out_dir.is_dir() and not any(out_dir.iterdir())
    try:
        formats.save(model, out_dir, format=fmt, tokenizer=tok, overwrite=overwrite or empty)
    except BaseException:
        for p in made:  # innermost first, only while empty
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _quantize(model, config, calibration, args):
    import polyquant
    resume = getattr(calibration, "resume_dir", None)
    for attempt in (0, 1):
        try:
            return polyquant.quantize(model, config, calibration, inplace=True, show_progress=not args.quiet,
                                      kernel=args.kernel)
        except KeyboardInterrupt:
            if resume is not None and Path(resume).is_dir():
                raise Interrupted(f"interrupted; the finished calibration blocks are kept in {resume}: rerun the "
                                  "same command to resume from there (--overwrite clears it if the settings "
                                  "changed)") from None
            raise Interrupted(f"interrupted; nothing was written to {args.output}") from None
        except ValueError as e:
            stale = resume is not None and str(resume) in str(e)
            if not stale:
                raise
            if not args.overwrite or attempt:
                raise UsageError(f"{e} (or pass --overwrite to clear it)") from None
            log.warning("clearing the resume folder %s left by another run", resume)
            shutil.rmtree(resume, ignore_errors=True)
    raise AssertionError("unreachable")  # pragma: no cover
