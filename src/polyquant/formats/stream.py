"""Streaming quantization: quantize a float safetensors folder into a checkpoint while holding
one unit (the embeddings, one decoder layer, the head ...) in memory at a time.

The model is a :class:`~polyquant.formats.lazy.LazyModel` (skeleton on the meta device). Units
are the repeated blocks and, outside them, each module that owns tensors, in module order. Per
unit: its tensors are read, its target Linears quantized (calibration-free methods per Linear,
data-dependent ones through the sequential driver, :class:`~polyquant.calibration.stream.SequentialRun`,
with the block's input activations the only state carried on), its output shard written, its
quantized layers replaced by the format's small per-layer summaries
(:meth:`~polyquant.formats.base.Format.layer_summary`) and its tensors released. The
checkpoint is transformers' sharded layout (one shard per unit plus
``model.safetensors.index.json``); its tensors are those :func:`polyquant.formats.save` writes
for the same model quantized in memory, bit for bit.

Crash safety: the work happens in ``OUT.partial`` (:mod:`polyquant.formats.partial`); the output
folder appears only when complete (hard links to the finished shards, atomic rename). A rerun with
the same arguments resumes after the last finished unit and writes the same files as an
uninterrupted run; other arguments or a changed source are refused with the differences named.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.formats.api import (_config_dict, _format_for_save, _quant_layers, _version, act_rule_record,
                                   add_layer_tensors, own_storage, write_config_files)
from polyquant.formats.base import Format
from polyquant.formats.io import INDEX_NAME, atomic_dir, check_output_dir, write_json
from polyquant.formats.lazy import LazyModel
from polyquant.formats.partial import PartialState, clear_stale_partial, partial_dir_for, source_fingerprint

__all__ = ["quantize_stream", "stream_refusal", "partial_dir_for"]

log = logging.getLogger(__name__)


def stream_refusal(spec, fmt: Format) -> str | None:
    """Why ``spec`` saved as ``fmt`` cannot be streamed (None when it can)."""
    if callable(spec.after_quantize):
        return f"{spec.name} calibrates the whole quantized model after quantizing it"
    if type(fmt).safetensors_metadata is not Format.safetensors_metadata:
        return f"format {fmt.name!r} writes shard metadata computed from every tensor of the model"
    return None


# -- units --------------------------------------------------------------------------------------
def _units(lazy: LazyModel, prefix: str, n_blocks: int) -> list[tuple[str, list[str]]]:
    """``(unit name, state-dict keys)`` in module order: each block, and each module outside the
    blocks that owns tensors."""
    owners: dict[str, list[str]] = {}
    for k in lazy.state_keys:
        if k.startswith(prefix + "."):
            owners.setdefault(".".join(k.split(".")[:prefix.count(".") + 2]), []).append(k)
        else:
            owners.setdefault(k.rpartition(".")[0], []).append(k)
    order = [n for n, _ in lazy.model.named_modules()]
    pos = {n: i for i, n in enumerate(order)}
    return sorted(owners.items(), key=lambda kv: pos.get(kv[0], len(order)))


def _written_keys(lazy: LazyModel, keys: list[str], qprefixes: tuple[str, ...]) -> list[str]:
    """The float keys ``save`` writes: not under a quantized layer, not a tied duplicate."""
    tied = lazy.tied if getattr(lazy.model.config, "tie_word_embeddings", False) else set()
    return [k for k in keys if not (qprefixes and k.startswith(qprefixes))
            and not (k in tied and lazy.source_key[k] != k)]


# -- summaries (what quantization_config needs of a released layer) -------------------------------
def _pack_summary(layers: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each finished layer's (summary weight, has bias, activation rule) as safetensors tensors and
    metadata; a rule is kept as its description plus its buffers (a static rule's scales)."""
    from polyquant.activations.base import rule_of
    tensors, meta = {}, {}
    for name, (qw, has_bias, act) in layers.items():
        fields, on_meta = {}, {}
        for f, t in qw.tensors().items():
            if t.is_meta:
                on_meta[f] = [str(t.dtype).replace("torch.", ""), list(t.shape)]
            else:
                tensors[f"{name}::{f}"] = t.detach().cpu().contiguous()
                fields[f] = True
        meta[name] = {"qtype": qw.qtype, "shape": list(qw.shape), "block": list(qw.block), "fields": sorted(fields),
                      "meta": on_meta, "bias": has_bias}
        rule = rule_of(act)
        if act is not None and rule is None:
            raise ValueError(f"layer {name!r}: its activation rule {type(act).__name__} has no description to resume from")
        if rule is not None:
            bufs = {b: t for b, t in act.named_buffers() if t is not None}
            tensors.update({f"{name}::act::{b}": t.detach().cpu().contiguous() for b, t in bufs.items()})
            meta[name]["act"] = {"rule": rule.to_dict(), "buffers": sorted(bufs)}
    return tensors, {"layers": json.dumps(meta, sort_keys=True)}


