"""The fine-grained FP8 checkpoint format (``quant_method: fp8``), as DeepSeek-V3 ships it and
transformers' ``FineGrainedFP8Config`` / ``FP8Linear`` and vLLM's ``fp8`` read it.

``config.json``::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}

Per quantized Linear ``[out, in]`` with block ``[bn, bk]``:

====================  =============  ==================================  ===============================
tensor                dtype          shape                               content
====================  =============  ==================================  ===============================
``weight``            float8_e4m3fn  ``[out, in]``                       codes ``q``
``weight_scale_inv``  float32        ``[ceil(out/bn), ceil(in/bk)]``     per block; **multiplied**:
                                                                         ``W = q * weight_scale_inv``
``activation_scale``  float32        ``[]``                              only ``activation_scheme: static``
``bias``              float          ``[out]``                           optional
====================  =============  ==================================  ===============================

Despite its name ``weight_scale_inv`` is the dequantization scale (the inverse of the quantization
multiplier ``448 / amax``). Edge blocks may be partial: transformers' ``FP8Linear`` (GPU) allocates
the ``ceil`` grid; its CPU path (``dequantize``, 5.24) derives the block as ``shape // grid`` and fails
on a layer with a partial edge block (576 with 128 blocks) -- ``polyquant convert`` serves CPU users.
``weight_block_size: null`` means one scale per tensor (shape ``[]``): read, never written (polyquant
writes one ``weight_block_size`` shared by every quantized layer, or refuses).

Activations: ``dynamic`` -- per token and group of ``bk`` input channels (per token when there is
no block), ``s = max(amax, 1e-4) / 448`` (DeepSeek's ``act_quant``; :class:`polyquant.kernels.fp8.Fp8ActQuant`,
recipe ``deepseek``); ``static`` -- ``x / activation_scale`` per tensor.

Refused on load (by name): ``scale_fmt: ue8m0`` (power-of-two ``float8_e8m0fnu`` scales),
``modules_to_convert`` (fp8 embeddings), fp4-packed experts.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import GPU_SERVING_NOTE, CheckpointError, Format, layer_bias, register_format
from polyquant.formats.fbgemm_fp8 import check_fp8_tensors, check_quantized_set, float_linears
from polyquant.kernels.fp8 import Fp8ActQuant
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["FineGrainedFp8Format", "read_block_size"]


def read_block_size(qcfg: dict[str, Any]) -> tuple[int, int] | None:
    """``weight_block_size`` of a config: ``(bn, bk)`` or None (per tensor). CheckpointError when
    it is not two positive integers."""
    b = qcfg.get("weight_block_size", [128, 128])
    if b is None:
        return None
    if not isinstance(b, (list, tuple)) or len(b) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in b):
        raise CheckpointError(f"fp8: weight_block_size must be two positive integers (or null), got {b!r}")
    return int(b[0]), int(b[1])


def _check_config(qcfg: dict[str, Any]) -> tuple[tuple[int, int] | None, str]:
    block = read_block_size(qcfg)
    scheme = str(qcfg.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise CheckpointError(f"fp8: activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
    fmt = qcfg.get("scale_fmt", "float")
    if fmt not in (None, "float"):
        raise CheckpointError(f"fp8: scale_fmt {fmt!r} (power-of-two ue8m0 scales) is not supported; polyquant "
                              "reads float32 weight_scale_inv")
    if qcfg.get("modules_to_convert"):
        raise CheckpointError("fp8: modules_to_convert (fp8 embeddings) is not supported")
    if qcfg.get("expert_dtype", "fp8") != "fp8":
        raise CheckpointError(f"fp8: expert_dtype {qcfg.get('expert_dtype')!r} is not supported")
    if str(qcfg.get("fmt", "e4m3")).lower() != "e4m3":
        raise CheckpointError(f"fp8: fmt {qcfg.get('fmt')!r} is not supported (e4m3 only)")
    return block, scheme


def _fail(name: str):
    return lambda msg: CheckpointError(f"fp8 layer {name!r}: {msg}")


class FineGrainedFp8Format(Format):
    name = "fp8"
    quant_method = "fp8"
    readers = ("transformers",)
    untested_readers = {"vllm": GPU_SERVING_NOTE, "sglang": GPU_SERVING_NOTE}
    untested_writers = {"transformers": "transformers quantizes to FineGrainedFP8 only on a GPU or XPU",
                        "deepseek": "DeepSeek's own converter is not a Python package"}
    description = "float8_e4m3fn weights with fp32 128x128 block scales (weight_scale_inv); fp8 1x128 activations"

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        """A per-tensor ``weight_scale_inv`` may be stored as a scalar ``[]`` or as ``[1, 1]``."""
        if found.dtype == written.dtype and found.numel() == written.numel() == 1:
            return None
        return super().tensor_mismatch(key, found, written)

    # -- saving ---------------------------------------------------------------------------
    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        if qw.qtype != "float8_e4m3fn":
            return f"fp8 stores float8_e4m3fn weights, got {qw.qtype}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras have no fp8 equivalent"
        if qw.scale.dtype != torch.float32:
            return f"weight_scale_inv is float32; this layer's scales are {qw.scale.dtype}"
        act = getattr(module, "act_quant", None)
        bk, inp = qw.block[1], qw.shape[1]
        ok_group = (act.group_size == bk or (bk >= inp and (act.group_size is None or act.group_size >= inp))
                    if isinstance(act, Fp8ActQuant) else False)
        if not (ok_group and act.recipe == "deepseek" and not act.static and act.scale_ub is None):
            return (f"fp8 readers quantize activations dynamically per token and group of {bk} channels "
                    f"(DeepSeek rule); this layer's activation rule is {act!r}")
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        return {"weight": qw.data.contiguous(), "weight_scale_inv": qw.scale.detach().float().contiguous()}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        blocks = {m.quantized_weight.block for m in layers.values()}
        if len(blocks) != 1:
            raise ValueError("fp8 has one weight_block_size for the whole model; the layers use "
                             f"{sorted(blocks)}")
        return {"quant_method": self.quant_method, "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(blocks.pop()), "modules_to_not_convert": float_linears(model)}

    # -- loading --------------------------------------------------------------------------
    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".weight_scale_inv")] for k in keys if k.endswith(".weight_scale_inv"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        try:
            block = read_block_size(qcfg)
        except CheckpointError:
            block = None
        return {"bits": 8, "group_size": block[1] if block else None, "sym": True,
                "weight_block_size": list(block) if block else None,
                "activation_scheme": qcfg.get("activation_scheme", "dynamic")}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        _check_config(qcfg)
        return check_quantized_set(model, qcfg, self.layers_from_keys(qcfg, keys) or [], "fp8", "weight_scale_inv")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        fail = _fail(name)
        block, scheme = _check_config(qcfg)
        out, inp = module.out_features, module.in_features
        allowed = {"weight", "weight_scale_inv", "bias"} | ({"activation_scale"} if scheme == "static" else set())
        unexpected = sorted(set(tensors) - allowed)
        if unexpected:
            raise fail(f"unexpected tensor(s) {unexpected} (activation_scheme {scheme!r})")
        missing = sorted({"weight", "weight_scale_inv"} - set(tensors))
        if scheme == "static" and "activation_scale" not in tensors:
            missing.append("activation_scale")
        if missing:
            raise fail(f"missing tensor(s) {missing}")
        qblock = block if block is not None else (out, inp)
        grid = (math.ceil(out / qblock[0]), math.ceil(inp / qblock[1]))
        if block is None and tensors["weight_scale_inv"].numel() != 1:
            raise fail(f"weight_scale_inv has shape {list(tensors['weight_scale_inv'].shape)}; weight_block_size "
                       "null means one scale per tensor")
        scale = check_fp8_tensors(fail, tensors["weight"], tensors["weight_scale_inv"], out, inp, grid,
                                  "weight_scale_inv")
        qw = QuantizedWeight.from_codes(tensors["weight"], "float8_e4m3fn", qblock, scale)
        if scheme == "static":
            a = tensors["activation_scale"]
            bad = a.numel() != 1 or not a.is_floating_point() or not bool(torch.isfinite(a).all())
            if bad or float(a.reshape(-1)[0]) <= 0:
                raise fail(f"activation_scale must be one positive finite float, got {a.dtype} {list(a.shape)}")
            act = Fp8ActQuant("deepseek", scale=a.float())
        else:
            act = Fp8ActQuant("deepseek", block[1] if block is not None else None)
        bias = layer_bias(tensors, out, fail)
        return QuantLinear(qw, bias, kernel="reference", act_quant=act, method="fp8-block")


register_format(FineGrainedFp8Format)
