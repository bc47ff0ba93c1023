"""compressed-tensors' ``quantization_config`` schema as polyquant reads it: the quantization
args (:class:`_Args`), which config group applies to which module (:class:`_Config`: targets by
``re:`` name or class, ``ignore``, presets), and the activation rule ``input_activations``
describe (:class:`CTActivationQuant`). The per-layer tensors are :mod:`polyquant.formats.compressed_tensors`."""
from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polyquant.activations.base import ActRule, register_act_rule
from polyquant.formats.base import CheckpointError

__all__ = ["CTActivationQuant"]

log = logging.getLogger("polyquant.formats.compressed_tensors")

PACK, INT_Q, NAIVE, FLOAT_Q = "pack-quantized", "int-quantized", "naive-quantized", "float-quantized"
_READ_FORMATS = (PACK, INT_Q, NAIVE, FLOAT_Q)
_FP8_MAX = 448.0
_STRATEGIES = ("tensor", "channel", "group", "block")


# -- quantization args ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Args:
    """The subset of compressed-tensors ``QuantizationArgs`` that polyquant reads."""

    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None
    block: tuple[int, int] | None
    actorder: str | None
    dynamic: bool | str


def _parse_args(d: Any, where: str) -> _Args:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} must be an object, got {d!r}")
    try:
        bits = int(d.get("num_bits", 8))
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}.num_bits is not an integer: {d.get('num_bits')!r}") from None
    typ = str(d.get("type", "int")).lower()
    if typ not in ("int", "float"):
        raise CheckpointError(f"{where}.type must be 'int' or 'float', got {typ!r}")
    gs = d.get("group_size")
    strategy = d.get("strategy")
    if strategy is None:
        strategy = "tensor" if gs is None else ("group" if gs > 0 else "channel")
    strategy = str(strategy).lower()
    block = d.get("block_structure")
    if isinstance(block, str):
        block = [int(x) for x in block.split("x")]
    if strategy == "block":
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
            raise CheckpointError(f"{where}: block strategy needs block_structure [rows, cols], got {block!r}")
        block = (int(block[0]), int(block[1]))
    else:
        block = None
    if strategy == "group" and not (isinstance(gs, int) and gs > 0):
        raise CheckpointError(f"{where}: group strategy needs a positive group_size, got {gs!r}")
    actorder = d.get("actorder")
    if actorder is True:
        actorder = "group"
    if actorder is False:
        actorder = None
    actorder = {"dynamic": "group", "static": "weight"}.get(actorder, actorder)
    return _Args(bits, typ, bool(d.get("symmetric", True)), strategy, gs if strategy == "group" else None,
                 block, actorder, d.get("dynamic", False))


def _args_dict(a: _Args) -> dict[str, Any]:
    d: dict[str, Any] = {"num_bits": a.num_bits, "type": a.type, "symmetric": a.symmetric,
                         "strategy": a.strategy, "group_size": a.group_size, "dynamic": a.dynamic,
                         "actorder": a.actorder}
    if a.block is not None:
        d["block_structure"] = list(a.block)
    return d


