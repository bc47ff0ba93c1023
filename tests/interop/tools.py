"""How each home tool reads and writes each format, for the interop suite.

A *reader* ``(tool, format)`` takes a checkpoint folder and returns the tool's own model (called
on token ids, it returns an object with ``.logits``); a *writer* ``(tool, format)`` takes a float
tiny-model folder and an output folder, has the tool quantize and save the model in that format,
and returns the tool's in-memory quantized model. ``needs`` names the importable modules a tool
needs (a missing one is reported as not installed). Nothing here knows polyquant's internals: the
suite compares logits.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Adapter:
    run: Callable
    needs: tuple[str, ...] = ()
    #: relative logit tolerance (max |a - b| / max |b|); 0 means bit-exact is required
    tolerance: float = 0.0
    note: str = ""
    #: the polyquant method config to write for this reader (None: the suite's generic choice)
    config: Callable | None = None
    #: strip polyquant's activation quantization before comparing (the tool runs float activations)
    float_activations: bool = False


def missing_modules(needs: tuple[str, ...]) -> list[str]:
    out = []
    for m in needs:
        try:
            importlib.import_module(m)
        except Exception:  # ImportError, or a library that fails at import time
            out.append(m)
    return out


# -- readers ----------------------------------------------------------------------------------------
def _transformers_read(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()


def _ct_read(folder: Path):
    """compressed-tensors' own decompression of every layer into the float model it describes."""
    import json
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    cfg = AutoConfig.from_pretrained(str(folder))
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = load_file(str(folder / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    layers = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")})
    import re
    groups = list(qcfg["config_groups"].values())

    def group_of(name: str) -> dict:
        for g in groups:
            for t in g["targets"]:
                if t == name or t == "Linear" or (t.startswith("re:") and re.fullmatch(t[3:], name)):
                    return g
        raise AssertionError(f"no config group targets {name}")

    for name in layers:
        group = group_of(name)
        comp = BaseCompressor.get_value_from_registry(group.get("format") or qcfg["format"])
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        dense[name + ".weight"] = comp.decompress(local, QuantizationScheme.model_validate(group))["weight"].float()
    rest = {k: v for k, v in sd.items() if not any(k.startswith(n + ".") for n in layers) or k.endswith(".bias")}
    missing, unexpected = model.load_state_dict({**rest, **dense}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def _hqq_read(folder: Path):
    from hqq.models.hf.base import AutoHQQHFModel
    return AutoHQQHFModel.from_quantized(str(folder), compute_dtype=torch.float32, device="cpu").eval()


def _quanto_read(folder: Path):
    from optimum.quanto import QuantizedModelForCausalLM
    return QuantizedModelForCausalLM.from_pretrained(str(folder))


# -- writers ----------------------------------------------------------------------------------------
def _ct_write(float_dir: Path, out: Path):
    """compressed-tensors quantizes (min/max qparams, W4 g32 symmetric), compresses and saves."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(m, qc, show_progress=False)
    for _, mod in m.named_modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        g = mod.weight.data.reshape(mod.weight.shape[0], -1, 32)
        s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
        mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
    comp = ModelCompressor.from_pretrained_model(m)
    comp.compress_model(m)
    m.save_pretrained(str(out))
    comp.update_config(str(out))
    comp.decompress_model(m)  # the library's own dense weights
    return m


def _hf_quantize(float_dir: Path, out: Path, qconfig):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32, device_map="cpu",
                                             quantization_config=qconfig).eval()
    m.save_pretrained(str(out))
    return m


def _bnb_write(float_dir: Path, out: Path):
    from transformers import BitsAndBytesConfig
    return _hf_quantize(float_dir, out, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True))


def _torchao_write(float_dir: Path, out: Path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig
    return _hf_quantize(float_dir, out, TorchAoConfig(Int8WeightOnlyConfig()))


def _fp8_write(float_dir: Path, out: Path):
    from transformers import FineGrainedFP8Config
    return _hf_quantize(float_dir, out, FineGrainedFP8Config())


def _hqq_write(float_dir: Path, out: Path):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    AutoHQQHFModel.quantize_model(m, quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
                                  compute_dtype=torch.float32, device="cpu")
    AutoHQQHFModel.save_to_safetensors(m, str(out), verbose=False)
    return m


def _quanto_write(float_dir: Path, out: Path):
    from optimum.quanto import QuantizedModelForCausalLM, qint4
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    qm = QuantizedModelForCausalLM.quantize(m, weights=qint4, exclude="lm_head")
    qm.save_pretrained(str(out))
    return qm


TF = ("transformers",)

#: (tool, format) -> how the tool reads our checkpoint of that format
READERS: dict[tuple[str, str], Adapter] = {
    ("transformers", "compressed-tensors"): Adapter(_transformers_read, TF + ("compressed_tensors",)),
    ("compressed-tensors", "compressed-tensors"): Adapter(_ct_read, ("compressed_tensors",)),
    ("transformers", "bitsandbytes"): Adapter(_transformers_read, TF + ("bitsandbytes",), tolerance=1e-2,
                                              note="bitsandbytes' CPU 4-bit matmul rounds differently"),
    ("transformers", "torchao"): Adapter(_transformers_read, TF + ("torchao",)),
    ("transformers", "fp8"): Adapter(_transformers_read, TF, tolerance=1e-5, float_activations=True,
                                     note="on a CPU transformers dequantizes the weights and runs float "
                                          "activations; compared with polyquant's activations unquantized"),
    ("transformers", "hqq"): Adapter(_transformers_read, TF + ("hqq",)),
    ("hqq", "hqq"): Adapter(_hqq_read, ("hqq",)),
    ("optimum-quanto", "quanto"): Adapter(_quanto_read, ("optimum.quanto",), tolerance=1e-5),
    ("transformers", "quanto"): Adapter(_transformers_read, TF + ("optimum.quanto",)),
    ("transformers", "bitnet"): Adapter(_transformers_read, TF, tolerance=1e-3,
                                        note="BitLinear applies the weight and activation scales in another order "
                                             "than polyquant's reference kernel"),
    ("transformers", "gptq"): Adapter(_transformers_read, TF + ("gptqmodel",)),
    ("transformers", "gptq_v2"): Adapter(_transformers_read, TF + ("gptqmodel",)),
    ("transformers", "awq"): Adapter(_transformers_read, TF + ("gptqmodel",)),
    ("transformers", "eetq"): Adapter(_transformers_read, TF + ("eetq",)),
    ("transformers", "fbgemm_fp8"): Adapter(_transformers_read, TF + ("fbgemm_gpu",)),
}

#: (tool, format) -> how the tool writes a checkpoint of that format
WRITERS: dict[tuple[str, str], Adapter] = {
    ("compressed-tensors", "compressed-tensors"): Adapter(_ct_write, ("compressed_tensors",)),
    ("transformers", "bitsandbytes"): Adapter(_bnb_write, TF + ("bitsandbytes",), tolerance=1e-2,
                                              note="bitsandbytes' CPU 4-bit matmul rounds differently"),
    ("transformers", "torchao"): Adapter(_torchao_write, TF + ("torchao",), tolerance=1e-5,
                                         note="torchao's int8 weight-only linear multiplies by the scale after the "
                                              "matmul; polyquant's reference kernel dequantizes first"),
    ("transformers", "fp8"): Adapter(_fp8_write, TF),
    ("hqq", "hqq"): Adapter(_hqq_write, ("hqq",)),
    ("optimum-quanto", "quanto"): Adapter(_quanto_write, ("optimum.quanto",), tolerance=1e-5),
}
