"""The compressed-tensors format (``quant_method: compressed-tensors``; written by llm-compressor,
read by vLLM and by transformers through the ``compressed_tensors`` library).

Layout checked against the library's source (compressed-tensors 0.20: ``compressors/pack_quantized``,
``compressors/naive_quantized``, ``quantization/quant_args.py``, ``lifecycle/forward.py``).
Per quantized Linear ``[out, in]``; the scale grid is ``[1]`` (tensor), ``[out, 1]`` (channel),
``[out, in/g]`` (group), ``[ceil(out/r), ceil(in/c)]`` (block), in the stored float dtype:

=====================  ==================  =========================================================
format                 tensor              content
=====================  ==================  =========================================================
``pack-quantized``     weight_packed       int32 ``[out, ceil(in*bits/32)]``: offset-binary codes
(int weights, no       (bits 1..8)         ``q + 2**(bits-1)``, dense LSB-first bit stream per row
activation quant)      weight_scale        scale grid
                       weight_shape        int64 ``[2]`` = ``[out, in]``
                       weight_zero_point   asymmetric only. group/channel: int32, offset-binary and
                                           packed along dim 0 ``[ceil(out*bits/32), G]``;
                                           tensor/block: int8 signed, shaped like the scale
                       weight_g_idx        int32 ``[in]``, only with ``actorder: group``
``int-quantized``      weight              int8 ``[out, in]`` signed ``q``; weight_scale;
(int weights with      (``naive-...`` for  weight_zero_point int8 signed (asymmetric);
activation quant)      other int cases)    weight_g_idx as above
``naive-quantized`` /  weight              float8_e4m3fn ``[out, in]``; weight_scale
``float-quantized``
(fp8 weights)
=====================  ==================  =========================================================

Dequantization is ``(q - zp) * scale`` with signed ``q`` in ``[-2**(b-1), 2**(b-1)-1]`` and
signed ``zp``. Our codes are unsigned (offset binary) with ``w = (decode(code) - zero) * scale``,
so the stored codes are the same bits in both conventions and the zero point converts exactly:
CT ``zp = zero + code_offset - 2**(b-1)`` (``uintB``: ``zp = zero - 2**(b-1)``; ``intB`` with a
zero: ``zp = zero``), which must be an integer in range or the layer is refused by name.

Library facts this module follows (0.20):
- 8-bit integer weights without activation quantization are ``pack-quantized`` (the library's
  format inference puts ``int-quantized`` first but it requires input activations), so W8A16 is
  ``pack-quantized``; ``int-quantized`` is written only with activation quantization (W8A8).
- A group size that does not divide ``in_features`` is refused: the library raises ("tensor
  column shape must be divisible by the given group_size"). Foreign checkpoints with a short last
  group (``ceil(in/g)`` scale columns) still load here.
- ``actorder: "group"`` with ``weight_g_idx`` was removed from compressed-tensors (0.20 rejects the
  config); vLLM and older releases read it. A layer with a non-trivial ``g_idx`` is therefore refused
  unless ``$POLYQUANT_CT_ACTORDER_GROUP=1`` asks for that config (then written with a warning); a
  ``g_idx`` equal to ``k // group_size`` is dropped (plain groups). GPTQ's static-groups act-order
  (``act_order`` + ``static_groups``: columns processed in activation order, groups in column
  order, no ``g_idx``) is written as ``actorder: "weight"``, which every reader takes.
- Odd bit widths (3/5/6/7) use the dense layout (values straddle words). Checkpoints from older
  releases that padded each word (``32 // bits`` values per word) are recognised by shape and read.
- transformers 5.24 with compressed-tensors 0.20 fails to load *asymmetric* pack-quantized
  checkpoints (even the library's own: the packed zero point shape mismatches the meta model);
  symmetric ones load. polyquant loads both.

Activation quantization: a ``QuantLinear.act_quant`` is described in ``input_activations`` when
it exposes ``ct_args`` (a dict of compressed-tensors ``QuantizationArgs`` fields, e.g.
``{"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}``);
loading builds a :class:`CTActivationQuant` from such a dict. Layers whose activation rule has no
such description are refused. Unsupported on load (refused by name): sparsity, transforms,
nvfp4/mxfp formats, ``quantization_status`` other than ``compressed``; a ``kv_cache_scheme`` is
ignored with a warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import GPU_SERVING_NOTE, CheckpointError, Format, layer_bias, register_format
from polyquant.formats.ct_schema import (_FP8_MAX, _READ_FORMATS, _STRATEGIES, FLOAT_Q, INT_Q, NAIVE, PACK,  # noqa: F401
                                         CTActivationQuant, _args_dict, _Args, _class_match, _Config, _name_match,
                                         _parse_args)
from polyquant.formats.base import LayerRefusal as _Refuse, refusal
from polyquant.tensor.packing import pack, packed_length, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CompressedTensorsFormat", "CTActivationQuant", "CT_VERSION", "ct_zero_point", "ACTORDER_GROUP_ENV"]

#: Set to 1 to write g_idx act-order layers as ``actorder: "group"`` (vLLM / compressed-tensors < 0.20 only).
ACTORDER_GROUP_ENV = "POLYQUANT_CT_ACTORDER_GROUP"


def _static_actorder(model: nn.Module) -> bool:
    """The model was quantized with GPTQ's static-groups act-order (``actorder: "weight"``)."""
    cfg = getattr(getattr(model, "polyquant", None), "config", None) or {}
    return bool(cfg.get("act_order")) and bool(cfg.get("static_groups"))