def _unpack_summary(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    from polyquant.activations.base import act_from_dict
    from polyquant.tensor.quantized_weight import QuantizedWeight
    out = {}
    for name, m in json.loads(metadata["layers"]).items():
        t = {f: tensors[f"{name}::{f}"] for f in m["fields"]}
        t.update({f: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for f, (dt, shape) in m["meta"].items()})
        act = None
        if m.get("act"):
            act = act_from_dict(m["act"]["rule"], **{b: tensors[f"{name}::act::{b}"] for b in m["act"]["buffers"]})
        out[name] = (QuantizedWeight.from_tensors(m["qtype"], tuple(m["shape"]), tuple(m["block"]), t), m["bias"], act)
    return out


def _stand_in(spec, qw, has_bias: bool, act) -> nn.Module:
    """A finished layer as its summary: what quantization_config / act_rules read, never run."""
    from polyquant.nn.quant_linear import QuantLinear
    bias = torch.empty(qw.shape[0], device="meta") if has_bias else None
    return QuantLinear(qw, bias, kernel="reference", act_quant=act, method=spec.name)


# -- the run ------------------------------------------------------------------------------------
def quantize_stream(source: str | os.PathLike, config, out_dir: str | os.PathLike, format: str | None = None,
                    calibration: Any = None, tokenizer: Any = None, overwrite: bool = False, *,
                    record: dict[str, Any] | None = None, autocast: Any = "auto", dtype: torch.dtype = torch.float32,
                    show_progress: bool = True, trust_remote_code: bool = False,
                    resume_args: dict[str, Any] | None = None, _after_unit=None) -> dict[str, Any]:
    """Quantize the float model of safetensors folder ``source`` with ``config`` into ``out_dir``,
    one unit at a time (see the module docstring). ``calibration``: token windows for methods that
    need data. ``record``: entries for ``polyquant.json`` (``source``, ``calibration``, ``runtime``).
    ``resume_args``: extra arguments the resume state must match (e.g. the calibration settings).
    Returns a summary (units, resumed units, seconds, per-Linear errors, output path)."""
    from polyquant.methods.registry import get_method
    from polyquant.nn.quantize import QuantRecord, _untie_if_needed, make_quant_linear, replace_module
    from polyquant.nn.select import find_blocks, select_linears
    from polyquant.progress import progress

    t0 = time.perf_counter()
    out = Path(out_dir)
    if clear_stale_partial(out):
        log.info("removed %s: left by a finished run killed before it cleaned up", partial_dir_for(out))
    check_output_dir(out, overwrite)
    spec = get_method(config.method)
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"{spec.name} needs calibration data")
    bound_heap(spec)
    lazy = LazyModel(source, dtype=dtype, trust_remote_code=trust_remote_code)
    model = lazy.model
    record = dict(record or {})
    targets = select_linears(model, config.include, config.exclude, config.quantize_lm_head)
    if not targets:
        raise ValueError("no Linear layer matched the include/exclude patterns")
    names = [n for n, _ in targets]
    del targets  # holding the Linear modules would keep every weight read into them alive
    _untie_if_needed(model, names)
    model.polyquant = QuantRecord(spec.name, config.to_dict(), names, format=format, source=record.get("source"))
    fmt = _format_for_save(model, format).for_model(model)
    reason = stream_refusal(spec, fmt)
    if reason:
        raise ValueError(f"cannot stream: {reason}; quantize it in memory")
    prefix, blocks = find_blocks(model)
    qprefixes = tuple(n + "." for n in names)
    units = [(u, keys) for u, keys in _units(lazy, prefix, len(blocks))
             if _written_keys(lazy, keys, qprefixes) or any(n == u or n.startswith(u + ".") for n in names)]
    shards = [f"model-{i + 1:05d}-of-{len(units):05d}.safetensors" for i in range(len(units))]
    run = None
    if spec.needs_calibration:
        from polyquant.calibration.stream import SequentialRun
        run = SequentialRun(model, spec, config, [(n, None) for n in names], calibration, autocast=autocast)
    samples_key = None
    if run is not None:
        from polyquant.calibration.checkpoint import _sha, _tensor_bytes
        samples_key = _sha([_tensor_bytes(v) for s in run.samples for _, v in sorted(s.items())])
    args = {"method": spec.name, "config": config.to_dict(), "format": fmt.name, "dtype": str(dtype),
            "calibration": samples_key, "autocast": run.autocast_name if run else None, **(resume_args or {})}
    state = PartialState(partial_dir_for(out), args, source_fingerprint(lazy.folder), [u for u, _ in units], shards)
    resumed = state.done
    if resumed:
        log.info("resuming %s from %s: %d of %d units done", out, state.folder, resumed, len(units))
    for i in range(state.done):  # finished layers come back as their summaries
        for name, (qw, has_bias, act) in _unpack_summary(*state.summary(i)).items():
            replace_module(model, name, _stand_in(spec, qw, has_bias, act))
    block_of = {f"{prefix}.{i}": i for i in range(len(blocks))}
    saved = state.calibration_state() if state.done else None  # where the interrupted run stopped
    if saved is not None and "rng" in saved:
        torch.set_rng_state(saved["rng"])
    captured = False
    with lazy:
        lazy.autoload(prefix)
        bar = progress(range(state.done, len(units)), desc=f"{spec.name} stream", enabled=show_progress)
        for u in bar:
            unit, keys = units[u]
            bar.set_postfix_str(unit)
            errs: dict[str, float] = {}
            unit_targets = [n for n in names if n == unit or n.startswith(unit + ".")]
            bi = block_of.get(unit)
            in_run = run is not None and (bi < run.n_run if bi is not None else bool(unit_targets))
            if in_run and not captured:
                first = units[_first_block(units, block_of)]
                swapped = _float_again(model, [n for n in names if n.startswith(first[0] + ".")])
                lazy.materialize(first[1])  # the capture runs block 0 once (in float: it may be done already)
                run.capture()
                for n, standin in swapped.items():
                    replace_module(model, n, standin)
                captured = True
                if saved is not None and "n_inputs" in saved:  # resuming: the next block's inputs
                    run.inputs = [saved[f"inputs.{j}"] for j in range(int(saved["n_inputs"]))]
                saved = None
                lazy.release([k for k in list(lazy.held) if k not in keys])
            lazy.materialize(keys)
            if in_run and bi is not None:
                errs = run.block(bi)
            elif in_run:
                errs = run.tail()
            else:
                for name in unit_targets:
                    lin = model.get_submodule(name)
                    qw = spec.quantize_weight(lin.weight.data, config, None)
                    replace_module(model, name, make_quant_linear(spec, config, qw, lin, kernel="reference"))
                    del lin, qw
            tensors, layers = _unit_tensors(lazy, fmt, keys, unit_targets, qprefixes)
            summary = {n: (fmt.layer_summary(n, m), m.bias is not None, m.act_quant) for n, m in layers.items()}
            calib = {"rng": torch.get_rng_state()}
            if run is not None and captured:
                calib.update({f"inputs.{j}": t.detach().cpu().contiguous() for j, t in enumerate(run.inputs)})
                calib["n_inputs"] = torch.tensor(len(run.inputs))
            meta = {"format": "pt", "polyquant_version": _version(), "quant_format": fmt.name}
            state.finish_unit(u, tensors, meta, _pack_summary(summary), calib, errs)
            del tensors, calib
            for n, (qw, has_bias, act) in summary.items():
                replace_module(model, n, _stand_in(spec, qw, has_bias, act))
            del layers, summary
            lazy.release(list(lazy.held))
            _return_freed_memory()
            if _after_unit is not None:
                _after_unit(u, lazy)
        bar.close()
    state.mark_assembled()
    _assemble(lazy, fmt, spec, config, names, state, out, overwrite, tokenizer, record, run)
    state.remove()  # a kill before this line leaves a stale state: clear_stale_partial removes it
    return {"out": out, "units": len(units), "resumed_units": resumed, "seconds": time.perf_counter() - t0,
            "errors": dict(state.errors), "layers": len(names), "format": fmt.name}


