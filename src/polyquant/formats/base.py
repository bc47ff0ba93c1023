"""The format interface and registry.

A *format* turns a quantized model into the exact tensors and ``quantization_config`` that
another tool (transformers, vLLM, the original library) reads, and back. Formats know nothing
about algorithms: they see ``QuantLinear`` modules / ``QuantizedWeight`` objects only.

Saving (``polyquant.formats.save``) and loading (``polyquant.formats.load``) are generic and live
in :mod:`polyquant.formats.api`: they handle config.json, the non-quantized parameters, tokenizer,
atomic writes and detection; a format implements only the per-layer parts below.

Contract with the generic loader: ``load_layer`` receives every tensor stored under the layer's
prefix (relative keys, including ``bias``) and may build its ``QuantLinear`` with
``kernel="reference"``; the loader moves the model to the device and then selects the kernels
(and sets ``QuantLinear.method`` / ``act_quant`` from polyquant's own record when there is one).
Two optional hooks serve ``checkpoint_info`` (which reads config.json and tensor headers only,
without building a model): ``layers_from_keys`` and ``describe``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from polyquant.registry import add_entry, instance, lookup
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["Format", "LayerRefusal", "refusal", "register_format", "get_format", "list_formats", "FORMATS", "CheckpointError",
           "layer_names", "check_linears", "linears_with_key", "layer_bias", "float_dtype", "output_head_names",
           "require_tensors", "layer_weights", "plain_grid_reason", "checkpoint_group_size"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign in a way we cannot read, or inconsistent."""


class LayerRefusal(Exception):
    """Raised inside a format's saving helpers: this layer cannot be stored, and why (the message);
    ``check_layer`` turns it into its reason (:func:`refusal`)."""


def refusal(plan, *args) -> str | None:
    """``check_layer`` of a format that plans a layer with ``plan(*args)`` (raising
    :class:`LayerRefusal`): the refusal's message, or None when the plan succeeds."""
    try:
        plan(*args)
    except LayerRefusal as e:
        return str(e)
    return None


# Why a home tool is not exercised by the test suite, for the reasons several formats share.
GPU_SERVING_NOTE = "a GPU serving engine, not installable on this CPU-only test machine"
VIA_GPTQMODEL_NOTE = ("transformers 5 reads it through GPTQModel (+ optimum), which is not in the test extra "
                      "(not verified on a CPU)")


