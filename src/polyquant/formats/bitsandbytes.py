"""The bitsandbytes checkpoint format (``quant_method: bitsandbytes``), as transformers writes it from
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` state dicts.

4-bit layers (``load_in_4bit``; bitsandbytes ``QuantState.as_dict(packed=True)``), keys under the
module:

=============================================  =======  ==========================================
key                                            dtype    content
=============================================  =======  ==========================================
``weight``                                     uint8    ``[ceil(out*in/2), 1]``: flattened row-major
                                                        codes, element 2j in the high nibble, 2j+1
                                                        in the low one (odd count: zero padded)
``weight.absmax``                              fp32     one per block of ``blocksize`` flattened
                                                        values (uint8 codes when double-quantized)
``weight.quant_map``                           fp32     the 16-entry code book
``weight.nested_absmax``                       fp32     double quant: one per 256 absmax values
``weight.nested_quant_map``                    fp32     double quant: the 256-entry dynamic map
``weight.quant_state.bitsandbytes__nf4|fp4``   uint8    UTF-8 JSON: quant_type, blocksize, dtype,
                                                        shape, and nested_blocksize / nested_dtype /
                                                        nested_offset with double quant
=============================================  =======  ==========================================

Dequantization: ``quant_map[nibble] * absmax[block]`` with, under double quant,
``absmax = nested_quant_map[absmax_u8] * nested_absmax[i // 256] + nested_offset`` (fp32).
A non-uint8 ``bnb_4bit_quant_storage`` stores the same bytes viewed as another dtype; reading
views them back. Writing uses uint8.

8-bit layers (``load_in_8bit``; ``Linear8bitLt._save_to_state_dict``): ``weight`` int8 ``[out, in]``,
``SCB`` fp32 ``[out]`` (row absmax), ``weight_format`` uint8 scalar 0 (= ``row``; anything else is
refused, as bitsandbytes does). ``W = weight * SCB / 127``. Loading attaches LLM.int8's activation
rule with ``llm_int8_threshold`` from the config.

Every Linear that is not quantized is listed in ``llm_int8_skip_modules`` (transformers converts
every other Linear on load). ``QuantizedWeight`` can hold a 4-bit layer only when a block is a
rectangle of the weight (``in % blocksize == 0`` or ``blocksize % in == 0``); other layers are
refused by name, on save and on load.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (GPU_SERVING_NOTE, CheckpointError, Format, check_linears, layer_bias,
                                    layer_weights, register_format, require_tensors)
from polyquant.methods.bnb import (BLOCKSIZES, NESTED_BLOCKSIZE, bnb_block, code_book, dequantize_blockwise_flat,
                                   int8_weight_from_scb)
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["BitsAndBytesFormat", "bnb4_layer_tensors", "bnb4_weight_from_tensors", "bnb8_layer_tensors",
           "bnb8_weight_from_tensors"]

_DQ_KEYS = {"absmax_q", "nested_absmax", "nested_offset", "nested_quant_map"}
_QS_PREFIX = "weight.quant_state.bitsandbytes__"
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _kind(qw: QuantizedWeight) -> str | None:
    if qw.qtype in ("nf4", "fp4"):
        return "4bit"
    if qw.qtype == "int8":
        return "8bit"
    return None


def check_bnb_weight(qw: QuantizedWeight) -> str | None:
    """None when the bitsandbytes format can store ``qw``; otherwise why not."""
    kind = _kind(qw)
    out, inp = qw.shape
    if kind is None:
        return f"bitsandbytes stores nf4 / fp4 (4-bit) or int8 (LLM.int8) weights, not {qw.qtype}"
    if qw.zero is not None or qw.g_idx is not None:
        return "bitsandbytes weights are absmax-scaled (no zero point, no act-order)"
    if kind == "8bit":
        if qw.block != (1, inp):
            return f"bitsandbytes int8 uses one scale per row, got block {qw.block}"
        if set(qw.extras) - {"SCB"}:
            return f"bitsandbytes int8 cannot store extra tensors {sorted(set(qw.extras) - {'SCB'})}"
        return None
    r, c = qw.block
    bs = r * c
    if bs not in BLOCKSIZES or not ((r == 1 and inp % c == 0) or (c == inp)):
        return (f"block {qw.block} is not {'/'.join(map(str, BLOCKSIZES))} consecutive values of the flattened "
                f"weight (in_features={inp})")
    if qw.extras and set(qw.extras) != _DQ_KEYS:
        return f"bitsandbytes 4-bit cannot store extra tensors {sorted(set(qw.extras) - _DQ_KEYS)}"
    return None


def _blocksize(qw: QuantizedWeight) -> int:
    return qw.block[0] * qw.block[1]


# -- per-layer conversion -----------------------------------------------------------------------

def bnb4_layer_tensors(qw: QuantizedWeight, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The ``weight`` / ``weight.*`` tensors of a 4-bit layer (keys relative to the module)."""
    if reason := check_bnb_weight(qw):
        raise ValueError(reason)
    qw = qw.to("cpu")
    codes = qw.codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1).contiguous()
    qs: dict[str, Any] = {"quant_type": qw.qtype, "blocksize": _blocksize(qw), "dtype": dtype,
                          "shape": list(qw.shape)}
    out = {"weight": packed, "weight.quant_map": code_book(qw.qtype)}
    if qw.extras:
        e = qw.extras
        out["weight.absmax"] = e["absmax_q"].to(torch.uint8).reshape(-1).contiguous()
        out["weight.nested_absmax"] = e["nested_absmax"].float().reshape(-1).contiguous()
        out["weight.nested_quant_map"] = e["nested_quant_map"].float().reshape(-1).contiguous()
        qs.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                   "nested_offset": float(e["nested_offset"].reshape(-1)[0])})
    else:
        out["weight.absmax"] = qw.scale.float().reshape(-1).contiguous()
    out[_QS_PREFIX + qw.qtype] = torch.tensor(list(json.dumps(qs).encode("utf-8")), dtype=torch.uint8)
    return out


