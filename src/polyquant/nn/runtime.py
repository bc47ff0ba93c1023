"""Runtime options for running a quantized model fast: how its *float* parts compute, and
fusing sibling quantized projections into one matmul. Nothing here changes a quantized weight.

* :func:`set_float_dtype` casts the parts that stay in float (embeddings, norms, an unquantized
  ``lm_head``) to another dtype, e.g. bf16: ``scope="lm_head"`` only the output head (and the input
  embedding when the two are tied: they share one table), ``scope="all"`` every float parameter so
  activations flow in that dtype. This is a float cast, not quantization: it changes results (check
  the perplexity) and is recorded on the model (``QuantRecord.extra["float_compute"]``).
* :func:`fuse_projections` runs q/k/v (and gate/up) -- sibling QuantLinears fed the same input --
  as one packed matmul. The fused weight is the exact concatenation of the members' codes and
  scales, so results are unchanged; :func:`unfuse_projections` restores the separate layers (do
  that before saving: checkpoint formats expect the original layer names).
* :func:`runtime_info` reports both, for results and reports.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import get_record, replace_module
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["set_float_dtype", "fuse_projections", "concat_weights", "unfuse_projections", "runtime_info", "FusedSlice", "FloatHead",
           "DEFAULT_FUSE_GROUPS"]

#: Sibling projections that transformers' decoder blocks feed with the same tensor, in call order.
DEFAULT_FUSE_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_RUNTIME_ATTR = "polyquant_runtime"


def _runtime_dict(model: nn.Module) -> dict[str, Any]:
    rec = get_record(model)
    if rec is not None:
        return rec.extra
    d = model.__dict__.get(_RUNTIME_ATTR)
    if d is None:
        d = {}
        model.__dict__[_RUNTIME_ATTR] = d
    return d


def runtime_info(model: nn.Module) -> dict[str, Any]:
    """``{"float_compute": "fp32"|"bf16"|..., "float_compute_scope": "all"|"lm_head"|None,
    "fused_projections": int}`` -- how this model's float parts compute and how many fused groups
    it runs. A model never passed through this module reports its parameters' dtype."""
    d = _runtime_dict(model) if (get_record(model) is not None or _RUNTIME_ATTR in model.__dict__) else {}
    if "float_compute" in d:
        fc, scope = d["float_compute"], d.get("float_compute_scope")
    else:
        dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
        dt = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
        fc, scope = _DTYPE_NAMES.get(dt, str(dt).replace("torch.", "")), None
    fused = sum(1 for m in model.modules() if isinstance(m, FusedSlice) and m.index == 0)
    return {"float_compute": fc, "float_compute_scope": scope, "fused_projections": fused}


# -- float parts -------------------------------------------------------------------------------

