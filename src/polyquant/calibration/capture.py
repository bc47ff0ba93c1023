"""Capture and replay for the sequential driver: the inputs of the first repeated block and every
block's call arguments, caught by patching the blocks' forwards (:func:`_capture`: tensors that
repeat across calls are interned, moved once), and one block re-run on one captured sample
(:func:`_run_block`, optionally under autocast)."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

__all__: list[str] = []

_NONE = object()


class _Stop(Exception):
    """Raised inside a forward to stop it once what is needed has been seen."""


@contextmanager
def _patched_forwards(blocks, fn: Callable):
    """Replace each block's ``forward`` by ``fn(block_index, *args, **kwargs)`` for a while."""
    saved = [b.__dict__.get("forward", _NONE) for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = functools.partial(fn, i)
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is _NONE:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    """Hidden states and the rest of a block call (``(mode, other args, kwargs)``)."""
    if args:
        return args[0], ("arg", tuple(args[1:]), dict(kwargs))
    if "hidden_states" in kwargs:
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], ("kw", (), kw)
    raise ValueError("cannot find the hidden states among the block's inputs")


class _Interner:
    """Share equal tensors between recorded calls (every block of every sample usually gets the
    same mask and position embeddings)."""

    def __init__(self) -> None:
        self.pool: list[torch.Tensor] = []

    def __call__(self, obj):
        if isinstance(obj, torch.Tensor):
            for t in self.pool:
                if t is obj:
                    return t
            for t in self.pool:
                if t.shape == obj.shape and t.dtype == obj.dtype and t.device == obj.device and torch.equal(t, obj):
                    return t
            self.pool.append(obj)
            return obj
        if isinstance(obj, tuple):
            return tuple(self(o) for o in obj)
        if isinstance(obj, list):
            return [self(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj


def _move(obj, device: torch.device, memo: dict):
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _model_forward(model: nn.Module, sample: dict) -> None:
    try:
        model(**sample, use_cache=False)
    except _Stop:
        pass


def _capture(model: nn.Module, blocks, samples: list[dict], device: torch.device | None):
    """Block 0's input hidden states per sample, every block's other arguments per sample, and the
    block output structure (None: a tensor; k: a tuple of length k)."""
    n = len(blocks)
    probe: dict[str, Any] = {}

    def catch_first(i, *args, **kwargs):
        probe["args"], probe["kwargs"] = args, kwargs
        raise _Stop

    with _patched_forwards(blocks[:1], catch_first):
        _model_forward(model, samples[0])
    if "args" not in probe:
        raise ValueError(f"the first block of {type(model).__name__} was never called by its forward")
    out = blocks[0](*probe["args"], **probe["kwargs"])  # real forward, once: learn the output structure
    if isinstance(out, torch.Tensor):
        struct = None
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        struct = len(out)
    else:
        raise ValueError(f"unsupported block output type {type(out).__name__}")
    del out, probe

    inps: list[torch.Tensor] = []
    recs: list[list] = []
    intern = _Interner()

    def record(i, *args, **kwargs):
        h, rest = _split(args, kwargs)
        recs[-1][i] = intern(rest)
        if i == 0:
            inps.append(h.detach().to(device) if device is not None else h.detach())
        if i == n - 1:
            raise _Stop
        return h if struct is None else (h,) + (None,) * (struct - 1)

    with _patched_forwards(blocks, record):
        for s in samples:
            recs.append([None] * n)
            _model_forward(model, s)
            missing = [i for i, r in enumerate(recs[-1]) if r is None]
            if missing:
                raise ValueError(f"blocks {missing[:5]} of {type(model).__name__} were not called by its forward")
    return inps, recs, struct


def _run_block(blk: nn.Module, h: torch.Tensor, rec: tuple, autocast: torch.dtype | None = None) -> torch.Tensor:
    mode, rest, kw = rec
    with torch.autocast(h.device.type, dtype=autocast, enabled=autocast is not None):
        out = blk(h, *rest, **kw) if mode == "arg" else blk(*rest, hidden_states=h, **kw)
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.to(h.dtype) if autocast is not None else out
