"""``polyquant quantize --stream``: the streaming path of the quantize command (one unit of the
model in memory at a time, resumable after any interruption; :mod:`polyquant.formats.stream`)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from polyquant.cli.base import UsageError
from polyquant.cli.paths import dir_bytes, source_of
from polyquant.cli.render import err, out

log = logging.getLogger("polyquant.cli")

def stream_folder(spec: str) -> Path | None:
    """The float safetensors folder a model spec streams from, or None (a .gguf or the default
    model before its one-time conversion, which the in-memory path does)."""
    from polyquant import models
    if spec == "default":
        try:
            folder = models.cache_dir() / "gguf" / models._gguf_key(models.default_model_path())
        except FileNotFoundError:
            return None
    elif Path(spec).expanduser().is_file():
        p = Path(spec).expanduser()
        folder = models.cache_dir() / "gguf" / models._gguf_key(p)
    else:
        folder = Path(spec).expanduser()
    return folder if (folder / "config.json").is_file() else None


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def float_bytes(folder: Path) -> int:
    """Bytes of the folder's float tensors as float32 (headers only)."""
    from polyquant.formats.io import SafetensorsIndex
    index = SafetensorsIndex(folder)
    return sum(4 * _numel(t.shape) for t in index.tensors.values() if t.is_float)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def choose(args, spec, fmt_name: str, out_dir: Path) -> tuple[bool, str]:
    """Whether to stream, and why (for the log). ``--stream`` that cannot work is a UsageError."""
    from polyquant.formats import get_format
    from polyquant.formats.partial import MANIFEST, partial_dir_for
    from polyquant.formats.stream import stream_refusal
    folder = stream_folder(args.model)
    reason = None if folder is not None else (
        "the model is a GGUF file not yet converted to safetensors" if args.model != "default"
        else "the default model is converted on its first load")
    reason = reason or stream_refusal(spec, get_format(fmt_name))
    if args.stream is False:
        return False, "--no-stream"
    if args.stream is True:
        if reason:
            raise UsageError(f"--stream: {reason}; quantize it in memory (--no-stream)")
        return True, "--stream"
    if reason:
        return False, reason
    if (partial_dir_for(out_dir) / MANIFEST).is_file():
        return True, f"resuming {partial_dir_for(out_dir)}"
    # the in-memory path holds the float model, the quantized one and the method's transient copies
    need, avail = float_bytes(folder) * spec.memory_factor, available_bytes()
    if avail is not None and need > avail:
        return True, (f"{spec.name} in memory needs about {need / 2**30:.1f} GiB ({spec.memory_factor:g}x the float32 "
                      f"model), {avail / 2**30:.1f} GiB available")
    return False, "the model fits in memory"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM interrupts like Ctrl-C (the resume state is consistent either way; this gets the message)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_stream(args, spec, config, fmt: str, out_dir: Path, calib_text, threads: dict, calib_defaults, interrupted):
    """Quantize by streaming; returns the exit code. ``interrupted``: the command's exception class
    for Ctrl-C (exit 130)."""
    import torch

    import polyquant
    from polyquant.formats.partial import ResumeMismatch, partial_dir_for
    from polyquant.formats.stream import quantize_stream
    folder = stream_folder(args.model)
    tok = None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - a folder without tokenizer files still quantizes
        log.warning("no tokenizer in %s (%s)", folder, e)
    samples, calib_record = None, None
    if spec.needs_calibration:
        if tok is None:
            raise UsageError(f"{spec.name} needs calibration data but {args.model} has no tokenizer")
        n, L, seed, builtin = calib_defaults(args)
        samples = polyquant.calibration_data(tok, text=calib_text, n_samples=n, seqlen=L, seed=seed)
        calib_record = {"text": str(Path(args.calib_text).expanduser().resolve()) if args.calib_text else builtin,
                        "samples": n, "seqlen": L, "seed": seed, "dtype": args.calib_dtype}
    autocast = {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16}[args.calib_dtype]
    record = {"source": source_of(args.model), "calibration": calib_record,
              "runtime": {"kernel": args.kernel, **threads}}
    partial = partial_dir_for(out_dir)
    torch.manual_seed(args.seed if args.seed is not None else 0)
    t1 = time.perf_counter()
    for attempt in (0, 1):
        try:
            with _sigterm_as_interrupt():
                res = quantize_stream(folder, config, out_dir, fmt, calibration=samples, tokenizer=tok,
                                      overwrite=args.overwrite, record=record, autocast=autocast,
                                      show_progress=not args.quiet, resume_args={"calibration_settings": calib_record})
            break
        except KeyboardInterrupt:
            raise interrupted(f"interrupted; {out_dir} was not written. The finished units are kept in {partial}: "
                              "rerun the same command to resume from there") from None
        except ResumeMismatch as e:
            if not args.overwrite or attempt:
                raise UsageError(str(e)) from None
            log.warning("discarding the resume state %s left by another run", partial)
            shutil.rmtree(partial, ignore_errors=True)
    if res["resumed_units"]:
        err(f"polyquant: resumed after {res['resumed_units']} of {res['units']} finished units in {partial}")
    out(f"quantized {res['layers']} layers of {args.model} with {config.describe()} in "
        f"{time.perf_counter() - t1:.1f} s, streamed ({res['units']} units, {threads['threads']} thread(s))")
    out(f"saved {fmt} checkpoint to {out_dir} ({dir_bytes(out_dir) / 1e6:.1f} MB)")
    return 0
