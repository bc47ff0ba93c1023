"""The AQLM checkpoint format (``quant_method: aqlm``), as Vahe1994/AQLM's ``convert_to_hf.py`` writes it and
the ``aqlm`` package's ``QuantizedLinear`` (through transformers' ``AqlmConfig``) reads it.

Per quantized Linear (``[out, in]``, ``og`` / ``ig`` = out / in group size, ``M`` code books of ``2**b``
entries):

=============  ==========================================  ==============================================
tensor         dtype                                       shape
=============  ==========================================  ==============================================
``codes``      smallest signed int of ``b`` bits (int8 for ``[out/og, in/ig, M]``; a code ``>= 2**(b-1)`` is
               b <= 8, int16 for b <= 16)                  stored as ``code - 2**b`` (aqlm ``pack_int_data``)
``codebooks``  float16                                     ``[M, 2**b, og, ig]``
``scales``     float16                                     ``[out/og, 1, 1, 1]``
``bias``       float                                       ``[out]`` (optional)
=============  ==========================================  ==============================================

``W[o-group, i-group] = scales[o] * sum_m codebooks[m, codes[o, i, m] mod 2**b]``.

``quantization_config``: ``{"quant_method": "aqlm", "in_group_size", "out_group_size", "num_codebooks",
"nbits_per_codebook", "linear_weights_not_to_quantize": [...]}``. transformers replaces *every*
``nn.Linear`` not matched by that list (5.x matches module names, as regexes, against it), so the list
names every Linear left in float - ``lm_head`` - both as the module name and as ``<name>.weight``
(the spelling AQLM's own converter writes, which 4.x matched): with ``lm_head.weight`` alone,
transformers 5.x builds an uninitialised quantized ``lm_head`` and the logits are NaN. One scheme per
checkpoint (the config has one set of sizes); mixed schemes are refused on save.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (GPU_SERVING_NOTE, CheckpointError, Format, check_linears, layer_bias,
                                    register_format, require_tensors)
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["AQLMFormat", "pack_codes", "unpack_codes", "aqlm_layer_tensors", "aqlm_weight_from_tensors", "scheme_of"]

_KEYS = ("codes", "codebooks", "scales")


def _int_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.int8
    if bits <= 16:
        return torch.int16
    raise ValueError(f"nbits_per_codebook {bits} > 16 is not supported")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned code indices (any int dtype) -> AQLM's signed storage (``code - 2**bits`` above ``2**(bits-1)``)."""
    c = codes.to(torch.int32)
    c = torch.where(c >= (1 << (bits - 1)), c - (1 << bits), c)
    return c.to(_int_dtype(bits)).contiguous()


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """AQLM's signed codes -> unsigned indices (int32, ``code mod 2**bits``)."""
    return stored.to(torch.int32) & ((1 << bits) - 1)


def scheme_of(qw: QuantizedWeight) -> dict[str, int]:
    m, k, og, ig = qw.codebooks.shape
    return {"in_group_size": int(ig), "out_group_size": int(og), "num_codebooks": int(m),
            "nbits_per_codebook": int(k).bit_length() - 1}


def aqlm_layer_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of one layer (without ``bias``)."""
    qw = qw.to("cpu")
    bits = qw.bits
    ob = qw.scale.shape[0]
    return {"codes": pack_codes(qw.codes, bits),
            "codebooks": qw.codebooks.to(torch.float16).contiguous(),
            "scales": qw.scale.to(torch.float16).reshape(ob, 1, 1, 1).contiguous()}


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"AQLM layer {name!r}: {msg}")


def _cfg_int(qcfg: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = qcfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"AQLM quantization_config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def config_scheme(qcfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(num_codebooks, nbits, out_group_size, in_group_size)`` of a quantization_config (checked)."""
    return (_cfg_int(qcfg, "num_codebooks", 1, 1, 256), _cfg_int(qcfg, "nbits_per_codebook", 16, 1, 16),
            _cfg_int(qcfg, "out_group_size", 1, 1, 1 << 16), _cfg_int(qcfg, "in_group_size", 8, 1, 1 << 16))


