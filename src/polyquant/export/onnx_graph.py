"""The graph side of the ONNX export (:mod:`polyquant.export.onnx`): the decoder wrapper
``torch.onnx.export`` traces (KV cache in and out), the float copy whose quantized layers hold their
dequantized weights, the export itself, the swap of each such layer's MatMul for a MatMulNBits node
(found by its weight's contents), and storing a float matrix the graph holds twice once."""
from __future__ import annotations

import copy
import hashlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyquant.export.base import ExportError
from polyquant.export.onnx_nbits import matmulnbits_tensors

__all__ = ["DecoderWithCache", "io_names", "kv_shape", "share_tied_weights", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"


# -- the decoder wrapper the exporter traces ---------------------------------------------------
class DecoderWithCache(nn.Module):
    """``(input_ids, attention_mask, position_ids, past.0.key, past.0.value, ...) -> (logits,
    present.0.key, ...)``: the same inputs and outputs optimum / onnxruntime-genai decoders have."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_kw: cache})
        pkv = getattr(out, "cache", None) or out.past_key_values
        res = [out.logits]
        for i in range(self.n_layers):
            layer = pkv.layers[i]
            res += [layer.keys, layer.values]
        return tuple(res)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ins, outs


def kv_shape(config) -> tuple[int, int]:
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return n_kv, head_dim


def _float_copy(model: nn.Module, qlayers: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, bytes]]:
    """A float copy of ``model`` whose quantized layers are Linears holding the dequantized weight;
    and each layer's key: the hash of ``W^T``'s float32 bytes (how its MatMul is found again)."""
    from polyquant.nn.quantize import replace_module
    f = copy.deepcopy(model).float()
    keys = {}
    for name, ql in qlayers.items():
        w = ql.quantized_weight.dequantize(torch.float32)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=ql.bias is not None)
        lin.weight.data.copy_(w)
        if ql.bias is not None:
            lin.bias.data.copy_(ql.bias.detach().float())
        replace_module(f, name, lin)
        keys[name] = hashlib.sha1(np.ascontiguousarray(w.t().numpy()).tobytes()).digest()
    return f.eval(), keys


def _torch_export(fmodel: nn.Module, path: Path, opset: int, dynamo: bool) -> None:
    cfg = fmodel.config
    L = cfg.num_hidden_layers
    n_kv, hd = kv_shape(cfg)
    wrap = DecoderWithCache(fmodel).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    am = torch.ones(1, 5, dtype=torch.long)
    pos = torch.arange(2, 5)[None]
    past = [torch.zeros(1, n_kv, 2, hd) for _ in range(2 * L)]
    ins, outs = io_names(L)
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            ds = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                  "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                  "position_ids": {0: "batch_size", 1: "sequence_length"},
                  "past": tuple({0: "batch_size", 2: "past_sequence_length"} for _ in range(2 * L))}
            torch.onnx.export(wrap, (ids, am, pos, *past), str(path), dynamo=True, input_names=ins,
                              output_names=outs, dynamic_shapes=ds, opset_version=max(opset, 18),
                              external_data=False, verbose=False)
        else:
            dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                   "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                   "position_ids": {0: "batch_size", 1: "sequence_length"},
                   "logits": {0: "batch_size", 1: "sequence_length"}}
            for n in ins[3:]:
                dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
            for n in outs[1:]:
                dyn[n] = {0: "batch_size", 2: "total_sequence_length"}
            torch.onnx.export(wrap, (ids, am, pos, *past), str(path), dynamo=False, input_names=ins,
                              output_names=outs, dynamic_axes=dyn, opset_version=opset, do_constant_folding=True)


def _initializer_keys(graph) -> dict[bytes, list[Any]]:
    from onnx import numpy_helper
    keys: dict[bytes, list[Any]] = {}
    for init in graph.initializer:
        if len(init.dims) != 2 or init.data_type != 1:  # FLOAT
            continue
        arr = numpy_helper.to_array(init)
        keys.setdefault(hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest(), []).append(init)
    return keys


def _swap_matmuls(model_proto, qlayers: dict[str, nn.Module], keys: dict[str, bytes],
                  accuracy_level: int) -> dict[str, dict[str, Any]]:
    from onnx import helper, numpy_helper
    g = model_proto.graph
    by_key = _initializer_keys(g)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    report: dict[str, dict[str, Any]] = {}
    remove_inits: set[str] = set()
    new_inits = []
    for name, ql in qlayers.items():
        inits = by_key.get(keys[name], [])
        if len(inits) != 1:
            raise ExportError(f"{name}: its weight was found {len(inits)} times in the exported graph "
                              "(expected once as a MatMul constant)")
        init = inits[0]
        users = consumers.get(init.name, [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != init.name:
            raise ExportError(f"{name}: the exported graph uses its weight in {[u.op_type for u in users]}, "
                              "not in one MatMul")
        mm = users[0]
        qw = ql.quantized_weight
        t = matmulnbits_tensors(qw)
        base = name.replace(".", "_")
        a_in = mm.input[0]
        nodes_before = []
        if "perm" in t:
            new_inits.append(numpy_helper.from_array(t["perm"], f"{base}.perm"))
            nodes_before.append(helper.make_node("Gather", [a_in, f"{base}.perm"], [f"{base}.A_perm"], axis=-1,
                                                 name=f"{base}/Gather"))
            a_in = f"{base}.A_perm"
        new_inits.append(numpy_helper.from_array(t["B"], f"{base}.qweight"))
        new_inits.append(numpy_helper.from_array(t["scales"], f"{base}.scales"))
        inputs = [a_in, f"{base}.qweight", f"{base}.scales"]
        if "zero_points" in t:
            new_inits.append(numpy_helper.from_array(t["zero_points"], f"{base}.qzeros"))
            inputs.append(f"{base}.qzeros")
        if "g_idx" in t:
            if "zero_points" not in t:
                inputs.append("")
            new_inits.append(numpy_helper.from_array(t["g_idx"], f"{base}.g_idx"))
            inputs.append(f"{base}.g_idx")
        nbits = helper.make_node("MatMulNBits", inputs, list(mm.output), domain=MS_DOMAIN,
                                 name=f"{base}/MatMulNBits", accuracy_level=accuracy_level, **t["attrs"])
        idx = list(g.node).index(mm)
        g.node.remove(mm)
        for j, nd in enumerate(nodes_before + [nbits]):
            g.node.insert(idx + j, nd)
        remove_inits.add(init.name)
        report[name] = {"type": f"MatMulNBits{t['attrs']['bits']}", "qtype": qw.qtype, "block": list(qw.block),
                        "block_size": t["attrs"]["block_size"], "source": "codes",
                        "exact": True,  # the same codes, float32 scales and integer zero points: no rounding
                        "act_order": "g_idx" if "g_idx" in t else ("gather" if "perm" in t else None),
                        "zero_points": "zero_points" in t}
    kept = [i for i in g.initializer if i.name not in remove_inits]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return report


def share_tied_weights(model_proto) -> list[dict[str, Any]]:
    """Store each float matrix once: the exporter writes a tied ``lm_head`` as its own initializer
    ``E^T`` beside the embedding ``E`` the Gather reads (constant folding of the transpose), so the
    file holds the embedding twice. Every 2-D float initializer equal to another one (``same``) or to
    another one's transpose (``transpose``) is removed and its consumers read the kept one (through
    one ``Transpose`` node for the second kind; onnxruntime folds it when the session is created, so
    the MatMul sees the same matrix and the logits are unchanged). Returns one entry per removed
    initializer: ``{"name", "kept", "how", "bytes"}``."""
    from onnx import helper, numpy_helper
    g = model_proto.graph
    mats = [(i, numpy_helper.to_array(i)) for i in g.initializer if len(i.dims) == 2 and i.data_type == 1]
    if len(mats) < 2:
        return []
    first: dict[tuple[tuple[int, ...], bytes], str] = {}
    for init, arr in mats:
        first.setdefault((arr.shape, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest()), init.name)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for j, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, j))

    def folded(name: str) -> bool:  # only ever a MatMul's B: the exporter's folded transpose
        return all(op == "MatMul" and j == 1 for op, j in consumers.get(name, [("?", 0)]))

    rename: dict[str, str] = {}
    transposes: dict[str, str] = {}  # kept initializer -> its Transpose node's output
    shared: list[dict[str, Any]] = []
    for init, arr in mats:
        key = (arr.shape, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest())
        if first[key] != init.name:  # an exact duplicate of an earlier one
            rename[init.name] = first[key]
            shared.append({"name": init.name, "kept": first[key], "how": "same", "bytes": arr.nbytes})
    for init, arr in mats:
        if init.name in rename or init.name in transposes:
            continue
        other = first.get((arr.shape[::-1], hashlib.sha1(np.ascontiguousarray(arr.T).tobytes()).digest()))
        if other is None or other == init.name or other in rename:
            continue
        drop, keep = (init.name, other) if folded(init.name) or not folded(other) else (other, init.name)
        if keep in rename or drop in transposes or drop in rename.values():
            continue
        rename[drop] = transposes.setdefault(keep, f"{keep}.T")
        shared.append({"name": drop, "kept": keep, "how": "transpose",
                       "bytes": int(np.prod(arr.shape)) * arr.itemsize})
    if not rename:
        return []
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
    for j, (src, dst) in enumerate(sorted(transposes.items())):
        g.node.insert(j, helper.make_node("Transpose", [src], [dst], perm=[1, 0],
                                          name=f"/polyquant/shared/{src.replace('.', '_')}/Transpose"))
    kept = [i for i in g.initializer if i.name not in rename]
    del g.initializer[:]
    g.initializer.extend(kept)
    return shared

