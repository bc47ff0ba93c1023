"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel / transformers ``quant_method: gptq``).

Per quantized Linear ``[out, in]`` with ``G = ceil(in / group_size)`` groups:

==========  ======  ==========================  =============================================
tensor      dtype   shape                       content
==========  ======  ==========================  =============================================
qweight     int32   ``[in*bits/32, out]``       codes of the transposed weight, packed along in
qzeros      int32   ``[G, out*bits/32]``        zero points packed along out (v1: zero - 1)
scales      fp16    ``[G, out]``                group scales
g_idx       int32   ``[in]``                    group of each input column (act-order)
==========  ======  ==========================  =============================================

Packing is the dense LSB-first bit stream of :mod:`polyquant.tensor.packing` (for 3 bits this is
GPTQ's 3-words-per-32-values layout), so ``qweight`` is exactly ``QuantizedWeight.data.T``.
``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.

Two registered names: ``gptq`` writes ``checkpoint_format: gptq`` (v1: zeros stored minus one;
what every GPTQ reader expects) and ``gptq_v2`` writes the true zeros. Loading reads both (and
refuses the legacy ``marlin`` layout). A v1 zero field read as all-ones means a zero of 0 that
overflowed; it is read modulo ``2**bits`` (as AutoGPTQ's torch path does) with a warning.

Scales are fp16 on disk. Saving rounds in-memory scales to fp16 (a warning says so when that
changes them), so save -> load is exact up to that rounding; a method that wants bit-exact round
trips quantizes against :func:`gptq_scale` (the fp16-representable scale) from the start.

Loading maps a checkpoint whose zeros are all ``2**(bits-1)`` and that says ``sym: true`` to the
signed qtype ``intB`` (no zero tensor), anything else to ``uintB`` with float zeros; a ``g_idx``
equal to ``i // group_size`` is dropped (the fast kernels then apply).
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (GPU_SERVING_NOTE, VIA_GPTQMODEL_NOTE, CheckpointError, Format, check_linears,
                                    checkpoint_group_size, float_dtype, layer_bias, layer_names, layer_weights,
                                    output_head_names, register_format, require_tensors)
from polyquant.tensor.packing import pack, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["GPTQFormat", "gptq_scale", "normalize_gptq_config", "read_gptq_config", "gptq_layer_tensors",
           "gptq_weight_from_tensors", "CONFIG_FILES"]

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
CONFIG_FILES = ("quantize_config.json", "quant_config.json", "config.json")
_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24  # smallest positive (subnormal) fp16


def gptq_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest fp16 value (kept in its dtype; magnitudes clamped into
    fp16's positive range). Quantize codes against this scale and a GPTQ save -> load is exact."""
    s = scale.float()
    mag = s.abs().clamp(_FP16_TINY, _FP16_MAX)
    s = torch.where(s < 0, -mag, mag).to(torch.float16)
    return s.to(scale.dtype)


# -- config -------------------------------------------------------------------------------

def normalize_gptq_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """Canonical keys from a GPTQ ``quantization_config`` / ``quantize_config.json`` dict: applies
    the AutoGPTQ aliases (``w_bit``, ``q_group_size``, ``is_marlin_format``, ``quant_method:
    marlin``), ``format`` as ``checkpoint_format``, and ``sym`` defaulting to True (warned).
    Raises CheckpointError for a marlin checkpoint or an unreadable value."""
    c = dict(qcfg)
    if "bits" not in c and "w_bit" in c:
        c["bits"] = c["w_bit"]
    if "group_size" not in c and "q_group_size" in c:
        c["group_size"] = c["q_group_size"]
    fmt = c.get("checkpoint_format") or c.get("format") or "gptq"
    if c.get("quant_method") == "marlin" or c.get("is_marlin_format"):
        fmt = "marlin"
    if fmt == "marlin":
        raise CheckpointError(
            "this GPTQ checkpoint uses checkpoint_format 'marlin' (Marlin's private 16x16 tile "
            "permutation of symmetric 4-bit weights); polyquant reads checkpoint_format 'gptq' and "
            "'gptq_v2' only. Use a gptq-format copy of the model (GPTQModel writes gptq and repacks "
            "to Marlin at run time)")
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"unknown GPTQ checkpoint_format {fmt!r}; readable: {', '.join(CHECKPOINT_FORMATS)}")
    c["checkpoint_format"] = fmt
    bits = c.get("bits")
    if isinstance(bits, bool) or bits not in BITS:
        raise CheckpointError(f"GPTQ bits must be one of {BITS}, got {bits!r}")
    gs = c.get("group_size", -1)
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise CheckpointError(f"GPTQ group_size must be -1 or a positive integer, got {gs!r}")
    c["group_size"] = gs
    if "sym" not in c:
        warnings.warn("GPTQ config has no 'sym' key; assuming sym=True (AutoGPTQ's default)", stacklevel=2)
        c["sym"] = True
    c["desc_act"] = bool(c.get("desc_act", False))
    pack_dtype = c.get("pack_dtype", "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise CheckpointError(f"GPTQ pack_dtype {pack_dtype!r} is not supported (only int32)")
    if c.get("dynamic"):
        raise CheckpointError("GPTQModel 'dynamic' per-module overrides are not supported yet")
    return c


def read_gptq_config(path: str | Path) -> dict[str, Any]:
    """The GPTQ config of a checkpoint folder, looked up as AutoGPTQ does: ``quantize_config.json``,
    then ``quant_config.json``, then ``config.json``'s ``quantization_config``; normalized."""
    path = Path(path)
    for fname in CONFIG_FILES:
        f = path / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: unreadable JSON ({e})") from None
        if fname == "config.json":
            d = d.get("quantization_config")
            if d is None:
                continue
        if not isinstance(d, dict):
            raise CheckpointError(f"{f}: expected a JSON object")
        return normalize_gptq_config(d)
    raise CheckpointError(f"{path}: no GPTQ config ({', '.join(CONFIG_FILES)})")


# -- per-layer conversion (pure tensor functions) -----------------------------------------

def _gptq_zeros(qw: QuantizedWeight) -> torch.Tensor:
    """GPTQ zero points ``[out, G]`` (float, on the CPU) such that ``W = (code - z) * s``."""
    return qw.zero_points().cpu()


def check_gptq_weight(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> str | None:
    """None when GPTQ can store ``qw``; otherwise why not."""
    qt = qw.qt
    out, inp = qw.shape
    if qt.kind != "int" or qt.bits not in BITS:
        return f"GPTQ stores {'/'.join(map(str, BITS))}-bit integer weights, not {qw.qtype}"
    if qw.block[0] != 1:
        return f"GPTQ groups run along the input dim only (row blocks of 1), got block {qw.block}"
    if qw.extras:
        return f"GPTQ cannot store extra tensors {sorted(qw.extras)}"
    if (inp * qt.bits) % 32 or (out * qt.bits) % 32:
        return (f"GPTQ packs whole int32 words: in_features*bits and out_features*bits must divide by 32 "
                f"(got {inp}x{out} at {qt.bits} bits)")
    z = _gptq_zeros(qw)
    if not bool(torch.equal(z, z.round())):
        return "GPTQ zero points must be integers"
    lo = 1 if checkpoint_format == "gptq" else 0
    zmin, zmax = float(z.min()), float(z.max())
    if zmin < lo or zmax > qt.n_codes - 1:
        if checkpoint_format == "gptq" and zmin == 0 and zmax <= qt.n_codes - 1:
            return ("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1 stores zero-1 "
                    "and 0 would wrap, corrupting its neighbours); save as 'gptq_v2' or "
                    "'compressed-tensors' instead")
        return f"GPTQ zero points must lie in [{lo}, {qt.n_codes - 1}], got [{zmin:g}, {zmax:g}]"
    s = qw.scale.detach().float()
    if not bool(torch.isfinite(s).all()) or float(s.abs().max()) > _FP16_MAX:
        return "GPTQ stores fp16 scales: a scale is not finite or exceeds the fp16 range"
    if qw.g_idx is not None:
        g = qw.g_idx
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= qw.scale.shape[1]):
            return "g_idx points outside the scale groups"
    return None


def gptq_layer_tensors(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` for one weight (checked first)."""
    if reason := check_gptq_weight(qw, checkpoint_format):
        raise ValueError(reason)
    qw = qw.to("cpu")
    bits = qw.bits
    out, inp = qw.shape
    gs = qw.group_columns
    codes = qw.codes  # [out, in]
    qweight = pack(codes.t().contiguous(), bits, dim=0)
    zeros = _gptq_zeros(qw).t().to(torch.int64)  # [G, out]
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    qzeros = pack(zeros, bits, dim=1)
    scales = qw.scale.detach().t().to(torch.float16).contiguous()
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32)
    else:
        g_idx = (torch.arange(inp) // gs).to(torch.int32)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(), "scales": scales,
            "g_idx": g_idx.contiguous()}


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"GPTQ layer {name!r}: {msg}")


def gptq_weight_from_tensors(name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                             in_features: int, out_features: int) -> QuantizedWeight:
    """Build the ``QuantizedWeight`` of one layer from its GPTQ tensors (``qcfg`` normalized).
    Raises CheckpointError naming the layer when a tensor disagrees with the config."""
    bits, fmt = int(qcfg["bits"]), qcfg["checkpoint_format"]
    gs = int(qcfg["group_size"])
    gs = in_features if gs == -1 or gs > in_features else gs
    n_groups = math.ceil(in_features / gs)
    qweight, qzeros, scales = require_tensors(tensors, ("qweight", "qzeros", "scales"), lambda m: _fail(name, m))
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise _fail(name, f"a {in_features}x{out_features} layer cannot be packed in int32 words at {bits} bits")
    expect = {"qweight": ((in_features * bits // 32, out_features), torch.int32),
              "qzeros": ((n_groups, out_features * bits // 32), torch.int32),
              "scales": ((n_groups, out_features), None)}
    for key, (shape, dtype) in expect.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise _fail(name, f"{key} has shape {tuple(t.shape)}, expected {shape} for bits={bits}, "
                              f"group_size={qcfg['group_size']}, in={in_features}, out={out_features}")
        if dtype is not None and t.dtype != dtype:
            raise _fail(name, f"{key} has dtype {t.dtype}, expected {dtype}")
    if not scales.dtype.is_floating_point:
        raise _fail(name, f"scales has dtype {scales.dtype}, expected a float dtype (fp16)")
    g_idx = tensors.get("g_idx")
    trivial = torch.arange(in_features) // gs
    if g_idx is not None:
        if tuple(g_idx.shape) != (in_features,) or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
            raise _fail(name, f"g_idx must be an integer tensor of shape ({in_features},), got "
                              f"{g_idx.dtype} {tuple(g_idx.shape)}")
        g_idx = g_idx.to(torch.int64)
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise _fail(name, f"g_idx values must lie in [0, {n_groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
        if torch.equal(g_idx, trivial):
            g_idx = None
    # codes [out, in]: qweight is the dense bit stream along in, i.e. QuantizedWeight.data.T
    zeros = unpack(qzeros.contiguous(), bits, out_features, dim=1).to(torch.int64)  # [G, out]
    if fmt == "gptq":
        maxq = (1 << bits) - 1
        if bool((zeros == maxq).any()):
            warnings.warn(f"GPTQ layer {name!r}: a v1 zero field holds {maxq} (a zero point of 0 that "
                          f"overflowed in checkpoint_format 'gptq'); reading it modulo 2**{bits} as 0",
                          stacklevel=2)
        zeros = (zeros + 1) & maxq
    scale = scales.t().contiguous()  # [out, G]
    block = (1, gs)
    signed = bool(qcfg.get("sym", True)) and bool((zeros == (1 << (bits - 1))).all())
    qtype = f"int{bits}" if signed else f"uint{bits}"
    zero = None if signed else zeros.t().to(torch.float32).contiguous()
    if bits == 8:
        codes = unpack(qweight.contiguous(), bits, in_features, dim=0).t().contiguous()
        return QuantizedWeight.from_codes(codes, qtype, block, scale, zero, g_idx)
    data = qweight.t().contiguous()
    return QuantizedWeight(qtype, (out_features, in_features), block, data, scale, zero, g_idx)


# -- the Format ----------------------------------------------------------------------------

class GPTQFormat(Format):
    """GPTQ checkpoints, ``checkpoint_format`` v1 (``gptq``) or ``gptq_v2``."""

    quant_method = "gptq"
    untested_readers = {"transformers": VIA_GPTQMODEL_NOTE, "gptqmodel": "not in the test extra (not verified on a CPU)",
                        "vllm": GPU_SERVING_NOTE}
    untested_writers = {"gptqmodel": "not in the test extra (not verified on a CPU)",
                        "llm-compressor": "not in the test extra"}

    def __init__(self, checkpoint_format: str = "gptq") -> None:
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        self.checkpoint_format = checkpoint_format
        self.name = checkpoint_format
        v = "v1, zeros stored minus one" if checkpoint_format == "gptq" else "v2, true zeros"
        self.description = f"GPTQ int32-packed 2/3/4/8-bit weights with group scales, zeros and g_idx ({v})"

    def detect(self, qcfg: dict[str, Any]) -> bool:
        # One format object reads every GPTQ flavour (v1, v2; marlin is refused with a reason).
        if self.checkpoint_format != "gptq":
            return False
        return qcfg.get("quant_method") in ("gptq", "marlin") or bool(qcfg.get("is_marlin_format"))

    # -- saving ---------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return check_gptq_weight(qw, self.checkpoint_format)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return gptq_layer_tensors(module.quantized_weight, self.checkpoint_format)

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        qws = layer_weights(layers)
        bits = {qw.bits for qw in qws.values()}
        if len(bits) != 1:
            raise ValueError(f"GPTQ stores one bit width per checkpoint; layers use {sorted(bits)}")
        group_size = checkpoint_group_size(qws, "GPTQ")
        half = (1 << (next(iter(bits)) - 1))
        sym = all(bool((_gptq_zeros(qw) == half).all()) for qw in qws.values())
        desc_act = any(qw.g_idx is not None and not torch.equal(
            qw.g_idx.long().cpu(), torch.arange(qw.shape[1]) // qw.group_columns) for qw in qws.values())
        rounded = [n for n, qw in qws.items() if not torch.equal(qw.scale.float(), gptq_scale(qw.scale).float())]
        if rounded:
            warnings.warn(f"GPTQ stores fp16 scales: {len(rounded)} layer(s) (e.g. {rounded[0]!r}) have scales "
                          "that round when saved; save -> load is exact up to that rounding", stacklevel=2)
        rec = getattr(model, "polyquant", None)
        mcfg = dict(getattr(rec, "config", {}) or {}) if rec is not None else {}
        method = getattr(rec, "method", None) if rec is not None else None
        damp = mcfg.get("damp_percent", mcfg.get("percdamp", 0.01))
        true_seq = bool(mcfg.get("true_sequential", True))
        static_groups = bool(mcfg.get("static_groups", False))
        from polyquant.version import __version__
        return {
            "quant_method": "gptq",
            "bits": next(iter(bits)),
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "damp_percent": damp,
            "true_sequential": true_seq,
            "static_groups": static_groups,
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,
            "pack_dtype": "int32",
            "lm_head": bool(set(layers) & output_head_names(model)),
            "meta": {"quantizer": [f"polyquant:{__version__}"], "method": method or "unknown",
                     "damp_percent": damp, "static_groups": static_groups, "true_sequential": true_seq,
                     "act_order": bool(mcfg.get("act_order", desc_act)), "mse": mcfg.get("mse", False)},
        }

    def extra_files(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already warned by quantization_config
            return {"quantize_config.json": self.quantization_config(model, layers)}

    # -- loading --------------------------------------------------------------------------
    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return layer_names(keys, "qweight")

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = normalize_gptq_config(qcfg)
        except CheckpointError:
            return super().describe(qcfg)
        return {"bits": c["bits"], "group_size": c["group_size"], "sym": c["sym"], "desc_act": c["desc_act"],
                "checkpoint_format": c["checkpoint_format"]}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        normalize_gptq_config(qcfg)  # refuses marlin / unreadable configs before any tensor is read
        return check_linears(layer_names(keys, "qweight"), model, "GPTQ")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 'sym' default is warned once by the caller
            cfg = normalize_gptq_config(qcfg)
        qw = gptq_weight_from_tensors(name, cfg, tensors, module.in_features, module.out_features)
        bias = layer_bias(tensors, module.out_features, lambda m: _fail(name, m), float_dtype(module))
        return QuantLinear(qw, bias, kernel="reference", method="gptq")


register_format(GPTQFormat("gptq"))
register_format(GPTQFormat("gptq_v2"))
