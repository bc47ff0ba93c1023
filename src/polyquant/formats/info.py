"""``checkpoint_info``: a summary of a checkpoint folder from config.json and the safetensors
headers alone (no model built): format, layers, tensors by kind, polyquant's record."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from polyquant.formats.accounting import _under
from polyquant.formats.api import _find_format, _qcfg, _read_record, _written_by
from polyquant.formats.base import CheckpointError
from polyquant.formats.io import SafetensorsIndex, read_config

__all__ = ["checkpoint_info"]


_CODE_HINT = re.compile(r"(qweight|weight_packed|packed|^weight$|codes|q_weight|W_q)")


def _heuristic_layers(keys_info: dict) -> list[str]:
    """Modules holding integer / fp8 tensors (formats without ``layers_from_keys``)."""
    names = set()
    for k, info in keys_info.items():
        if info.is_float and info.dtype not in ("F8_E4M3", "F8_E5M2"):
            continue
        mod = k.rsplit(".", 1)[0]
        if ".weight." in k:
            mod = k.split(".weight.", 1)[0]
        names.add(mod)
    return sorted(names)


def _kind(rel: str, info) -> str:
    r = rel.lower()
    if "zero" in r or r in ("qzeros", "zeros"):
        return "zeros"
    if "scale" in r or r in ("scales", "absmax", "scb"):
        return "scales"
    if r == "bias":
        return "bias"
    if _CODE_HINT.search(rel) and (not info.is_float or info.dtype in ("F8_E4M3", "F8_E5M2")):
        return "codes"
    return "other"


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a checkpoint folder from config.json and safetensors headers (no model built):
    format, quant_method, method, bits, group_size, sym, quantized layers (count, first names),
    float parameter count, bytes on disk (total and by kind) and who wrote it."""
    folder = Path(path)
    config = read_config(folder)
    qcfg = _qcfg(config, folder)
    record = _read_record(folder)
    index = SafetensorsIndex(folder)
    tinfo = index.tensors
    fmt = _find_format(qcfg) if qcfg is not None else None
    layers: list[str] = []
    if qcfg is not None:
        found = fmt.layers_from_keys(qcfg, set(tinfo)) if fmt is not None else None
        layers = sorted(found) if found is not None else _heuristic_layers(tinfo)
    prefixes = tuple(n + "." for n in layers)
    by_kind = {"codes": 0, "scales": 0, "zeros": 0, "bias": 0, "other_quantized": 0, "float": 0}
    float_params = 0
    by_dtype: dict[str, int] = {}
    for k, info in tinfo.items():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        if _under(k, prefixes):
            mod = next(n for n in layers if k.startswith(n + "."))
            kind = _kind(k[len(mod) + 1:], info)
            by_kind["other_quantized" if kind == "other" else kind] += info.nbytes
        else:
            by_kind["float"] += info.nbytes
            if info.is_float:
                float_params += int(torch.Size(info.shape).numel())
    desc = fmt.describe(qcfg) if (fmt is not None and qcfg is not None) else {}
    meta = {}
    try:
        with index:
            meta = index.metadata()
    except CheckpointError:
        pass
    files_bytes = sum(f.stat().st_size for f in index.files)
    return {
        "path": str(folder),
        "format": fmt.name if fmt is not None else None,
        "quant_method": qcfg.get("quant_method") if qcfg else None,
        "readable": qcfg is None or fmt is not None,
        "method": (record or {}).get("method") or (fmt.name if fmt is not None else None),
        "method_config": (record or {}).get("config"),
        "bits": desc.get("bits"),
        "group_size": desc.get("group_size"),
        "sym": desc.get("sym"),
        "quantized_layers": len(layers),
        "layer_names": layers[:5],
        "float_params": float_params,
        "tensors": len(tinfo),
        "bytes_total": files_bytes,
        "bytes_tensors": sum(i.nbytes for i in tinfo.values()),
        "bytes_by_kind": by_kind,
        "bytes_by_dtype": by_dtype,
        "architectures": config.get("architectures"),
        "written_by": _written_by(record, qcfg, meta),
    }
