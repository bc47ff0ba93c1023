"""The ``polyquant`` command line: thin wrappers over the public API.

Commands: ``methods``, ``formats``, ``kernels`` (the registries), ``quantize``, ``eval``, ``info``,
``compare``, ``report``, ``convert``, ``matrix``, ``diagrams``, ``recommend``. Method options are generic: the
flags ``--bits``, ``--group-size``, ``--sym/--asym``, ``--act-order``, ``--clip-search`` and
``--opt key=value`` set fields of the chosen method's config dataclass (values converted from the
field's type), so a newly registered method needs no change here.

Errors print one line to stderr (``polyquant: error: ...``); bad usage or input exits with 2,
an unexpected failure with 1 (``--debug`` shows the traceback). Results go to stdout, logs and
progress bars to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "build_config", "UsageError"]

log = logging.getLogger("polyquant.cli")


class UsageError(Exception):
    """Bad usage or input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we report one line
        cmd = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{cmd + ': ' if cmd else ''}{message} (see {self.prog} --help)")


# -- output helpers ---------------------------------------------------------------------------

def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _json(obj: Any) -> None:
    from polyquant.report.store import to_jsonable
    _out(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            items += _flat(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v) if len(v) <= 12 else f"[{len(v)} items]"
    return str(v)


def _print_mapping(d: dict[str, Any]) -> None:
    rows = _flat(d)
    w = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        _out(f"{k.ljust(w)}  {_fmt_value(v)}")


# -- model / path checks ----------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_model_arg(spec: str, allow_checkpoint: bool = True) -> str:
    """Refuse, before any loading, what polyquant cannot load: a missing path, a hub id (no
    downloads), a folder without config.json, a non-GGUF file."""
    if spec == "default":
        return spec
    p = Path(spec).expanduser()
    if not p.exists():
        if _HUB_ID.match(spec):
            raise UsageError(f"{spec!r} is not a local path and polyquant does not download models: download it "
                             f"yourself and give the local folder (or 'default', or a .gguf file)")
        raise UsageError(f"model {spec!r} does not exist (give 'default', a local Hugging Face folder or a .gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UsageError(f"model {spec!r} is a file but not a .gguf (give a Hugging Face folder or a .gguf file)")
        return spec
    if not (p / "config.json").is_file():
        raise UsageError(f"model folder {spec!r} has no config.json: not a Hugging Face model folder")
    if not allow_checkpoint and _is_checkpoint(p):
        raise UsageError(f"{spec!r} is already a quantized checkpoint; give the unquantized model")
    return spec


def _is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / "config.json"
    if not (p.is_dir() and cfg.is_file()):
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def _source_of(spec: str) -> str:
    return "default" if spec == "default" else str(Path(spec).expanduser().resolve())


def _load(spec: str):
    """(model, tokenizer) for 'default', a HF folder, a .gguf, or a quantized checkpoint."""
    import polyquant
    if _is_checkpoint(spec):
        from polyquant.formats import load
        return load(spec)
    return polyquant.load_model(spec)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} already exists; pass --overwrite to replace it")
        if not (out / "config.json").is_file():  # a typo must not wipe an unrelated folder
            raise UsageError(f"refusing to overwrite {out}: it is not empty and not a model folder (no config.json)")


def _read_text_arg(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    from polyquant.data import load_text
    try:
        return load_text(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not a UTF-8 text file") from None


# -- method configs from flags ----------------------------------------------------------------

_GENERIC = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym", "act_order": "--act-order",
            "clip_search": "--clip-search"}


def _options(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert_value(raw: str, tp: Any, name: str) -> Any:
    """Convert a command-line string to a config field's type (``int``, ``float``, ``bool``,
    ``str``, ``X | None``, ``Literal``, ``list[X]`` / ``tuple[X, ...]`` as comma-separated or
    JSON, ``dict`` as JSON)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(raw, a, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: cannot read {raw!r} as {_type_name(tp)}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(f"{name} must be one of {list(args)}, got {raw!r}")
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on", "y"):
            return True
        if low in ("0", "false", "no", "off", "n"):
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if tp is str:
        return raw
    if origin in (list, tuple, set, frozenset):
        if raw.strip().startswith("["):
            try:
                items = json.loads(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a JSON list") from None
            items = [json.dumps(x) if not isinstance(x, str) else x for x in items]
        else:
            items = [x.strip() for x in raw.split(",")] if raw.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{name} needs {len(args)} comma-separated values, got {raw!r}")
            return tuple(convert_value(x, a, name) for x, a in zip(items, args))
        elem = args[0] if args else str
        vals = [convert_value(x, elem, name) for x in items]
        return origin(vals) if origin is not list else vals
    if origin is dict or tp is dict:
        try:
            val = json.loads(raw)
        except ValueError:
            raise ValueError(f"{name} must be a JSON object, got {raw!r}") from None
        if not isinstance(val, dict):
            raise ValueError(f"{name} must be a JSON object, got {raw!r}")
        return val
    try:  # anything else: JSON, else the string
        return json.loads(raw)
    except ValueError:
        return raw


def build_config(method: str, bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
                 act_order: bool | None = None, clip_search: bool | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, lm_head: bool = False, kernel: str | None = None,
                 opts: Sequence[str] = ()):
    """A validated config of ``method`` from generic flags and ``key=value`` options.
    Raises ``UsageError`` naming the problem."""
    from polyquant.methods import get_method
    try:
        spec = get_method(method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cls = spec.config_cls
    fields = _options(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable annotation: fall back to JSON/str
        hints = {}
    listing = ", ".join(sorted(fields))
    values: dict[str, Any] = {}
    for name, value in (("bits", bits), ("group_size", group_size), ("sym", sym), ("act_order", act_order),
                        ("clip_search", clip_search)):
        if value is None:
            continue
        if name not in fields:
            if name == "bits" and tuple(spec.bits) == (value,):
                continue  # a fixed-width method asked for its own width
            raise UsageError(f"method {method!r} has no option {_GENERIC[name]} ({name}); its options: {listing}")
        values[name] = value
    if include:
        values["include"] = list(include)
    if exclude:
        values["exclude"] = list(exclude)
    if lm_head:
        values["quantize_lm_head"] = True
    if kernel is not None:
        if kernel != "auto":
            from polyquant.kernels import get_kernel
            try:
                get_kernel(kernel)
            except ValueError as e:
                raise UsageError(str(e)) from None
        values["kernel"] = kernel
    for item in opts:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--opt needs key=value, got {item!r}")
        if key not in fields:
            raise UsageError(f"method {method!r} has no option {key!r}; its options: {listing}")
        try:
            values[key] = convert_value(raw, hints.get(key, Any), key)
        except ValueError as e:
            raise UsageError(f"--opt {item}: {e}") from None
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid {method} config: {e}") from None


# -- commands ---------------------------------------------------------------------------------

def _method_options(spec) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(spec.config_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def method_rows(markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    from polyquant.methods import list_methods
    headers = ["name", "family", "bits", "calibration", "formats (default first)", "activations", "description"]
    rows = []
    for s in list_methods():
        name = f"`{s.name}`" if markdown else s.name
        rows.append([name, s.family, ",".join(str(b) for b in s.bits), "yes" if s.needs_calibration else "no",
                     ", ".join(s.formats), s.activations, s.description])
    return headers, rows


def format_rows(markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    import polyquant.formats as formats
    headers = ["name", "quant_method", "readers", "description"]
    rows = [[f"`{f.name}`" if markdown else f.name, f.quant_method, ", ".join(f.readers), f.description]
            for f in formats.list_formats()]
    return headers, rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cmd_methods(args) -> int:
    from polyquant.methods import list_methods
    if args.json:
        _json([{"name": s.name, "family": s.family, "bits": list(s.bits), "needs_calibration": s.needs_calibration,
                "formats": list(s.formats), "default_format": s.default_format, "activations": s.activations,
                "description": s.description, "reference": s.reference, "options": _method_options(s)}
               for s in list_methods()])
    elif args.markdown:
        _out(markdown_table(*method_rows(markdown=True)))
    else:
        _out(text_table(*method_rows()))
    return 0


def cmd_formats(args) -> int:
    import polyquant.formats as formats
    if args.json:
        _json([{"name": f.name, "quant_method": f.quant_method, "readers": list(f.readers),
                "writers": list(f.writers), "description": f.description} for f in formats.list_formats()])
    elif args.markdown:
        _out(markdown_table(*format_rows(markdown=True)))
    else:
        _out(text_table(*format_rows()))
    return 0


def cmd_kernels(args) -> int:
    from polyquant.kernels import list_kernels
    ks = list_kernels()
    if args.json:
        _json([{"name": k.name, "devices": list(k.devices), "layouts": k.layouts, "fast": k.fast,
                "priority": k.priority} for k in ks])
    else:
        _out(text_table(["name", "devices", "layouts", "fast", "priority"],
                        [[k.name, ",".join(k.devices), k.layouts, "yes" if k.fast else "no", k.priority] for k in ks]))
    return 0


def _save_atomic(model, out: Path, fmt: str, tokenizer, overwrite: bool, source: str | None = None) -> Path:
    """Save into a hidden temporary folder next to ``out`` and move it into place, so ``out`` is
    either the complete checkpoint or untouched (never partial)."""
    from polyquant.formats import save
    out = out.absolute()
    missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    ok = False
    try:
        saved = Path(save(model, tmp / out.name, format=fmt, tokenizer=tokenizer))
        if source:
            _add_source(saved, source)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise UsageError(f"output folder {out} appeared while quantizing; pass --overwrite to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(saved, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(saved, out)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in missing:  # only folders we created, only if still empty
                try:
                    p.rmdir()
                except OSError:
                    break
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_quantize(args) -> int:
    import torch

    import polyquant
    from polyquant.methods import get_method
    from polyquant.nn import kernel_summary

    config = build_config(args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                          act_order=args.act_order, clip_search=args.clip_search, include=args.include,
                          exclude=args.exclude, lm_head=args.lm_head, kernel=args.kernel, opts=args.opt)
    spec = get_method(args.method)
    _check_model_arg(args.model, allow_checkpoint=False)
    out = Path(args.output).expanduser()
    _check_output(out, args.overwrite)
    fmt = args.format or spec.default_format
    import polyquant.formats as formats
    if fmt not in formats.FORMATS:
        raise UsageError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(formats.FORMATS))}")
    if fmt not in spec.formats:
        raise UsageError(f"method {spec.name!r} results cannot be saved as {fmt!r}; "
                         f"its formats: {', '.join(spec.formats)}")
    calib_flags = {"--calib-text": args.calib_text, "--calib-samples": args.calib_samples,
                   "--calib-seqlen": args.calib_seqlen}
    if not spec.needs_calibration and any(v is not None for v in calib_flags.values()):
        log.warning("%s needs no calibration data; ignoring %s", spec.name,
                    ", ".join(k for k, v in calib_flags.items() if v is not None))
    calib_text = _read_text_arg(args.calib_text, "--calib-text") if spec.needs_calibration else None

    t0 = time.perf_counter()
    model, tok = polyquant.load_model(args.model)
    if getattr(model, "polyquant", None) is not None:
        raise UsageError(f"{args.model} is already quantized")
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - t0)
    calibration = None
    if spec.needs_calibration:
        if tok is None:
            raise UsageError(f"{spec.name} needs calibration data but {args.model} has no tokenizer")
        kw = {k: v for k, v in (("n_samples", args.calib_samples), ("seqlen", args.calib_seqlen),
                                ("seed", args.seed)) if v is not None}
        samples = polyquant.calibration_data(tok, text=calib_text, **kw)
        # per-block checkpoints beside the output: a rerun with the same arguments resumes there
        resume_dir = Path(out).parent / f".{Path(out).name}.calibration-resume"
        from polyquant.calibration import Calibration
        ac = _AUTOCAST[args.calib_dtype]
        calibration = Calibration(samples, resume_dir=resume_dir, autocast=getattr(torch, ac) if ac == "bfloat16" else ac)
    torch.manual_seed(args.seed if args.seed is not None else 0)
    t1 = time.perf_counter()
    q = polyquant.quantize(model, config, calibration, inplace=True, show_progress=not args.quiet)
    quant_s = time.perf_counter() - t1
    q.polyquant.source = _source_of(args.model)
    q.polyquant.format = fmt
    saved = _save_atomic(q, out, fmt, tok, args.overwrite, source=q.polyquant.source)
    if calibration is not None:
        shutil.rmtree(calibration.resume_dir, ignore_errors=True)
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(kernel_summary(q).items()))
    _out(f"quantized {len(q.polyquant.modules)} layers of {args.model} with {config.describe()} in {quant_s:.1f} s")
    _out(f"saved {fmt} checkpoint to {saved} ({_dir_bytes(saved) / 1e6:.1f} MB); kernels: {kernels}")
    return 0


_AUTOCAST = {"auto": "auto", "float32": None, "bfloat16": "bfloat16"}
_RECORD_FILE = "polyquant.json"  # polyquant's own record in a checkpoint (see polyquant.formats.api)


def _recorded_source(path: str | Path) -> str | None:
    """The unquantized model a polyquant checkpoint was made from (``source`` in polyquant.json)."""
    p = Path(path) / _RECORD_FILE
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    src = rec.get("source") if isinstance(rec, dict) else None
    return src if isinstance(src, str) and src else None


def _add_source(folder: Path, source: str) -> None:
    """Record the source model in the checkpoint's polyquant.json (inside the not-yet-published
    temporary folder), unless the format writer already did."""
    p = folder / _RECORD_FILE
    if not p.is_file():
        return
    rec = json.loads(p.read_text())
    if isinstance(rec, dict) and not rec.get("source"):
        rec["source"] = source
        p.write_text(json.dumps(rec, indent=2) + "\n")


def cmd_eval(args) -> int:
    import polyquant
    from polyquant.nn import set_kernels

    _check_model_arg(args.model)
    if args.reference:
        _check_model_arg(args.reference, allow_checkpoint=False)
    text = _read_text_arg(args.text, "--text")
    model, tok = _load(args.model)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer files; evaluation needs one")
    if args.kernel:
        set_kernels(model, args.kernel)
    from polyquant.nn import runtime as rt
    if args.fuse:
        rt.fuse_projections(model)  # exact: the members' codes and scales concatenated
    if args.head_dtype:
        import torch
        rt.set_float_dtype(model, getattr(torch, args.head_dtype), scope="lm_head")
    reference = None
    if not args.no_reference:
        ref_spec = args.reference
        if ref_spec is None and _is_checkpoint(args.model):
            src = _recorded_source(args.model)
            if src == "default":
                ref_spec = "default"
            else:
                log.warning("no reference model for KL/top1 (checkpoint source: %s); pass --reference MODEL", src)
        if ref_spec is not None:
            reference, _ = polyquant.load_model(ref_spec)
    res = polyquant.evaluate(model, tok, text=text, seqlen=args.seqlen, max_windows=args.max_windows,
                             reference=reference, threads=args.threads, decode_tokens=args.decode_tokens,
                             measure_speed=not args.no_speed)
    res["runtime"] = rt.runtime_info(model)  # float compute dtype and fused groups, as measured
    if args.json:
        from polyquant.report.store import to_jsonable
        _out(json.dumps(to_jsonable(res), allow_nan=False))
    else:
        _print_mapping(res)
    return 0


def cmd_info(args) -> int:
    from polyquant.formats import checkpoint_info
    p = Path(args.checkpoint).expanduser()
    if not p.exists():
        raise UsageError(f"checkpoint {args.checkpoint!r} does not exist")
    if not p.is_dir():
        raise UsageError(f"checkpoint {args.checkpoint!r} is not a folder")
    if not (p / "config.json").is_file():
        raise UsageError(f"{args.checkpoint!r} has no config.json: not a Hugging Face checkpoint folder")
    info = checkpoint_info(p)
    if args.json:
        _json(info)
    else:
        _print_mapping(info)
    return 0


def _csv(kind: str):
    """An argparse type: a comma-separated list of names (``kind='str'``) or integers."""
    def parse(v: str) -> list:
        items = [x.strip() for x in v.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {v!r}")
        if kind == "str":
            return items
        try:
            return [int(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {v!r}") from None
    return parse


def _write_report_files(out: Path, result: dict) -> list[Path]:
    from polyquant.report.html import write_report
    return write_report(out, result)


def cmd_compare(args) -> int:
    from polyquant.report.compare import SUMMARY_HEADERS, build_runs, run_compare, summary_rows
    _check_model_arg(args.model, allow_checkpoint=False)
    text = _read_text_arg(args.text, "--text")
    calib_text = _read_text_arg(args.calib_text, "--calib-text")
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    try:
        runs, skipped = build_runs(args.methods, args.bits, args.group_sizes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for s in skipped:
        _err(f"polyquant: skipping {s['method']} {s['setting']}: {s['reason']}")
    if len(runs) < 2:
        raise UsageError("no setting of the chosen methods applies (see the skipped combinations above)")
    grid = args.bits is not None or args.group_sizes is not None
    run_list = ("grid" if grid else "headline") + ("" if args.methods is None else f" of {','.join(args.methods)}")
    t0 = time.perf_counter()
    result = run_compare(args.model, out, runs, text=text, text_name=args.text, seqlen=args.seqlen,
                         max_windows=args.max_windows, threads=args.threads, eval_threads=args.eval_threads,
                         decode_tokens=args.decode_tokens, slow_decode_tokens=args.slow_decode_tokens,
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, calib_text=calib_text,
                         calib_text_name=args.calib_text, skipped=skipped, run_list=run_list,
                         measure_speed=not args.no_speed, resume=not args.fresh, show_progress=not args.quiet)
    runs_done = result["runs"]
    failed = [r for r in runs_done if r.get("status") != "ok"]
    _out(text_table(SUMMARY_HEADERS, summary_rows(result)))
    windows_threads = f" ({args.eval_threads} for the windows)" if args.eval_threads else ""
    _out(f"\n{len(runs_done)} runs ({len(failed)} failed) on {args.model}, seqlen {args.seqlen}, "
         f"{args.max_windows} windows, {args.threads} thread(s){windows_threads}, "
         f"in {time.perf_counter() - t0:.0f} s; records: {out / 'results.json'}")
    paths = _write_report_files(out, result)
    _out(f"report: {out / 'report.html'} ({len(paths)} files written)")
    if failed:
        _err(f"polyquant: {len(failed)} run(s) failed: " + "; ".join(f"{r['name']}: {r.get('error')}" for r in failed))
        return 1
    return 0


def cmd_report(args) -> int:
    """Regenerate a sweep's report files from its results.json, without running anything."""
    folder = Path(args.dir).expanduser()
    path = folder / "results.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist (give the -o DIR of a polyquant compare run)")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        raise UsageError(f"{path} is not a polyquant compare results file (no 'runs' list)")
    paths = _write_report_files(folder, result)
    _out(f"wrote {folder / 'report.html'} and {len(paths) - 1} other files from {len(result['runs'])} records")
    return 0


def cmd_convert(args) -> int:
    """Dequantize a checkpoint into a plain float folder (``polyquant.convert.convert``)."""
    from polyquant.convert import convert
    p = Path(args.checkpoint).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise UsageError(f"{args.checkpoint!r} is not a checkpoint folder (no config.json)")
    out = Path(args.output).expanduser()
    _check_output(out, args.overwrite)
    t0 = time.perf_counter()
    convert(p, to=args.to, out_dir=out, overwrite=args.overwrite)
    _out(f"wrote {out} ({args.to}, {_dir_bytes(out) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_matrix(args) -> int:
    """The hardware compatibility matrix (``polyquant.report.matrix``): declared, and probed from a
    sweep's results.json when given."""
    from polyquant.report import matrix as mx
    from polyquant.report.advisor import load_results
    probed = mx.probed_matrix(load_results(args.results)) if args.results else None
    declared = mx.declared_matrix()
    if args.format == "json":
        _json({"devices": {d.key: {"label": d.label, "needs": d.needs} for d in mx.DEVICE_CLASSES},
               "declared": declared, "probed": probed})
    elif args.format == "html":
        _out(mx.matrix_html(declared, probed))
    else:
        _out("## Declared\n\n" + mx.matrix_markdown(declared))
        if probed is not None:
            _out(f"\n## Probed ({args.results})\n\n" + mx.matrix_markdown(probed))
    return 0


def cmd_diagrams(args) -> int:
    """The overview's diagrams (``polyquant.report.diagrams``): Mermaid on stdout, or files."""
    from polyquant.report.diagrams import DIAGRAM_NAMES, all_diagrams
    names = list(dict.fromkeys(args.names)) or list(DIAGRAM_NAMES)
    unknown = [n for n in names if n not in DIAGRAM_NAMES]
    if unknown:
        raise UsageError(f"unknown diagram {unknown[0]!r}; diagrams: {', '.join(DIAGRAM_NAMES)}")
    if args.output is None and args.format == "svg":
        raise UsageError("--format svg writes files: give -o DIR")
    diagrams = all_diagrams()
    if args.output is None:
        if len(names) == 1:
            _out(diagrams[names[0]].mermaid.rstrip())
        else:
            _out("\n".join(f"## {diagrams[n].title}\n\n```mermaid\n{diagrams[n].mermaid}```\n" for n in names).rstrip())
        return 0
    from polyquant.report.store import atomic_write_text
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["mermaid", "svg"] if args.format is None else [args.format]
    for n in names:
        for kind in kinds:
            path = out / f"{n}.{'mmd' if kind == 'mermaid' else 'svg'}"
            atomic_write_text(path, diagrams[n].mermaid if kind == "mermaid" else diagrams[n].svg)
            _out(f"wrote {path}")
    return 0


def cmd_recommend(args) -> int:
    """The advisor (``polyquant.report.advisor.recommend``); exit 1 when nothing qualifies."""
    from polyquant.report import advisor
    _check_model_arg(args.model)
    try:
        memory = advisor.parse_size(args.memory, "--memory")
        limit = (advisor.parse_ppl_increase(args.max_ppl_increase, "--max-ppl-increase")
                 if args.max_ppl_increase is not None else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    results = advisor.load_results(args.results) if args.results else None
    rec = advisor.recommend(args.model, args.device, memory, limit, results, capability=args.capability,
                            allow_reference=args.allow_reference)
    if args.json:
        _json(rec.to_dict())
    else:
        _out(rec.explain())
    if not rec.ok:
        _err(f"polyquant: no recommendation: {rec.reason}")
        return 1
    return 0


# -- the parser -------------------------------------------------------------------------------

def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from polyquant.methods import METHODS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="info logs")
    p = _Parser(prog="polyquant", parents=[common],
                description="Quantize Hugging Face models with many methods, save them in the ecosystem's "
                            "formats, and measure accuracy, size and speed. polyquant never downloads: "
                            "MODEL is 'default' (SmolLM2-135M-Instruct), a local HF folder or a .gguf file.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    for name, helptext, fn, md in (("methods", "list the quantization methods", cmd_methods, True),
                                   ("formats", "list the checkpoint formats", cmd_formats, True),
                                   ("kernels", "list the matmul kernels", cmd_kernels, False)):
        s = sub.add_parser(name, parents=[common], help=helptext, description=helptext + ".")
        s.add_argument("--json", action="store_true", help="print JSON")
        if md:
            s.add_argument("--markdown", action="store_true", help="print a Markdown table (README)")
        s.set_defaults(func=fn)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and save a checkpoint",
                       description="Quantize MODEL with a method and save the checkpoint to -o DIR (written "
                                   "whole or not at all). Methods: " + ", ".join(sorted(METHODS)) + ". Flags a "
                                   "method has no field for are refused; see `polyquant methods --json` for "
                                   "each method's options.")
    q.add_argument("model", metavar="MODEL", help="'default', a local HF folder, or a .gguf file")
    q.add_argument("--method", "-m", default="rtn", help="method name (default: rtn)")
    q.add_argument("--bits", "-b", type=int, help="weight bits")
    q.add_argument("--group-size", "-g", type=int, help="input columns per scale (-1: per channel)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_const", const=True, default=None, help="symmetric")
    g.add_argument("--asym", dest="sym", action="store_const", const=False, help="asymmetric (zero points)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize columns in order of decreasing activation (GPTQ)")
    q.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="search clipping ranges (RTN)")
    q.add_argument("--format", "-f", help="checkpoint format (default: the method's first format)")
    q.add_argument("--include", action="append", default=[], metavar="RE",
                   help="quantize only modules whose name matches (repeatable)")
    q.add_argument("--exclude", action="append", default=[], metavar="RE",
                   help="keep modules whose name matches in float (repeatable)")
    q.add_argument("--lm-head", action="store_true", help="also quantize the output head (kept float by default)")
    q.add_argument("--kernel", help="kernel to run the layers with (default: auto)")
    q.add_argument("--calib-text", metavar="FILE", help="calibration text file (default: the built-in text's "
                                                        "calibration slice)")
    q.add_argument("--calib-samples", type=_positive, metavar="N", help="calibration sequences")
    q.add_argument("--calib-seqlen", type=_positive, metavar="L", help="tokens per calibration sequence")
    q.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    q.add_argument("--calib-dtype", choices=sorted(_AUTOCAST), default="auto",
                   help="dtype of the calibration forwards: auto (bf16 on a CUDA GPU, exact float32 on a CPU), "
                        "float32, bfloat16 (about 1.6x faster on CPUs with AMX; statistics stay float32)")
    q.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field of the method's config, e.g. --opt clip_grid=40 (repeatable)")
    q.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity, KL / top-1 to the reference, size, speed",
                       description="Evaluate a model or quantized checkpoint: perplexity on the text, KL and "
                                   "top-1 agreement with the unquantized reference, weight size, decode speed.")
    e.add_argument("model", metavar="MODEL_OR_CKPT")
    e.add_argument("--text", metavar="FILE", help="evaluation text (default: the built-in pydoc text)")
    e.add_argument("--seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-windows", type=_positive, metavar="N", help="evaluate at most N windows")
    e.add_argument("--threads", type=_positive, metavar="N", help="torch threads")
    r = e.add_mutually_exclusive_group()
    r.add_argument("--reference", metavar="MODEL", help="unquantized model for KL / top-1 (default: the "
                                                        "checkpoint's recorded source when it is 'default')")
    r.add_argument("--no-reference", action="store_true", help="skip KL / top-1")
    e.add_argument("--decode-tokens", type=_positive, default=64, help="tokens to decode for speed (default 64)")
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    e.add_argument("--kernel", help="run quantized layers with this kernel (default: auto)")
    e.add_argument("--fuse", action="store_true",
                   help="run q/k/v and gate/up as one packed matmul each (exact; faster decode)")
    e.add_argument("--head-dtype", choices=("float32", "bfloat16"),
                   help="compute the float lm_head in this dtype (bfloat16 is a lossy float cast, not "
                        "quantization: faster decode, check the perplexity); recorded under 'runtime'")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", parents=[common], help="what is in a checkpoint",
                       description="Show a checkpoint's format, method, bits, group, layers and size.")
    i.add_argument("checkpoint", metavar="CKPT")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    from polyquant.report import compare as cmp
    c = sub.add_parser("compare", parents=[common], help="sweep methods and settings, write a report",
                       description="Run the unquantized baseline and a sweep of methods on MODEL, evaluate each "
                                   "the same way (same text, windows and threads), print a table and write DIR: "
                                   "results.json and runs.jsonl (one record per run), report.html (one "
                                   "self-contained page: sortable table, charts, compatibility matrices, "
                                   "diagrams), charts/ (PNG and SVG), matrix.md/.json and summary.md. With no "
                                   "--methods/--bits/--group-sizes every registered method runs at its headline "
                                   "setting (" + ", ".join(n for n, _, _ in cmp.HEADLINE) + "); --bits and/or "
                                   "--group-sizes run a grid per method instead, skipping the combinations a "
                                   "method refuses. Finished runs found in DIR are reused (an interrupted sweep "
                                   "resumes); a run that fails is recorded and the sweep goes on. The defaults "
                                   f"({cmp.DEFAULT_MAX_WINDOWS} windows of {cmp.DEFAULT_SEQLEN} tokens, "
                                   f"{cmp.DEFAULT_CALIB_SAMPLES} x {cmp.DEFAULT_CALIB_SEQLEN} calibration tokens, "
                                   f"{cmp.DEFAULT_DECODE_TOKENS} decode tokens, {cmp.SLOW_DECODE_TOKENS} on "
                                   "kernels that are not fast paths, 1 thread) keep the default sweep on the "
                                   "default model under 20 minutes on a 2-core CPU.")
    c.add_argument("model", metavar="MODEL", nargs="?", default="default", help="default: 'default'")
    c.add_argument("-o", "--output", default=cmp.DEFAULT_OUT, metavar="DIR",
                   help=f"output folder (default: {cmp.DEFAULT_OUT})")
    c.add_argument("--methods", type=_csv("str"), metavar="M1,M2",
                   help="methods to run (default: every registered method; fp32 always runs)")
    c.add_argument("--bits", type=_csv("int"), metavar="B1,B2", help="weight bit widths of the grid, e.g. 2,3,4,8")
    c.add_argument("--group-sizes", type=_csv("int"), metavar="G1,G2",
                   help="group sizes of the grid, e.g. 32,64,128 (-1: per channel)")
    c.add_argument("--seqlen", type=_positive, default=cmp.DEFAULT_SEQLEN,
                   help=f"tokens per window (default {cmp.DEFAULT_SEQLEN})")
    c.add_argument("--max-windows", type=_positive, default=cmp.DEFAULT_MAX_WINDOWS, metavar="N",
                   help=f"evaluation windows (default {cmp.DEFAULT_MAX_WINDOWS})")
    c.add_argument("--text", metavar="FILE", help="evaluation text (default: the built-in pydoc text)")
    c.add_argument("--calib-samples", type=_positive, default=cmp.DEFAULT_CALIB_SAMPLES, metavar="N",
                   help=f"calibration sequences for methods that use data (default {cmp.DEFAULT_CALIB_SAMPLES})")
    c.add_argument("--calib-seqlen", type=_positive, default=cmp.DEFAULT_CALIB_SEQLEN, metavar="L",
                   help=f"tokens per calibration sequence (default {cmp.DEFAULT_CALIB_SEQLEN})")
    c.add_argument("--calib-text", metavar="FILE", help="calibration text (default: the built-in text's "
                                                        "calibration slice, never evaluated)")
    c.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="torch threads for the speed measurement (default 1)")
    c.add_argument("--eval-threads", type=_positive, metavar="N",
                   help="torch threads for the perplexity/KL windows (default: --threads)")
    c.add_argument("--decode-tokens", type=_positive, default=cmp.DEFAULT_DECODE_TOKENS, metavar="N",
                   help=f"tokens to decode for speed (default {cmp.DEFAULT_DECODE_TOKENS})")
    c.add_argument("--slow-decode-tokens", type=_positive, default=cmp.SLOW_DECODE_TOKENS, metavar="N",
                   help=f"tokens to decode on kernels that are not fast paths (default {cmp.SLOW_DECODE_TOKENS})")
    c.add_argument("--no-speed", action="store_true", help="skip speed measurements")
    c.add_argument("--fresh", action="store_true", help="redo every run, ignoring finished ones in DIR")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", parents=[common], help="regenerate a sweep's report from its results.json",
                        description="Rewrite DIR/report.html, DIR/charts/, DIR/matrix.md/.json and DIR/summary.md "
                                    "from DIR/results.json (written by polyquant compare) without running anything.")
    rp.add_argument("dir", metavar="DIR", help="the output folder of a polyquant compare run")
    rp.set_defaults(func=cmd_report)

    v = sub.add_parser("convert", parents=[common], help="dequantize a checkpoint to a plain float folder",
                       description="Dequantize any checkpoint polyquant reads into a plain Hugging Face folder "
                                   "that transformers loads without a quantization config (activation "
                                   "quantization is dropped).")
    v.add_argument("checkpoint", metavar="CKPT")
    v.add_argument("--to", choices=("bf16", "fp16", "fp32"), default="bf16", help="float dtype (default bf16)")
    v.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    v.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    v.set_defaults(func=cmd_convert)

    mx = sub.add_parser("matrix", parents=[common], help="the hardware compatibility matrix",
                        description="For each registered method and bit width: can polyquant quantize it, run it "
                                    "with the reference kernel, and run it with a fast kernel on CPU / CUDA (with "
                                    "the minimum compute capability) / ROCm / Apple MPS / Intel XPU. With "
                                    "--results, also what actually ran in that sweep.")
    mx.add_argument("--format", "-f", choices=("markdown", "json", "html"), default="markdown",
                    help="output format (default markdown)")
    mx.add_argument("--results", metavar="RESULTS",
                    help="a sweep's results.json (or its folder): add the probed matrix")
    mx.set_defaults(func=cmd_matrix)

    dg = sub.add_parser("diagrams", parents=[common], help="technique map, pipeline and integration diagrams",
                        description="The overview's diagrams, generated from the registries: technique-map, "
                                    "pipeline, integration. Without -o: Mermaid on stdout (Markdown blocks, or "
                                    "raw Mermaid for one named diagram). With -o DIR: NAME.mmd and NAME.svg "
                                    "(rendered offline).")
    dg.add_argument("names", nargs="*", metavar="NAME", help="diagrams to emit (default: all)")
    dg.add_argument("-o", "--output", metavar="DIR", help="write the files here")
    dg.add_argument("--format", "-f", choices=("mermaid", "svg"),
                    help="only this format (default: Mermaid on stdout; both with -o)")
    dg.set_defaults(func=cmd_diagrams)

    rc = sub.add_parser("recommend", parents=[common], help="pick a method and setting for a memory budget",
                        description="Pick the method and setting whose weights fit --memory on --device with "
                                    "the least perplexity increase: from a sweep's measured results when given "
                                    "(--results), else from the registry's traits and a documented prior table. "
                                    "Prints the numbers used and every rejected option with the reason; exits 1 "
                                    "when nothing qualifies.")
    rc.add_argument("model", metavar="MODEL", nargs="?", default="default",
                    help="'default', a local HF folder (counted from config.json) or a .gguf (default: default)")
    rc.add_argument("--device", "-d", choices=("cpu", "cuda", "rocm", "mps", "xpu"), default="cpu",
                    help="where the model will run (default cpu)")
    rc.add_argument("--memory", "-m", required=True, metavar="SIZE",
                    help="memory budget for the weights: 4GB, 512MiB, or bytes")
    rc.add_argument("--max-ppl-increase", metavar="LIMIT", help="largest perplexity increase: 5%% or 0.05")
    rc.add_argument("--results", metavar="RESULTS", help="a sweep's results.json (or its folder)")
    rc.add_argument("--capability", metavar="X.Y", help="CUDA compute capability of the target GPU, e.g. 8.9")
    rc.add_argument("--allow-reference", action="store_true",
                    help="accept options only the (slow) reference kernel runs on the device")
    rc.add_argument("--json", action="store_true", help="print JSON")
    rc.set_defaults(func=cmd_recommend)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up per record, so captured streams work)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("polyquant")
    logger.setLevel(level)
    if not any(getattr(h, "_polyquant", False) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("polyquant: %(levelname)s: %(message)s"))
        h._polyquant = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.propagate = False


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg += f": {e.filename}"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad usage or input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _setup_logging("-v" in argv or "--verbose" in argv, debug)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        _err("polyquant: interrupted")
        return 130
    except UsageError as e:
        if debug:
            traceback.print_exc()
        _err(f"polyquant: error: {_one_line(e)}")
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        # bad input: a config the method refuses, a corrupt or foreign checkpoint (CheckpointError)
        if debug:
            traceback.print_exc()
        _err(f"polyquant: error: {_one_line(e)}")
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        _err(f"polyquant: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