class Format:
    """Base class of an on-disk format.

    Attributes:
        name: registry name (``compressed-tensors``, ``gptq``, ``awq``, ``bitsandbytes`` ...).
        quant_method: the ``quantization_config.quant_method`` string it is detected by.
        readers: tools that load this format, verified by ``tests/interop`` (a row per tool).
        writers: tools that produce it, verified the same way.
        untested_readers / untested_writers: other tools, each with why it is not verified here.
    """

    name: str = ""
    quant_method: str = ""
    readers: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    #: tools that read / write the format but that ``tests/interop`` does not verify here, with the
    #: reason (not installable on a CPU, refuses the format, ...); ``readers`` / ``writers`` hold
    #: only what the interop suite verified, and are what ``polyquant formats`` prints
    untested_readers: dict[str, str] = {}
    untested_writers: dict[str, str] = {}
    description: str = ""

    # -- detection ------------------------------------------------------------------------
    def detect(self, qcfg: dict[str, Any]) -> bool:
        """Whether a ``quantization_config`` dict is in this format (default: quant_method match)."""
        return qcfg.get("quant_method") == self.quant_method

    # -- saving ---------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> "Format":
        """The format object that saves ``model`` (called first by ``save``). Default: ``self``; a
        format whose per-layer tensors depend on a model-level setting (AWQ's ``version``) returns
        a configured copy."""
        return self

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        """None if this format can store the layer; otherwise the reason it cannot."""
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors for one quantized module, keyed relative to the module (``weight_packed`` ...).
        ``module`` is a ``QuantLinear``; its bias (if any) is saved by the generic code as ``bias``."""
        raise NotImplementedError

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        """The ``quantization_config`` written into config.json."""
        raise NotImplementedError

    def extra_files(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        """Other JSON files to write next to config.json (e.g. GPTQ's ``quantize_config.json``)."""
        return {}

    #: names among ``extra_files`` that need every layer's tensors at once (hqq's ``qmodel.pt``):
    #: a streaming save, which releases each layer once it is written, leaves them out and records it
    whole_model_files: tuple[str, ...] = ()

    def layer_summary(self, name: str, module: nn.Module) -> QuantizedWeight:
        """What ``quantization_config`` / ``extra_files`` need of one layer once its tensors are
        written and the layer released (streaming saves keep this, not the layer): a
        ``QuantizedWeight`` that stands in for the layer's. Default: the layer's, with its codes
        (``data``, the bulk of it) reduced to their shape and dtype on the meta device; a format
        whose config reads the codes' values returns more."""
        qw = module.quantized_weight
        return QuantizedWeight.from_tensors(qw.qtype, qw.shape, qw.block,
                                            {**qw.tensors(), "data": torch.empty_like(qw.data, device="meta")})

    def safetensors_metadata(self, tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module]
                             ) -> dict[str, str]:
        """Extra string entries for the safetensors header of every shard, given the complete
        tensor dict being written (e.g. torchao's per-tensor subclass descriptions). Default none."""
        return {}

    # -- loading --------------------------------------------------------------------------
    def for_config(self, qcfg: dict[str, Any]) -> "Format":
        """The format object that reads (and, for the generic tensor check, re-writes) a checkpoint
        with this ``quantization_config``. Default ``self``; AWQ returns a copy for its layout."""
        return self

    def implied_config(self, folder: Any) -> dict[str, Any] | None:
        """For a folder whose config.json has no ``quantization_config``: the config this format
        reads it with when a file of its own marks the folder as quantized (default: None)."""
        return None

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        """Names of the Linear modules stored quantized in a checkpoint with these tensor keys.
        Default: every module that has a ``<name>.<marker>`` key for the marker tensor."""
        raise NotImplementedError

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        """Build the quantized module for ``name`` from its tensors (relative keys). ``module`` is
        the float skeleton (on the meta device: use only its shapes / class). Raise
        ``CheckpointError`` naming the layer and the problem if the tensors are inconsistent."""
        raise NotImplementedError

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        """The generic loader's check of every tensor read (``api.check_layer_tensors``): ``found``
        is the tensor stored under ``key``, ``written`` what this format's ``layer_tensors`` writes
        for the layer it built from them. None when they agree; otherwise a (possibly empty) note
        appended to the error. Default: shape and dtype must be equal. A format that reads
        documented variants (a byte view in another dtype, a legacy shape) accepts them here."""
        if tuple(found.shape) == tuple(written.shape) and found.dtype == written.dtype:
            return None
        return ""

    # -- inspection (optional; used by checkpoint_info) -------------------------------------
    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        """Names of the quantized modules judged from the tensor keys alone (no model built).
        Default None: the caller falls back to a dtype heuristic."""
        return None

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        """``bits`` / ``group_size`` / ``sym`` of a ``quantization_config`` for summaries (None where
        unknown). Default: the flat GPTQ/AWQ-style keys."""
        return {"bits": qcfg.get("bits", qcfg.get("w_bit")),
                "group_size": qcfg.get("group_size", qcfg.get("q_group_size")),
                "sym": qcfg.get("sym")}


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format | Callable[[], Format]) -> Format:
    f = instance(fmt)
    return add_entry(FORMATS, f.name, f, "format")


def get_format(name: str) -> Format:
    return lookup(FORMATS, name, "format")


def list_formats() -> list[Format]:
    return [FORMATS[k] for k in sorted(FORMATS)]


# -- helpers the formats' loaders share -----------------------------------------------------------

def layer_names(keys: set[str], marker: str) -> list[str]:
    """The modules that hold a tensor ``<module>.<marker>`` (sorted)."""
    return sorted({k[: -len(marker) - 1] for k in keys if k.endswith("." + marker)})