def aqlm_weight_from_tensors(name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor], in_features: int,
                             out_features: int) -> QuantizedWeight:
    """Rebuild a ``QuantizedWeight`` from one layer's AQLM tensors, checked against the config."""
    M, bits, og, ig = config_scheme(qcfg)
    require_tensors(tensors, _KEYS, lambda m: _fail(name, m))
    unexpected = sorted(set(tensors) - {*_KEYS, "bias"})
    if unexpected:
        raise _fail(name, f"unexpected tensor(s) {unexpected}")
    if in_features % ig:
        raise _fail(name, f"in_group_size {ig} does not divide in_features {in_features}")
    if out_features % og:
        raise _fail(name, f"out_group_size {og} does not divide out_features {out_features}")
    ob, ib, K = out_features // og, in_features // ig, 1 << bits
    codes, cb, sc = tensors["codes"], tensors["codebooks"], tensors["scales"]
    want = _int_dtype(bits)
    if codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64) or tuple(codes.shape) != (ob, ib, M):
        raise _fail(name, f"codes must be a signed int tensor [{ob}, {ib}, {M}], got {codes.dtype} {list(codes.shape)}")
    if codes.dtype.itemsize < want.itemsize:
        raise _fail(name, f"codes are {codes.dtype}, too narrow for {bits}-bit codes")
    lo, hi = -(1 << (bits - 1)), (1 << bits) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise _fail(name, f"codes outside [{lo}, {hi}] for nbits_per_codebook {bits}")
    if not cb.dtype.is_floating_point or tuple(cb.shape) != (M, K, og, ig):
        raise _fail(name, f"codebooks must be float [{M}, {K}, {og}, {ig}], got {cb.dtype} {list(cb.shape)}")
    if not sc.dtype.is_floating_point or sc.numel() != ob or sc.shape[0] != ob:
        raise _fail(name, f"scales must be float [{ob}, 1, 1, 1], got {sc.dtype} {list(sc.shape)}")
    return QuantizedWeight.from_vector_codes(unpack_codes(codes, bits), cb.contiguous(), sc.reshape(ob, 1).contiguous())


class AQLMFormat(Format):
    """AQLM's ``QuantizedLinear`` tensors (codes, code books, scales)."""

    name = "aqlm"
    quant_method = "aqlm"
    untested_readers = {"transformers + aqlm": "the aqlm package is not in the test extra (not verified here)",
                        "vllm": GPU_SERVING_NOTE}
    untested_writers = {"aqlm (Vahe1994/AQLM convert_to_hf.py)": "a script in the AQLM repository, not an "
                                                                 "installable package"}
    description = "AQLM: additive code books (M x 2^b code words of og x ig), signed int codes, fp16 scales per output group"

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        if qw.layout != "vector":
            return f"AQLM stores additive code-book (vector) weights, not {qw.qtype}"
        if qw.outliers is not None:
            return "AQLM has no sparse outliers"
        if getattr(module, "act_quant", None) is not None:
            return "AQLM is weight-only (the layer has activation quantization)"
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return aqlm_layer_tensors(module.quantized_weight)

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        from polyquant.nn.quant_linear import QuantLinear
        if not layers:
            raise ValueError("no quantized layers to describe")
        schemes = {tuple(sorted(scheme_of(m.quantized_weight).items())) for m in layers.values()}
        if len(schemes) != 1:
            raise ValueError(f"AQLM's config holds one scheme per checkpoint; the layers use {len(schemes)}: "
                             f"{[dict(s) for s in sorted(schemes)]}")
        scheme = dict(next(iter(schemes)))
        floats = [n for n, m in model.named_modules()
                  if n and isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and n not in layers]
        skip: list[str] = []
        for n in floats:
            skip += [n, f"{n}.weight"]
        return {"quant_method": "aqlm", **scheme, "linear_weights_not_to_quantize": skip}

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".codebooks")] for k in keys if k.endswith(".codebooks"))

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        config_scheme(qcfg)
        names = set()
        for k in keys:
            for marker in _KEYS:
                if k.endswith("." + marker):
                    names.add(k[: -len(marker) - 1])
        for n in check_linears(sorted(names), model, "AQLM"):
            for marker in _KEYS:
                if f"{n}.{marker}" not in keys:
                    raise CheckpointError(f"AQLM layer {n!r}: missing tensor {marker!r} in the checkpoint")
        return sorted(names)

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        qw = aqlm_weight_from_tensors(name, qcfg, tensors, module.in_features, module.out_features)
        bias = layer_bias(tensors, module.out_features, lambda m: _fail(name, m), torch.float32)
        return QuantLinear(qw, bias, kernel="reference", method="aqlm")

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        m, b = qcfg.get("num_codebooks", 1), qcfg.get("nbits_per_codebook", 16)
        ig, og = qcfg.get("in_group_size", 8), qcfg.get("out_group_size", 1)
        try:
            bits = m * b / (ig * og)
        except TypeError:
            bits = None
        return {"bits": bits, "group_size": ig, "sym": None, "scheme": f"{m}x{b}"}


register_format(AQLMFormat)