def bnb8_layer_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``weight`` (int8), ``SCB`` and ``weight_format`` of an LLM.int8 layer."""
    if reason := check_bnb_weight(qw):
        raise ValueError(reason)
    qw = qw.to("cpu")
    cb = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    scb = qw.extras.get("SCB")
    if scb is None:
        scb = qw.scale[:, 0].float() * 127.0
    return {"weight": cb, "SCB": scb.float().reshape(-1).contiguous(),
            "weight_format": torch.tensor(0, dtype=torch.uint8)}


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"bitsandbytes layer {name!r}: {msg}")


def _quant_state(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    keys = [k for k in tensors if k.startswith(_QS_PREFIX)]
    if len(keys) != 1:
        raise _fail(name, f"expected exactly one '{_QS_PREFIX}nf4|fp4' tensor, found {keys}")
    t = tensors[keys[0]]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise _fail(name, f"{keys[0]} must be a 1-D uint8 tensor of JSON bytes")
    try:
        qs = json.loads(bytes(t.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(name, f"{keys[0]} is not UTF-8 JSON ({e})") from None
    if not isinstance(qs, dict):
        raise _fail(name, f"{keys[0]} must hold a JSON object")
    suffix = keys[0][len(_QS_PREFIX):]
    if qs.get("quant_type") != suffix:
        raise _fail(name, f"quant_state says quant_type {qs.get('quant_type')!r} under key suffix {suffix!r}")
    return qs


def bnb4_weight_from_tensors(name: str, tensors: dict[str, torch.Tensor], in_features: int,
                             out_features: int) -> QuantizedWeight:
    """Rebuild a 4-bit layer's ``QuantizedWeight`` (CheckpointError naming the layer on any mismatch)."""
    qs = _quant_state(name, tensors)
    qt = qs["quant_type"]
    if qt not in ("nf4", "fp4"):
        raise _fail(name, f"quant_type {qt!r} is not nf4 / fp4")
    shape = qs.get("shape")
    if not isinstance(shape, list) or [int(v) for v in shape] != [out_features, in_features]:
        raise _fail(name, f"quant_state shape {shape} != the layer's [{out_features}, {in_features}]")
    bs = qs.get("blocksize")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise _fail(name, f"blocksize {bs!r} is not a positive integer")
    if qs.get("dtype") not in _DTYPE_NAMES:
        raise _fail(name, f"quant_state dtype {qs.get('dtype')!r} is not one of {_DTYPE_NAMES}")
    try:
        block = bnb_block((out_features, in_features), bs)
    except ValueError as e:
        raise _fail(name, str(e)) from None
    qmap = require_tensors(tensors, ("weight", "weight.absmax", "weight.quant_map"), lambda m: _fail(name, m))[2]
    if tuple(qmap.shape) != (16,) or not torch.equal(qmap.float(), code_book(qt)):
        raise _fail(name, f"weight.quant_map is not bitsandbytes' {qt} code book (custom code books are not supported)")
    numel = out_features * in_features
    n_blocks = math.ceil(numel / bs)
    w = tensors["weight"]
    if w.dtype != torch.uint8:
        w = w.contiguous().view(torch.uint8)
    w = w.reshape(-1)
    if w.numel() != math.ceil(numel / 2):
        raise _fail(name, f"weight holds {w.numel()} bytes, expected {math.ceil(numel / 2)} for {numel} 4-bit values")
    codes = torch.stack([w >> 4, w & 15], dim=1).reshape(-1)[:numel]
    absmax = tensors["weight.absmax"].reshape(-1)
    if absmax.numel() != n_blocks:
        raise _fail(name, f"weight.absmax has {absmax.numel()} entries, expected {n_blocks} blocks of {bs}")
    extras: dict[str, torch.Tensor] = {}
    nested = "weight.nested_absmax" in tensors or "nested_offset" in qs
    if nested:
        for key in ("weight.nested_absmax", "weight.nested_quant_map"):
            if key not in tensors:
                raise _fail(name, f"double-quantized layer lacks {key!r}")
        nbs = qs.get("nested_blocksize")
        if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs <= 0:
            raise _fail(name, f"nested_blocksize {nbs!r} is not a positive integer")
        try:
            offset = float(qs["nested_offset"])
        except (KeyError, TypeError, ValueError):
            raise _fail(name, "double quant without a numeric nested_offset") from None
        if absmax.dtype != torch.uint8:
            raise _fail(name, f"double-quantized weight.absmax must be uint8 codes, got {absmax.dtype}")
        nmap = tensors["weight.nested_quant_map"].float().reshape(-1)
        nabs = tensors["weight.nested_absmax"].float().reshape(-1)
        if nmap.numel() != 256:
            raise _fail(name, f"weight.nested_quant_map has {nmap.numel()} entries, expected 256")
        if nabs.numel() != math.ceil(n_blocks / nbs):
            raise _fail(name, f"weight.nested_absmax has {nabs.numel()} entries, expected {math.ceil(n_blocks / nbs)}")
        if nbs != NESTED_BLOCKSIZE:
            raise _fail(name, f"nested_blocksize {nbs} is not supported (bitsandbytes writes {NESTED_BLOCKSIZE})")
        off = torch.tensor([offset], dtype=torch.float32)
        scale = dequantize_blockwise_flat(absmax, nabs, nmap, nbs) + off
        extras = {"absmax_q": absmax.contiguous(), "nested_absmax": nabs.contiguous(), "nested_offset": off,
                  "nested_quant_map": nmap.contiguous()}
    else:
        if not absmax.dtype.is_floating_point:
            raise _fail(name, f"weight.absmax must be float (or uint8 with double quant), got {absmax.dtype}")
        scale = absmax.float()
    grid = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
    return QuantizedWeight.from_codes(codes.reshape(out_features, in_features).contiguous(), qt, block,
                                      scale.reshape(grid).contiguous(), extras=extras)