log = logging.getLogger(__name__)

CT_VERSION = "0.20.0"  # the library release whose layout this module writes


# -- saving helpers ---------------------------------------------------------------------------
def ct_zero_point(qw: QuantizedWeight) -> torch.Tensor | None:
    """Our zero as a compressed-tensors *unsigned* (offset-binary) zero point code
    ``zp + 2**(b-1) = zero + code_offset`` (int64, scale-grid shaped); None when symmetric."""
    qt = qw.qt
    if qt.signed and qw.zero is None:
        return None
    z = qw.zero.double() if qw.zero is not None else torch.zeros(qw.scale.shape, dtype=torch.float64)
    code = z + qt.code_offset
    if not bool(torch.equal(code, torch.round(code))):
        raise _Refuse("non-integer zero points (compressed-tensors stores integer zero points)")
    if code.numel() and (float(code.min()) < 0 or float(code.max()) > (1 << qt.bits) - 1):
        raise _Refuse(f"zero points outside the {qt.bits}-bit range")
    return code.to(torch.int64)


def _trivial_g_idx(qw: QuantizedWeight) -> bool:
    c = qw.block[1]
    ref = torch.arange(qw.shape[1], device=qw.g_idx.device) // c
    return bool(torch.equal(qw.g_idx.long(), ref))


