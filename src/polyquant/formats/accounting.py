"""Accounting for every tensor of a checkpoint folder, from the safetensors headers alone: the float
tensors a model skeleton expects outside its quantized layers (nothing missing, extra, misshapen or
stored as integers: :func:`_account_for_tensors`), and each quantized layer's tensors against what
its format writes (:func:`check_layer_tensors`); :func:`foreign_hint` names the tool that wrote
tensors nobody expects."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import CheckpointError, Format, list_formats
from polyquant.formats.io import SafetensorsIndex

__all__ = ["check_layer_tensors", "foreign_hint"]

log = logging.getLogger("polyquant.formats.api")


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that transformers ties to another key (e.g. ``lm_head.weight``)."""
    keys: set[str] = set()
    for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
        t = getattr(model, attr, None)
        if isinstance(t, dict):
            keys.update(t)
        elif isinstance(t, (list, tuple, set)):
            keys.update(str(k) for k in t)
    return keys


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and key.startswith(prefixes)


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def foreign_hint(keys: set[str] | list[str]) -> str:
    """What a set of tensor keys the model does not have looks like: the formats whose per-layer
    tensors they are (judged by each format's ``layers_from_keys``), or ''."""
    keys = set(keys)
    hits = []
    for fmt in list_formats():
        try:
            found = fmt.layers_from_keys({}, keys)
        except Exception:  # a format's key reader must not hide the real error
            found = None
        if found:
            hits.append((fmt.name, found))
    if not hits:
        return ""
    names = "/".join(n for n, _ in hits)
    layer = hits[0][1][0]
    sample = sorted(k[len(layer) + 1:] for k in keys if k.startswith(layer + "."))
    return (f"; these are {names} per-layer tensors (e.g. {layer!r}: {', '.join(sample[:4])}), but config.json has "
            f"no quantization_config that says so: this is a quantized checkpoint written without its config "
            f"(add the quantization_config the writing tool produces, or re-save it with that tool)")


def _account_for_tensors(folder: Path, model: nn.Module, index: SafetensorsIndex, names: list[str]
                         ) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """Check, from the safetensors headers alone, that the folder holds exactly the float tensors
    the model skeleton expects outside the quantized layers ``names``: nothing missing, nothing
    extra, every shape equal, no float parameter stored as integers. Raises ``CheckpointError``
    naming a few of the offending tensors and what they look like. Returns ``(expected, float_keys,
    tied)`` for the loader."""
    keys = index.keys()
    modules = dict(model.named_modules())
    prefixes = tuple(n + "." for n in names)
    expected = {k: v for k, v in model.state_dict().items() if not _under(k, prefixes)}
    persistent = set(model.state_dict())
    transient = {n for n, _ in model.named_buffers()} - persistent
    float_keys = {k for k in keys if not _under(k, prefixes)}
    extra = sorted(k for k in float_keys - set(expected) if k not in transient)
    if extra:
        hint = foreign_hint(extra) if not names else ""
        layer_hint = [k for k in extra if k.rsplit(".", 1)[0] in modules]
        if not hint and layer_hint and not layer_hint[0].endswith((".weight", ".bias")):
            hint = (f" (e.g. {layer_hint[0]!r}: quantized tensors for a layer the quantization_config does not "
                    "quantize)")
        raise CheckpointError(f"{folder}: {len(extra)} tensor(s) the model does not have: {_few(extra)}{hint}")
    tied = _tied_keys(model) if getattr(model.config, "tie_word_embeddings", False) else set()
    if tied and any(k.rsplit(".", 1)[0] in names for k in tied):
        # a quantized output head cannot share the float embedding: keep both, untied
        log.warning("%s: the config ties the output head, which is stored quantized; loading it untied", folder)
        model.config.tie_word_embeddings = False
        tied = set()
    missing = sorted(k for k in set(expected) - float_keys if k not in tied)
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {_few(missing)}: the model needs them and nothing is "
                              "initialised at random (a partial or foreign checkpoint)")
    for k in sorted(float_keys & set(expected)):
        info = index.tensors[k]
        if tuple(info.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{info.file}: tensor {k!r} has shape {list(info.shape)}, the model expects "
                                  f"{list(expected[k].shape)}")
        if expected[k].is_floating_point() != info.is_float:
            raise CheckpointError(f"{info.file}: tensor {k!r} is stored as {info.dtype}, the model expects a "
                                  f"{str(expected[k].dtype).removeprefix('torch.')} tensor")
    return expected, float_keys, tied


def _shape_dtype(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_layer_tensors(fmt: Format, name: str, found: dict[str, torch.Tensor], module: nn.Module,
                        where: Any = "") -> None:
    """The generic shape / dtype check of every quantized layer read: the format writes the layer
    it just built (``fmt.layer_tensors``) and every tensor it would write must have the shape and
    dtype of the tensor found under the same key (``fmt.tensor_mismatch`` may accept a documented
    variant, e.g. a byte view). A layout the format reads but cannot write is not compared."""
    if not found:
        return
    try:
        written = fmt.layer_tensors(name, module)
    except (ValueError, NotImplementedError, TypeError, KeyError, RuntimeError):
        return
    for k, ref in written.items():
        t = found.get(k)
        if t is None or not isinstance(ref, torch.Tensor):
            continue
        why = fmt.tensor_mismatch(k, t, ref)
        if why is not None:
            prefix = f"{where}: " if where else ""
            raise CheckpointError(f"{prefix}{fmt.name} layer {name!r}, tensor {k!r}: expected "
                                  f"{_shape_dtype(ref)}, found {_shape_dtype(t)}{why}")
