"""Which modules to quantize: the architecture knowledge, kept small.

Default targets: every ``nn.Linear`` inside the model's repeated blocks (the largest
``nn.ModuleList`` of identical blocks: decoder layers of any transformers decoder, encoder layers
of a BERT-style encoder). ``lm_head`` and embeddings are kept unless asked. ``include`` /
``exclude`` are regexes matched (``re.search``) against the full module name.
"""
from __future__ import annotations

import re

from torch import nn

__all__ = ["find_blocks", "select_linears"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ModuleList with the most parameters whose children share
    one class and hold Linear layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if best is None or n > best[0]:
            best = (n, name, mod)
    if best is None:
        raise ValueError(f"cannot find repeated blocks of Linear layers in {type(model).__name__}")
    return best[1], best[2]


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, mod in model.named_modules():
        parts = name.split(".")
        # by name only outside repeated blocks (a block's own Linear may be called "output")
        if mod is head or (parts[-1] in ("lm_head", "embed_out", "output") and not any(p.isdigit() for p in parts)):
            names.add(name)
    return names


def select_linears(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None,
                   quantize_lm_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The ``(name, Linear)`` pairs to quantize, in model order."""
    heads = _output_head_names(model)
    if include:
        pats = [re.compile(p) for p in include]
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and any(p.search(n) for p in pats)]
    else:
        prefix, _ = find_blocks(model)
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]
    if quantize_lm_head:
        chosen += [(n, m) for n, m in model.named_modules()
                   if n in heads and isinstance(m, nn.Linear) and all(n != c for c, _ in chosen)]
    else:
        chosen = [(n, m) for n, m in chosen if n not in heads]
    if exclude:
        pats = [re.compile(p) for p in exclude]
        chosen = [(n, m) for n, m in chosen if not any(p.search(n) for p in pats)]
    return chosen