# -- activation quantization ------------------------------------------------------------------
@register_act_rule
class CTActivationQuant:
    """Activation fake-quantization as compressed-tensors applies ``input_activations``:
    dynamic (per token, per token and group of input channels, or per tensor, from the current
    min/max) or static per tensor (``input_scale`` / ``input_zero_point``). ``ct_args`` is the
    dict it was built from; ``rule`` its description (registered as ``compressed-tensors``)."""

    kind = "compressed-tensors"

    def __init__(self, ct_args: dict[str, Any], scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None) -> None:
        a = _parse_args(ct_args, "input_activations")
        if a.type == "float" and a.num_bits != 8:
            raise CheckpointError(f"input_activations: float{a.num_bits} activations are not supported")
        if a.type == "int" and not 2 <= a.num_bits <= 8:
            raise CheckpointError(f"input_activations: int{a.num_bits} activations are not supported")
        if a.dynamic is True:
            if a.strategy not in ("token", "tensor", "group"):
                raise CheckpointError(f"input_activations: dynamic {a.strategy} strategy is not supported")
        elif a.dynamic is False:
            if a.strategy != "tensor" or scale is None:
                raise CheckpointError("input_activations: static activation quantization needs the tensor "
                                      "strategy and an input_scale")
        else:
            raise CheckpointError(f"input_activations: dynamic={a.dynamic!r} is not supported")
        self.args = a
        self.ct_args = dict(ct_args)
        self.scale = scale
        self.zero_point = zero_point

    def _range(self) -> tuple[float, float]:
        if self.args.type == "float":
            return -_FP8_MAX, _FP8_MAX
        b = self.args.num_bits
        return float(-(1 << (b - 1))), float((1 << (b - 1)) - 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        if a.strategy == "group" and self.scale is None:  # per token and group of input channels
            k, g = x.shape[-1], a.group_size
            xg = torch.nn.functional.pad(x, (0, -k % g)).unflatten(-1, (-(-k // g), g))
            return self._fake_quant(xg, (-1,)).flatten(-2)[..., :k]
        return self._fake_quant(x, (-1,) if a.strategy == "token" else None)

    def _fake_quant(self, x: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
        a = self.args
        qmin, qmax = self._range()
        xf = x.float()
        if self.scale is not None:
            s = self.scale.float().reshape(-1)[0]
            zp = self.zero_point.float().reshape(-1)[0] if self.zero_point is not None else None
        else:
            dims = dims if dims is not None else tuple(range(xf.dim()))
            lo = torch.clamp(xf.amin(dim=dims, keepdim=True), max=0)
            hi = torch.clamp(xf.amax(dim=dims, keepdim=True), min=0)
            if a.symmetric:
                s = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
                zp = None
            else:
                s = (hi - lo) / (qmax - qmin)
            s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
            if not a.symmetric:
                zp = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
        y = xf / s
        if zp is not None:
            y = y + zp
        y = torch.clamp(y, qmin, qmax)
        y = y.to(torch.float8_e4m3fn).float() if a.type == "float" else torch.round(y)
        if zp is not None:
            y = y - zp
        return (y * s).to(x.dtype)

    @property
    def rule(self) -> ActRule:
        """The description of this rule (:class:`polyquant.activations.ActRule`)."""
        a = self.args
        return ActRule(self.kind, "float8_e4m3fn" if a.type == "float" else f"int{a.num_bits}", a.strategy,
                       a.group_size if a.strategy == "group" else None, dynamic=a.dynamic is True,
                       symmetric=a.symmetric, recipe="compressed-tensors")

    @classmethod
    def from_rule(cls, rule: ActRule, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                  **tensors) -> "CTActivationQuant":
        fl = rule.dtype.startswith("float")
        d: dict[str, Any] = {"num_bits": 8 if fl else int(rule.dtype[3:]), "type": "float" if fl else "int",
                             "symmetric": rule.symmetric, "strategy": rule.granularity, "dynamic": rule.dynamic}
        if rule.group_size is not None:
            d["group_size"] = rule.group_size
        return cls(d, scale, zero_point)

    def to_dict(self) -> dict[str, Any]:
        return self.rule.to_dict()

    def __repr__(self) -> str:
        a = self.args
        return f"CTActivationQuant({a.type}{a.num_bits}, {a.strategy}, {'dynamic' if a.dynamic else 'static'})"


def _class_match(module: nn.Module, target: str) -> bool:
    return any(issubclass(cls, nn.Module) and cls.__name__ == target for cls in type(module).__mro__)


def _name_match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


class _Config:
    """A parsed compressed-tensors ``quantization_config``."""

    def __init__(self, qcfg: dict[str, Any]) -> None:
        status = qcfg.get("quantization_status", "compressed")
        if status != "compressed":
            raise CheckpointError(f"compressed-tensors checkpoint with quantization_status {status!r}: only "
                                  "'compressed' checkpoints (quantized tensors on disk) are supported")
        if qcfg.get("sparsity_config"):
            raise CheckpointError("compressed-tensors sparsity (sparsity_config) is not supported")
        if qcfg.get("transform_config"):
            raise CheckpointError("compressed-tensors transforms (transform_config) are not supported")
        if qcfg.get("kv_cache_scheme"):
            warnings.warn("compressed-tensors kv_cache_scheme is ignored: the KV cache stays in float", stacklevel=3)
        self.format = qcfg.get("format")
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError("compressed-tensors quantization_config has no config_groups")
        self.schemes: dict[str, dict[str, Any]] = {}
        for gname, scheme in groups.items():
            if isinstance(scheme, list):  # a preset name mapped to targets
                scheme = self._preset(gname, scheme)
            if not isinstance(scheme, dict) or not isinstance(scheme.get("targets"), list):
                raise CheckpointError(f"config_groups[{gname!r}] must have a 'targets' list")
            self.schemes[gname] = scheme
        self.target_to_group: dict[str, str] = {}
        for gname, scheme in self.schemes.items():  # later groups win for the same target (as the library)
            for t in scheme["targets"]:
                self.target_to_group[str(t)] = gname
        self.ignore = [str(x) for x in (qcfg.get("ignore") or [])]

    @staticmethod
    def _preset(gname: str, targets: list) -> dict[str, Any]:
        try:
            from compressed_tensors.quantization import preset_name_to_scheme
            return json.loads(preset_name_to_scheme(gname, targets).model_dump_json())
        except ImportError:
            raise CheckpointError(f"config group {gname!r} is a preset name; reading presets needs the "
                                  "compressed-tensors package") from None
        except Exception as e:
            raise CheckpointError(f"config group {gname!r}: unknown preset ({e})") from None

    def group_for(self, name: str, module: nn.Module) -> str | None:
        """The config group of a module, with the library's precedence (exact names, then regexes,
        then class names) and ``ignore`` applied."""
        if any(_name_match(name, ig) or _class_match(module, ig) for ig in self.ignore):
            return None
        targets = sorted(self.target_to_group, key=lambda x: ("re:" in x, x))
        for t in targets:
            if _name_match(name, t):
                return self.target_to_group[t]
        for t in targets:
            if _class_match(module, t):
                return self.target_to_group[t]
        return None

    def weights(self, gname: str) -> _Args | None:
        w = self.schemes[gname].get("weights")
        return None if w is None else _parse_args(w, f"config_groups[{gname!r}].weights")

    def inputs(self, gname: str) -> dict[str, Any] | None:
        return self.schemes[gname].get("input_activations")

    def layer_format(self, gname: str, keys: set[str]) -> str:
        f = self.schemes[gname].get("format") or self.format
        if f in (None, "mixed-precision"):
            f = PACK if "weight_packed" in keys else NAIVE
        return f
