"""The HQQ checkpoint format (``quant_method: hqq``): the safetensors-encoded ``HQQLinear.state_dict``
that hqq (0.2.x) and transformers' HQQ integration write, one set of keys per quantized Linear.

Per layer (hqq ``HQQLinear.state_dict`` with ``encoded_state_dict=True``; hqq ``core/utils.py``
encodes a bool as a uint8 scalar, an int as an int32 scalar, a str - and a ``torch.dtype`` as its
``str()`` - as uint8 character codes, a ``torch.Size`` as int64):

===============================  ================================================================
key                              content
===============================  ================================================================
``W_q``                          codes of the grouped weight, bit-packed along dim 0 (below)
``scale``, ``zero``              ``compute_dtype``; ``[numel/gs, 1]`` (axis 1) / ``[1, numel/gs]``
                                 (axis 0); ``W = (q - zero) * scale``, zero a float in code units
``nbits``, ``group_size``,       int32 scalars
``axis``
``shape``                        int64 ``[out, in]``
``packing``                      ``8bit_u8`` (5-8 bits) / ``4bit_u8`` / ``3bit_32`` / ``2bit_u8`` /
                                 ``1bit_u8``
``unpack_view_dtype``,           ``torch.uint8`` (``torch.int32`` for 3-bit); the compute dtype
``compute_dtype``                (e.g. ``torch.float16``)
``view_as_float``,               uint8 flags; ``quant_scale`` / ``quant_zero`` (quantized meta,
``quant_scale``, ``quant_zero``, deprecated in hqq) must be 0; ``encoded_state_dict`` and
``offload_meta``,                ``stores_quant_config`` are 1; ``channel_wise``, ``optimize``,
``encoded_state_dict``,          ``round_zero`` repeat the layer's ``weight_quant_params``
``stores_quant_config``,
``channel_wise``, ``optimize``,
``round_zero``
===============================  ================================================================

Grouping: axis 1 reshapes the flattened weight to ``[numel/gs, gs]`` (``block=(1, gs)`` when
``in % gs == 0``, ``block=(gs/in, in)`` when ``gs`` is a multiple of ``in``); axis 0 to
``[gs, numel/gs]``, expressible only with ``gs == out`` (``block=(out, 1)``); other groupings are
refused by name. Packing (hqq ``bitpack.py``) splits the rows of the grouped ``[R, C]`` codes into
``k`` equal slices (``k = 8 / bits``; ``10`` for 3-bit, rows zero-padded to a multiple of 10) and
stores slice ``t`` at bit ``(k - 1 - t) * bits`` of one word (uint8; int32 for 3-bit): ``4bit_u8``
= first half of the rows in the high nibble.

``quantization_config``: ``{"quant_method": "hqq", "quant_config": {"weight_quant_params": {...},
"scale_quant_params": null, "zero_quant_params": null, "offload_meta": false}, "skip_modules": [...]}``
(``quant_config`` keyed by linear tag when layer types differ), as transformers' ``HqqConfig`` and
``prepare_for_hqq_linear`` write it. Note: transformers 5.24's ``HqqConfig`` raises
NotImplementedError, so these checkpoints load through hqq (or polyquant), not transformers 5.24.

Files: ``model.safetensors`` (the tensors above) is polyquant's primary file; polyquant also reads
the folders hqq's ``AutoHQQHFModel.save_to_safetensors`` writes (the same encoded tensors, the
model's plain config.json without a quantization_config: recognised by the tensors,
``implied_config``). ``qmodel.pt`` is written too because it is the only file hqq's own loader
(``AutoHQQHFModel.from_quantized``) reads: ``{module name: state dict}`` for every leaf module
(``serialize_weights``' layout), quantized layers as the same encoded tensors, read by hqq with
``torch.load(weights_only=True)``. It holds only tensors in dicts, so that restricted unpickler
reads it without running code; polyquant itself never opens it (it reads the safetensors).
``tests/interop`` loads polyquant's folder with ``from_quantized`` and compares the logits.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import CheckpointError, Format, check_linears, layer_bias, register_format
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["HQQFormat", "hqq_pack", "hqq_unpack", "packing_for", "hqq_layer_tensors", "hqq_weight_from_tensors",
           "linear_tag"]

_PACKINGS = {"8bit_u8": (8, 1), "4bit_u8": (4, 2), "2bit_u8": (2, 4), "1bit_u8": (1, 8), "3bit_32": (3, 10)}
_DTYPES = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16,
           "torch.uint8": torch.uint8, "torch.int32": torch.int32}


def packing_for(bits: int) -> str:
    """hqq's packing name for a bit width (5, 6, 7 and 8 bits are stored one per byte)."""
    if bits >= 5:
        return "8bit_u8"
    return {4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}[bits]