def bnb8_weight_from_tensors(name: str, tensors: dict[str, torch.Tensor], in_features: int,
                             out_features: int) -> QuantizedWeight:
    """Rebuild an LLM.int8 layer's ``QuantizedWeight``."""
    cb, scb = require_tensors(tensors, ("weight", "SCB"), lambda m: _fail(name, m))
    if cb.dtype != torch.int8 or tuple(cb.shape) != (out_features, in_features):
        raise _fail(name, f"weight must be int8 [{out_features}, {in_features}], got {cb.dtype} {list(cb.shape)}")
    if not scb.dtype.is_floating_point or scb.numel() != out_features:
        raise _fail(name, f"SCB must be {out_features} float values, got {scb.dtype} {list(scb.shape)}")
    fmt = tensors.get("weight_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
        raise _fail(name, f"weight_format {int(fmt.reshape(-1)[0])} is not 0 ('row'); bitsandbytes only loads "
                          "row-major")
    return int8_weight_from_scb(cb, scb.reshape(-1))


# -- the Format --------------------------------------------------------------------------------

def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


class BitsAndBytesFormat(Format):
    """bitsandbytes 4-bit (NF4 / FP4, optional double quant) and 8-bit (LLM.int8) checkpoints."""

    name = "bitsandbytes"
    quant_method = "bitsandbytes"
    readers = ("transformers",)  # with bitsandbytes installed (its CPU backend)
    writers = ("transformers",)
    untested_readers = {"vllm": GPU_SERVING_NOTE}
    description = "bitsandbytes NF4/FP4 blockwise absmax (double quant) and LLM.int8 row-wise int8"

    # -- saving ---------------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return check_bnb_weight(qw)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        if _kind(qw) == "8bit":
            return bnb8_layer_tensors(qw)
        return bnb4_layer_tensors(qw)

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        qws = layer_weights(layers)
        kinds = {_kind(qw) for qw in qws.values()}
        if len(kinds) != 1:
            raise ValueError("a bitsandbytes checkpoint is either 4-bit or 8-bit; these layers mix both")
        kind = kinds.pop()
        rec = getattr(model, "polyquant", None)
        mcfg = dict(getattr(rec, "config", {}) or {}) if rec is not None else {}
        prev = (getattr(rec, "extra", {}) or {}).get("quantization_config") if rec is not None else None
        prev = prev if isinstance(prev, dict) else {}
        qtypes = {qw.qtype for qw in qws.values()} if kind == "4bit" else {"fp4"}  # transformers' default
        if len(qtypes) != 1:
            raise ValueError(f"a bitsandbytes checkpoint uses one 4-bit type; layers use {sorted(qtypes)}")
        dq = {bool(qw.extras) for qw in qws.values()} if kind == "4bit" else {False}
        if len(dq) != 1:
            raise ValueError("bnb_4bit_use_double_quant is one flag per checkpoint; some layers are double-quantized "
                             "and others not")
        threshold = mcfg.get("threshold", prev.get("llm_int8_threshold", 6.0))
        threshold = float(threshold)
        if not math.isfinite(threshold):
            threshold = 0.0  # bitsandbytes: 0 disables the decomposition
        compute = mcfg.get("compute_dtype", prev.get("bnb_4bit_compute_dtype", "float32"))
        skip = [n for n in _linear_names(model) if n not in layers]
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": kind == "4bit",
            "_load_in_8bit": kind == "8bit",
            "load_in_4bit": kind == "4bit",
            "load_in_8bit": kind == "8bit",
            "llm_int8_threshold": threshold,
            "llm_int8_skip_modules": skip,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": qtypes.pop(),
            "bnb_4bit_use_double_quant": dq.pop(),
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8",
        }

    # -- loading --------------------------------------------------------------------------------
    def _check_config(self, qcfg: dict[str, Any]) -> None:
        if qcfg.get("llm_int8_has_fp16_weight"):
            raise CheckpointError("llm_int8_has_fp16_weight=true checkpoints keep float weights (a training "
                                  "setting); polyquant reads inference checkpoints with int8 weights")
        if qcfg.get("load_in_4bit") and qcfg.get("load_in_8bit"):
            raise CheckpointError("quantization_config sets both load_in_4bit and load_in_8bit")

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        four = {k[: -len(".weight.absmax")] for k in keys if k.endswith(".weight.absmax")}
        eight = {k[: -len(".SCB")] for k in keys if k.endswith(".SCB")}
        return sorted(four | eight)

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        self._check_config(qcfg)
        four = {k[: -len(".weight.absmax")] for k in keys if k.endswith(".weight.absmax")}
        eight = {k[: -len(".SCB")] for k in keys if k.endswith(".SCB")}
        if four and eight:
            raise CheckpointError("the checkpoint mixes 4-bit (weight.absmax) and 8-bit (SCB) layers")
        if four and qcfg.get("load_in_8bit"):
            raise CheckpointError("quantization_config says load_in_8bit but the tensors are 4-bit")
        if eight and qcfg.get("load_in_4bit"):
            raise CheckpointError("quantization_config says load_in_4bit but the tensors are 8-bit (SCB)")
        return check_linears(sorted(four | eight), model, "bitsandbytes")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        self._check_config(qcfg)
        out_f, in_f = module.out_features, module.in_features
        act = None
        if "SCB" in tensors:
            qw = bnb8_weight_from_tensors(name, tensors, in_f, out_f)
            from polyquant.kernels.bnb_int8 import LLMInt8Activation
            t = qcfg.get("llm_int8_threshold", 6.0)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t) >= 0:
                raise CheckpointError(f"llm_int8_threshold must be a number >= 0, got {t!r}")
            act = LLMInt8Activation(float(t), "float16")
            method = "bnb-int8"
        else:
            qw = bnb4_weight_from_tensors(name, tensors, in_f, out_f)
            method = f"bnb-{qw.qtype}"
        bias = layer_bias(tensors, out_f, lambda m: _fail(name, m), torch.float32)
        return QuantLinear(qw, bias, kernel="reference", act_quant=act, method=method)

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        if qcfg.get("load_in_8bit"):
            return {"bits": 8, "group_size": -1, "sym": True, "threshold": qcfg.get("llm_int8_threshold")}
        return {"bits": 4, "group_size": None, "sym": True, "quant_type": qcfg.get("bnb_4bit_quant_type"),
                "double_quant": qcfg.get("bnb_4bit_use_double_quant")}


register_format(BitsAndBytesFormat)
