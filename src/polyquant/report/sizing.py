"""What the advisor is asked with: the parameter count of a model without loading its weights
(:func:`model_size`, :class:`ModelSize`), and the parsers of the command line's sizes and limits
(:func:`parse_size`, :func:`parse_ppl_increase`, :func:`format_bytes`)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FLOAT_BYTES", "ModelSize", "model_size", "parse_size", "parse_ppl_increase", "format_bytes"]

#: Bytes per parameter of everything polyquant leaves in float (it loads models in fp32).
FLOAT_BYTES = 4


# -- parsing ----------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int, name: str = "memory") -> int:
    """``4GB`` (10^9), ``512MiB`` (2^20), ``1.5G``, ``800000`` (bytes) -> bytes (ValueError naming
    ``name`` otherwise)."""
    if isinstance(text, bool):
        raise ValueError(f"{name} must be a size like 4GB or 512MiB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a size like 4GB, 512MiB or a number of bytes, got {text!r}")
        value = int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return value


def parse_ppl_increase(text: str | float, name: str = "max_ppl_increase") -> float:
    """``5%`` or ``0.05`` -> 0.05. A bare number above 1 is refused (write ``150%``)."""
    if isinstance(text, bool):
        raise ValueError(f"{name} must be a fraction (0.05) or a percentage (5%), got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"{name} must be a fraction (0.05) or a percentage (5%), got {text!r}") from None
        if not s.endswith("%") and value > 1:
            raise ValueError(f"{name}: {text!r} is ambiguous; give a fraction (0.05) or a percentage (5%)")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative fraction, got {text!r}")
    return value


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB"


def _pct(x: float | None) -> str:
    if x is None:
        return "?"
    return f"+{100 * x:.2f}%" if x < 10 else f"+{100 * x:.3g}%"


# -- model size -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """Parameters of a model: ``total_params`` (each tied tensor once), ``quantized_params``
    (the weights of the Linears ``quantize`` selects: inside the repeated blocks, lm_head kept
    float), ``float_bytes`` per parameter of the rest."""

    name: str
    total_params: int
    quantized_params: int
    float_bytes: int = FLOAT_BYTES
    how: str = ""

    def __post_init__(self) -> None:
        for f in ("total_params", "quantized_params", "float_bytes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative integer, got {v!r}")
        if self.quantized_params > self.total_params:
            raise ValueError(f"quantized_params ({self.quantized_params}) exceeds total_params ({self.total_params})")
        if self.total_params == 0:
            raise ValueError("total_params must be positive")

    @property
    def float_params(self) -> int:
        return self.total_params - self.quantized_params


def _count(model, name: str, how: str) -> ModelSize:
    from polyquant.nn.select import select_linears
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    try:
        quant = sum(lin.weight.numel() for _, lin in select_linears(model))
    except Exception:  # no repeated blocks found: every Linear but the head
        quant = 0
    return ModelSize(name, int(total), int(quant), FLOAT_BYTES, how)


def _from_folder(folder: Path, name: str) -> ModelSize:
    import torch
    from transformers import AutoConfig
    from polyquant.models import _model_class
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # count the float skeleton
    cls = _model_class(config, trust_remote_code=False)
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return _count(model, name, f"counted from {folder / 'config.json'} on the meta device (no weights loaded)")


def model_size(model: "str | os.PathLike | int | ModelSize") -> ModelSize:
    """The parameter counts of ``model``: an int (taken as the number of weights to quantize,
    nothing else counted), a :class:`ModelSize`, or a model spec as ``polyquant`` takes it
    (``default``, a local HF folder: counted from its config.json on the meta device, no weights
    read; a .gguf: loaded once into polyquant's cache). ValueError naming ``model`` otherwise."""
    if isinstance(model, ModelSize):
        return model
    if isinstance(model, bool):
        raise ValueError(f"model must be a parameter count or a model spec, got {model!r}")
    if isinstance(model, int):
        if model <= 0:
            raise ValueError(f"model: a parameter count must be positive, got {model}")
        return ModelSize(f"{model:,} params", model, model, FLOAT_BYTES, "given as a parameter count")
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a parameter count or a model spec, got {type(model).__name__}")
    spec = os.fspath(model)
    from polyquant import models
    if spec == "default" or spec.endswith(".gguf"):
        gguf = models.default_model_path() if spec == "default" else Path(spec).expanduser()
        if spec != "default" and not gguf.is_file():
            raise ValueError(f"model {spec!r} does not exist")
        folder = models.cache_dir() / "gguf" / models._gguf_key(gguf)
        if (folder / "config.json").is_file():
            return _from_folder(folder, spec)
        m, _ = models.load_model(spec)  # dequantizes once into the cache
        return _count(m, spec, "counted from the loaded model")
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {spec!r} is not 'default', a .gguf file or a folder with config.json")
    return _from_folder(folder, spec)
