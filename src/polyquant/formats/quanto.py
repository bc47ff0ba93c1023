"""The optimum-quanto format (``quant_method: quanto``): the state dict of a frozen quanto model
(``QModuleMixin._save_to_state_dict``) in safetensors, plus ``quanto_qmap.json``, as
``optimum.quanto.QuantizedModelForCausalLM.save_pretrained`` writes it and ``from_pretrained`` /
``requantize`` read it (optimum-quanto 0.2.7). transformers itself cannot load quanto checkpoints
(``QuantoHfQuantizer.is_serializable`` is False); its ``QuantoConfig`` fields are written to
config.json for information.

Per quantized Linear ``[N, K]`` (scale dtype = the model's float dtype):

================================  ==============  ==============================================
key                               dtype / shape   content
================================  ==============  ==============================================
``weight._data``                  int8 / fp8      ``qint8`` / ``qfloat8``: codes ``[N, K]``
                                  ``[N, K]``
``weight._data._data``            uint8           ``qint2`` / ``qint4``: the codes of the grouped
                                  ``[ceil(G/(8/b)), g]``  view ``[G = N*K/g, g]`` packed along dim 0:
                                                  row chunk ``i`` of ``ceil(G/(8/b))`` rows goes to
                                                  bits ``[b*i, b*(i+1))`` (``PackedTensor``)
``weight._scale``                 float ``[N, 1]`` or ``[G, 1]``
``weight._shift``                 float ``[G, 1]``  2/4-bit only: ``w = u * scale - shift``
                                                  (uint8 integer zero points when quanto's
                                                  ``zeropoint=True`` optimizer made it:
                                                  ``w = (u - shift) * scale``)
``input_scale``, ``output_scale``  float ``[]``    static activation scales (1.0 when unused)
``bias``                          float ``[N]``
================================  ==============  ==============================================

``quanto_qmap.json``: ``{module: {"weights": "qint4", "activations": "none"}}``. The group ``g`` is
not stored: quanto derives it from ``in_features`` (128, lowered by 32 until it divides, else one group
per row), so layers quantized with another group are refused when saving (polyquant reads any group
from the shapes). Activation scales must be calibrated before saving.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import CheckpointError, Format, linears_with_key, register_format
from polyquant.formats.base import LayerRefusal as _Refuse, plain_grid_reason, refusal
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["QuantoFormat", "pack_weights", "unpack_weights", "QMAP_FILE"]

QMAP_FILE = "quanto_qmap.json"
_TO_HF_WEIGHTS = {"qint2": "int2", "qint4": "int4", "qint8": "int8", "qfloat8_e4m3fn": "float8"}
_TO_HF_ACT = {"none": None, "qint8": "int8", "qfloat8_e4m3fn": "float8"}
_QMAP_ACT = {"none": "none", "qint8": "qint8", "qfloat8": "qfloat8_e4m3fn"}  # our rule's name -> quanto's
_FROM_HF_ACT = {None: None, "int8": "qint8", "float8": "qfloat8"}


def pack_weights(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto ``pack_weights``: uint8 ``[G, g]`` (values < 2**bits) -> ``[ceil(G / (8/bits)), g]``."""
    per = 8 // bits
    rows = -(-codes.shape[0] // per)
    pad = torch.zeros((rows * per - codes.shape[0], codes.shape[1]), dtype=torch.uint8)
    chunks = torch.cat([codes.to(torch.uint8), pad]).reshape(per, rows, codes.shape[1])
    out = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8)
    for i in range(per):
        out |= chunks[i] << (bits * i)
    return out


