"""What every export target shares: the registry, the error type, the model source, atomic files.

An exporter turns a quantized model (in memory, or a checkpoint folder polyquant reads) into one
file that another runtime loads (a GGUF for llama.cpp, an ONNX decoder for onnxruntime). It keeps
polyquant's codes and scales where the target's grid holds them exactly and says, layer by layer,
what it kept, what it re-rounded (with the loss) and what it refused (with the reason).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from polyquant.registry import lookup

__all__ = ["ExportError", "Exporter", "EXPORTERS", "register_exporter", "get_exporter", "atomic_file",
           "resolve_model", "quant_layers", "ExportResult"]


class ExportError(ValueError):
    """A model (or one of its layers) the target cannot hold; the message names the layer and why."""


@dataclass(frozen=True)
class Exporter:
    """One export target.

    Attributes:
        name: ``--to`` value (``gguf``, ``onnx``).
        suffix: file suffix of the output.
        readers: runtimes that read the output (for the integration graph).
        run: ``(model, tokenizer, out: Path, **opts) -> ExportResult``.
        description: one line.
        options: the accepted options with a short description each.
        check_layer: ``QuantizedWeight -> None | reason``: None when the target stores the layer's
            codes and scales as they are (for the compatibility matrix); the reason otherwise.
        layer_type: ``QuantizedWeight -> str``: the target's storage type for a layer it holds
            (``Q4_0``, ``MatMulNBits4``; for the compatibility matrix).
        untested_readers: other runtimes that are meant to read the output but were not run here,
            each with why (dashed in the integration graph, named in the matrix).
    """

    name: str
    suffix: str
    readers: tuple[str, ...]
    run: Callable[..., "ExportResult"]
    description: str
    options: dict[str, str] = field(default_factory=dict)
    check_layer: Callable[[Any], "str | None"] | None = None
    layer_type: Callable[[Any], str] | None = None
    untested_readers: dict[str, str] = field(default_factory=dict)


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exp: Exporter) -> Exporter:
    EXPORTERS[exp.name] = exp
    return exp


def get_exporter(name: str) -> Exporter:
    return lookup(EXPORTERS, name, "export target", hint=lambda t: f"choose one of {sorted(t)}")


@dataclass
class ExportResult:
    """What an export wrote: the file, its size, the seconds it took and one entry per layer
    (``{"type": ..., "source": "codes" | "requantized" | "float", "exact": bool, "max_abs_err": ...}``)."""

    path: Path
    target: str
    bytes: int = 0
    seconds: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for info in self.layers.values():
            key = f"{info.get('type')}:{info.get('source')}"
            counts[key] = counts.get(key, 0) + 1
        worst = max((float(i.get("max_abs_err") or 0.0) for i in self.layers.values()), default=0.0)
        return {"path": str(self.path), "target": self.target, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "layers": counts,
                "exact_layers": sum(bool(i.get("exact")) for i in self.layers.values()
                                    if i.get("source") != "float"),
                "quantized_layers": sum(i.get("source") != "float" for i in self.layers.values()),
                "max_abs_err": worst, **self.extra}


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is fsynced and renamed to ``out``; on any
    exception (an interrupt included) it is removed and ``out`` is left as it was."""
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder; give a file path for the export")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> QuantLinear`` of a model."""
    from polyquant.nn.quant_linear import QuantLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def note_activation_rules(model: nn.Module, result: "ExportResult", runtime: str) -> int:
    """Mark every exported layer whose activation rule (BitNet's int8 per token, LLM.int8, W8A8 ...) the
    file does not carry: the target runs those layers with its own activations (``runtime`` says which),
    so its outputs are the weights' without polyquant's activation rounding. Returns how many; logs it."""
    import logging
    from polyquant.activations.base import rule_of
    n = 0
    for name, mod in quant_layers(model).items():
        act = getattr(mod, "act_quant", None)
        if act is None or name not in result.layers:
            continue
        r = rule_of(act)
        result.layers[name]["activations"] = f"{r.kind if r else type(act).__name__} not carried: {runtime}"
        n += 1
    if n:
        result.extra["activation_rules_not_carried"] = n
        logging.getLogger(__name__).warning(
            "%d layers' activation rules are not carried into the %s file: %s", n, result.target, runtime)
    return n


def resolve_model(model_or_dir: Any, tokenizer: Any = None):
    """``(model, tokenizer, source)`` from a model in memory or a checkpoint folder / spec that
    :func:`polyquant.models.load_model` reads (quantized folders go through ``formats.load``)."""
    if isinstance(model_or_dir, nn.Module):
        rec = getattr(model_or_dir, "polyquant", None)
        return model_or_dir, tokenizer, getattr(rec, "source", None)
    import polyquant.formats  # noqa: F401  (registers the loader of quantized folders)
    from polyquant.models import load_model
    model, tok = load_model(model_or_dir)
    rec = getattr(model, "polyquant", None)
    source = getattr(rec, "source", None)
    if source is None:
        import json
        p = Path(model_or_dir) / "polyquant.json"
        if p.is_file():
            try:
                source = json.loads(p.read_text()).get("source")
            except (ValueError, OSError):
                source = None
    return model, tokenizer if tokenizer is not None else tok, source
