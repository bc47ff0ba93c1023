"""Generic checkpoint save / load / inspection: everything that is the same for every format.

``save`` writes a Hugging Face model folder: ``config.json`` (the model config plus the format's
``quantization_config``), ``generation_config.json``, ``model.safetensors`` (float parameters of
the non-quantized modules, each quantized layer's tensors from the format, biases), the format's
extra files, the tokenizer, and ``polyquant.json`` (polyquant's own record: method, method
config, version). polyquant's record is a separate file rather than a key inside
``quantization_config`` because readers validate that dict (compressed-tensors' schemes forbid
unknown keys; its top level ignores them only "until transformers is compatible"), so an extra
key there could break them.

``load`` builds the model skeleton from config.json without allocating float weights, swaps in
the format's quantized layers (reading each layer's tensors lazily from safetensors), loads the
remaining float tensors, checks that nothing is missing, extra or misshapen, ties weights,
moves to the device and selects kernels. ``detect_format`` reads only config.json; the accounting
of every tensor is :mod:`polyquant.formats.accounting`, ``checkpoint_info`` :mod:`polyquant.formats.info`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.formats.accounting import (_account_for_tensors, _tied_keys, _under, check_layer_tensors,  # noqa: F401
                                          foreign_hint)
from polyquant.formats.act_rules import POLYQUANT_FILE, act_rule_record, apply_recorded_rule, recorded_rules
from polyquant.formats.base import FORMATS, CheckpointError, Format, get_format, list_formats
from polyquant.formats.io import (DEFAULT_MAX_SHARD_BYTES, SafetensorsIndex, atomic_dir, check_output_dir,
                                  read_config, read_json, write_json, write_safetensors)

__all__ = ["save", "load", "detect_format", "check_layer_tensors", "foreign_hint", "POLYQUANT_FILE", "act_rule_record"]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")


# -- helpers ----------------------------------------------------------------------------------
def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    from polyquant.nn.quant_linear import QuantLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _format_for_save(model: nn.Module, format: str | None) -> Format:
    rec = getattr(model, "polyquant", None)
    if format is not None:
        return get_format(format)
    from polyquant.methods import get_method
    try:
        return get_format(get_method(rec.method).default_format)
    except ValueError:
        if rec.format:  # e.g. a loaded foreign checkpoint: save back to the format it came from
            return get_format(rec.format)
        raise


def _version() -> str:
    from polyquant.version import __version__
    return __version__


def _config_dict(model: nn.Module, float_dtype: torch.dtype | None) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ValueError("save() needs a transformers model (it has no .config)")
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    if float_dtype is not None:
        d["dtype"] = str(float_dtype).removeprefix("torch.")
    return d


# -- save ---------------------------------------------------------------------------------------

def add_layer_tensors(fmt: Format, layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Each quantized layer's tensors as ``fmt`` stores them (``<layer>.<name>``), and its bias."""
    for name, m in layers.items():
        lt = fmt.layer_tensors(name, m)
        if "bias" in lt:
            raise ValueError(f"format {fmt.name!r} returned a 'bias' tensor for {name!r}; bias is saved generically")
        for k, t in lt.items():
            tensors[f"{name}.{k}"] = t
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = m.bias.detach()