def unpack_weights(packed: torch.Tensor, bits: int, n_rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_weights` (quanto ``unpack``), keeping the first ``n_rows`` rows."""
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
    return torch.cat(parts)[:n_rows]


def _quanto_group(k: int) -> int | None:
    from polyquant.methods.quanto import quanto_group_size
    return quanto_group_size(k, 128)


def _weights_name(qw: QuantizedWeight) -> str:
    qt = qw.qt
    if qt.name == "float8_e4m3fn":
        return "qfloat8_e4m3fn"
    if qt.kind == "int" and qt.bits == 8:
        return "qint8"
    if qt.kind == "int" and qt.bits in (2, 4):
        return f"qint{qt.bits}"
    raise _Refuse(f"qtype {qt.name} (quanto stores int2/int4/int8 and float8_e4m3fn weights)")


def _plan(qw: QuantizedWeight, module: nn.Module) -> tuple[str, str]:
    """(quanto weights qtype, activations qtype) of a layer, or _Refuse."""
    from polyquant.kernels.quanto_act import QuantoActivation
    n, k = qw.shape
    if why := plain_grid_reason(qw, "quanto"):
        raise _Refuse(why)
    wname = _weights_name(qw)
    r, c = qw.block
    if wname in ("qint8", "qfloat8_e4m3fn"):
        if (r, c) != (1, k) or qw.zero is not None or (wname == "qint8" and not qw.qt.signed):
            raise _Refuse(f"quanto's 8-bit weights are symmetric per row, got block {qw.block}"
                          f"{' with zero points' if qw.zero is not None else ''}")
    else:
        want = _quanto_group(k) or k
        if r != 1 or min(c, k) != want:
            what = f"groups of {want}" if want < k else "one group per row"
            raise _Refuse(f"quanto derives the group size from in_features when it loads ({k} -> {what}); this "
                          f"layer has block {qw.block}")
    act = getattr(module, "act_quant", None)
    if act is None:
        return wname, "none"
    if not isinstance(act, QuantoActivation):
        raise _Refuse(f"its activation quantization ({type(act).__name__}) is not quanto's static rule")
    if not act.calibrated or act.output_scale is None:
        raise _Refuse("its activation scales are not calibrated (run "
                      "polyquant.kernels.quanto_act.calibrate_activations(model, data) first)")
    return wname, act.qtype


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"quanto layer {name!r}: {msg}")


class QuantoFormat(Format):
    name = "quanto"
    quant_method = "quanto"
    readers = ("optimum-quanto",)
    writers = ("optimum-quanto",)
    untested_readers = {"transformers": "transformers 5.24's QuantoConfig quantizes float weights; from_pretrained "
                                        "on a quanto folder returns a model without its quantized weights, "
                                        "silently (load it with optimum-quanto)"}
    description = ("optimum-quanto state dicts: int8/fp8 per-row, int2/int4 group-wise affine packed along dim 0, "
                   "static activation scales; quanto_qmap.json")

    # -- saving -------------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return refusal(_plan, qw, module)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        wname, aname = _plan(qw, module)
        n, k = qw.shape
        s = qw.scale.detach()
        t: dict[str, torch.Tensor] = {}
        if wname == "qint8":
            t["weight._data"] = (qw.codes.to(torch.int16) - 128).to(torch.int8)
            t["weight._scale"] = s.reshape(n, 1)
        elif wname == "qfloat8_e4m3fn":
            t["weight._data"] = qw.data.detach()
            t["weight._scale"] = s.reshape(n, 1)
        else:
            bits = qw.bits
            g = min(qw.block[1], k)
            codes = qw.codes  # w = (u - offset - zero) * s = u * s - shift
            zero = qw.zero.double() if qw.zero is not None else torch.zeros(s.shape, dtype=torch.float64)
            shift = ((zero + qw.qt.code_offset) * s.double()).to(s.dtype)
            t["weight._data._data"] = pack_weights(codes.reshape(n * k // g, g), bits)
            t["weight._scale"] = s.reshape(-1, 1).contiguous()
            t["weight._shift"] = shift.reshape(-1, 1).contiguous()
        one = torch.ones((), dtype=s.dtype)
        act = module.act_quant if aname != "none" else None
        t["input_scale"] = act.input_scale.detach().to(s.dtype).reshape(()) if act is not None else one
        t["output_scale"] = act.output_scale.detach().to(s.dtype).reshape(()) if act is not None else one.clone()
        return t

    def _qmap(self, layers: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
        out = {}
        for name, m in layers.items():
            w, a = _plan(m.quantized_weight, m)
            out[name] = {"weights": w, "activations": _QMAP_ACT[a]}
        return out

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        from polyquant.nn.quant_linear import QuantLinear
        qmap = self._qmap(layers)
        w = Counter(v["weights"] for v in qmap.values()).most_common(1)[0][0]
        a = Counter(v["activations"] for v in qmap.values()).most_common(1)[0][0]
        floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
        return {"quant_method": "quanto", "weights": _TO_HF_WEIGHTS[w], "activations": _TO_HF_ACT[a],
                "modules_to_not_convert": floats}

    def extra_files(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        return {QMAP_FILE: self._qmap(layers)}

    # -- loading ------------------------------------------------------------------------------
    def implied_config(self, folder: Any) -> dict[str, Any] | None:
        """quanto's own ``save_pretrained`` writes no quantization_config, only ``quanto_qmap.json``."""
        from pathlib import Path
        from polyquant.formats.io import read_json
        path = Path(folder) / QMAP_FILE
        if not path.is_file():
            return None
        qmap = read_json(path, "quanto quantization map")
        entries = [v for v in qmap.values() if isinstance(v, dict)]
        if not entries or len(entries) != len(qmap):
            raise CheckpointError(f"{path}: expected {{module: {{'weights': ..., 'activations': ...}}}}")
        w = Counter(str(v.get("weights")) for v in entries).most_common(1)[0][0]
        a = Counter(str(v.get("activations", "none")) for v in entries).most_common(1)[0][0]
        if w not in _TO_HF_WEIGHTS:
            raise CheckpointError(f"{path}: weights {w!r} are not supported ({', '.join(_TO_HF_WEIGHTS)})")
        acts = {"none": None, "qint8": "int8", "qfloat8": "float8", "qfloat8_e4m3fn": "float8"}
        if a not in acts:
            raise CheckpointError(f"{path}: activations {a!r} are not supported")
        return {"quant_method": "quanto", "weights": _TO_HF_WEIGHTS[w], "activations": acts[a],
                "modules_to_not_convert": None}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        return linears_with_key(model, keys, "weight._scale", "quanto")

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".weight._scale")] for k in keys if k.endswith(".weight._scale"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        bits = {"int2": 2, "int4": 4, "int8": 8, "float8": 8}.get(qcfg.get("weights"))
        return {"bits": bits, "group_size": None, "sym": bits == 8 if bits else None,
                "activations": qcfg.get("activations")}

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.kernels.quanto_act import QuantoActivation
        from polyquant.nn.quant_linear import QuantLinear
        n, k = module.out_features, module.in_features
        allowed = {"weight._data", "weight._data._data", "weight._scale", "weight._shift", "input_scale",
                   "output_scale", "bias"}
        unexpected = sorted(set(tensors) - allowed)
        if unexpected:
            raise _fail(name, f"unexpected tensor(s) {unexpected}")
        if "weight._scale" not in tensors:
            raise _fail(name, "missing weight._scale")
        scale = tensors["weight._scale"]
        if not scale.is_floating_point():
            raise _fail(name, f"weight._scale must be float, got {scale.dtype}")
        if "weight._data" in tensors:
            data = tensors["weight._data"]
            if tuple(data.shape) != (n, k) or scale.numel() != n:
                raise _fail(name, f"weight._data {list(data.shape)} / weight._scale {list(scale.shape)} do not fit a "
                                  f"[{n}, {k}] per-row weight")
            if data.dtype == torch.int8:
                qw = QuantizedWeight.from_codes((data.to(torch.int16) + 128).to(torch.uint8), "int8", (1, k),
                                                scale.reshape(n, 1))
            elif data.dtype == torch.float8_e4m3fn:
                qw = QuantizedWeight.from_codes(data, "float8_e4m3fn", (1, k), scale.reshape(n, 1))
            else:
                raise _fail(name, f"weight._data dtype {data.dtype} is not supported (int8, float8_e4m3fn)")
        elif "weight._data._data" in tensors:
            qw = self._qbits(name, qcfg, tensors, scale, n, k)
        else:
            raise _fail(name, "missing weight._data (8-bit) or weight._data._data (2/4-bit)")
        act = None
        aq = _FROM_HF_ACT.get(qcfg.get("activations"), "unknown")
        if aq == "unknown":
            raise _fail(name, f"activations {qcfg.get('activations')!r} are not supported (int8, float8)")
        if aq is not None:
            if "input_scale" not in tensors:
                raise _fail(name, "activations are quantized but input_scale is missing")
            act = QuantoActivation(aq, tensors["input_scale"].float(), tensors.get("output_scale"))
        bias = tensors.get("bias")
        if bias is not None and tuple(bias.shape) != (n,):
            raise _fail(name, f"bias has shape {list(bias.shape)}, expected [{n}]")
        return QuantLinear(qw, bias, kernel="reference", act_quant=act, method="")

    @staticmethod
    def _qbits(name, qcfg, tensors, scale, n, k) -> QuantizedWeight:
        packed = tensors["weight._data._data"]
        shift = tensors.get("weight._shift")
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise _fail(name, f"weight._data._data must be 2-D uint8, got {packed.dtype} {list(packed.shape)}")
        if shift is None or tuple(shift.shape) != tuple(scale.shape):
            raise _fail(name, "2/4-bit weights need weight._shift shaped like weight._scale")
        groups = scale.shape[0]
        if scale.dim() != 2 or scale.shape[1] != 1 or (n * k) % groups or k % ((n * k) // groups):
            raise _fail(name, f"weight._scale has shape {list(scale.shape)}, which gives no group size for a "
                              f"[{n}, {k}] weight")
        g = (n * k) // groups
        if packed.shape[1] != g:
            raise _fail(name, f"weight._data._data has {packed.shape[1]} columns, group size is {g}")
        prefer = {"int2": 2, "int4": 4}.get(qcfg.get("weights"), 4)
        bits = None
        for b in (prefer, 6 - prefer):
            if packed.shape[0] == -(-groups // (8 // b)):
                bits = b
                break
        if bits is None:
            raise _fail(name, f"weight._data._data has {packed.shape[0]} rows; {groups} groups packed at 2 or 4 bits "
                              f"need {-(-groups // 4)} or {-(-groups // 2)}")
        codes = unpack_weights(packed, bits, groups).reshape(n, k)
        s = scale.reshape(n, k // g)
        if shift.is_floating_point():
            zero = shift.reshape(n, k // g).double() / s.double()
            if bool((s == 0).any()):
                raise _fail(name, "a group has scale 0 with a float shift (quanto's 0/0 codes are undefined)")
        else:
            zero = shift.reshape(n, k // g).to(torch.float32)
        return QuantizedWeight.from_codes(codes, f"uint{bits}", (1, g), s, zero)


register_format(QuantoFormat)
