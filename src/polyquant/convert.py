"""``convert``: turn any checkpoint polyquant can read into a plain float Hugging Face folder
(``bf16`` by default) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no
quantization config and no polyquant.

Generic over formats: the checkpoint is loaded with :func:`polyquant.formats.load`, every
``QuantLinear`` becomes an ``nn.Linear`` holding ``QuantizedWeight.dequantize()`` (computed in fp32,
rounded once to the target dtype), every other parameter is cast, and the folder is written
atomically (a temporary sibling renamed into place; a failure leaves nothing behind).

What a plain float model cannot hold is dropped, with a warning: activation quantization (fp8 /
int8 activations, LLM.int8 outlier handling) -- the converted model computes with the dequantized
weights and float activations.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["convert", "DTYPES"]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Replace every ``QuantLinear`` of ``model`` (in place) by an ``nn.Linear`` with its dequantized
    weight in ``dtype``; cast the rest to ``dtype``. Returns ``{"layers": n, "act_quant": [names]}``."""
    from polyquant.nn.quant_linear import QuantLinear
    from polyquant.nn.quantize import replace_module
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with_act = []
    for name, m in layers:
        w = m.quantized_weight.dequantize(torch.float32)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().float().to(dtype), requires_grad=False)
        if m.act_quant is not None:
            with_act.append(name)
        replace_module(model, name, lin)
    model.to(dtype)
    return {"layers": len(layers), "act_quant": with_act}


def convert(ckpt_dir: str | os.PathLike, to: str = "bf16", out_dir: str | os.PathLike | None = None, *,
            overwrite: bool = False) -> Path:
    """Dequantize the checkpoint at ``ckpt_dir`` into a plain ``to`` (``bf16``, ``fp16`` or
    ``fp32``) Hugging Face folder at ``out_dir``; returns ``out_dir``.

    Raises ``CheckpointError`` for a checkpoint polyquant cannot read, ``FileExistsError`` for an
    existing ``out_dir`` without ``overwrite``, ``ValueError`` for a bad ``to`` or ``out_dir``.
    """
    from polyquant.formats import load
    from polyquant.formats.io import atomic_dir, check_output_dir

    if to not in DTYPES:
        raise ValueError(f"to must be one of {sorted(DTYPES)}, got {to!r}")
    if out_dir is None:
        raise ValueError("out_dir is required")
    src, out = Path(ckpt_dir), Path(out_dir)
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"out_dir must differ from the checkpoint folder ({src})")
    check_output_dir(out, overwrite)  # refuse before loading anything
    dtype = DTYPES[to]
    model, tok = load(src, kernel="reference", dtype=torch.float32)
    rec = getattr(model, "polyquant", None)
    info = dequantize_model(model, dtype)
    if info["act_quant"]:
        warnings.warn(f"{len(info['act_quant'])} layer(s) (e.g. {info['act_quant'][0]!r}) quantize their activations "
                      "at run time; the converted float model does not (it keeps only the dequantized weights)",
                      stacklevel=2)
    if rec is not None:
        del model.polyquant
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = dtype
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(str(tmp))
    log.info("converted %s (%s, %d quantized layers) to %s %s", src, rec.format if rec else "float",
             info["layers"], to, out)
    return out
