"""A lean batch-1 decode runtime for Llama-family decoders (``runtime="fast"``).

Batch-1 decode is memory-bound: its floor is the weight bytes read per token over the memory
bandwidth. What keeps transformers' generic forward far from that floor on a CPU is per-token
overhead around the matmuls (the cache object, mask construction, rotary recomputation, module
dispatch of 210 Linears and their norms). :class:`FastDecoder` runs the same computation with
that overhead removed:

* a static KV cache per layer (``[kv_heads, max_len, head_dim]``, allocated once; a token writes
  one slice, nothing is allocated per token by the cache);
* rotary tables computed once for every position by the model's own rotary module (so every
  rope variant the model implements -- default, llama3, linear, dynamic at load length -- is the
  model's own);
* q/k/v and gate/up run as one matmul each (the exact concatenation of the members' codes and
  scales: :func:`polyquant.nn.runtime.concat_weights`; float layers are concatenated too);
* the layers' own kernels (``cpu-lut4``, ``cpu-int8`` ...) do the matmuls, so every quantized
  layout works; a layout whose members cannot be concatenated runs member by member (recorded in
  :attr:`FastDecoder.fallbacks`).

* one token (the decode step) runs each layer as one compiled C call (``native``, the default where
  :mod:`polyquant.kernels.cpu_gemv` builds): RMSNorm, the q/k/v matrix-vector product, rope, the
  KV cache write, attention over the cache, o, gate/up, SiLU, down, the residual adds; and the final
  norm and the head as one more. Its matrix-vector products read the decoder's own copies of the
  weights in ``cpu-gemv``'s layout (integer 1-4 / 8-bit group-wise or per-channel, float32, a bf16 head
  computing as ``torch.mv`` does), float32 activations and accumulation. A layer (or head) it cannot
  take runs the Python step below and is recorded in :attr:`FastDecoder.fallbacks`; prompts (more
  than one token) run the Python step through the same modules.

Numerics: the same operations in the same dtype as transformers' eager path; RMSNorm is
``torch.nn.functional.rms_norm`` and attention ``scaled_dot_product_attention`` (the sdpa path
transformers uses by default), so logits agree with the model's own forward to float32 rounding
(the tests bound the difference and check that greedy tokens are identical). The native step computes
the same float32 operations in another summation order, and its quantized layers run float32
activations where ``cpu-int4`` / ``cpu-int8`` round them to bf16: it is closer to the reference kernel
(dequantize + float32 matmul) than those kernels are; the tests bound its difference to the reference.

Supported: decoder blocks with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm`` / ``post_attention_layernorm`` RMSNorms and a rotary module on the base model
(Llama, Mistral without a sliding window in reach, Qwen2, ...). Anything else is refused by
:func:`fast_decode_reason` with the reason; callers fall back to the model's own forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.runtime import concat_weights

__all__ = ["FastDecoder", "fast_decode_reason", "fast_greedy_decode"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _base(model: nn.Module) -> nn.Module | None:
    return getattr(model, "model", None)


def fast_decode_reason(model: nn.Module, max_len: int = 0) -> str | None:
    """None when :class:`FastDecoder` can run ``model``; otherwise why not."""
    base = _base(model)
    cfg = getattr(model, "config", None)
    if base is None or cfg is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        return "not a decoder-only model with model.layers / model.embed_tokens"
    if getattr(model, "lm_head", None) is None or not hasattr(base, "norm"):
        return "no lm_head / final norm"
    if getattr(base, "rotary_emb", None) is None:
        return "no rotary embedding module on the base model"
    act = getattr(cfg, "hidden_act", None)
    if act not in _ACTS:
        return f"activation {act!r} is not one the fast runtime implements ({', '.join(sorted(_ACTS))})"
    sw = getattr(cfg, "sliding_window", None)
    if sw and getattr(cfg, "use_sliding_window", True) and max_len > sw:
        return f"a sliding window of {sw} tokens is within reach of max_len={max_len}"
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(not hasattr(attn, n) for n in _ATTN) or \
                any(not hasattr(mlp, n) for n in _MLP):
            return f"layer {i} is not a q/k/v/o + gate/up/down block"
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                return f"layer {i} has {extra} (not implemented by the fast runtime)"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            n = getattr(layer, norm, None)
            if n is None or "RMSNorm" not in type(n).__name__ or getattr(n, "weight", None) is None:
                return f"layer {i}'s {norm} is not an RMSNorm with a weight"
        for extra in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            if getattr(layer, extra, None) is not None:
                return f"layer {i} has {extra} (not a Llama-family block)"
        for lin in [getattr(attn, n) for n in _ATTN] + [getattr(mlp, n) for n in _MLP]:
            if not isinstance(lin, (nn.Linear, QuantLinear)):
                return f"layer {i} holds a {type(lin).__name__}, not a Linear or QuantLinear"
    return None


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        v = getattr(norm, name, None)
        if v is not None:
            return float(v)
    return 1e-6


def _gemv_reason(qw) -> str | None:
    from polyquant.kernels.cpu_gemv import CpuGemvKernel
    return CpuGemvKernel().layout_reason(qw) or CpuGemvKernel().supports(qw, qw.data.device)


def _native_module(m: nn.Module) -> nn.Module:
    """``m``, or for a QuantLinear ``cpu-gemv`` can run (and is not running), a copy on it (same
    quantized tensors, the kernel's packed buffers built)."""
    if isinstance(m, QuantLinear) and m.kernel_name != "cpu-gemv" and m.act_quant is None and \
            _gemv_reason(m.quantized_weight) is None:
        return QuantLinear(m.quantized_weight, m.bias, kernel="cpu-gemv", method=m.method)
    return m


def _act_key(act) -> Any:
    """What makes two activation rules compute the same thing on the same input (siblings share
    their input, so equal rules let their weights run as one matmul): the rule and any static scale."""
    if act is None:
        return None
    rule = getattr(act, "rule", None)
    if rule is None:  # a rule that does not describe itself: equal only to itself
        return id(act)
    scale = getattr(act, "scale", None)
    return (type(act).__name__, repr(rule),
            tuple(scale.detach().reshape(-1).tolist()) if isinstance(scale, torch.Tensor) else None)


class _Proj:
    """One matmul over the concatenation of sibling projections (or each member alone)."""

    def __init__(self, members: list[nn.Module], fallbacks: list[str], name: str, native: bool = False) -> None:
        self.sizes = [m.out_features for m in members]
        self.members = members
        self.fused: nn.Module | None = None
        if len(members) == 1:
            self.fused = members[0]
        elif all(isinstance(m, nn.Linear) for m in members):
            w = torch.cat([m.weight.detach() for m in members])
            b = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            self.fused = lin.requires_grad_(False)
        elif all(isinstance(m, QuantLinear) for m in members):
            qw = concat_weights([m.quantized_weight for m in members])
            same = len({(m._kernel_request, m.method, _act_key(m.act_quant)) for m in members}) == 1
            has_bias = [m.bias is not None for m in members]
            if qw is not None and same and len(set(has_bias)) == 1:
                bias = torch.cat([m.bias.detach() for m in members]) if has_bias[0] else None
                kernel = members[0]._kernel_request
                if native and members[0].act_quant is None and _gemv_reason(qw) is None:
                    kernel = "cpu-gemv"  # the decoder's own copy: built in the layout its C step reads
                self.fused = QuantLinear(qw, bias, kernel=kernel,
                                         act_quant=members[0].act_quant, method=members[0].method)
        if self.fused is None:
            fallbacks.append(f"{name}: members run one by one (their weights cannot be concatenated)")

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is not None:
            y = self.fused(x)
            return list(torch.split(y, self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        return [m(x) for m in self.members]


class FastDecoder:
    """Batch-1 prefill + decode for a Llama-family model (see the module docstring).

    Args:
        model: a transformers causal LM (float or quantized by polyquant), in eval mode.
        max_len: the KV cache length (prompt + generated tokens).
        native: run one-token steps through the compiled layer step where it can (see the module
            docstring); False: the Python step everywhere, through the layers' own kernels.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, native: bool = True) -> None:
        reason = fast_decode_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"the fast decode runtime cannot run this model: {reason}")
        self.model = model
        base = _base(model)
        cfg = model.config
        self.max_len = int(max_len)
        self.fallbacks: list[str] = []
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        emb = base.embed_tokens
        # activations flow in the norms' dtype (a bf16 head / embedding table is cast at its edges)
        self.dtype = base.layers[0].input_layernorm.weight.dtype
        self.act = _ACTS[cfg.hidden_act]
        self.embed = emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = self.head_dim ** -0.5
        self.layers: list[dict[str, Any]] = []
        why_not = self._native_reason(cfg) if native else "native=False"
        nat = why_not is None
        for i, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": (layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                "ln2": (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
                "qkv": _Proj([a.q_proj, a.k_proj, a.v_proj], self.fallbacks, f"layer {i} q/k/v", nat),
                "o": _native_module(a.o_proj) if nat else a.o_proj,
                "gu": _Proj([m.gate_proj, m.up_proj], self.fallbacks, f"layer {i} gate/up", nat),
                "down": _native_module(m.down_proj) if nat else m.down_proj,
            })
        self.norm = (base.norm.weight, _eps(base.norm))
        self.head = _native_module(model.lm_head) if nat else model.lm_head
        with torch.inference_mode():
            pos = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
            cos, sin = base.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        shape = (len(self.layers), self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.pos = 0
        self.native_layers = 0
        self.native_head = False
        self._c: dict[str, Any] | None = None
        if nat:
            self._build_native(cfg)
        elif native:
            self.fallbacks.append(f"every layer: Python step ({why_not})")

    def _native_reason(self, cfg) -> str | None:
        if self.device.type != "cpu":
            return f"the compiled step runs on the CPU, not {self.device.type}"
        if self.dtype != torch.float32:
            return f"the compiled step runs float32 activations, not {self.dtype}"
        if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
            return f"the compiled step implements SiLU, not {cfg.hidden_act!r}"
        if self.head_dim > 1024 or self.n_heads % self.n_kv:
            return "head_dim > 1024 or heads not a multiple of kv heads"
        from polyquant.kernels.cext import library_error
        return library_error("gemv")

    def _build_native(self, cfg) -> None:
        """The C descriptors of every layer the compiled step can take (the rest recorded)."""
        import ctypes

        from polyquant.kernels import cpu_gemv as G
        keep: list[torch.Tensor] = []
        t = lambda v: (v.detach().to(torch.float32).contiguous())  # noqa: E731
        descs: list[Any] = []
        inter = int(cfg.intermediate_size)
        kmax = max(cfg.hidden_size, inter, self.n_heads * self.head_dim)
        for i, L in enumerate(self.layers):
            parts, why = {}, None
            for key in ("qkv", "o", "gu", "down"):
                mod = L[key].fused if isinstance(L[key], _Proj) else L[key]
                if mod is None:
                    why = f"{key} members run one by one"
                    break
                d, why = G.linear_desc(mod, keep)
                if d is None:
                    why = f"{key}: {why}"
                    break
                parts[key] = d
            if why is None and (parts["gu"].n != 2 * inter or parts["down"].k != inter):
                why = f"gate/up / down sizes are not the configured intermediate size {inter}"
            if why is not None:
                self.fallbacks.append(f"layer {i}: Python step ({why})")
                descs.append(None)
                continue
            ln1, ln2 = t(L["ln1"][0]), t(L["ln2"][0])
            keep.extend((ln1, ln2))
            descs.append(G.Layer(ln1.data_ptr(), ln2.data_ptr(), L["ln1"][1], L["ln2"][1], parts["qkv"], parts["o"],
                                 parts["gu"], parts["down"], self.k_cache[i].data_ptr(), self.v_cache[i].data_ptr()))
        head, why = G.linear_desc(self.head, keep)
        if head is None:
            self.fallbacks.append(f"head: Python step ({why})")
        if all(d is None for d in descs) and head is None:
            return
        cos, sin = t(self.cos), t(self.sin)
        n = G.lib().pq_decode_scratch(cfg.hidden_size, self.n_heads, self.n_kv, self.head_dim, self.max_len,
                                      inter, max(kmax, head.k if head is not None else 0))
        buf = torch.zeros(int(n), dtype=torch.float32)
        norm_w = t(self.norm[0])
        keep.extend((cos, sin, buf, norm_w))
        model = G.Model(cfg.hidden_size, self.n_heads, self.n_kv, self.head_dim, self.max_len, inter, self.scaling,
                        cos.data_ptr(), sin.data_ptr(), buf.data_ptr())
        self._c = {"lib": G.lib(), "simd": G.simd_level(), "model": model, "layers": descs, "head": head,
                   "norm": norm_w, "keep": keep, "x": torch.zeros(cfg.hidden_size, dtype=torch.float32),
                   "byref": ctypes.byref}
        self.native_layers = sum(d is not None for d in descs)
        self.native_head = head is not None

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": "fast", "max_len": self.max_len, "fallbacks": list(self.fallbacks),
                "native_layers": self.native_layers, "native_head": self.native_head}

    def reset(self) -> None:
        self.pos = 0

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids [T]`` (or ``[1, T]``) from the current position; returns the last position's
        logits ``[vocab]``. The first call after :meth:`reset` may hold a whole prompt; later calls
        one token (or a block, causal within itself)."""
        ids = ids.reshape(-1).to(self.device)
        t = ids.numel()
        p0 = self.pos
        if p0 + t > self.max_len:
            raise ValueError(f"KV cache full: {p0} + {t} tokens > max_len={self.max_len}")
        with torch.inference_mode():
            if t == 1 and self._c is not None:
                logits = self._native_step(ids, p0)
            else:
                x = self.embed(ids).to(self.dtype)  # [T, hidden]
                for li in range(len(self.layers)):
                    x = self._layer(li, x, p0)
                logits = self._head(x)
        self.pos = p0 + t
        return logits

    def _layer(self, li: int, x: torch.Tensor, p0: int) -> torch.Tensor:
        """The Python step of layer ``li`` for ``x [T, hidden]`` at positions ``p0 ..``."""
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        t = x.shape[0]
        end = p0 + t
        cos, sin = self.cos[p0:end, None], self.sin[p0:end, None]  # [T, 1, hd]
        L = self.layers[li]
        w, eps = L["ln1"]
        h = F.rms_norm(x, (x.shape[-1],), w, eps)
        q, k, v = L["qkv"](h)
        q = self._rope(q.view(t, nh, hd), cos, sin)
        k = self._rope(k.view(t, nkv, hd), cos, sin)
        self.k_cache[li, :, p0:end] = k.transpose(0, 1)
        self.v_cache[li, :, p0:end] = v.view(t, nkv, hd).transpose(0, 1)
        kc, vc = self.k_cache[li, :, :end], self.v_cache[li, :, :end]
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc[None], vc[None],
                                           is_causal=t > 1 and p0 == 0, scale=self.scaling,
                                           enable_gqa=nkv != nh) if t == 1 or p0 == 0 else \
            self._block_attention(q, kc, vc, p0)
        x = x + L["o"](a[0].transpose(0, 1).reshape(t, nh * hd))
        w, eps = L["ln2"]
        h = F.rms_norm(x, (x.shape[-1],), w, eps)
        g, u = L["gu"](h)
        return x + L["down"](self.act(g) * u)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        w, eps = self.norm
        h = F.rms_norm(x[-1:], (x.shape[-1],), w, eps)
        return self.head(h)[0].float()

    def _native_step(self, ids: torch.Tensor, p0: int) -> torch.Tensor:
        """One token through the compiled layer step (layers it cannot take through :meth:`_layer`)."""
        c = self._c
        lib, byref, model, x = c["lib"], c["byref"], c["model"], c["x"]
        threads, simd = torch.get_num_threads(), c["simd"]
        x.copy_(self.embed.weight[ids[0]] if type(self.embed) is nn.Embedding else self.embed(ids)[0])
        xp = x.data_ptr()
        mref = byref(model)
        for li, d in enumerate(c["layers"]):
            if d is not None:
                if lib.pq_decode_layer(mref, byref(d), xp, p0, threads, simd) != 0:
                    raise RuntimeError(f"the compiled decode step refused layer {li} at position {p0}")
            else:
                x.copy_(self._layer(li, x.view(1, -1), p0)[0])
        if c["head"] is None:
            return self._head(x.view(1, -1))
        logits = torch.empty(c["head"].n, dtype=torch.float32)
        lib.pq_decode_head(mref, c["norm"].data_ptr(), self.norm[1], byref(c["head"]), xp, logits.data_ptr(),
                           threads, simd)
        return logits

    def _block_attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, p0: int) -> torch.Tensor:
        t = q.shape[0]
        end = kc.shape[1]
        mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=p0)
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc[None], vc[None], attn_mask=mask,
                                              scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)

    __call__ = forward


def fast_greedy_decode(dec: FastDecoder, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding with :class:`FastDecoder`, the protocol of
    :func:`polyquant.eval.speed.greedy_decode`: ``(new_tokens [n], seconds of the n steps)``."""
    import time

    dec.reset()
    logits = dec(prompt.reshape(-1))
    tok = logits.argmax(-1, keepdim=True)
    new = []
    t0 = time.perf_counter()
    for _ in range(n):
        new.append(tok)
        tok = dec(tok).argmax(-1, keepdim=True)
    seconds = time.perf_counter() - t0
    return torch.cat(new).cpu(), seconds
