"""The torchao safetensors format (``quant_method: torchao``), as torchao 0.18 writes it through
transformers (``flatten_tensor_state_dict``) and reads it back (``unflatten_tensor_state_dict``, which
transformers' ``TorchAoHfQuantizer`` calls; torchao >= 0.14 reads safetensors, >= 0.15 ``Int8Tensor``).

Tensors: every quantized weight ``<mod>.weight`` (a torchao tensor subclass) is stored as plain tensors
``<mod>._weight_<field>``; everything else keeps its name. The safetensors *header metadata* describes
them: ``"<mod>.weight"`` -> JSON ``{"_type": <subclass>, "_data": {attributes}, "_tensor_data_names":
[fields]}``, every plain tensor -> ``{"_type": "Tensor"}``, and ``"tensor_names"`` -> the JSON list of
all original names (torchao's ``is_metadata_torchao`` rejects a file without them).

=========================  =====================================================================
subclass (config)          fields
=========================  =====================================================================
``Int4Tensor``             ``qdata`` int8 ``[N, K/2]``: signed int4 ``q = u - 8``, even k in the low
(Int4WeightOnlyConfig,     nibble, odd k in the high one; ``scale``, ``zero_point`` in the weight
packing ``plain``)         dtype, ``[K/g, N]`` (transposed); ``w = q * scale + zero_point``.
                           Attributes ``block_size [1, g]``, ``shape [N, K]``.
``Int8Tensor``             ``qdata`` int8 ``[N, K]``, ``scale`` float32 ``[N, 1]`` (per row) or
(Int8WeightOnlyConfig,     ``[1, 1]``; optional ``zero_point`` int8 (torchao writes zeros; polyquant
Int8DynamicActivation-     omits it). Attributes ``block_size``, ``dtype`` (the model's float dtype),
Int8WeightConfig)          ``act_quant_kwargs`` (``QuantizeTensorToInt8Kwargs`` for dynamic activations).
``Float8Tensor``           ``qdata`` float8_e4m3fn ``[N, K]``, ``scale`` float32 ``[N, 1]`` or
(Float8WeightOnlyConfig,   ``[1, 1]``; attributes ``block_size``, ``mm_config``, ``act_quant_kwargs``
Float8DynamicActivation-   (``QuantizeTensorToFloat8Kwargs``), ``kernel_preference``, ``dtype``.
Float8WeightConfig)
``IntxUnpackedToInt8``     read only: ``qdata`` int8 ``[N, K]`` holding ``intB`` values, ``scale`` and
``Tensor`` (IntxWeight-    ``zero_point`` ``[N, K/g]``; ``w = (q - zero_point) * scale``.
OnlyConfig)
=========================  =====================================================================

``quantization_config``: ``{"quant_method": "torchao", "quant_type": {"default": <config_to_dict of
the torchao config>}, "modules_to_not_convert": [float Linear layers], "include_input_output_embeddings":
false, "untie_embedding_weights": false}``; layers needing different configs are written as an
``FqnToConfig`` (per-module configs, which transformers also reads). polyquant writes only the config
fields that define the layout (the rest keep torchao's defaults), so older torchao releases parse it too.

Any polyquant layer with one of these layouts is stored, whichever method made it: 4-bit group-wise
weights with groups of 32/64/128/256 dividing ``in_features`` (the zero point becomes torchao's float
``zero_point = (8 - offset - zero) * scale``), symmetric 8-bit per-row / per-tensor weights, float8
per-row / per-tensor weights; float scales are cast to float32 for ``Int8Tensor``/``Float8Tensor``
(exact). Not readable (refused by name): ``Int4TilePackedTo4dTensor`` (tinygemm tiles),
``Int4PlainInt32Tensor``, MX/NVFP4, activation pre-scales and static activation scales, quantized
embeddings.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import CheckpointError, Format, linears_with_key, register_format
from polyquant.formats.base import LayerRefusal as _Refuse, plain_grid_reason, refusal
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["TorchAOFormat", "pack_int4", "unpack_int4", "TORCHAO_VERSION"]

TORCHAO_VERSION = "0.18.0"  # the torchao release whose layout this module writes
INT4_GROUPS = (32, 64, 128, 256)
_PREFIX = "_weight_"


# -- int4 nibble packing (FBGEMM / mslk ``pack_int4``) ---------------------------------------
def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned codes ``u [N, K]`` (0..15, value ``u - 8``) -> int8 ``[N, K/2]``: the two's-complement
    nibble of ``u - 8`` (= ``u ^ 8``), even k low, odd k high."""
    nib = (u.to(torch.uint8) ^ 8) & 0xF
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(torch.int8)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[N, K/2]`` -> unsigned codes ``[N, K]``."""
    b = q.view(torch.uint8)
    out = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)
    return out ^ 8


# -- torchao JSON pieces -----------------------------------------------------------------------
def _dtype_json(dt: torch.dtype) -> dict[str, Any]:
    return {"_type": "torch.dtype", "_data": str(dt).removeprefix("torch.")}


def _gran_json(g: str, versioned: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"_type": "PerRow", "_data": {"dim": -1}} if g == "row" else {"_type": "PerTensor", "_data": {}}
    if versioned:  # config_to_dict adds versions; the tensor-metadata encoder does not
        d = {"_type": d["_type"], "_version": 1, "_data": d["_data"]}
    return d


_AUTO = {"_type": "KernelPreference", "_data": "AUTO"}
_MM_CONFIG = {"_type": "Float8MMConfig", "_data": {"emulate": False, "use_fast_accum": True, "pad_inner_dim": False}}
_SYMMETRIC = {"_type": "MappingType", "_data": "SYMMETRIC"}


@dataclass(frozen=True)
class _Plan:
    """How one layer is stored: ``kind`` int4 / int8 / float8, weight granularity or group, activations."""

    kind: str
    gran: str | None = None       # int8 / float8: "row" | "tensor"
    group: int | None = None      # int4
    act: tuple | None = None      # ("int8", gran) | ("float8", gran, lb, ub)

    def config(self) -> dict[str, Any]:
        """``config_to_dict`` form of the torchao config (layout-defining fields only)."""
        if self.kind == "int4":
            return {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {
                "group_size": self.group, "int4_packing_format": {"_type": "Int4PackingFormat", "_data": "PLAIN"}}}
        if self.kind == "int8":
            if self.act is None:
                return {"_type": "Int8WeightOnlyConfig", "_version": 2,
                        "_data": {"granularity": _gran_json(self.gran, True)}}
            return {"_type": "Int8DynamicActivationInt8WeightConfig", "_version": 2,
                    "_data": {"act_mapping_type": _SYMMETRIC, "granularity": _gran_json(self.gran, True)}}
        if self.act is None:
            return {"_type": "Float8WeightOnlyConfig", "_version": 2, "_data": {
                "weight_dtype": _dtype_json(torch.float8_e4m3fn), "granularity": _gran_json(self.gran, True)}}
        _, agran, lb, ub = self.act
        return {"_type": "Float8DynamicActivationFloat8WeightConfig", "_version": 2, "_data": {
            "activation_dtype": _dtype_json(torch.float8_e4m3fn), "weight_dtype": _dtype_json(torch.float8_e4m3fn),
            "granularity": [_gran_json(agran, True), _gran_json(self.gran, True)],
            "activation_value_lb": lb, "activation_value_ub": ub}}

    def tensor_meta(self, shape: tuple[int, int], hp_dtype: torch.dtype, fields: list[str]) -> dict[str, Any]:
        """The safetensors metadata entry of ``<mod>.weight``."""
        n, k = shape
        if self.kind == "int4":
            data: dict[str, Any] = {"block_size": [1, self.group], "shape": [n, k]}
            typ = "Int4Tensor"
        else:
            block = [1, k] if self.gran == "row" else [n, k]
            if self.kind == "int8":
                act = None
                if self.act is not None:
                    act = {"_type": "QuantizeTensorToInt8Kwargs",
                           "_data": {"granularity": _gran_json(self.act[1], False), "mapping_type": _SYMMETRIC}}
                data = {"act_quant_kwargs": act, "block_size": block, "dtype": _dtype_json(hp_dtype)}
                typ = "Int8Tensor"
            else:
                act, mm = None, None
                if self.act is not None:
                    _, agran, lb, ub = self.act
                    mm = _MM_CONFIG
                    act = {"_type": "QuantizeTensorToFloat8Kwargs", "_data": {
                        "float8_dtype": _dtype_json(torch.float8_e4m3fn), "granularity": _gran_json(agran, False),
                        "mm_config": None, "hp_value_lb": lb, "hp_value_ub": ub, "kernel_preference": _AUTO}}
                data = {"block_size": block, "mm_config": mm, "act_quant_kwargs": act, "kernel_preference": _AUTO,
                        "dtype": _dtype_json(hp_dtype)}
                typ = "Float8Tensor"
        return {"_type": typ, "_data": data, "_tensor_data_names": fields}


def _act_plan(module: nn.Module) -> tuple | None:
    from polyquant.kernels.float8 import Float8DynamicActivation
    from polyquant.kernels.int8_dynamic import Int8DynamicActivation
    act = getattr(module, "act_quant", None)
    if act is None:
        return None
    if isinstance(act, Int8DynamicActivation):
        return ("int8", act.granularity)
    if isinstance(act, Float8DynamicActivation):
        return ("float8", act.granularity, act.lb, act.ub)
    raise _Refuse(f"its activation quantization ({type(act).__name__}) has no torchao equivalent "
                  "(torchao stores dynamic int8 / float8 activation rules)")


def _plan(qw: QuantizedWeight, module: nn.Module) -> _Plan:
    qt = qw.qt
    n, k = qw.shape
    r, c = qw.block
    if why := plain_grid_reason(qw, "torchao"):
        raise _Refuse(why)
    act = _act_plan(module)
    gran = "row" if (r, c) == (1, k) else ("tensor" if (r, c) == (n, k) else None)
    if qt.kind == "int" and qt.bits == 4:
        g = min(c, k)
        if r != 1 or g not in INT4_GROUPS or k % g:
            raise _Refuse(f"torchao int4 needs row blocks with a group size from {INT4_GROUPS} dividing "
                          f"in_features {k}; this layer has block {qw.block}")
        if act is not None:
            raise _Refuse("torchao int4 weights take no activation quantization")
        return _Plan("int4", group=g)
    if qt.kind == "int" and qt.bits == 8:
        if not qt.signed or qw.zero is not None:
            raise _Refuse("torchao int8 weights are symmetric (signed codes, no zero point)")
        if gran is None:
            raise _Refuse(f"torchao int8 weights are per row or per tensor, got block {qw.block}")
        if act is not None and act[0] != "int8":
            raise _Refuse("int8 weights with float8 activations have no torchao config")
        if act is not None and act[1] != gran:
            raise _Refuse(f"torchao uses one granularity for int8 weights and activations ({gran} vs {act[1]})")
        return _Plan("int8", gran=gran, act=act)
    if qt.name == "float8_e4m3fn":
        if qw.zero is not None:
            raise _Refuse("float8 weights with a zero point")
        if gran is None:
            raise _Refuse(f"torchao float8 weights here are per row or per tensor, got block {qw.block}")
        if act is not None and act[0] != "float8":
            raise _Refuse("float8 weights with int8 activations have no torchao config")
        return _Plan("float8", gran=gran, act=act)
    raise _Refuse(f"qtype {qt.name} (torchao stores int4 group-wise, int8 and float8_e4m3fn weights)")


def _layer_tensors(qw: QuantizedWeight, plan: _Plan) -> dict[str, torch.Tensor]:
    if plan.kind == "int4":
        s = qw.scale.detach()
        zero = qw.zero.double() if qw.zero is not None else torch.zeros(s.shape, dtype=torch.float64)
        zp = ((8.0 - qw.qt.code_offset - zero) * s.double()).to(s.dtype)
        return {"qdata": pack_int4(qw.codes), "scale": s.t().contiguous(), "zero_point": zp.t().contiguous()}
    scale = qw.scale.detach().to(torch.float32).reshape(-1, 1).contiguous()
    if plan.kind == "int8":
        return {"qdata": (qw.codes.to(torch.int16) - 128).to(torch.int8), "scale": scale}
    return {"qdata": qw.data.detach(), "scale": scale}


# -- reading -----------------------------------------------------------------------------------
def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"torchao layer {name!r}: {msg}")


def _config_for(qcfg: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The torchao config dict that applies to module ``name`` (None: not quantized by config)."""
    qt = qcfg.get("quant_type")
    if isinstance(qt, str):
        raise CheckpointError(f"torchao quant_type {qt!r} is the legacy string form (pickled AffineQuantizedTensor "
                              "checkpoints); polyquant reads the safetensors layout of torchao >= 0.14")
    if not isinstance(qt, dict) or "default" not in qt or not isinstance(qt["default"], dict):
        raise CheckpointError("torchao quantization_config.quant_type must be {'default': <config dict>}")
    cfg = qt["default"]
    if cfg.get("_type") in ("FqnToConfig", "ModuleFqnToConfig"):
        table = (cfg.get("_data") or {}).get("fqn_to_config") or (cfg.get("_data") or {}).get("module_fqn_to_config")
        if not isinstance(table, dict):
            raise CheckpointError("torchao FqnToConfig without fqn_to_config")
        for key in (name, f"{name}.weight"):
            if key in table:
                return table[key]
        for pat, c in table.items():
            if pat.startswith("re:") and (re.fullmatch(pat[3:], name) or re.fullmatch(pat[3:], f"{name}.weight")):
                return c
        return table.get("_default")
    return cfg


