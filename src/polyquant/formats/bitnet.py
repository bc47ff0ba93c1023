"""The BitNet format (``quant_method: bitnet``; transformers' ``BitNetQuantConfig``, read by its
``BitLinear`` and ``AutoBitLinear``, written by Microsoft's BitNet converters and polyquant).

``quantization_config``: ``{"quant_method": "bitnet", "linear_class": "bitlinear" | "autobitlinear",
"quantization_mode": "offline" | "online", "use_rms_norm": bool, "rms_norm_eps": 1e-6,
"modules_to_not_convert": [...]}``. transformers converts *every* ``nn.Linear`` not matched by
``modules_to_not_convert`` (a name matches from its start up to a module boundary, as a regex, or as a
suffix), so polyquant lists every float Linear there, the output head included.

Per converted Linear ``[out, in]`` (offline):

===================  =======  ===================  =========================================================
tensor               dtype    shape                content
===================  =======  ===================  =========================================================
``weight``           uint8    ``[ceil(out/4), in]``  4 ternary values per byte, ``value + 1`` in 2 bits; the
                                                   output rows in 4 chunks of ``R = ceil(out/4)``: byte
                                                   ``[r, k]`` holds rows ``r, R+r, 2R+r, 3R+r`` of column ``k``
                                                   in bits ``0-1, 2-3, 4-5, 6-7``
``weight_scale``     float    ``[1]``              ``bitlinear``: the multiplier ``1 / mean|W|`` (the layer
                                                   computes ``(q_x @ W_q^T) / (s_x * weight_scale)``);
                                                   ``autobitlinear``: ``mean|W|`` (``(x_q @ W_q^T + b) *
                                                   weight_scale``, so its bias is scaled too)
``rms_norm.weight``  float    ``[in]``             only with ``use_rms_norm``: the input RMSNorm's weight
``bias``             float    ``[out]``            optional
===================  =======  ===================  =========================================================

``online`` mode (AutoBitLinear for training) stores float ``weight`` tensors ternarized on every forward
pass; polyquant reads such a folder by ternarizing each weight once with the same absmean rule.

Both linear classes load to the same layer: ternary codes with the dequantization scale ``mean|W|``
(for ``bitlinear`` the float32 reciprocal of the stored multiplier, chosen so that the kernel's
``1 / scale`` gives the stored value back) and BitLinear's activation rule. Writing uses the class the
method config names (``linear_class``; a loaded checkpoint keeps its own; default ``autobitlinear``, the
class of Microsoft's BitNet b1.58 2B4T). Only per-tensor ternary layers with BitLinear's activation rule
can be stored, with ``out_features`` divisible by 4 (transformers' ``BitLinear`` allocates
``[out // 4, in]`` and ``AutoBitLinear`` unpacks only ``4 * rows == out``); ``autobitlinear`` layers with
a bias are refused (it scales the bias by ``weight_scale``: write ``bitlinear`` for them).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import CheckpointError, Format, linears_with_key, register_format
from polyquant.activations.bitnet import BitNetActivation
from polyquant.kernels.cpu_ternary import weight_multiplier
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["BitNetFormat", "pack_bitnet", "unpack_bitnet", "should_convert", "LINEAR_CLASSES", "DEFAULT_CLASS"]

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
MODES = ("offline", "online")
DEFAULT_CLASS = "autobitlinear"
_KNOWN_KEYS = {"quant_method", "linear_class", "quantization_mode", "use_rms_norm", "rms_norm_eps",
               "modules_to_not_convert"}


def pack_bitnet(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``[out, in]`` (uint8 ``value + 1`` in 0..2) -> BitNet's ``weight`` uint8 ``[ceil(out/4), in]``."""
    out = codes.shape[0]
    r = -(-out // 4)
    c = codes.to(torch.uint8)
    packed = torch.zeros((r, *codes.shape[1:]), dtype=torch.uint8)
    for i in range(4):
        chunk = c[i * r: min((i + 1) * r, out)]
        packed[: chunk.shape[0]] |= chunk << (2 * i)
    return packed


def unpack_bitnet(packed: torch.Tensor, out: int) -> torch.Tensor:
    """BitNet's ``weight`` uint8 ``[R, in]`` -> codes ``[out, in]`` (uint8 ``value + 1``; rows past
    ``out`` in the last chunks are padding and dropped)."""
    p = packed.to(torch.uint8)
    return torch.cat([(p >> (2 * i)) & 3 for i in range(4)], dim=0)[:out].contiguous()


def should_convert(name: str, patterns: list[str] | None) -> bool:
    """transformers' ``should_convert_module``: False when a pattern matches ``name`` from its start up to
    a module boundary (as a regex) or as a suffix."""
    if not patterns:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return False
        except re.error:
            pass
        if name.endswith(key):
            return False
    return True


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"bitnet layer {name!r}: {msg}")


