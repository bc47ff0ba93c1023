"""Running an exported ONNX decoder with onnxruntime (:mod:`polyquant.export.onnx`): the inputs of
one step (:func:`feeds`), the exporter's check against the float model, and :class:`OnnxCausalLM`
(perplexity scoring and greedy KV-cache decode)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyquant.export.onnx_graph import io_names, kv_shape

__all__ = ["feeds", "OnnxCausalLM"]


def feeds(config, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
          past_len: int = 0) -> dict[str, np.ndarray]:
    """onnxruntime inputs for ``input_ids`` ``[B, S]`` after ``past_len`` cached positions."""
    b, s = input_ids.shape
    n_kv, hd = kv_shape(config)
    ins, _ = io_names(config.num_hidden_layers)
    f = {"input_ids": input_ids.astype(np.int64),
         "attention_mask": np.ones((b, past_len + s), np.int64),
         "position_ids": np.tile(np.arange(past_len, past_len + s, dtype=np.int64), (b, 1))}
    for j, n in enumerate(ins[3:]):
        f[n] = past[j] if past is not None else np.zeros((b, n_kv, 0, hd), np.float32)
    return f


def _verify(data: bytes, fmodel: nn.Module) -> dict[str, float]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 8), generator=g)
    got = sess.run(["logits"], feeds(fmodel.config, ids.numpy()))[0]
    with torch.no_grad():
        ref = fmodel(ids).logits.numpy()
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max())}



# -- running an exported file ------------------------------------------------------------------
class OnnxCausalLM(nn.Module):
    """An exported decoder run by onnxruntime behind the small part of the transformers interface
    polyquant's perplexity scoring uses (``model(input_ids=..., labels=...)`` -> ``.loss``, ``.logits``),
    plus :meth:`greedy` (KV-cache decode through the graph's ``present.*`` outputs).

    ``config`` defaults to ``<path>.tokenizer/config.json`` (written by the exporter)."""

    def __init__(self, path: str | Path, config=None, threads: int = 1):
        super().__init__()
        import onnxruntime as ort
        from transformers import AutoConfig
        self.path = Path(path)
        self.config = config if config is not None else AutoConfig.from_pretrained(str(self.path) + ".tokenizer")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.name_or_path = str(self.path)

    def can_generate(self) -> bool:
        return True

    def get_output_embeddings(self):  # noqa: D401 - for is_causal_lm
        return True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any):
        from transformers.modeling_outputs import CausalLMOutput
        logits = torch.from_numpy(self.session.run(["logits"], feeds(self.config, input_ids.cpu().numpy()))[0])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1).to(logits.device))
        return CausalLMOutput(loss=loss, logits=logits)

    def greedy(self, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
        """Greedy decode ``n`` tokens after ``prompt`` (1-D) with the KV cache; returns the tokens and
        the seconds of the ``n - 1`` single-token steps after the first (prefill excluded)."""
        ids = prompt.reshape(1, -1).numpy()
        o = self.session.run(None, feeds(self.config, ids))
        tok = int(o[0][0, -1].argmax())
        out, past, pos = [tok], o[1:], ids.shape[1]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            o = self.session.run(None, feeds(self.config, np.array([[tok]], np.int64), past, pos))
            past, pos = o[1:], pos + 1
            tok = int(o[0][0, -1].argmax())
            out.append(tok)
        return out, time.perf_counter() - t0