def _plan(qw: QuantizedWeight, module: nn.Module
          ) -> tuple[_Args, dict[str, Any] | None, str, bool, torch.Tensor | None]:
    """(weight args, input_activations dict, format, keep g_idx, unsigned zero point codes) for
    one layer, or _Refuse."""
    qt = qw.qt
    out, inp = qw.shape
    r, c = qw.block
    if qw.extras:
        raise _Refuse(f"extra tensors {sorted(qw.extras)} have no compressed-tensors equivalent")
    if not qw.scale.is_floating_point() or qw.scale.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                     torch.float64):
        raise _Refuse(f"scale dtype {qw.scale.dtype} (compressed-tensors needs fp16/bf16/fp32 scales)")
    zp = None
    if qt.kind == "int":
        typ = "int"
        zp = ct_zero_point(qw)
        sym = zp is None
    elif qt.name == "float8_e4m3fn":
        if qw.zero is not None:
            raise _Refuse("fp8 weights with a zero point")
        typ, sym = "float", True
    else:
        raise _Refuse(f"qtype {qt.name} (compressed-tensors stores integer and float8_e4m3fn weights here)")
    keep_g = qw.g_idx is not None and not _trivial_g_idx(qw)
    if r == 1 and c >= inp:
        strategy, gs, block = "channel", None, None
    elif r == 1:
        if inp % c:
            raise _Refuse(f"group size {c} does not divide in_features {inp} (compressed-tensors requires "
                          "it: 'tensor column shape must be divisible by the given group_size')")
        strategy, gs, block = "group", c, None
    elif r >= out and c >= inp:
        strategy, gs, block = "tensor", None, None
    else:
        strategy, gs, block = "block", None, (r, c)
    if keep_g and strategy != "group":
        raise _Refuse("act-order (g_idx) needs group quantization")
    if keep_g and os.environ.get(ACTORDER_GROUP_ENV) != "1":
        raise _Refuse("act-order with g_idx is compressed-tensors' removed actorder='group' (vLLM and "
                      "compressed-tensors < 0.20 read it; compressed-tensors >= 0.20 and transformers refuse it): "
                      "quantize GPTQ with static groups (--act-order with --format compressed-tensors does: "
                      "actorder='weight'), save as the gptq format, or set "
                      f"{ACTORDER_GROUP_ENV}=1 to write actorder='group' for those readers")
    inputs = None
    if getattr(module, "act_quant", None) is not None:
        ct = getattr(module.act_quant, "ct_args", None)
        if not isinstance(ct, dict):
            raise _Refuse("its activation quantization has no compressed-tensors description (act_quant.ct_args)")
        ia = _parse_args(ct, "input_activations")
        if ia.strategy == "group" and ia.group_size and inp % ia.group_size:
            raise _Refuse(f"activation group size {ia.group_size} does not divide in_features {inp} (compressed-"
                          "tensors' group quantization requires it; the fine-grained 'fp8' format does not)")
        if ia.dynamic is False:
            sc = getattr(module.act_quant, "scale", None)
            if not (isinstance(sc, torch.Tensor) and sc.numel() == 1 and ia.strategy == "tensor"):
                raise _Refuse("static activation quantization needs one per-tensor act_quant.scale")
            if not ia.symmetric and not isinstance(getattr(module.act_quant, "zero_point", None), torch.Tensor):
                raise _Refuse("asymmetric static activation quantization needs act_quant.zero_point")
        inputs = dict(ct)
    if typ == "int":
        fmt = INT_Q if inputs is not None else PACK
    else:
        fmt = FLOAT_Q if inputs is not None else NAIVE
    args = _Args(qt.bits, typ, sym, strategy, gs, block, "group" if keep_g else None, False)
    return args, inputs, fmt, keep_g, zp


def _ct_scale(qw: QuantizedWeight, strategy: str) -> torch.Tensor:
    s = qw.scale.detach()
    return s.reshape(1).clone() if strategy == "tensor" else s.contiguous()


# -- loading helpers --------------------------------------------------------------------------
def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"compressed-tensors layer {name!r}: {msg}")


def _unpack_legacy(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Pre-dense packing of old releases: ``32 // bits`` values per int32 word, rest padding."""
    per = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    vals = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], w.shape[-1] * per)
    return vals[..., :n].to(torch.uint8).movedim(-1, dim)


