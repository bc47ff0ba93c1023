"""The FBGEMM FP8 checkpoint format (transformers ``quant_method: fbgemm_fp8``; read by transformers'
``FbgemmFp8Linear`` and vLLM's ``fbgemm_fp8``).

``config.json``::

    "quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                            "modules_to_not_convert": ["lm_head"]}

Per quantized Linear ``[out, in]``:

================  ==============  ============  =================================================
tensor            dtype           shape         content
================  ==============  ============  =================================================
``weight``        float8_e4m3fn   ``[out, in]``  codes ``q``
``weight_scale``  float32         ``[out, 1]``   per output channel; ``W = q * weight_scale``
``bias``          float           ``[out]``      optional
================  ==============  ============  =================================================

``input_scale_ub`` is a non-persistent buffer in transformers (never saved): the activation rule
is rebuilt from ``activation_scale_ub`` -- per token, ``amax`` clamped to ``[1e-12, ub]``,
``q = sat(x * 448 / amax)`` (:class:`polyquant.kernels.fp8.Fp8ActQuant`, recipe ``fbgemm``).

``modules_to_not_convert`` lists every Linear we keep in float, by full name: transformers adds
its default skips (the output head) only when the key is absent, and matches each entry as a
module-name prefix, a regex or a suffix. A Linear is read as quantized when it has a
``weight_scale`` tensor; one that does while ``modules_to_not_convert`` names it, or one that does
not while the config converts it, is refused (:func:`check_quantized_set`).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import GPU_SERVING_NOTE, CheckpointError, Format, layer_bias, register_format
from polyquant.kernels.fp8 import Fp8ActQuant
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["FbgemmFp8Format", "skipped_by", "float_linears", "check_fp8_tensors", "check_quantized_set"]

DEFAULT_UB = 1200.0


# -- shared with the fine-grained fp8 format ------------------------------------------------------
def skipped_by(name: str, patterns: list[str] | None) -> bool:
    """Whether transformers' ``should_convert_module`` keeps ``name`` in float: a pattern matches as
    a module-name prefix or regex up to a ``.`` boundary, or as a suffix."""
    for p in patterns or []:
        try:
            if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p):
                return True
        except re.error:
            if name == p or name.startswith(p + ".") or name.endswith(p):
                return True
    return False


def float_linears(model: nn.Module) -> list[str]:
    """Full names of the Linear layers kept in float (not QuantLinear)."""
    from polyquant.nn.quant_linear import QuantLinear
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]


def modules_to_not_convert(qcfg: dict[str, Any], where: str) -> list[str] | None:
    m = qcfg.get("modules_to_not_convert")
    if m is None:
        m = qcfg.get("ignored_layers")
    if m is None:
        return None
    if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
        raise CheckpointError(f"{where}: modules_to_not_convert must be a list of names, got {m!r}")
    return m


def check_quantized_set(model: nn.Module, qcfg: dict[str, Any], names: list[str], where: str,
                        scale_key: str) -> list[str]:
    """Cross-check the layers holding ``scale_key`` against the ones transformers converts: every
    Linear not kept in float by ``modules_to_not_convert`` (when absent: the output head). A layer to
    convert without a scale would have its float8 codes read as float weights; a kept one with a
    scale contradicts the config. Returns ``names``."""
    skip = modules_to_not_convert(qcfg, where)
    if skip is None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        skip_names = {n for n, m in model.named_modules() if head is not None and m is head}
        kept = lambda n: n in skip_names  # noqa: E731
    else:
        kept = lambda n: skipped_by(n, skip)  # noqa: E731
    have = set(names)
    for n in names:
        if skip is not None and kept(n):
            raise CheckpointError(f"{where}: {n!r} has a {scale_key} but modules_to_not_convert keeps it in float")
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n not in have and not kept(n):
            raise CheckpointError(f"{where}: layer {n!r} has no {scale_key}, but the config does not keep it in "
                                  "float (modules_to_not_convert)")
    return names


def check_fp8_tensors(fail, w: torch.Tensor, scale: torch.Tensor, out: int, inp: int, grid: tuple[int, int],
                      scale_name: str) -> torch.Tensor:
    """Validate an e4m3 ``weight`` and its fp32 scale grid; returns the scale shaped ``grid``."""
    if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (out, inp):
        raise fail(f"weight must be float8_e4m3fn [{out}, {inp}], got {w.dtype} {list(w.shape)}")
    if not scale.is_floating_point() or scale.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise fail(f"{scale_name} must be a float32/bf16/fp16 tensor, got {scale.dtype}")
    if scale.numel() != grid[0] * grid[1] or (scale.dim() == 2 and tuple(scale.shape) != grid):
        raise fail(f"{scale_name} has shape {list(scale.shape)}, expected {list(grid)}")
    s = scale.float().reshape(grid)
    if not bool(torch.isfinite(s).all()):
        raise fail(f"{scale_name} holds NaN or Inf values")
    if bool((s < 0).any()):
        raise fail(f"{scale_name} holds negative values")
    if bool(torch.isnan(w.float()).any()):
        raise fail("weight holds NaN codes")
    return s.contiguous()


def _ub(qcfg: dict[str, Any]) -> float:
    ub = qcfg.get("activation_scale_ub", DEFAULT_UB)
    if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not (math.isfinite(ub) and ub > 0):
        raise CheckpointError(f"fbgemm_fp8: activation_scale_ub must be a positive number, got {ub!r}")
    return float(ub)


def _fail(name: str):
    return lambda msg: CheckpointError(f"fbgemm_fp8 layer {name!r}: {msg}")


class FbgemmFp8Format(Format):
    name = "fbgemm_fp8"
    quant_method = "fbgemm_fp8"
    untested_readers = {"transformers": "transformers' fbgemm_fp8 needs a CUDA or XPU device (ImportError on a CPU)",
                        "vllm": GPU_SERVING_NOTE}
    untested_writers = {"transformers": "transformers' fbgemm_fp8 needs a CUDA or XPU device (ImportError on a CPU)"}
    description = "float8_e4m3fn weights with fp32 per-channel scales; fp8 per-token activations (FBGEMM)"

    # -- saving ---------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        if qw.qtype != "float8_e4m3fn":
            return f"fbgemm_fp8 stores float8_e4m3fn weights, got {qw.qtype}"
        if qw.block != (1, qw.shape[1]):
            return f"fbgemm_fp8 stores per-channel scales, got block {qw.block}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras have no fbgemm_fp8 equivalent"
        act = getattr(module, "act_quant", None)
        if not (isinstance(act, Fp8ActQuant) and act.recipe == "fbgemm" and act.group_size is None
                and not act.static):
            return ("fbgemm_fp8 readers always quantize activations per token (FBGEMM rule); this layer's "
                    f"activation rule is {act!r}")
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        return {"weight": qw.data.contiguous(), "weight_scale": qw.scale.detach().float().reshape(-1, 1).contiguous()}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        ubs = {m.act_quant.scale_ub if m.act_quant.scale_ub is not None else math.inf for m in layers.values()}
        if len(ubs) != 1 or not math.isfinite(next(iter(ubs))):
            raise ValueError("fbgemm_fp8 has one activation_scale_ub for the whole model; the layers use "
                             f"{sorted(ubs)}")
        return {"quant_method": self.quant_method, "activation_scale_ub": ubs.pop(),
                "modules_to_not_convert": float_linears(model)}

    # -- loading --------------------------------------------------------------------------
    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        return {"bits": 8, "group_size": -1, "sym": True, "weights": "float8_e4m3fn per channel",
                "activation_scale_ub": qcfg.get("activation_scale_ub", DEFAULT_UB)}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        _ub(qcfg)
        return check_quantized_set(model, qcfg, self.layers_from_keys(qcfg, keys) or [], "fbgemm_fp8",
                                   "weight_scale")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        fail = _fail(name)
        out, inp = module.out_features, module.in_features
        unexpected = sorted(set(tensors) - {"weight", "weight_scale", "bias", "input_scale_ub"})
        if unexpected:
            raise fail(f"unexpected tensor(s) {unexpected}")
        if "weight" not in tensors:
            raise fail("missing tensor 'weight'")
        scale = check_fp8_tensors(fail, tensors["weight"], tensors["weight_scale"], out, inp, (out, 1), "weight_scale")
        qw = QuantizedWeight.from_codes(tensors["weight"], "float8_e4m3fn", (1, inp), scale)
        bias = layer_bias(tensors, out, fail)
        return QuantLinear(qw, bias, kernel="reference", act_quant=Fp8ActQuant("fbgemm", None, _ub(qcfg)),
                           method="fbgemm-fp8")


register_format(FbgemmFp8Format)
