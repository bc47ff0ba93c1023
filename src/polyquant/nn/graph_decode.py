"""Batch-1 decode as one CUDA graph launch per token (``runtime="graph"``).

On a GPU, batch-1 decode of a quantized model is launch-bound, not bandwidth-bound: each of the
100-200 quantized Linears of a decoder, and the norms, rope and attention around them, pay a
Python launch of 8-60 us against kernels of 3-20 us. :class:`GraphDecoder` records the whole decode
step once in a CUDA graph and replays it per token:

* the step reads its token and position from two device tensors and writes the next token and
  position back into them (greedy), so a token costs one ``graph.replay()`` and nothing on the host;
* the KV cache is :class:`~polyquant.nn.decode.FastDecoder`'s static ``[layers, kv_heads, max_len,
  head_dim]``: a token writes its slot with ``index_copy_`` at the position tensor, and attention
  runs over the whole cache with a mask of the positions written so far (fixed shapes, so the graph
  is valid for every position);
* rope reads the precomputed tables at the position tensor; q/k/v and gate/up run fused through the
  layers' own kernels (``triton-w4a16``, ``triton-fp8-block`` / ``fp8-scaled-mm`` with the fp8
  activation rule fused into their one-row kernel, ``int8-dynamic``, ``reference`` ...).

A kernel or activation rule that cannot be captured (one whose work depends on the data on the host,
e.g. LLM.int8's outlier columns: ``Kernel.graph_safe = False``) makes the decoder run the same
static step eagerly; the reason is recorded in :attr:`GraphDecoder.fallbacks` (and
:attr:`GraphDecoder.graph_reason`). Off CUDA (or ``graph=False``) the static step runs eagerly too:
that is how the tests check on a CPU that the step computes what the plain path computes.

Prompts (more than one token) run FastDecoder's Python step through the same modules (prefill is
compute-bound; its kernels take the dequantize + GEMM route).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.nn.decode import FastDecoder, _Proj
from polyquant.nn.quant_linear import QuantLinear

__all__ = ["GraphDecoder", "graph_greedy_decode", "capture_reason"]


def _modules(dec: FastDecoder) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for i, L in enumerate(dec.layers):
        for key in ("qkv", "o", "gu", "down"):
            p = L[key]
            mods = ([p.fused] if p.fused is not None else p.members) if isinstance(p, _Proj) else [p]
            out.extend((f"layer {i} {key}", m) for m in mods)
    out.append(("head", dec.head))
    return out


def capture_reason(dec: FastDecoder) -> str | None:
    """Why the decode step of ``dec`` cannot be captured in a CUDA graph (None when it can)."""
    for name, m in _modules(dec):
        if isinstance(m, QuantLinear):
            if not getattr(m.kernel, "graph_safe", True):
                return f"{name}: kernel {m.kernel_name} is not graph-safe ({m.kernel.graph_unsafe_reason})"
            if m.act_quant is not None and not getattr(m.act_quant, "graph_safe", True):
                return f"{name}: activation rule {type(m.act_quant).__name__} depends on the data on the host"
    if dec.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the model is on {dec.device.type}"
    return None


class GraphDecoder(FastDecoder):
    """Batch-1 prefill + decode with the one-token step captured in a CUDA graph (module docstring).

    Args:
        model: a transformers causal LM (float or quantized by polyquant) on its device, in eval mode.
        max_len: the KV cache length (prompt + generated tokens). Attention reads the whole cache
            each step, so size it to the need.
        graph: capture the step (default: where the model is on CUDA); False: the same static step
            eagerly.
        fused_ops: True: run the norms, residual adds, rope + KV cache write and SiLU * up as the
            fused Triton kernels of :mod:`polyquant.kernels.triton_decode_ops` (needs CUDA, fused
            q/k/v and gate/up in every layer, SiLU, a power-of-two head size; ValueError otherwise).
            Default (None) off: they are checked in Triton's interpreter and compiled ahead for
            sm_80 / sm_90, but have not yet run on a GPU. The reason they are off is
            :attr:`fused_ops_reason`.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, graph: bool | None = None,
                 fused_ops: bool | None = None) -> None:
        super().__init__(model, max_len, native=False)
        self.fallbacks = [f for f in self.fallbacks if not f.startswith("every layer: Python step")]
        dev = self.device
        self._tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._hist = torch.zeros(self.max_len + 1, dtype=torch.long, device=dev)
        self._positions = torch.arange(self.max_len, device=dev)
        self._graph: Any = None
        self._out: torch.Tensor | None = None
        self.fused_ops_reason = self._fused_ops_reason(fused_ops)
        want = dev.type == "cuda" if graph is None else bool(graph)
        self.graph_reason = capture_reason(self) if want else "graph=False"
        if want and self.graph_reason is not None:
            self.fallbacks.append(f"decode step runs eagerly: {self.graph_reason}")
        self.captured = False

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "runtime": "graph", "graph": self.graph_reason is None,
                "graph_reason": self.graph_reason, "captured": self.captured,
                "fused_ops": self.fused_ops_reason is None, "fused_ops_reason": self.fused_ops_reason}

    def _fused_ops_reason(self, fused_ops: bool | None) -> str | None:
        from polyquant.kernels.triton_decode_ops import decode_ops_reason
        if not fused_ops:
            return "fused_ops=False" if fused_ops is False else "off by default (not yet run on a GPU)"
        why = decode_ops_reason(self.device)
        if why is None and self.act is not F.silu:
            why = "the activation is not SiLU"
        if why is None and (self.head_dim & (self.head_dim - 1) or self.head_dim < 2):
            why = f"head size {self.head_dim} is not a power of two"
        if why is None:
            for i, L in enumerate(self.layers):
                if L["qkv"].fused is None or L["gu"].fused is None:
                    why = f"layer {i}: q/k/v or gate/up are not one fused matmul"
                    break
        if why is None:
            why = None if self.cos.is_contiguous() and self.cos.dim() == 2 else "rope tables are not [max_len, hd]"
        if fused_ops and why is not None:
            raise ValueError(f"fused_ops=True but {why}")
        return why

    # -- the static step (fixed shapes; position and token are device tensors) -------------------
    def _static_step(self) -> torch.Tensor:
        if self.fused_ops_reason is None:
            return self._fused_step()
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        p = self._pos
        x = self.embed(self._tok).to(self.dtype)  # [1, hidden]
        cos, sin = self.cos.index_select(0, p)[:, None], self.sin.index_select(0, p)[:, None]  # [1, 1, hd]
        mask = (self._positions <= p).view(1, 1, 1, -1)
        for li, L in enumerate(self.layers):
            w, eps = L["ln1"]
            h = F.rms_norm(x, (x.shape[-1],), w, eps)
            q, k, v = L["qkv"](h)
            q = self._rope(q.view(1, nh, hd), cos, sin)
            k = self._rope(k.view(1, nkv, hd), cos, sin)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.index_copy_(1, p, k.transpose(0, 1))
            vc.index_copy_(1, p, v.view(1, nkv, hd).transpose(0, 1))
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc[None], vc[None], attn_mask=mask,
                                               scale=self.scaling, enable_gqa=nkv != nh)
            x = x + L["o"](a[0].transpose(0, 1).reshape(1, nh * hd))
            w, eps = L["ln2"]
            h = F.rms_norm(x, (x.shape[-1],), w, eps)
            g, u = L["gu"](h)
            x = x + L["down"](self.act(g) * u)
        return self._advance(self._head(x))

    def _advance(self, logits: torch.Tensor) -> torch.Tensor:
        p = self._pos
        nxt = logits.argmax(-1, keepdim=True)
        self._hist.index_copy_(0, p + 1, nxt)  # the token this step predicts, at the next position
        self._tok.copy_(nxt)
        self._pos.add_(1)
        return logits

    def _fused_step(self) -> torch.Tensor:
        """The static step with the small ops fused (:mod:`polyquant.kernels.triton_decode_ops`)."""
        from polyquant.kernels.triton_decode_ops import add_rms_norm, rope_kv_write, silu_mul
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        p = self._pos
        x = self.embed(self._tok).to(self.dtype).contiguous()  # [1, hidden]: the residual stream
        mask = (self._positions <= p).view(1, 1, 1, -1)
        delta = None
        for li, L in enumerate(self.layers):
            w, eps = L["ln1"]
            h = add_rms_norm(x, w, eps, delta)
            qkv = L["qkv"].fused(h)
            kc, vc = self.k_cache[li], self.v_cache[li]
            q = rope_kv_write(qkv, self.cos, self.sin, p, kc, vc, nh, nkv)
            a = F.scaled_dot_product_attention(q[None, :, None], kc[None], vc[None], attn_mask=mask,
                                               scale=self.scaling, enable_gqa=nkv != nh)
            o = L["o"](a.reshape(1, nh * hd))
            w, eps = L["ln2"]
            h = add_rms_norm(x, w, eps, o)
            d = L["down"](silu_mul(L["gu"].fused(h)))
            delta = d
        w, eps = self.norm
        h = add_rms_norm(x, w, eps, delta)
        return self._advance(self.head(h)[0].float())

    def _capture(self) -> None:
        tok, pos = self._tok.clone(), self._pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # JIT-compiles the Triton kernels, warms cuBLAS (writes only slots >= pos)
                self._tok.copy_(tok)
                self._pos.copy_(pos)
                self._static_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._tok.copy_(tok)
        self._pos.copy_(pos)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._out = self._static_step()
        except Exception as e:  # noqa: BLE001 - recorded, and the step runs eagerly from now on
            self.graph_reason = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            self.fallbacks.append(f"decode step runs eagerly: {self.graph_reason}")
            torch.cuda.synchronize(self.device)
            self._out = None
            return
        self._graph = graph
        self.captured = True

    def _step(self) -> torch.Tensor:
        if self.graph_reason is None:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                return self._out
        return self._static_step()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """As :meth:`FastDecoder.forward`; one token runs the static (captured) step. The logits of a
        captured step live in the graph's output buffer: the next step overwrites them."""
        ids = ids.reshape(-1)
        if ids.numel() != 1:
            return super().forward(ids)
        if self.pos + 1 > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + 1 tokens > max_len={self.max_len}")
        with torch.inference_mode():
            self._tok.copy_(ids.to(self.device))
            self._pos.fill_(self.pos)
            logits = self._step()
        self.pos += 1
        return logits

    __call__ = forward

    def generate(self, first: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy: feed ``first`` (one token) at the current position, then each prediction; ``n``
        steps, ``[n]`` tokens predicted (on the device; no host synchronisation inside the loop)."""
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {n} tokens > max_len={self.max_len}")
        start = self.pos
        with torch.inference_mode():
            self._tok.copy_(first.reshape(-1)[:1].to(self.device))
            self._pos.fill_(start)
            for _ in range(n):
                self._step()
        self.pos = start + n
        return self._hist[start + 1:start + n + 1].clone()


def graph_greedy_decode(dec: GraphDecoder, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding with :class:`GraphDecoder`, the protocol of
    :func:`polyquant.eval.speed.greedy_decode`: ``(new_tokens [n], seconds of the n steps)`` (the
    first call captures the graph: time a later one)."""
    import time

    dec.reset()
    logits = dec(prompt.reshape(-1))
    tok = logits.argmax(-1, keepdim=True)
    if dec.device.type == "cuda":
        torch.cuda.synchronize(dec.device)
    t0 = time.perf_counter()
    rest = dec.generate(tok, n)  # n steps, as fast_greedy_decode runs (the last prediction unused)
    if dec.device.type == "cuda":
        torch.cuda.synchronize(dec.device)
    seconds = time.perf_counter() - t0
    return torch.cat([tok.reshape(1), rest[:n - 1]]).cpu(), seconds