def _scale_from_multiplier(ws: float) -> torch.Tensor:
    """The float32 ``m`` with ``float32(1 / m) == ws`` (``bitlinear``'s stored multiplier), nearest to
    ``1 / ws``: the kernel recomputes the multiplier as ``1 / scale`` and gets the stored value back."""
    target = torch.tensor([ws], dtype=torch.float32)
    m = (1.0 / target.double()).float()
    for cand in (m, torch.nextafter(m, torch.tensor([math.inf])), torch.nextafter(m, torch.tensor([0.0]))):
        if torch.equal(weight_multiplier(cand), target):
            return cand.reshape(1, 1)
    return m.reshape(1, 1)


class BitNetFormat(Format):
    name = "bitnet"
    quant_method = "bitnet"
    readers = ("transformers",)
    untested_writers = {"transformers": "transformers has no BitNet quantizer (it reads pre-quantized folders)",
                        "microsoft/BitNet": "Microsoft's converters are scripts, not an installable package"}
    description = ("BitNet b1.58: ternary weights 4 per byte (output rows in 4 chunks), one weight_scale per "
                   "tensor (bitlinear: 1/mean|W|, autobitlinear: mean|W|), int8 per-token activations")

    def __init__(self, linear_class: str = DEFAULT_CLASS, mode: str = "offline") -> None:
        if linear_class not in LINEAR_CLASSES:
            raise ValueError(f"linear_class must be one of {list(LINEAR_CLASSES)}, got {linear_class!r}")
        self.linear_class = linear_class
        self.mode = mode

    # -- saving ---------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> "BitNetFormat":
        rec = getattr(model, "polyquant", None)
        cls = None
        if rec is not None:
            cls = (rec.config or {}).get("linear_class")
            if cls is None:
                cls = ((rec.extra or {}).get("quantization_config") or {}).get("linear_class")
        return BitNetFormat(cls if cls in LINEAR_CLASSES else self.linear_class)

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        n, k = qw.shape
        if qw.qt.kind != "ternary":
            return f"BitNet stores ternary weights, got {qw.qtype}"
        if qw.block != (n, k):
            return f"BitNet stores one scale per tensor, got block {qw.block}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extra tensors have no BitNet equivalent"
        if n % 4:
            return (f"out_features {n} is not divisible by 4 (transformers' BitLinear holds [out // 4, in], "
                    "AutoBitLinear unpacks only 4 * rows == out)")
        if not isinstance(getattr(module, "act_quant", None), BitNetActivation):
            return "BitNet layers quantize their inputs with BitLinear's int8 per-token rule; this layer does not"
        if self.linear_class == "autobitlinear" and getattr(module, "bias", None) is not None:
            return "autobitlinear scales the bias by weight_scale; save with linear_class=bitlinear"
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        s = qw.scale.detach().to(torch.float32).reshape(1)
        t = {"weight": pack_bitnet(qw.codes),
             "weight_scale": weight_multiplier(s) if self.linear_class == "bitlinear" else s.clone()}
        nw = getattr(module.act_quant, "norm_weight", None)
        if nw is not None:
            t["rms_norm.weight"] = nw.detach()
        return t

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        from polyquant.nn.quant_linear import QuantLinear
        floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
        norms = {(getattr(m.act_quant, "norm_weight", None) is not None, m.act_quant.eps) for m in layers.values()}
        with_norm = {a for a, _ in norms}
        if len(with_norm) > 1:
            raise ValueError("BitNet's use_rms_norm is one setting for the model: some layers have an input "
                             "RMSNorm and others do not")
        use_norm = with_norm.pop()
        eps = {e for a, e in norms if a}
        if len(eps) > 1:
            raise ValueError(f"BitNet's rms_norm_eps is one setting for the model; the layers use {sorted(eps)}")
        for n in layers:
            if not should_convert(n, floats):
                raise ValueError(f"layer {n!r} would be kept float by transformers (modules_to_not_convert "
                                 f"matches it: {[f for f in floats if not should_convert(n, [f])][:3]})")
        return {"quant_method": "bitnet", "linear_class": self.linear_class, "quantization_mode": "offline",
                "use_rms_norm": use_norm, "rms_norm_eps": eps.pop() if eps else 1e-6,
                "modules_to_not_convert": floats}

    # -- loading --------------------------------------------------------------------------
    def for_config(self, qcfg: dict[str, Any]) -> "BitNetFormat":
        cls, mode = self._settings(qcfg)
        return BitNetFormat(cls, mode)

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        """Documented variants: ``weight_scale`` / ``rms_norm.weight`` in any float dtype (the model's:
        bf16 in Microsoft's checkpoints), and the float ``weight`` of ``online`` checkpoints."""
        if key in ("weight_scale", "rms_norm.weight"):
            if found.is_floating_point() and found.numel() == written.numel():
                return None
            return ""
        if key == "weight" and self.mode == "online" and found.is_floating_point():
            return None
        return super().tensor_mismatch(key, found, written)

    @staticmethod
    def _settings(qcfg: dict[str, Any]) -> tuple[str, str]:
        cls = qcfg.get("linear_class", "bitlinear")
        mode = qcfg.get("quantization_mode", "offline")
        if cls not in LINEAR_CLASSES:
            raise CheckpointError(f"bitnet linear_class must be one of {list(LINEAR_CLASSES)}, got {cls!r}")
        if mode not in MODES:
            raise CheckpointError(f"bitnet quantization_mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "online" and cls != "autobitlinear":
            mode = "offline"  # transformers' BitLinear has no online mode: it reads packed weights
        mtnc = qcfg.get("modules_to_not_convert")
        if mtnc is not None and not (isinstance(mtnc, list) and all(isinstance(x, str) for x in mtnc)):
            raise CheckpointError("bitnet modules_to_not_convert must be a list of module names")
        return cls, mode

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        cls, mode = self._settings(qcfg)
        if mode == "offline":
            return linears_with_key(model, keys, "weight_scale", "bitnet")
        skip = qcfg.get("modules_to_not_convert")
        if skip is None:  # transformers' default: the output head stays float
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            skip = [n for n, m in model.named_modules() if head is not None and m is head]
        return [n for n, m in model.named_modules()
                if n and isinstance(m, nn.Linear) and should_convert(n, skip) and f"{n}.weight" in keys]

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        if qcfg.get("quantization_mode", "offline") == "online" and qcfg.get("linear_class") == "autobitlinear":
            return None
        return sorted(k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        return {"bits": 2, "group_size": None, "sym": True}

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        cls, mode = self._settings(qcfg)
        n, k = module.out_features, module.in_features
        use_norm = bool(qcfg.get("use_rms_norm", False))
        eps = qcfg.get("rms_norm_eps", 1e-6)
        eps = 1e-6 if eps is None else float(eps)
        allowed = {"weight", "bias"} | ({"weight_scale"} if mode == "offline" else set()) | (
            {"rms_norm.weight"} if use_norm else set())
        unexpected = sorted(set(tensors) - allowed)
        if unexpected:
            raise _fail(name, f"unexpected tensor(s) {unexpected}" + (
                " (rms_norm.weight without use_rms_norm in the quantization_config)" if "rms_norm.weight" in unexpected
                else ""))
        need = ["weight"] + (["weight_scale"] if mode == "offline" else []) + (["rms_norm.weight"] if use_norm else [])
        for key in need:
            if key not in tensors:
                raise _fail(name, f"missing {key}")
        w = tensors["weight"]
        bias = tensors.get("bias")
        if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
            raise _fail(name, f"bias must be {n} floats, got {bias.dtype} {list(bias.shape)}")
        if mode == "online":  # AutoBitLinear online: float weights, ternarized on every forward pass
            from polyquant.methods.bitnet import absmean_ternary
            if not w.is_floating_point() or tuple(w.shape) != (n, k):
                raise _fail(name, f"online weight must be float [{n}, {k}], got {w.dtype} {list(w.shape)}")
            codes, m, _ = absmean_ternary(w)
            scale = m.reshape(1, 1)
        else:
            rows = -(-n // 4)
            if w.dtype != torch.uint8:
                raise _fail(name, f"weight must be uint8 (4 ternary values per byte), got {w.dtype}")
            if tuple(w.shape) != (rows, k):
                raise _fail(name, f"weight must have shape [ceil({n}/4), {k}] = [{rows}, {k}], got {list(w.shape)}")
            s = tensors["weight_scale"]
            if not s.is_floating_point() or s.numel() != 1:
                raise _fail(name, f"weight_scale must be one float, got {s.dtype} {list(s.shape)}")
            ws = float(s.to(torch.float32).reshape(()))
            if not (math.isfinite(ws) and ws > 0):
                raise _fail(name, f"weight_scale must be a positive finite number, got {ws}")
            codes = unpack_bitnet(w, n)
            if int(codes.max()) > 2 if codes.numel() else False:
                raise _fail(name, "weight holds the 2-bit code 3, which is no ternary value (codes are value + 1)")
            scale = _scale_from_multiplier(ws) if cls == "bitlinear" else s.to(torch.float32).reshape(1, 1)
            if bias is not None and cls == "autobitlinear":  # (x W^T + b) * weight_scale
                bias = bias.to(torch.float32) * s.to(torch.float32).reshape(())
        norm = None
        if use_norm:
            norm = tensors["rms_norm.weight"]
            if not norm.is_floating_point() or tuple(norm.shape) != (k,):
                raise _fail(name, f"rms_norm.weight must be {k} floats, got {norm.dtype} {list(norm.shape)}")
        qw = QuantizedWeight.from_codes(codes, "ternary", (n, k), scale)
        return QuantLinear(qw, bias, kernel="reference", act_quant=BitNetActivation(norm, eps), method="")


register_format(BitNetFormat)