def hqq_pack(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """Pack grouped codes ``[R, C]`` (uint8) along dim 0 in hqq's layout."""
    bits, k = _PACKINGS[packing]
    if k == 1:
        return codes.to(torch.uint8).contiguous()
    rows = codes.shape[0]
    wide = torch.int32 if packing == "3bit_32" else torch.int64
    x = codes.to(wide)
    if packing == "3bit_32":
        pad = -rows % k
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    elif rows % k:
        raise ValueError(f"{packing} needs a multiple of {k} grouped rows, got {rows}")
    step = x.shape[0] // k
    out = torch.zeros(step, x.shape[1], dtype=wide)
    for t in range(k):
        out |= x[t * step:(t + 1) * step] << ((k - 1 - t) * bits)
    return out.to(torch.int32 if packing == "3bit_32" else torch.uint8).contiguous()


def hqq_unpack(packed: torch.Tensor, packing: str, rows: int) -> torch.Tensor:
    """Inverse of :func:`hqq_pack`: the first ``rows`` grouped rows as uint8 codes."""
    bits, k = _PACKINGS[packing]
    if k == 1:
        return packed.to(torch.uint8)[:rows]
    x = packed.to(torch.int64)
    mask = (1 << bits) - 1
    parts = [(x >> ((k - 1 - t) * bits)) & mask for t in range(k)]
    return torch.cat(parts, dim=0)[:rows].to(torch.uint8)


def linear_tag(name: str) -> str:
    """transformers' HQQ linear tag: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


# -- checks and conversion ---------------------------------------------------------------------

def _grouping(qw: QuantizedWeight) -> tuple[int, int] | None:
    """``(axis, group_size)`` of a layout hqq can store, else None."""
    out, inp = qw.shape
    r, c = qw.block
    if r == 1 and (c >= inp or inp % c == 0):
        return 1, min(c, inp)
    if c >= inp and r < out and out % r == 0:  # groups of r whole rows
        return 1, r * inp
    if c == 1 and r >= out:
        return 0, out
    return None


def check_hqq_weight(qw: QuantizedWeight) -> str | None:
    """None when the HQQ format can store ``qw``; otherwise why not."""
    qt = qw.qt
    if qt.kind != "int" or qt.signed:
        return f"HQQ stores unsigned integer codes with a float zero point (uint1..uint8), not {qw.qtype}"
    if qw.zero is None:
        return "HQQ layers have a zero point (use an asymmetric uintB weight)"
    if qw.g_idx is not None or qw.extras:
        return "HQQ cannot store act-order (g_idx) or extra tensors"
    g = _grouping(qw)
    if g is None:
        return (f"block {qw.block} is neither groups along the input dim dividing in_features (axis 1) nor "
                "whole columns (axis 0)")
    axis, gs = g
    rows = qw.shape[0] * qw.shape[1] // gs if axis == 1 else gs
    _, k = _PACKINGS[packing_for(qw.bits)]
    if packing_for(qw.bits) != "3bit_32" and rows % k:
        return f"{packing_for(qw.bits)} packs {k} grouped rows per word; this layer has {rows} groups"
    if qw.scale.dtype != qw.zero.dtype or not qw.scale.dtype.is_floating_point:
        return f"HQQ stores scale and zero in one float compute dtype, got {qw.scale.dtype} / {qw.zero.dtype}"
    return None


def _s(text: str) -> torch.Tensor:
    return torch.tensor([ord(ch) for ch in text], dtype=torch.uint8)


def _b(v: bool) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.uint8)


def _i(v: int) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.int32)


def hqq_layer_tensors(qw: QuantizedWeight, optimize: bool = True, round_zero: bool | None = None
                      ) -> dict[str, torch.Tensor]:
    """The encoded ``HQQLinear.state_dict`` of one layer (without ``bias``)."""
    if reason := check_hqq_weight(qw):
        raise ValueError(reason)
    qw = qw.to("cpu")
    out, inp = qw.shape
    axis, gs = _grouping(qw)
    codes = qw.codes
    grouped = codes.reshape(-1, gs) if axis == 1 else codes  # axis 0, gs == out: [gs, numel/gs] is W itself
    packing = packing_for(qw.bits)
    shape_sz = (-1, 1) if axis == 1 else (1, -1)
    dt = qw.scale.dtype
    rz = (qw.bits == 4) if round_zero is None else round_zero
    return {
        "W_q": hqq_pack(grouped, packing),
        "nbits": _i(qw.bits), "group_size": _i(gs), "shape": torch.tensor([out, inp], dtype=torch.int64),
        "scale": qw.scale.reshape(shape_sz).contiguous(), "zero": qw.zero.reshape(shape_sz).contiguous(),
        "axis": _i(axis), "packing": _s(packing),
        "unpack_view_dtype": _s("torch.int32" if packing == "3bit_32" else "torch.uint8"),
        "view_as_float": _b(False), "quant_scale": _b(False), "quant_zero": _b(False),
        "compute_dtype": _s(str(dt)), "offload_meta": _b(False), "encoded_state_dict": _b(True),
        "stores_quant_config": _b(True), "channel_wise": _b(True), "optimize": _b(optimize), "round_zero": _b(rz),
    }


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"HQQ layer {name!r}: {msg}")


def _dec_int(name: str, t: torch.Tensor, key: str) -> int:
    if t.numel() != 1 or t.dtype.is_floating_point:
        if t.numel() == 1 and key == "nbits":
            raise _fail(name, f"nbits {float(t):g} is not an integer bit width (hqq's 1.58-bit is not supported)")
        raise _fail(name, f"{key} must be an integer scalar, got {t.dtype} {list(t.shape)}")
    return int(t.reshape(-1)[0])


def _dec_str(name: str, t: torch.Tensor, key: str) -> str:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise _fail(name, f"{key} must be a uint8 string, got {t.dtype} {list(t.shape)}")
    return "".join(chr(int(c)) for c in t.tolist())


def _dec_bool(t: torch.Tensor | None, default: bool = False) -> bool:
    return default if t is None else bool(int(t.reshape(-1)[0]))


def hqq_weight_from_tensors(name: str, tensors: dict[str, torch.Tensor], in_features: int,
                            out_features: int) -> QuantizedWeight:
    """Rebuild a ``QuantizedWeight`` from one layer's encoded HQQ state dict."""
    for key in ("W_q", "scale", "zero", "nbits", "group_size", "shape", "axis", "packing"):
        if key not in tensors:
            raise _fail(name, f"missing tensor {key!r}" + (" (quantized scale/zero meta is not supported)"
                                                          if key in ("scale", "zero") else ""))
    if "encoded_state_dict" not in tensors:
        raise _fail(name, "not an encoded (safetensors) HQQ state dict")
    if _dec_bool(tensors.get("quant_scale")) or _dec_bool(tensors.get("quant_zero")):
        raise _fail(name, "quantized scale / zero meta-data (deprecated in hqq) is not supported")
    bits = _dec_int(name, tensors["nbits"], "nbits")
    gs = _dec_int(name, tensors["group_size"], "group_size")
    axis = _dec_int(name, tensors["axis"], "axis")
    packing = _dec_str(name, tensors["packing"], "packing")
    shape = [int(v) for v in tensors["shape"].reshape(-1).tolist()]
    if shape != [out_features, in_features]:
        raise _fail(name, f"shape {shape} != the layer's [{out_features}, {in_features}]")
    if not 1 <= bits <= 8:
        raise _fail(name, f"nbits {bits} is outside 1..8")
    pbits = _PACKINGS[packing][0] if packing in _PACKINGS else None
    if pbits is None or not (pbits == bits or (pbits == 8 and bits >= 5)):
        raise _fail(name, f"packing {packing!r} does not hold {bits}-bit codes")
    if axis not in (0, 1):
        raise _fail(name, f"axis {axis} is not 0 or 1")
    numel = out_features * in_features
    if gs <= 0 or numel % gs:
        raise _fail(name, f"group_size {gs} does not divide the {numel} weight values")
    if axis == 1 and in_features % gs and gs % in_features:
        raise _fail(name, f"axis-1 groups of {gs} straddle rows of in_features={in_features}; QuantizedWeight "
                          "cannot express that")
    if axis == 0 and gs != out_features:
        raise _fail(name, f"axis-0 groups of {gs} < out_features={out_features} gather strided rows; QuantizedWeight "
                          "cannot express that")
    rows, cols = (numel // gs, gs) if axis == 1 else (gs, numel // gs)
    w_q = tensors["W_q"]
    if _dec_bool(tensors.get("view_as_float")):
        view = _dec_str(name, tensors["unpack_view_dtype"], "unpack_view_dtype") if "unpack_view_dtype" in tensors \
            else ("torch.int32" if packing == "3bit_32" else "torch.uint8")
        if view not in _DTYPES:
            raise _fail(name, f"unpack_view_dtype {view!r} is not supported")
        w_q = w_q.contiguous().view(_DTYPES[view])
    want = torch.int32 if packing == "3bit_32" else torch.uint8
    k = _PACKINGS[packing][1]
    prow = math.ceil(rows / k)
    if w_q.dtype != want or tuple(w_q.shape) != (prow, cols):
        raise _fail(name, f"W_q is {w_q.dtype} {list(w_q.shape)}, expected {want} {[prow, cols]} for {packing}")
    if packing != "3bit_32" and rows % k:
        raise _fail(name, f"{packing} needs a multiple of {k} grouped rows, got {rows}")
    codes = hqq_unpack(w_q, packing, rows)
    if int(codes.max()) >= (1 << bits):
        raise _fail(name, f"W_q holds codes above {(1 << bits) - 1} for nbits={bits}")
    sz = (rows, 1) if axis == 1 else (1, cols)
    scale, zero = tensors["scale"], tensors["zero"]
    for key, t in (("scale", scale), ("zero", zero)):
        if not t.dtype.is_floating_point or tuple(t.shape) != sz:
            raise _fail(name, f"{key} is {t.dtype} {list(t.shape)}, expected a float tensor {list(sz)}")
    if axis == 1:
        codes = codes.reshape(out_features, in_features)
        block = (1, gs) if in_features % gs == 0 else (gs // in_features, in_features)
        grid = (out_features // block[0], in_features // block[1])
    else:
        block, grid = (out_features, 1), (1, in_features)
    return QuantizedWeight.from_codes(codes.contiguous(), f"uint{bits}", block, scale.reshape(grid).contiguous(),
                                      zero.reshape(grid).contiguous())


# -- hqq's own loader ------------------------------------------------------------------------------

QMODEL_FILE = "qmodel.pt"


def hqq_qmodel_bytes(model: nn.Module, layers: dict[str, nn.Module]) -> bytes:
    """The ``qmodel.pt`` that ``AutoHQQHFModel.from_quantized`` reads: ``{module name: state dict}``
    for every leaf module with tensors (hqq's ``serialize_weights``), quantized layers as their
    encoded ``HQQLinear`` state dict (``HQQLinear.load_state_dict`` decodes it) plus ``bias``.
    Only tensors, in dicts: ``torch.load(weights_only=True)``, which hqq uses, reads it without
    running any pickled code."""
    import io
    weights: dict[str, dict[str, torch.Tensor]] = {}
    inside = tuple(n + "." for n in layers)
    for name, mod in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if name in layers:
            sd = dict(hqq_layer_tensors(mod.quantized_weight))
            if getattr(mod, "bias", None) is not None:
                sd["bias"] = mod.bias.detach().cpu().clone()
        elif next(mod.children(), None) is None:
            sd = {k: v.detach().cpu().clone() for k, v in mod.state_dict().items()}
        else:
            continue
        if sd:
            weights[name] = sd
    buf = io.BytesIO()
    torch.save(weights, buf)
    return buf.getvalue()


# -- the Format ---------------------------------------------------------------------------------

def _wqp(qw: QuantizedWeight, optimize: bool, round_zero: bool | None) -> dict[str, Any]:
    axis, gs = _grouping(qw)
    return {"nbits": qw.bits, "channel_wise": True, "group_size": gs, "optimize": optimize,
            "round_zero": (qw.bits == 4) if round_zero is None else round_zero, "axis": axis,
            "view_as_float": False}


def _record_opts(model: nn.Module) -> tuple[bool, bool | None]:
    """``optimize`` / ``round_zero`` from polyquant's record of an hqq-quantized model (defaults otherwise)."""
    rec = getattr(model, "polyquant", None)
    cfg = dict(getattr(rec, "config", {}) or {}) if rec is not None and getattr(rec, "method", "") == "hqq" else {}
    return bool(cfg.get("optimize", True)), cfg.get("round_zero")


class HQQFormat(Format):
    """hqq's safetensors-encoded ``HQQLinear`` state dicts."""

    name = "hqq"
    quant_method = "hqq"
    whole_model_files = (QMODEL_FILE,)  # a pickle of every module's tensors: not written by streaming saves
    readers = ("hqq",)  # AutoHQQHFModel.from_quantized reads qmodel.pt
    writers = ("hqq",)  # AutoHQQHFModel.save_to_safetensors
    untested_readers = {"transformers": "transformers 5.24 has no HQQ loader (HqqConfig raises NotImplementedError): "
                                        "from_pretrained returns a model without the quantized weights, silently"}
    description = "HQQ: uint1-8 codes packed along the grouped rows, float scale and zero per group"

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return check_hqq_weight(qw)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return hqq_layer_tensors(module.quantized_weight)

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        if not layers:
            raise ValueError("no quantized layers to describe")
        optimize, round_zero = _record_opts(model)
        params = {n: _wqp(m.quantized_weight, optimize, round_zero) for n, m in layers.items()}
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        tags_q = {linear_tag(n) for n in layers}
        skip = sorted({linear_tag(n) for n in linears} - tags_q)
        mixed = sorted({linear_tag(n) for n in linears if n not in layers} & tags_q)
        if mixed:
            warnings.warn(f"HQQ's config names layer *types*: {mixed} are quantized in some blocks and not in others, "
                          "which transformers' HQQ loader cannot express (polyquant reads the per-layer tensors)",
                          stacklevel=2)

        def wrap(p: dict[str, Any]) -> dict[str, Any]:
            return {"weight_quant_params": p, "scale_quant_params": None, "zero_quant_params": None,
                    "offload_meta": False}

        distinct = {tuple(sorted(p.items())) for p in params.values()}
        if len(distinct) == 1:
            quant_config: dict[str, Any] = wrap(next(iter(params.values())))
        else:
            by_tag: dict[str, dict[str, Any]] = {}
            for n, p in params.items():
                t = linear_tag(n)
                if t in by_tag and by_tag[t] != p:
                    raise ValueError(f"HQQ's config holds one setting per layer type; {t!r} layers differ "
                                     f"({by_tag[t]} vs {p})")
                by_tag[t] = p
            quant_config = {t: wrap(p) for t, p in sorted(by_tag.items())}
        return {"quant_method": "hqq", "quant_config": quant_config, "skip_modules": skip}

    def extra_files(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        """``qmodel.pt`` for hqq's own loader (see the module docstring): every leaf module's
        state dict by module name, the quantized ones as the same encoded tensors as the safetensors."""
        return {QMODEL_FILE: hqq_qmodel_bytes(model, layers)}

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".W_q")] for k in keys if k.endswith(".W_q"))

    def implied_config(self, folder: Any) -> dict[str, Any] | None:
        """hqq's ``AutoHQQHFModel.save_to_safetensors`` writes the encoded ``HQQLinear`` state dicts
        with the model's plain config.json (no quantization_config): a folder whose tensors hold
        ``<layer>.W_q`` with its ``nbits`` / ``packing`` / ``encoded_state_dict`` siblings is read as
        hqq, with the settings of its first layer (every layer's own tensors are read anyway)."""
        from pathlib import Path
        from polyquant.formats.io import SafetensorsIndex
        folder = Path(folder)
        if not any(folder.glob("*.safetensors")):
            return None
        index = SafetensorsIndex(folder)
        keys = index.keys()
        layers = [n for n in self.layers_from_keys({}, keys) or []
                  if all(f"{n}.{k}" in keys for k in ("nbits", "group_size", "axis", "packing"))]
        if not layers:
            return None
        with index:
            first = {k: index.get(f"{layers[0]}.{k}") for k in ("nbits", "group_size", "axis")}
        params = {"nbits": _dec_int(layers[0], first["nbits"], "nbits"),
                  "group_size": _dec_int(layers[0], first["group_size"], "group_size"),
                  "axis": _dec_int(layers[0], first["axis"], "axis")}
        return {"quant_method": "hqq", "quant_config": {"weight_quant_params": params},
                "implied_by": f"{len(layers)} layers of hqq tensors (W_q, scale, zero, ...) without a "
                              "quantization_config in config.json (hqq's save_to_safetensors)"}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        names = self.layers_from_keys(qcfg, keys) or []
        return check_linears(names, model, "HQQ")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        qw = hqq_weight_from_tensors(name, tensors, module.in_features, module.out_features)
        bias = layer_bias(tensors, module.out_features, lambda m: _fail(name, m), torch.float32)
        return QuantLinear(qw, bias, kernel="reference", method="hqq")

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        qc = qcfg.get("quant_config") or {}
        p = qc.get("weight_quant_params") if isinstance(qc, dict) else None
        if p is None and isinstance(qc, dict) and qc:
            first = next(iter(qc.values()))
            p = first.get("weight_quant_params") if isinstance(first, dict) else None
        p = p or {}
        return {"bits": p.get("nbits"), "group_size": p.get("group_size"), "sym": False, "axis": p.get("axis")}


register_format(HQQFormat)