def _gran_from(d: Any, where: str) -> str:
    t = d.get("_type") if isinstance(d, dict) else None
    if t == "PerRow":
        return "row"
    if t == "PerTensor":
        return "tensor"
    raise CheckpointError(f"{where}: granularity {t!r} is not supported (PerRow / PerTensor)")


def _act_from_config(cfg: dict[str, Any], name: str):
    typ = cfg.get("_type")
    data = cfg.get("_data") or {}
    if typ == "Int8DynamicActivationInt8WeightConfig":
        mapping = (data.get("act_mapping_type") or {}).get("_data", "SYMMETRIC")
        if mapping != "SYMMETRIC":
            raise _fail(name, f"{mapping.lower()} dynamic activations are not supported")
        from polyquant.kernels.int8_dynamic import Int8DynamicActivation
        g = data.get("granularity")
        return Int8DynamicActivation(_gran_from(g, name) if g is not None else "row")
    if typ == "Float8DynamicActivationFloat8WeightConfig":
        from polyquant.kernels.float8 import Float8DynamicActivation
        g = data.get("granularity")
        if g is None:
            agran = "tensor"
        elif isinstance(g, list):
            agran = _gran_from(g[0], name)
        else:
            agran = _gran_from(g, name)
        return Float8DynamicActivation(agran, data.get("activation_value_lb"), data.get("activation_value_ub"))
    return None