def _libc():
    """glibc's ``libc.so.6`` (None when the C library is not glibc)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    return _LIBC or None


def _return_freed_memory() -> None:
    """Hand the memory freed by a released unit back to the system (glibc's ``malloc_trim``).
    Without it glibc keeps freed tensor memory below its (adaptive) mmap threshold in the heap,
    where fragmentation grew the resident size by about 70 MB per decoder layer of the 1.5B
    benchmark model (2.7 GB peak after 26 layers instead of about 1.2 GB)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


#: allocations from this size on get their own memory map while streaming (see :func:`_bounded_heap`)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_heap(spec) -> None:
    """Fix the mmap threshold (:func:`_bounded_heap`) when method ``spec`` calibrates: RTN / HQQ meet
    their memory bound without it and page-fault 35% more with it. Call it before anything large is
    allocated: the plan check's stand-in quantization before a streamed GPTQ run left a 1784 MiB heap
    (1469 MiB of it free but resident) that the whole run then kept (2903 MiB peak on the 1.5B benchmark
    model instead of 2344 MiB). Idempotent."""
    if spec.needs_calibration:
        _bounded_heap()


def _bounded_heap() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the rest of the process.

    glibc raises the threshold each time a mapped block is freed, up to 32 MB, so that after the
    first layer every activation, weight slice and temporary under 32 MB comes from the heap; their
    interleaved lifetimes inside a block fragment it, and a GPTQ block of the 1.5B benchmark model
    peaked 0.45-1.0 GB above what it holds (2.9 GB at the first layer, 3.4 GB from the eleventh).
    A fixed threshold (which also turns the adaptation off) maps each tensor of 1 MiB or more on
    its own and unmaps it when freed: the same block peaks at 2.4 GB at every depth, in the same
    time. Process-wide and permanent (glibc has no way back to the adaptive threshold); nothing
    happens on other C libraries."""
    lib = _libc()
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_LIBC = None


def _float_again(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Put float (meta) Linears back where finished layers' stand-ins are; returns the stand-ins."""
    from polyquant.nn.quant_linear import QuantLinear
    from polyquant.nn.quantize import replace_module
    swapped = {}
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantLinear):
            swapped[n] = m
            replace_module(model, n, nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta"))
    return swapped


def _first_block(units, block_of) -> int:
    return next(i for i, (u, _) in enumerate(units) if block_of.get(u) == 0)


def _unit_tensors(lazy: LazyModel, fmt: Format, keys: list[str], unit_targets: list[str], qprefixes):
    """The unit's output tensors (float ones as ``save`` writes them, then each quantized layer's)."""
    model = lazy.model
    tensors: dict[str, torch.Tensor] = {}
    for k in _written_keys(lazy, keys, qprefixes):
        tensors[k] = lazy._current(k).detach()
    layers = {n: model.get_submodule(n) for n in unit_targets}
    for name, m in layers.items():
        reason = fmt.check_layer(name, m.quantized_weight, m)
        if reason:
            raise ValueError(f"format {fmt.name!r} cannot store layer {name!r}: {reason}")
    add_layer_tensors(fmt, layers, tensors)
    own_storage(tensors)
    return tensors, layers


def _float_dtype(lazy: LazyModel, qprefixes) -> torch.dtype | None:
    for k in _written_keys(lazy, lazy.state_keys, qprefixes):
        info = lazy.index.tensors[lazy.source_key[k]]
        if info.is_float:
            return lazy.dtype
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _assemble(lazy, fmt, spec, config, names, state: PartialState, out: Path, overwrite, tokenizer, record, run) -> None:
    """config.json, polyquant.json, index, extra files, tokenizer; the shards linked: then the atomic rename."""
    model = lazy.model
    layers = _quant_layers(model)
    if sorted(layers) != sorted(names):
        raise AssertionError(f"streaming finished with {len(layers)} quantized layers, expected {len(names)}")
    qcfg = dict(fmt.quantization_config(model, layers))
    qcfg.setdefault("quant_method", fmt.quant_method)
    cfg = _config_dict(model, _float_dtype(lazy, tuple(n + "." for n in names)))
    cfg["quantization_config"] = qcfg
    skipped = set(fmt.whole_model_files)
    try:
        extra = fmt.extra_files(model, layers)
    except Exception:  # noqa: BLE001 - a whole-model file cannot be built from the summaries
        if not skipped:
            raise
        extra = {}
    extra = {k: v for k, v in extra.items() if k not in skipped}
    rec = {"polyquant_version": _version(), "method": spec.name, "config": config.to_dict(), "format": fmt.name,
           "modules": sorted(layers)}
    if record.get("source"):
        rec["source"] = record["source"]
    if rules := act_rule_record(layers):  # each layer's activation rule, as ``save`` records it
        rec["act_rules"] = rules
    calib = dict(record.get("calibration") or {}) if run is not None else None
    if calib is not None:
        calib["autocast"] = run.autocast_name
        rec["calibration"] = calib
    rec["runtime"] = {**(record.get("runtime") or {}), "stream": True}
    if skipped:
        rec["stream_omitted"] = sorted(skipped)
    weight_map = {k: state.shards[i] for i in range(state.done) for k in state.unit_keys[i]}
    index = {"metadata": {"total_size": sum(state.unit_bytes)}, "weight_map": weight_map}
    with atomic_dir(out, overwrite) as tmp:
        write_config_files(tmp, fmt, model, cfg, extra, rec)
        for name in state.shards[:state.done]:
            _link_or_copy(state.folder / name, tmp / name)
        write_json(tmp / INDEX_NAME, index)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