def _make_output_cast_hook(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    return hook


class FloatHead(nn.Linear):
    """The output head computing in its weight's dtype (e.g. bf16): the input is cast to it, the
    logits are cast to ``out_dtype``. One row at a time (decode) runs as a matrix-vector product
    (``torch.mv``), which on CPU is about twice as fast in bf16 as ``F.linear`` for a 49k x 576
    head; several rows use ``F.linear``. Same parameters (and state-dict keys) as the Linear it
    replaces, so a tied input embedding stays tied."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        xw = x if x.dtype == w.dtype else x.to(w.dtype)
        if xw.numel() == self.in_features:
            y = torch.mv(w, xw.reshape(-1)).view(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(xw, w, self.bias)
        return y if y.dtype == self.out_dtype else y.to(self.out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", compute={self.weight.dtype}, out={self.out_dtype}"


def _swap_head(model: nn.Module, out_dtype: torch.dtype) -> None:
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    replace_module(model, name, FloatHead(head, out_dtype))


def _cast_params(module: nn.Module, dtype: torch.dtype, seen: set[int]) -> int:
    n = 0
    for p in module.parameters(recurse=False):
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def set_float_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, scope: str = "all") -> dict[str, Any]:
    """Run the model's float (non-quantized) parts in ``dtype``, in place. Returns :func:`runtime_info`.

    Args:
        dtype: a floating dtype (bf16 is the one the CPU packed int4/int8 ops take natively).
        scope: ``"all"``: every float parameter outside QuantLinear layers is cast (embeddings,
            norms, an unquantized head); hidden states and logits then come out in ``dtype``.
            ``"lm_head"``: only the output head computes in ``dtype`` (input cast to it, logits cast
            back to the model's dtype); when the head is tied to the input embedding the shared table
            is cast and the embedding's output is cast back, so everything else stays as it was.

    Buffers (rotary tables, quantized weights, kernel buffers) are not touched. The cast is lossy
    and not undone by calling again with float32; reload the model to get the original back.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if scope not in ("all", "lm_head"):
        raise ValueError(f"scope must be 'all' or 'lm_head', got {scope!r}")
    d = _runtime_dict(model)
    if d.get("float_compute") not in (None, _DTYPE_NAMES.get(dtype)) or (
            "float_compute_scope" in d and d["float_compute_scope"] != scope):
        raise ValueError(f"float compute is already set ({d.get('float_compute')}, scope "
                         f"{d.get('float_compute_scope')}); reload the model to change it")
    if "float_compute" in d:  # already set to this dtype and scope
        return runtime_info(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain_head = isinstance(head, nn.Linear) and not isinstance(head, FloatHead)
    if scope == "lm_head" and not plain_head:
        raise ValueError("scope='lm_head' needs an unquantized nn.Linear output head (got "
                         f"{type(head).__name__ if head is not None else 'none'})")
    seen: set[int] = set()
    if scope == "all":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                seen.update(id(p) for p in m.parameters())  # a QuantLinear's bias follows its kernel
                continue
            _cast_params(m, dtype, seen)
        if plain_head:
            _swap_head(model, dtype)
    else:
        orig = head.weight.dtype
        _cast_params(head, dtype, seen)
        _swap_head(model, orig)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and getattr(emb, "weight", None) is head.weight:
            emb.register_forward_hook(_make_output_cast_hook(orig))
    d["float_compute"] = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    d["float_compute_scope"] = scope
    return runtime_info(model)


# -- fused projections -------------------------------------------------------------------------

class _FusedState:
    """Shared by the members of one fused group: the last input and the outputs computed from it."""

    __slots__ = ("x", "outs")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.outs: tuple[torch.Tensor, ...] | None = None


class FusedSlice(nn.Module):
    """Stands in for one member of a fused group. The first member called with a new input runs
    the fused QuantLinear once and keeps the split outputs; the others called with the *same*
    tensor object take their slice. Any other input is computed afresh, so results never depend on
    call order. The last member releases the kept outputs."""

    def __init__(self, fused: QuantLinear, sizes: list[int], index: int, state: _FusedState, name: str,
                 has_bias: bool = False) -> None:
        super().__init__()
        self.has_bias = has_bias
        self.fused = fused
        self.sizes = list(sizes)
        self.index = index
        self.member = name
        self._state = state
        self.in_features = fused.in_features
        self.out_features = sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st.x is not x or st.outs is None:
            st.outs = self.fused(x).split(self.sizes, dim=-1)
            st.x = x
        out = st.outs[self.index]
        if self.index == len(self.sizes) - 1:
            st.x = st.outs = None
        return out

    def extra_repr(self) -> str:
        return f"member={self.member}, index={self.index}, sizes={self.sizes}"


def _concat(qws: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The members' rows stacked into one weight, or None when they cannot share one. Act-order
    members (``g_idx``) stack only when their ``g_idx`` are equal: each input column then belongs
    to the same group in every member, so the stacked weight has that one ``g_idx`` (and its kernel
    gathers the input once for all of them). GPTQ gives siblings equal ``g_idx``: their Hessians
    come from the same input, so ``argsort(diag(H))`` is the same."""
    a = qws[0]
    for q in qws:
        if (q.qtype, q.block, q.shape[1]) != (a.qtype, a.block, a.shape[1]) or q.extras:
            return None
        if q.codebooks is not None or q.outliers is not None:  # own code books / sparse parts
            return None
        if (q.g_idx is None) != (a.g_idx is None) or (q.g_idx is not None and not torch.equal(q.g_idx, a.g_idx)):
            return None
        if (q.zero is None) != (a.zero is None) or q.scale.dtype != a.scale.dtype:
            return None
        if q.shape[0] % a.block[0]:
            return None
    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731  (rows are packed independently)
    zero = cat([q.zero for q in qws]) if a.zero is not None else None
    return QuantizedWeight(a.qtype, (sum(q.shape[0] for q in qws), a.shape[1]), a.block,
                           cat([q.data for q in qws]), cat([q.scale for q in qws]), zero,
                           None if a.g_idx is None else a.g_idx.clone())


#: public name: the exact row-wise concatenation of sibling weights (None when they cannot share one)
concat_weights = _concat


def fuse_projections(model: nn.Module, groups: Iterable[tuple[str, ...]] = DEFAULT_FUSE_GROUPS) -> int:
    """Fuse sibling QuantLinears (same parent, names in ``groups``) into one packed matmul, in
    place. A group is fused only when its members share the input size, qtype, block, kernel,
    act-order ``g_idx`` (none, or equal) and have no activation quantizer; the fused layer must be
    supported by the same kernel. Returns
    the number of groups fused (also recorded as ``fused_projections``)."""
    groups = [tuple(g) for g in groups]
    done = 0
    for pname, parent in list(model.named_modules()):
        for g in groups:
            mods = [getattr(parent, n, None) for n in g]
            if not all(isinstance(m, QuantLinear) for m in mods):
                continue
            if len({m.kernel_name for m in mods}) != 1 or any(m.act_quant is not None for m in mods):
                continue
            qw = _concat([m.quantized_weight for m in mods])
            if qw is None:
                continue
            biases = [m.bias for m in mods]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=qw.scale.dtype)
                                  for b, m in zip(biases, mods)])
            try:
                fused = QuantLinear(qw, bias, kernel=mods[0].kernel_name, method=mods[0].method)
            except ValueError:  # the kernel cannot take the fused shape: leave the group alone
                continue
            state = _FusedState()
            sizes = [m.out_features for m in mods]
            for i, (n, m) in enumerate(zip(g, mods)):
                replace_module(model, f"{pname}.{n}" if pname else n, FusedSlice(fused, sizes, i, state, n,
                                                                                  m.bias is not None))
            done += 1
    if done:
        d = _runtime_dict(model)
        d["fused_projections"] = d.get("fused_projections", 0) + done
    return done


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: separate QuantLinears again (exact: rows are sliced back).
    Returns the number of groups restored."""
    restored = 0
    for pname, parent in list(model.named_modules()):
        slices = [(n, c) for n, c in parent.named_children() if isinstance(c, FusedSlice)]
        by_fused: dict[int, list[tuple[str, FusedSlice]]] = {}
        for n, c in slices:
            by_fused.setdefault(id(c.fused), []).append((n, c))
        for members in by_fused.values():
            fused = members[0][1].fused
            qw = fused.quantized_weight
            start = 0
            offsets = {}
            for i, size in enumerate(members[0][1].sizes):
                offsets[i] = (start, start + size)
                start += size
            for n, c in members:
                a, b = offsets[c.index]
                r = qw.block[0]
                z = qw.zero[a // r:b // r] if qw.zero is not None else None
                part = QuantizedWeight(qw.qtype, (b - a, qw.shape[1]), qw.block, qw.data[a:b].clone(),
                                       qw.scale[a // r:b // r].clone(), None if z is None else z.clone(),
                                       None if qw.g_idx is None else qw.g_idx.clone())
                bias = fused.bias[a:b] if fused.bias is not None and c.has_bias else None
                setattr(parent, n, QuantLinear(part, bias, kernel=fused._kernel_request, method=fused.method))
            restored += 1
    if restored:
        d = _runtime_dict(model)
        d["fused_projections"] = max(0, d.get("fused_projections", 0) - restored)
    return restored