_READ_TYPES = ("Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig",
               "Float8WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig", "IntxWeightOnlyConfig")


def _intx_bits(cfg: dict[str, Any], name: str) -> int:
    wd = ((cfg.get("_data") or {}).get("weight_dtype") or {}).get("_data", "int8")
    m = re.fullmatch(r"int([1-8])", str(wd))
    if not m:
        raise _fail(name, f"IntxWeightOnlyConfig weight_dtype {wd!r} is not supported")
    return int(m.group(1))


class TorchAOFormat(Format):
    name = "torchao"
    quant_method = "torchao"
    readers = ("transformers",)  # with torchao installed
    writers = ("transformers",)
    description = ("torchao tensor subclasses flattened into safetensors (Int4Tensor, Int8Tensor, Float8Tensor; "
                   "reads IntxUnpackedToInt8Tensor) with their descriptions in the header metadata")

    # -- saving -------------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return refusal(_plan, qw, module)

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        """torchao checkpoints name the tensor subclass of each weight, and polyquant reads four
        (``IntxUnpackedToInt8`` among them) but writes three, so a re-written layer need not have the
        stored layout: ``load_layer`` checks every field's shape and dtype against its subclass itself."""
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        return {_PREFIX + k: v for k, v in _layer_tensors(qw, _plan(qw, module)).items()}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        from polyquant.nn.quant_linear import QuantLinear
        configs = {name: _plan(m.quantized_weight, m).config() for name, m in layers.items()}
        distinct = {json.dumps(c, sort_keys=True) for c in configs.values()}
        if len(distinct) == 1:
            quant_type = next(iter(configs.values()))
        else:
            quant_type = {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": configs}}
        floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
        return {"quant_method": "torchao", "quant_type": {"default": quant_type}, "modules_to_not_convert": floats,
                "include_input_output_embeddings": False, "untie_embedding_weights": False}

    def safetensors_metadata(self, tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> dict[str, str]:
        owned = set()
        hp = [t.dtype for k, t in tensors.items() if t.is_floating_point() and t.dtype.itemsize > 1
              and not any(k.startswith(f"{n}.{_PREFIX}") for n in layers)]
        hp_dtype = max(set(hp), key=hp.count) if hp else torch.float32
        meta: dict[str, str] = {}
        names: list[str] = []
        for name, m in layers.items():
            qw = m.quantized_weight
            plan = _plan(qw, m)
            fields = list(_layer_tensors(qw, plan))
            owned.update(f"{name}.{_PREFIX}{f}" for f in fields)
            meta[f"{name}.weight"] = json.dumps(plan.tensor_meta(qw.shape, hp_dtype, fields))
            names.append(f"{name}.weight")
        for k in tensors:
            if k not in owned:
                meta[k] = json.dumps({"_type": "Tensor"})
                names.append(k)
        meta["tensor_names"] = json.dumps(names)
        return meta

    # -- loading ------------------------------------------------------------------------------
    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        if qcfg.get("include_input_output_embeddings"):
            raise CheckpointError("torchao checkpoints with quantized embeddings (include_input_output_embeddings) "
                                  "are not supported")
        return linears_with_key(model, keys, f"{_PREFIX}qdata", "torchao")

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(f".{_PREFIX}qdata")] for k in keys if k.endswith(f".{_PREFIX}qdata"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        try:
            cfg = _config_for(qcfg, "")
        except CheckpointError:
            cfg = None
        typ = (cfg or {}).get("_type")
        data = (cfg or {}).get("_data") or {}
        bits = {"Int4WeightOnlyConfig": 4, "Int8WeightOnlyConfig": 8, "Int8DynamicActivationInt8WeightConfig": 8,
                "Float8WeightOnlyConfig": 8, "Float8DynamicActivationFloat8WeightConfig": 8}.get(typ)
        if typ == "IntxWeightOnlyConfig":
            try:
                bits = _intx_bits(cfg, "")
            except CheckpointError:
                bits = None
        gs = data.get("group_size") if typ == "Int4WeightOnlyConfig" else None
        return {"bits": bits, "group_size": gs, "sym": None if typ is None else typ != "Int4WeightOnlyConfig",
                "torchao_config": typ}

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        cfg = _config_for(qcfg, name) or {}
        typ = cfg.get("_type")
        n, k = module.out_features, module.in_features
        fields = {key[len(_PREFIX):]: t for key, t in tensors.items() if key.startswith(_PREFIX)}
        other = sorted(set(tensors) - {f"{_PREFIX}{f}" for f in fields} - {"bias"})
        if other:
            raise _fail(name, f"unexpected tensor(s) {other}")
        unsupported = sorted(set(fields) - {"qdata", "scale", "zero_point"})
        if unsupported:
            raise _fail(name, f"field(s) {unsupported} are not supported (e.g. scale_and_zero: the tinygemm "
                              "Int4TilePackedTo4dTensor layout; act_pre_scale / act_quant_scale: pre-scaled or "
                              "static activations)")
        for f in ("qdata", "scale"):
            if f not in fields:
                raise _fail(name, f"missing _weight_{f}")
        q, scale, zp = fields["qdata"], fields["scale"], fields.get("zero_point")
        if not scale.is_floating_point():
            raise _fail(name, f"scale must be a float tensor, got {scale.dtype}")
        act = None
        if q.dtype == torch.float8_e4m3fn:
            if tuple(q.shape) != (n, k):
                raise _fail(name, f"qdata has shape {list(q.shape)}, expected [{n}, {k}]")
            block = self._row_or_tensor(name, scale, n, k)
            qw = QuantizedWeight.from_codes(q, "float8_e4m3fn", block, scale.reshape(-1, 1) if block[0] == 1
                                            else scale.reshape(1, 1))
            act = _act_from_config(cfg, name)
        elif q.dtype == torch.int8 and tuple(q.shape) == (n, k // 2) and typ in (None, "Int4WeightOnlyConfig"):
            qw = self._int4(name, q, scale, zp, n, k)
        elif q.dtype == torch.int8 and tuple(q.shape) == (n, k):
            if typ == "IntxWeightOnlyConfig":
                qw = self._intx(name, cfg, q, scale, zp, n, k)
            else:
                block = self._row_or_tensor(name, scale, n, k)
                zero = None
                if zp is not None and bool((zp != 0).any()):
                    zero = zp.to(torch.float32).reshape(scale.reshape(-1, 1).shape if block[0] == 1 else (1, 1))
                codes = (q.to(torch.int16) + 128).to(torch.uint8)
                s = scale.reshape(-1, 1) if block[0] == 1 else scale.reshape(1, 1)
                qw = QuantizedWeight.from_codes(codes, "int8", block, s, zero)
                act = _act_from_config(cfg, name)
        else:
            raise _fail(name, f"qdata {q.dtype} {list(q.shape)} matches no supported torchao tensor for a [{n}, {k}] "
                              f"weight (config {typ!r})")
        if typ is not None and typ not in _READ_TYPES:
            raise _fail(name, f"torchao config {typ!r} is not supported (polyquant reads {', '.join(_READ_TYPES)})")
        bias = tensors.get("bias")
        if bias is not None and tuple(bias.shape) != (n,):
            raise _fail(name, f"bias has shape {list(bias.shape)}, expected [{n}]")
        return QuantLinear(qw, bias, kernel="reference", act_quant=act, method="")

    @staticmethod
    def _row_or_tensor(name: str, scale: torch.Tensor, n: int, k: int) -> tuple[int, int]:
        if scale.numel() == 1:
            return (n, k)
        if scale.numel() == n and (scale.dim() == 1 or tuple(scale.shape) == (n, 1)):
            return (1, k)
        raise _fail(name, f"scale has shape {list(scale.shape)}: only per-row [{n}, 1] and per-tensor scales are "
                          "supported")

    @staticmethod
    def _int4(name, q, scale, zp, n, k) -> QuantizedWeight:
        if zp is None:
            raise _fail(name, "Int4Tensor needs _weight_zero_point")
        if scale.dim() != 2 or scale.shape[1] != n or k % scale.shape[0] or tuple(zp.shape) != tuple(scale.shape):
            raise _fail(name, f"scale / zero_point have shapes {list(scale.shape)} / {list(zp.shape)}; an int4 "
                              f"[{n}, {k}] weight needs [K/group, {n}] for both")
        group = k // scale.shape[0]
        s = scale.t().contiguous()
        zero_code = 8.0 - zp.t().double() / s.double()
        return QuantizedWeight.from_codes(unpack_int4(q), "uint4", (1, group), s, zero_code)

    @staticmethod
    def _intx(name, cfg, q, scale, zp, n, k) -> QuantizedWeight:
        bits = _intx_bits(cfg, name)
        if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
            raise _fail(name, f"scale has shape {list(scale.shape)}, expected [{n}, K/group]")
        group = k // scale.shape[1]
        half = 1 << (bits - 1)
        qi = q.to(torch.int16)
        if qi.numel() and (int(qi.min()) < -half or int(qi.max()) > half - 1):
            raise _fail(name, f"qdata values exceed the int{bits} range of the config")
        zero = None
        if zp is not None and bool((zp != 0).any()):
            if tuple(zp.shape) != tuple(scale.shape):
                raise _fail(name, f"zero_point has shape {list(zp.shape)}, expected {list(scale.shape)}")
            zero = zp.to(torch.float32)
        return QuantizedWeight.from_codes((qi + half).to(torch.uint8), f"int{bits}", (1, group), scale, zero)


register_format(TorchAOFormat)