def own_storage(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor detached, on the CPU, contiguous and in storage of its own (safetensors refuses
    two names over one buffer): in place."""
    ptrs: set[tuple] = set()
    for k in list(tensors):
        t = tensors[k].detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and key in ptrs:
            t = t.clone()
        elif key is not None:
            ptrs.add(key)
        tensors[k] = t.contiguous()


def write_config_files(tmp: Path, fmt: Format, model: nn.Module, config: dict[str, Any], extra: dict[str, Any],
                       record: dict[str, Any]) -> None:
    """config.json, generation_config.json, the format's extra files and polyquant.json, into ``tmp``."""
    write_json(tmp / "config.json", config)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_diff_dict"):
        write_json(tmp / "generation_config.json", gen.to_diff_dict())
    for fname, content in extra.items():
        if Path(fname).name != fname or fname in ("config.json", POLYQUANT_FILE):
            raise ValueError(f"format {fmt.name!r} asked to write a bad extra file name {fname!r}")
        if isinstance(content, (bytes, str)):
            (tmp / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        else:
            write_json(tmp / fname, content)
    write_json(tmp / POLYQUANT_FILE, record)


def save(model: nn.Module, out_dir: str | os.PathLike, format: str | None = None, tokenizer: Any = None,
         overwrite: bool = False, *, max_shard_size: int | None = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Save a polyquant-quantized model as a Hugging Face folder in an ecosystem format.

    Args:
        model: a model returned by ``polyquant.quantize`` (or ``polyquant.load``).
        out_dir: the folder to create (written to a temporary sibling, then renamed: a failure
            leaves nothing behind).
        format: a registered format name; default: the method's default format.
        tokenizer: optional tokenizer to save alongside.
        overwrite: replace an existing model folder (swapped out only once the new one is complete).
        max_shard_size: bytes per safetensors shard (transformers' layout with an index above it);
            None writes one file.

    Returns the output folder. Raises ValueError naming the layer when the format cannot store it.
    The in-memory model is never modified.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    rec = getattr(model, "polyquant", None)
    if rec is None:
        raise ValueError("save() takes a model quantized by polyquant (model.polyquant is missing); "
                         "save a float model with model.save_pretrained()")
    fmt = _format_for_save(model, format).for_model(model)
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("the model has no quantized (QuantLinear) layers to save")
    for name, m in layers.items():
        reason = fmt.check_layer(name, m.quantized_weight, m)
        if reason:
            raise ValueError(f"format {fmt.name!r} cannot store layer {name!r}: {reason}")

    # tensors (computed before anything is written)
    prefixes = tuple(n + "." for n in layers)
    tied = _tied_keys(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    float_dtype = None
    for k, t in model.state_dict().items():
        if _under(k, prefixes):
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            if k in tied or seen[ident] in tied:
                keep = seen[ident] if k in tied else k
                tensors.pop(seen[ident], None)
                tensors[keep] = t
                seen[ident] = keep
                continue
            t = t.clone()  # shared but not declared tied: store both
        else:
            seen[ident] = k
        tensors[k] = t
        if float_dtype is None and t.is_floating_point():
            float_dtype = t.dtype
    add_layer_tensors(fmt, layers, tensors)
    own_storage(tensors)

    qcfg = dict(fmt.quantization_config(model, layers))
    qcfg.setdefault("quant_method", fmt.quant_method)
    config = _config_dict(model, float_dtype)
    config["quantization_config"] = qcfg
    extra = fmt.extra_files(model, layers)
    record = {"polyquant_version": _version(), "method": rec.method, "config": rec.config, "format": fmt.name,
              "modules": sorted(layers)}
    if rec.source:  # the model it was quantized from ('default' or a resolved path)
        record["source"] = rec.source
    if rules := act_rule_record(layers):  # each layer's activation rule, as described (ActRule)
        record["act_rules"] = rules
    for key in ("calibration", "runtime", "global_finetune"):  # calibration settings; kernel and threads; fine-tuning
        if isinstance((rec.extra or {}).get(key), dict):
            record[key] = rec.extra[key]

    with atomic_dir(out, overwrite) as tmp:
        write_config_files(tmp, fmt, model, config, extra, record)
        write_safetensors(tmp, tensors, max_shard_size,
                          metadata={**fmt.safetensors_metadata(tensors, layers),
                                    "polyquant_version": _version(), "quant_format": fmt.name})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    log.info("saved %d quantized layers to %s (%s)", len(layers), out, fmt.name)
    return out


# -- detection ------------------------------------------------------------------------------------
def _find_format(qcfg: dict[str, Any]) -> Format | None:
    hits = [f for f in list_formats() if f.detect(qcfg)]
    if len(hits) > 1:
        log.debug("several formats claim this checkpoint: %s; using %s", [f.name for f in hits], hits[0].name)
    return hits[0] if hits else None


def _qcfg(config: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    qcfg = config.get("quantization_config")
    if qcfg is None:  # some tools mark quantized folders by a side file instead (quanto_qmap.json)
        for fmt in list_formats():
            implied = fmt.implied_config(folder)
            if implied is not None:
                return implied
        return None
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{folder}/config.json: quantization_config must be an object")
    return qcfg


def _unknown(qcfg: dict[str, Any]) -> CheckpointError:
    return CheckpointError(f"unknown quant_method {qcfg.get('quant_method')!r}: polyquant reads "
                           f"{', '.join(sorted(FORMATS))}")


def _implied_quantized(folder: Path) -> bool:
    """For ``polyquant.models``: a folder without a quantization_config that a format still
    recognises as quantized (its own side file or tensors)."""
    try:
        return any(fmt.implied_config(folder) is not None for fmt in list_formats())
    except CheckpointError:
        return True  # let the checkpoint loader report what is wrong with it


def _check_float_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """For ``polyquant.models``: before transformers reads a float folder, check from the headers
    that its tensors are exactly the model's (``_account_for_tensors``)."""
    index = SafetensorsIndex(folder)
    _account_for_tensors(folder, _skeleton(folder, read_config(folder), trust_remote_code), index, [])


def _register_with_models() -> None:
    from polyquant import models
    if _implied_quantized not in models.QUANTIZED_FOLDER_TESTS:
        models.QUANTIZED_FOLDER_TESTS.append(_implied_quantized)
    if _check_float_folder not in models.FOLDER_CHECKS:
        models.FOLDER_CHECKS.append(_check_float_folder)


_register_with_models()


def detect_format(path: str | os.PathLike) -> str | None:
    """The registered format of a checkpoint folder; None for a plain float model. Raises
    ``CheckpointError`` for an unreadable folder or a quant_method no format reads."""
    folder = Path(path)
    qcfg = _qcfg(read_config(folder), folder)
    if qcfg is None:
        return None
    fmt = _find_format(qcfg)
    if fmt is None:
        raise _unknown(qcfg)
    return fmt.name


def _read_record(folder: Path) -> dict[str, Any] | None:
    p = folder / POLYQUANT_FILE
    if not p.is_file():
        return None
    return read_json(p, "polyquant record")


# -- load -----------------------------------------------------------------------------------------
def _skeleton(folder: Path, config_dict: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{folder}/config.json is not a config transformers can read: {e}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # we build the quantized modules ourselves
    cls = None
    for arch in config_dict.get("architectures") or []:
        cls = getattr(transformers, str(arch), None)
        if cls is not None:
            break
    try:  # skip the (meta) weight init: every weight is loaded afterwards
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with init_empty_weights(include_buffers=False), no_init_weights():
        if cls is not None:
            return cls(config)
        if getattr(config, "auto_map", None) and not trust_remote_code:
            raise CheckpointError(f"{folder} needs code shipped with the model ({config_dict.get('architectures')}); "
                                  "polyquant does not run remote code unless trust_remote_code=True")
        from polyquant.models import _model_class
        auto = _model_class(config, trust_remote_code)
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # a broken tokenizer must not hide the model
        log.warning("could not load the tokenizer in %s: %s", folder, e)
        return None


def load(path: str | os.PathLike, kernel: str = "auto", device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    try:
        return _load(path, kernel, device, dtype, trust_remote_code)
    except CheckpointError as e:  # every refusal names the folder (or a file in it) and is one line
        msg = " ".join(str(e).split())
        if str(Path(path)) not in msg:
            raise CheckpointError(f"{path}: {msg}") from None
        if msg != str(e):
            raise CheckpointError(msg) from None
        raise


load.__doc__ = None  # set below from _load


def _load(path: str | os.PathLike, kernel: str = "auto", device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a quantized checkpoint folder (any registered format; a plain float folder loads via
    ``polyquant.models.load_model``). Returns ``(model, tokenizer)``; the tokenizer is None when
    the folder has none.

    Args:
        kernel: ``auto`` or a kernel name, selected per layer after moving to ``device``.
        device: where the model runs.
        dtype: dtype of the float (non-quantized) parameters and biases; quantized scales keep
            their stored dtype.
        trust_remote_code: allow model classes shipped with the checkpoint (off by default).

    Raises ``CheckpointError`` (a ValueError) for a missing, corrupt, foreign or inconsistent folder.
    """
    from polyquant.nn.quant_linear import QuantLinear
    from polyquant.nn.quantize import QuantRecord, replace_module

    folder = Path(path)
    config_dict = read_config(folder)
    qcfg = _qcfg(config_dict, folder)
    if qcfg is None:
        from polyquant.models import load_model
        index = SafetensorsIndex(folder)  # clear errors for missing / pickle-only / truncated weights
        skeleton = _skeleton(folder, config_dict, trust_remote_code)
        _account_for_tensors(folder, skeleton, index, [])  # every tensor, before any weight is read
        del index, skeleton
        model, tok = load_model(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device), tok
    fmt = _find_format(qcfg)
    if fmt is None:
        raise _unknown(qcfg)
    fmt = fmt.for_config(qcfg)
    record = _read_record(folder)
    index = SafetensorsIndex(folder)
    keys = index.keys()

    model = _skeleton(folder, config_dict, trust_remote_code)
    names = list(fmt.quantized_layers(qcfg, model, keys))
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), nn.Linear):
            raise CheckpointError(f"the checkpoint stores {n!r} quantized, but the model has no Linear layer "
                                  "of that name")
    expected, float_keys, tied = _account_for_tensors(folder, model, index, names)

    with index:
        for n in names:
            skel = modules[n]
            rel = {k[len(n) + 1:]: index.get(k) for k in keys if k.startswith(n + ".")}
            files = sorted({index.tensors[n + "." + k].file for k in rel})
            where = files[0] if len(files) == 1 else f"{folder} ({', '.join(f.name for f in files)})"
            try:
                new = fmt.load_layer(n, qcfg, rel, skel)
            except (ValueError, RuntimeError, KeyError, TypeError) as e:  # CheckpointError included
                msg = str(e) if isinstance(e, CheckpointError) else f"layer {n!r}: {e}"
                raise CheckpointError(f"{where}: {msg}") from None
            check_layer_tensors(fmt, n, rel, new, where=where)
            if getattr(new, "bias", None) is not None and new.bias.is_floating_point():
                new.bias.data = new.bias.data.to(dtype)
            replace_module(model, n, new)
        state: dict[str, torch.Tensor] = {}
        for k in sorted(float_keys & set(expected)):
            t = index.get(k)
            if t.is_floating_point() and expected[k].is_floating_point():
                t = t.to(dtype)
            elif t.dtype != expected[k].dtype:  # _account_for_tensors refused float <-> non-float already
                t = t.to(expected[k].dtype)
            state[k] = t
        model.load_state_dict(state, strict=False, assign=True)
        del state
        meta = index.metadata()
    if tied:
        model.tie_weights()
    still = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still:
        raise CheckpointError(f"{folder}: no tensor for {still[:5]}")
    model.to(device)
    model.eval()

    method = (record or {}).get("method") or fmt.name
    mconfig = (record or {}).get("config") or {}
    from polyquant.methods import get_method
    from polyquant.methods.registry import config_from_dict
    try:
        spec = get_method(method)
    except ValueError:
        spec = None
    rule, mcfg = (spec.act_rule if spec is not None else None), None
    if callable(rule) and mconfig:
        try:
            mcfg = config_from_dict(mconfig)
        except ValueError as e:
            log.warning("cannot rebuild %s activation quantization from polyquant.json: %s", method, e)
    recorded = recorded_rules(folder, record)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantLinear):
            m.method = method if spec is not None else (m.method or method)
            # the method's own activation rule (one per layer, as quantize_model builds them) replaces a
            # format's stateless one; an activation rule carrying a stored static scale is kept
            if mcfg is not None and getattr(m.act_quant, "scale", None) is None:
                m.act_quant = rule(mcfg)
            if n in recorded:  # polyquant.json's description of the layer's activation rule
                apply_recorded_rule(folder, n, m, recorded[n])
            m.set_kernel(kernel)
    written_by = _written_by(record, qcfg, meta)
    model.polyquant = QuantRecord(method, dict(mconfig), names, format=fmt.name, source=str(folder),
                                  extra={"quantization_config": qcfg, "written_by": written_by})
    gen_path = folder / "generation_config.json"
    if gen_path.is_file() and getattr(model, "generation_config", None) is not None:
        try:
            from transformers import GenerationConfig
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except Exception as e:
            log.warning("ignoring unreadable generation_config.json: %s", e)
    model.name_or_path = str(folder)
    return model, _load_tokenizer(folder, trust_remote_code)


load.__doc__ = _load.__doc__


def _written_by(record: dict[str, Any] | None, qcfg: dict[str, Any] | None, meta: dict[str, str]) -> str:
    if record and record.get("polyquant_version"):
        return f"polyquant {record['polyquant_version']}"
    if meta.get("polyquant_version"):
        return f"polyquant {meta['polyquant_version']}"
    if qcfg and qcfg.get("quant_method") == "compressed-tensors" and qcfg.get("version"):
        return f"foreign (compressed-tensors {qcfg['version']})"
    return "foreign"


