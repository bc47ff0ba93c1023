"""Export a quantized model to another runtime's file: GGUF (llama.cpp) and ONNX (onnxruntime).

Layering: formats -> export -> eval -> report -> cli. One module per target (``gguf.py``,
``onnx.py``); each registers an :class:`~polyquant.export.base.Exporter` in ``EXPORTERS``.

    polyquant.export("out/gptq-w4", to="gguf", out="model.gguf", type="Q4_0")
    polyquant.export(model, to="onnx", out="model.onnx", tokenizer=tok)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from polyquant.export.base import (EXPORTERS, ExportError, Exporter, ExportResult, atomic_file, get_exporter,
                                   register_exporter, resolve_model)

__all__ = ["export", "EXPORTERS", "ExportError", "Exporter", "ExportResult", "get_exporter", "register_exporter",
           "atomic_file", "list_exporters"]

_MODULES = {"gguf": "polyquant.export.gguf", "onnx": "polyquant.export.onnx"}


def _load_target(name: str) -> Exporter:
    if name not in EXPORTERS and name in _MODULES:
        import importlib
        importlib.import_module(_MODULES[name])  # heavy imports (onnx) only when asked
    return get_exporter(name)


def list_exporters() -> dict[str, Exporter]:
    """Every target (importing their modules; a target whose dependency is missing is skipped)."""
    for name in _MODULES:
        try:
            _load_target(name)
        except ImportError:
            pass
    return dict(EXPORTERS)


def export(model_or_dir: Any, to: str, out: str | os.PathLike, *, tokenizer: Any = None, **opts) -> ExportResult:
    """Export a model (in memory, or a folder / ``default`` that ``polyquant.load_model`` reads) to
    the runtime ``to`` (``gguf`` or ``onnx``), written atomically at ``out``.

    Options are the target's (``type=``, ``float_type=`` ... for GGUF; see each module). A layer the
    target cannot hold raises :class:`ExportError` naming the layer and the reason. Returns an
    :class:`ExportResult` (path, bytes, seconds, one entry per layer: kept codes / re-rounded and
    the loss)."""
    exp = _load_target(to)
    model, tok, source = resolve_model(model_or_dir, tokenizer)
    opts.setdefault("source", source)
    return exp.run(model, tok, Path(out), **opts)


class _CallableModule(type(os)):
    """``polyquant.export`` is this package; calling it is :func:`export` (``polyquant.export(model,
    to=..., out=...)``), the public API the brief names."""

    def __call__(self, model_or_dir: Any, to: str, out: str | os.PathLike, **kwargs) -> ExportResult:
        return export(model_or_dir, to, out, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