def _unpack_any(name: str, what: str, words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    if words.dtype != torch.int32:
        raise _fail(name, f"{what} must be int32, got {words.dtype}")
    have = words.shape[dim]
    dense = packed_length(n, bits)
    if have == dense:
        return unpack(words.contiguous(), bits, n, dim=dim)
    legacy = math.ceil(n / (32 // bits))
    if 32 % bits and have == legacy:
        log.info("%s: %s uses the pre-dense %d-bit packing of older compressed-tensors releases", name, what, bits)
        return _unpack_legacy(words, bits, n, dim)
    raise _fail(name, f"{what} has {have} words along dim {dim}; {n} values of {bits} bits need {dense} "
                      "(does the config's num_bits match the tensors?)")


def _expected_grid(a: _Args, out: int, inp: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(QuantizedWeight block, scale grid) for a strategy."""
    if a.strategy == "tensor":
        return (out, inp), (1, 1)
    if a.strategy == "channel":
        return (1, inp), (out, 1)
    if a.strategy == "group":
        return (1, a.group_size), (out, math.ceil(inp / a.group_size))
    if a.strategy == "block":
        r, c = a.block
        return (r, c), (math.ceil(out / r), math.ceil(inp / c))
    raise CheckpointError(f"weight strategy {a.strategy!r} is not supported for Linear weights")


def _as_grid(t: torch.Tensor, strategy: str, out: int) -> torch.Tensor:
    """A stored scale / zero point as its ``[rows, groups]`` grid: a tensor strategy's may be one
    value of any shape, a channel strategy's ``[out]``; anything else is returned as it is."""
    if t.numel() == 1 and strategy == "tensor":
        return t.reshape(1, 1)
    if strategy == "channel" and tuple(t.shape) == (out,):
        return t.reshape(out, 1)
    return t


# -- the Format -------------------------------------------------------------------------------
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    readers = ("compressed-tensors", "transformers")
    writers = ("compressed-tensors",)
    untested_readers = {"vllm": GPU_SERVING_NOTE, "sglang": GPU_SERVING_NOTE}
    untested_writers = {"llm-compressor": "not in the test extra (its checkpoints are compressed-tensors' own "
                                          "compressors, verified in the row above)"}
    description = ("int 1-8 bit weights packed in int32 (pack-quantized), int8/fp8 weights "
                   "(int-/naive-/float-quantized); tensor, channel, group or block scales; sym or asym")

    # -- saving -------------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return refusal(_plan, qw, module)

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        """Packed codes may use the pre-dense packing of older releases (``_unpack_any`` accepted
        exactly that width, or the dense one); every other tensor must match what we write."""
        if (key.endswith("_packed") and found.dtype == written.dtype == torch.int32 and found.dim() == written.dim()
                and found.shape[:-1] == written.shape[:-1]):
            return None
        return super().tensor_mismatch(key, found, written)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        args, inputs, fmt, keep_g, zp = _plan(qw, module)
        out, inp = qw.shape
        t: dict[str, torch.Tensor] = {"weight_scale": _ct_scale(qw, args.strategy)}
        half = 1 << (qw.bits - 1) if args.type == "int" else 0
        if args.strategy == "tensor" and zp is not None:
            zp = zp.reshape(1)
        if fmt == PACK:
            t["weight_packed"] = qw.data if qw.bits < 8 else pack(qw.codes, 8, dim=-1)
            t["weight_shape"] = torch.tensor([out, inp], dtype=torch.int64)
            if zp is not None:
                if args.strategy in ("group", "channel"):
                    t["weight_zero_point"] = pack(zp.to(torch.uint8), qw.bits, dim=0)
                else:
                    t["weight_zero_point"] = (zp - half).to(torch.int8)
        elif args.type == "int":
            t["weight"] = (qw.codes.to(torch.int16) - half).to(torch.int8)
            if zp is not None:
                t["weight_zero_point"] = (zp - half).to(torch.int8)
        else:
            t["weight"] = qw.data
        if keep_g:
            t["weight_g_idx"] = qw.g_idx.to(torch.int32)
        if inputs is not None and inputs.get("dynamic", False) is False:  # static: the calibrated scale
            act = module.act_quant
            t["input_scale"] = act.scale.detach().reshape(1).to(qw.scale.dtype).clone()
            if not inputs.get("symmetric", True):
                t["input_zero_point"] = act.zero_point.detach().reshape(1).to(torch.int8).clone()
        return t

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        members: dict[str, list[str]] = {}
        act_order = []
        static = _static_actorder(model)
        for name, m in layers.items():
            args, inputs, fmt, keep_g, _ = _plan(m.quantized_weight, m)
            if keep_g:
                act_order.append(name)
            weights = _args_dict(args)
            if not keep_g and weights["strategy"] in ("group", "channel") and static:
                weights["actorder"] = "weight"  # static-groups act-order: same tensors, recorded
            scheme = {"weights": weights, "input_activations": inputs, "output_activations": None,
                      "format": fmt}
            key = json.dumps(scheme, sort_keys=True)
            groups.setdefault(key, scheme)
            members.setdefault(key, []).append(name)
        if act_order:
            warnings.warn(f"{len(act_order)} layer(s) (e.g. {act_order[0]!r}) are saved with actorder='group' and "
                          "weight_g_idx: vLLM and compressed-tensors < 0.20 read them, compressed-tensors >= 0.20 "
                          "(and transformers through it) refuses that config", stacklevel=3)
        from polyquant.nn.quant_linear import QuantLinear
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
        config_groups = {}
        single = len(groups) == 1
        for i, (key, scheme) in enumerate(groups.items()):
            config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else members[key], **scheme}
        formats = {s["format"] for s in groups.values()}
        return {
            "quant_method": self.quant_method,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        }

    # -- loading ------------------------------------------------------------------------------
    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        cfg = _Config(qcfg)
        names = []
        for name, module in model.named_modules():
            if not name:
                continue
            g = cfg.group_for(name, module)
            if g is None or cfg.weights(g) is None:
                continue
            if isinstance(module, nn.Linear):
                names.append(name)
            elif f"{name}.weight_scale" in keys or f"{name}.weight_packed" in keys:
                raise CheckpointError(f"compressed-tensors quantizes {name!r} ({type(module).__name__}); polyquant "
                                      "reads quantized Linear layers only")
        return names

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith((".weight_packed", ".weight_scale"))})

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        groups = qcfg.get("config_groups") or {}
        for scheme in groups.values():
            if isinstance(scheme, dict) and isinstance(scheme.get("weights"), dict):
                try:
                    a = _parse_args(scheme["weights"], "weights")
                except CheckpointError:
                    break
                gs = a.group_size if a.strategy == "group" else (-1 if a.strategy == "channel" else None)
                return {"bits": a.num_bits, "group_size": gs, "sym": a.symmetric, "type": a.type,
                        "strategy": a.strategy, "groups": len(groups), "ct_format": qcfg.get("format")}
        return {"bits": None, "group_size": None, "sym": None, "ct_format": qcfg.get("format")}

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        cfg = _Config(qcfg)
        g = cfg.group_for(name, module)
        a = cfg.weights(g) if g is not None else None
        if a is None:
            raise _fail(name, "no config group quantizes this layer")
        fmt = cfg.layer_format(g, set(tensors))
        if fmt not in _READ_FORMATS:
            raise _fail(name, f"format {fmt!r} is not supported (polyquant reads {', '.join(_READ_FORMATS)})")
        out, inp = module.out_features, module.in_features
        if a.type == "int" and not 1 <= a.num_bits <= 8:
            raise _fail(name, f"int{a.num_bits} weights are not supported")
        if a.type == "float" and a.num_bits != 8:
            raise _fail(name, f"float{a.num_bits} weights are not supported")
        block, grid = _expected_grid(a, out, inp)
        inputs = cfg.inputs(g)
        allowed = {"weight_scale", "weight_zero_point", "weight_g_idx", "bias"}
        allowed |= {"weight_packed", "weight_shape"} if fmt == PACK else {"weight"}
        if inputs is not None and not (isinstance(inputs, dict) and inputs.get("dynamic", False)):
            allowed |= {"input_scale", "input_zero_point"}
        unexpected = sorted(set(tensors) - allowed)
        if unexpected:
            raise _fail(name, f"unexpected tensor(s) {unexpected} for format {fmt!r}")
        required = ["weight_scale", "weight_packed" if fmt == PACK else "weight"]
        if not a.symmetric and a.type == "int":
            required.append("weight_zero_point")
        if a.actorder == "group":
            required.append("weight_g_idx")
        missing = [k for k in required if k not in tensors]
        if missing:
            raise _fail(name, f"missing tensor(s) {missing}")

        scale = tensors["weight_scale"]
        if not scale.is_floating_point():
            raise _fail(name, f"weight_scale must be a float tensor, got {scale.dtype}")
        scale = _as_grid(scale, a.strategy, out)
        if tuple(scale.shape) != grid:
            raise _fail(name, f"weight_scale has shape {list(tensors['weight_scale'].shape)}, a {a.strategy} "
                              f"scale of a [{out}, {inp}] weight needs {list(grid)}")

        if a.type == "float":
            w = tensors["weight"]
            if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (out, inp):
                raise _fail(name, f"weight must be float8_e4m3fn [{out}, {inp}], got {w.dtype} {list(w.shape)}")
            codes, qtype, zero = w, "float8_e4m3fn", None
        else:
            bits = a.num_bits
            half = 1 << (bits - 1)
            if fmt == PACK:
                shape = tensors.get("weight_shape")
                if shape is not None and [int(v) for v in shape.reshape(-1).tolist()] != [out, inp]:
                    raise _fail(name, f"weight_shape {shape.tolist()} != [{out}, {inp}]")
                wp = tensors["weight_packed"]
                if wp.dim() != 2 or wp.shape[0] != out:
                    raise _fail(name, f"weight_packed has shape {list(wp.shape)}, expected [{out}, "
                                      f"{packed_length(inp, bits)}]")
                if bits < 8 and wp.dtype == torch.int32 and wp.shape[1] == packed_length(inp, bits):
                    codes = wp.contiguous()  # our layout already (dense LSB-first words): no repacking
                else:
                    codes = _unpack_any(name, "weight_packed", wp, bits, inp, dim=1)
            else:
                w = tensors["weight"]
                if w.dtype != torch.int8 or tuple(w.shape) != (out, inp):
                    raise _fail(name, f"weight must be int8 [{out}, {inp}], got {w.dtype} {list(w.shape)}")
                c16 = w.to(torch.int16) + half
                if c16.numel() and (int(c16.min()) < 0 or int(c16.max()) >= (1 << bits)):
                    raise _fail(name, f"weight values exceed the {bits}-bit range of the config")
                codes = c16.to(torch.uint8)
            zero = None
            qtype = f"int{bits}"
            if not a.symmetric:
                zp = tensors["weight_zero_point"]
                if zp.dtype == torch.int32 and a.strategy in ("group", "channel") and fmt == PACK:
                    zcode = _unpack_any(name, "weight_zero_point", zp, bits, out, dim=0).to(torch.float32)
                elif zp.dtype in (torch.int8, torch.int16, torch.int32, torch.int64) or zp.is_floating_point():
                    zcode = zp.to(torch.float32) + half  # unpacked signed zero points
                else:
                    raise _fail(name, f"weight_zero_point has unsupported dtype {zp.dtype}")
                zcode = _as_grid(zcode, a.strategy, out)
                if tuple(zcode.shape) != grid:
                    raise _fail(name, f"weight_zero_point unpacks to {list(zcode.shape)}, expected {list(grid)}")
                qtype, zero = f"uint{bits}", zcode
        g_idx = tensors.get("weight_g_idx")
        if g_idx is not None:
            if a.strategy != "group" or tuple(g_idx.shape) != (inp,) or g_idx.is_floating_point():
                raise _fail(name, f"weight_g_idx {g_idx.dtype} {list(g_idx.shape)} needs group strategy and "
                                  f"[{inp}] integers")
            gi = g_idx.long()
            if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= grid[1]):
                raise _fail(name, f"weight_g_idx values outside [0, {grid[1]})")
            g_idx = None if torch.equal(gi, torch.arange(inp) // a.group_size) else g_idx.to(torch.int32)
        try:
            if codes.dtype == torch.int32:  # packed words
                qw = QuantizedWeight(qtype, (out, inp), block, codes, scale, zero, g_idx)
            else:
                qw = QuantizedWeight.from_codes(codes, qtype, block, scale, zero, g_idx)
        except ValueError as e:
            raise _fail(name, str(e)) from None
        act = None
        if inputs is not None:
            act = CTActivationQuant(inputs, tensors.get("input_scale"), tensors.get("input_zero_point"))
        bias = layer_bias(tensors, out, lambda m: _fail(name, m))
        return QuantLinear(qw, bias, kernel="reference", act_quant=act, method="")


register_format(CompressedTensorsFormat)