def check_linears(names: list[str], model: nn.Module, fmt: str) -> list[str]:
    """``names``, each checked to be a Linear of ``model`` (CheckpointError naming the first that is not)."""
    mods = dict(model.named_modules())
    for n in names:
        if not isinstance(mods.get(n), nn.Linear):
            raise CheckpointError(f"{fmt} tensors for {n!r}, but the model has no Linear layer of that name")
    return names


def linears_with_key(model: nn.Module, keys: set[str], suffix: str, fmt: str) -> list[str]:
    """The modules of ``model`` (in module order) that hold a tensor ``<module>.<suffix>``; one
    that is not a Linear is refused by name."""
    names = []
    for name, module in model.named_modules():
        if name and f"{name}.{suffix}" in keys:
            if not isinstance(module, nn.Linear):
                raise CheckpointError(f"{fmt} quantizes {name!r} ({type(module).__name__}); polyquant reads "
                                      "quantized Linear layers only")
            names.append(name)
    return names


def require_tensors(tensors: dict[str, torch.Tensor], keys: tuple[str, ...] | list[str],
                    fail: Callable[[str], Exception]) -> list[torch.Tensor]:
    """The tensors under ``keys``, in that order; ``fail(message)`` is raised for the first key missing."""
    for key in keys:
        if key not in tensors:
            raise fail(f"missing tensor {key!r}")
    return [tensors[key] for key in keys]


def layer_bias(tensors: dict[str, torch.Tensor], out_features: int, fail: Callable[[str], Exception],
               dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A layer's optional ``bias``: checked to be ``[out_features]`` (``fail(message)`` is raised
    otherwise), cast to ``dtype`` when one is given."""
    bias = tensors.get("bias")
    if bias is None:
        return None
    if tuple(bias.shape) != (out_features,):
        raise fail(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
    return bias if dtype is None else bias.to(dtype)


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's float ``weight`` (None when it has none)."""
    w = getattr(module, "weight", None)
    return w.dtype if w is not None and w.dtype.is_floating_point else None


def output_head_names(model: nn.Module) -> set[str]:
    """The module names of the model's output head (``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


# -- helpers the formats' savers share -------------------------------------------------------------

def layer_weights(layers: dict[str, nn.Module]) -> dict[str, QuantizedWeight]:
    """Each quantized layer's ``QuantizedWeight`` by name, for a ``quantization_config`` (ValueError
    when there is none: a config describes at least one layer)."""
    if not layers:
        raise ValueError("no quantized layers to describe")
    return {n: m.quantized_weight for n, m in layers.items()}


def plain_grid_reason(qw: QuantizedWeight, fmt: str) -> str | None:
    """Why ``fmt``, which stores codes and a float scale grid (and zero points) only, cannot take
    ``qw``: act-order, extra tensors, or non-float scales; None when it has none of them."""
    if qw.g_idx is not None or qw.extras:
        return f"act-order (g_idx) / extra tensors have no {fmt} equivalent"
    if not qw.scale.is_floating_point():
        return f"scale dtype {qw.scale.dtype}"
    return None


def checkpoint_group_size(qws: dict[str, QuantizedWeight], fmt: str) -> int:
    """The one ``group_size`` a ``fmt`` checkpoint stores for all its layers (-1: per channel).
    ValueError when the grouped layers use different sizes, or when a per-channel layer wider than
    that group stands beside them (a reader would split it into groups)."""
    grouped = {qw.group_columns for qw in qws.values() if qw.scale.shape[1] > 1}
    if len(grouped) > 1:
        raise ValueError(f"{fmt} stores one group_size per checkpoint; layers use {sorted(grouped)}")
    group_size = grouped.pop() if grouped else -1
    if group_size != -1:
        wide = [n for n, qw in qws.items() if qw.scale.shape[1] == 1 and qw.shape[1] > group_size]
        if wide:
            raise ValueError(f"layers {wide[:3]} are per-channel but others use group_size {group_size}")
    return group_size
