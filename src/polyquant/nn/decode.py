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

Numerics: the same operations in the same dtype as transformers' eager path; RMSNorm is
``torch.nn.functional.rms_norm`` and attention ``scaled_dot_product_attention`` (the sdpa path
transformers uses by default), so logits agree with the model's own forward to float32 rounding
(the tests bound the difference and check that greedy tokens are identical).

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


class _Proj:
    """One matmul over the concatenation of sibling projections (or each member alone)."""

    def __init__(self, members: list[nn.Module], fallbacks: list[str], name: str) -> None:
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
            same = len({(m._kernel_request, m.method, id(m.act_quant) if m.act_quant else None) for m in members}) == 1
            has_bias = [m.bias is not None for m in members]
            if qw is not None and same and len(set(has_bias)) == 1:
                bias = torch.cat([m.bias.detach() for m in members]) if has_bias[0] else None
                self.fused = QuantLinear(qw, bias, kernel=members[0]._kernel_request,
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
    """

    def __init__(self, model: nn.Module, max_len: int = 2048) -> None:
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
        for i, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": (layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                "ln2": (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
                "qkv": _Proj([a.q_proj, a.k_proj, a.v_proj], self.fallbacks, f"layer {i} q/k/v"),
                "o": a.o_proj,
                "gu": _Proj([m.gate_proj, m.up_proj], self.fallbacks, f"layer {i} gate/up"),
                "down": m.down_proj,
            })
        self.norm = (base.norm.weight, _eps(base.norm))
        self.head = model.lm_head
        with torch.inference_mode():
            pos = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
            cos, sin = base.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        shape = (len(self.layers), self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.pos = 0

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": "fast", "max_len": self.max_len, "fallbacks": list(self.fallbacks)}

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
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        with torch.inference_mode():
            x = self.embed(ids).to(self.dtype)  # [T, hidden]
            cos, sin = self.cos[p0:p0 + t, None], self.sin[p0:p0 + t, None]  # [T, 1, hd]
            end = p0 + t
            for li, L in enumerate(self.layers):
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
                x = x + L["down"](self.act(g) * u)
            w, eps = self.norm
            h = F.rms_norm(x[-1:], (x.shape[-1],), w, eps)
            logits = self.head(h)[0].float()
        self.pos = end
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
