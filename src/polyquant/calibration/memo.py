"""Reuse of a block's sub-module outputs across the true-sequential passes of one block.

True-sequential calibration runs a block's inputs through it once per group of Linears and once
more for its outputs: on a Llama block the attention runs four times per sample (for o_proj's,
gate/up's and down's statistics and for the outputs) although from the gate/up pass on its
weights and inputs no longer change. :class:`BlockMemo` wraps the block's direct children that
hold Linears (``self_attn``, ``mlp``, ...) and each quantized Linear's stand-in as it is swapped in
(so q/k/v and gate/up, quantized in one pass, are not recomputed in the next): a call whose inputs equal the last ones for that sample
(compared exactly, ``torch.equal``), under the same autocast, with the child's modules, parameters
and buffers unchanged (module identity plus each tensor's in-place version counter), returns the
output it gave then, provided neither that output nor the kept inputs were changed in place since
(their version counters again); anything else runs the child. Nothing is copied. The result is the one recomputation
would give, bit for bit: a deterministic forward of equal inputs and weights.

Changes made through ``tensor.data`` bypass the version counters and are not seen: the memo
serves the driver's own group loop, where the only change to a block is the swap of a quantized
Linear's stand-in (methods that edit float modules, ``spec.quantize_block``, run without it).

A child is never skipped while it contains a Linear whose statistics hook is active, nor when an
argument is an object the memo cannot compare (a KV cache, say: it may be mutated by the call).
Entries are kept within ``budget_bytes`` (inputs and outputs); beyond it the children simply run.

Pure functions get the same treatment (:data:`PURE_FUNCTIONS`: ``scaled_dot_product_attention``
without dropout): once o_proj's stand-in replaces it, the attention module runs again in the
gate/up pass for o_proj's new output, but the attention core over unchanged q, k and v is the one
the o_proj pass computed. A call is keyed by the wrapped module it runs inside and its rank among
that module's calls of the function in the forward, so keeping the module drops it as it drops
the module's children. The function is replaced process-wide while the memo is installed, but
only the installing thread's calls (of it and of the wrapped modules) are looked up; other
threads' calls go straight through.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

#: bytes of cached inputs and outputs one block may hold (beyond this the children simply run)
DEFAULT_BUDGET = 2 << 30

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _sdpa_pure(args: tuple, kwargs: dict) -> bool:
    p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
    return p == 0.0


#: ``(namespace, attribute, is_pure(args, kwargs))``: functions replaced by a memoized wrapper while
#: a memo is installed (looked up at call time by their callers, as transformers' sdpa path does)
PURE_FUNCTIONS: tuple = ((torch.nn.functional, "scaled_dot_product_attention", _sdpa_pure),)


def _comparable(leaves: list) -> bool:
    return all(isinstance(x, (torch.Tensor, *_PLAIN)) for x in leaves)


def _same(a: list, b: list) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor):
                return False
            if x is y:
                continue
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _device_type(leaves: list) -> str:
    return next((x.device.type for x in leaves if isinstance(x, torch.Tensor)), "cpu")


def _nbytes(leaves: list) -> int:
    return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))


class BlockMemo:
    """Install on a block with ``with BlockMemo(blk) as memo:``; set ``memo.sample`` to the index
    of the calibration sample before each block forward, ``memo.hooked`` to the Linears whose
    statistics hooks are active for the pass and ``memo.keep = False`` for the last pass (nothing
    kept then could be used). Removes its wrappers on exit. Keeping a child's call drops the kept
    calls of the modules inside it for that sample: they are reached only through it."""

    def __init__(self, blk: nn.Module, budget_bytes: int = DEFAULT_BUDGET,
                 functions: tuple = PURE_FUNCTIONS) -> None:
        self.blk = blk
        self.budget = int(budget_bytes)
        self.used = 0
        self._sample: int | None = None
        self._thread: int | None = None
        self._functions = functions
        self._patched: list[tuple[Any, str, Any]] = []
        self._scope: list[str] = [""]  # the wrapped modules running now (innermost last)
        self._ranks: dict[tuple[str, str], int] = {}  # (scope, function) -> calls so far this forward
        self.hooked: set[int] = set()
        self.keep = True  # False for the block's last pass: look up, keep nothing new
        self.hits = self.misses = 0
        self._cache: dict[tuple[str, int], tuple] = {}
        self._wrapped: list[tuple[nn.Module, bool, Any]] = []

    @property
    def sample(self) -> int | None:
        """The calibration sample the next block forward runs (None: no reuse)."""
        return self._sample

    @sample.setter
    def sample(self, j: int | None) -> None:
        self._sample = j
        self._ranks.clear()
        del self._scope[1:]

    # -- install / remove --------------------------------------------------------------------------
    def __enter__(self) -> "BlockMemo":
        self._thread = threading.get_ident()  # the wrappers serve only this thread's calls
        for name, child in self.blk.named_children():
            if isinstance(child, nn.Linear) or not any(
                    getattr(m, "weight", None) is not None and getattr(m.weight, "dim", lambda: 0)() == 2
                    for m in child.modules()):
                continue  # a bare Linear is itself swapped when quantized; norms are cheap
            self.wrap(name, child)
        for ns, attr, pure in self._functions:
            fn = getattr(ns, attr)
            self._patched.append((ns, attr, fn))
            setattr(ns, attr, self._wrap_function(attr, fn, pure))
        return self

    def wrap(self, name: str, module: nn.Module) -> None:
        """Memoize ``module`` (``name`` relative to the block) too: the driver calls it for each
        quantized Linear's stand-in as it is swapped in, so that later passes reuse its output."""
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = self._wrap(name, module, module.forward)
        self._wrapped.append((module, had, old))

    def __exit__(self, *exc) -> None:
        for ns, attr, fn in reversed(self._patched):
            setattr(ns, attr, fn)
        self._patched.clear()
        for child, had, old in self._wrapped:
            if had:
                child.forward = old
            else:
                del child.forward
        self._wrapped.clear()
        self._cache.clear()
        self.used = 0

    # -- the wrapper -------------------------------------------------------------------------------
    @staticmethod
    def _state(child: nn.Module, device_type: str) -> tuple:
        mods = tuple(id(m) for m in child.modules())
        tensors = tuple((id(t), t._version) for t in (*child.parameters(), *child.buffers()))
        return mods, tensors, BlockMemo._amp(device_type)

    @staticmethod
    def _amp(device_type: str) -> tuple:
        on = torch.is_autocast_enabled(device_type)
        return on, torch.get_autocast_dtype(device_type) if on else None, torch.is_grad_enabled()

    def _wrap(self, name: str, child: nn.Module, forward):
        def memo_forward(*args, **kwargs):
            j = self.sample
            if threading.get_ident() != self._thread:
                return forward(*args, **kwargs)
            if j is None or any(id(m) in self.hooked for m in child.modules()):
                return self._run(name, forward, args, kwargs)
            leaves, spec = tree_flatten((args, kwargs))
            if not _comparable(leaves):
                return self._run(name, forward, args, kwargs)
            dev = _device_type(leaves)

            def compute():
                out = self._run(name, forward, args, kwargs)
                return out, self._state(child, dev) == state  # a call that changed the child: not kept

            state = self._state(child, dev)
            return self._call((name, j), state, spec, leaves, compute, child)
        return memo_forward

    def _call(self, key: tuple[str, int], state: tuple, spec, leaves: list, compute, child):
        """The kept output for ``key`` if it is still what recomputation would give, else
        ``compute()`` (-> ``(out, keepable)``), kept for the next pass when it can be."""
        hit = self._cache.get(key)
        if (hit is not None and hit.state == state and hit.spec == spec and hit.intact()
                and _same(hit.inputs, leaves)):
            self.hits += 1
            return hit.out
        self.misses += 1
        out, keepable = compute()
        out_leaves, _ = tree_flatten(out)
        if hit is not None:
            self.used -= hit.size
            del self._cache[key]
        if self.keep and keepable and _comparable(out_leaves):
            if child is not None:  # the calls inside this one are reached only through it now
                for k in [k for k in self._cache if k[1] == key[1] and k[0].startswith(key[0] + ".")]:
                    self.used -= self._cache.pop(k).size
            size = _nbytes(leaves) + _nbytes(out_leaves)
            if self.used + size <= self.budget:
                self._cache[key] = _Entry(state, spec, leaves, out, out_leaves, size, child)
                self.used += size
        return out

    def _run(self, name: str, forward, args, kwargs):
        """Run a wrapped module as the scope of the pure-function calls inside it."""
        self._scope.append(name)
        for key in [k for k in self._ranks if k[0] == name]:
            del self._ranks[key]
        try:
            return forward(*args, **kwargs)
        finally:
            self._scope.pop()

    def _wrap_function(self, attr: str, fn, pure):
        def memo_call(*args, **kwargs):
            j = self._sample
            if j is None or threading.get_ident() != self._thread or not pure(args, kwargs):
                return fn(*args, **kwargs)
            leaves, spec = tree_flatten((args, kwargs))
            if not _comparable(leaves):
                return fn(*args, **kwargs)
            scope = self._scope[-1]
            rank = self._ranks.get((scope, attr), 0)
            self._ranks[(scope, attr)] = rank + 1
            name = f"{scope}.{attr}#{rank}" if scope else f"{attr}#{rank}"
            return self._call((name, j), self._amp(_device_type(leaves)), spec, leaves,
                              lambda: (fn(*args, **kwargs), True), None)
        return memo_call


class _Entry:
    """One kept call: the inputs and the output by reference, with their in-place version counters
    (a tensor changed in place since, by the caller or anyone, makes the entry stale), and the
    child's modules and tensors (kept alive, so that their ids in ``state`` stay unique)."""

    __slots__ = ("state", "spec", "inputs", "out", "size", "_versions", "_tensors", "_alive")

    def __init__(self, state, spec, inputs, out, out_leaves, size, child):
        self.state, self.spec, self.inputs, self.out, self.size = state, spec, inputs, out, size
        self._tensors = [x for x in (*inputs, *out_leaves) if isinstance(x, torch.Tensor)]
        self._versions = [t._version for t in self._tensors]
        self._alive = (() if child is None else
                       (list(child.modules()), list(child.parameters()), list(child.buffers())))

    def intact(self) -> bool:
        return all(t._version == v for t, v in zip(self._tensors, self._versions))
