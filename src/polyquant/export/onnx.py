"""ONNX Runtime export: the float decoder exported by ``torch.onnx`` (with KV cache inputs and
outputs), its quantized Linears' MatMuls replaced by ``com.microsoft.MatMulNBits`` nodes that carry
polyquant's own codes, scales and zero points.

The graph is built by the maintained exporter (``torch.onnx.export``; the TorchScript exporter by
default, which takes seconds, or ``dynamo=True``), never by hand: each quantized layer is
exported as a float Linear holding its dequantized weight, found again in the graph by that
weight's exact contents (the MatMul's constant ``B`` is ``W^T``), and its MatMul swapped for a
MatMulNBits node with the same input and output.

MatMulNBits (``onnxruntime/contrib_ops/cpu/quantization/matmul_nbits.cc``): attributes ``K``,
``N``, ``bits``, ``block_size`` (a power of two >= 16), ``accuracy_level``; inputs ``A``, ``B``
uint8 ``[N, ceil(K / bs), bs * bits / 8]`` (codes low bits first along K), ``scales`` ``[N *
k_blocks]``, ``zero_points`` uint8 packed the same way along the blocks (absent: ``2**(bits-1)``),
``g_idx`` int32 ``[K]``; value ``(q - zp) * scale``. polyquant's value ``(code - offset - zero) *
scale`` is that with ``zp = offset + zero`` whenever it is an integer code, so 2-, 4- and 8-bit
integer layouts are stored bit for bit (onnxruntime 1.32 on CPU; 3-bit has no kernel there).

- group size: a power of two >= 16 is the block size; per-channel weights repeat their scale over
  blocks of the largest power of two (<= 128) that divides ``K``; any other group is refused.
- act-order: symmetric 2/4-bit layers pass ``g_idx`` (the CPU kernel runs it); others (asymmetric
  zero points give wrong results with ``g_idx`` on onnxruntime 1.32's CPU kernel, 8-bit has no
  ``g_idx`` path) are stored with their columns sorted by group and the activation gathered in the
  same order first (``Gather(A, perm, axis=-1)``, exact).
- int8 per-channel: MatMulNBits with ``bits=8`` (its int8 equivalent in onnxruntime).
- refused by layer name with the reason: code books (NF4 / FP4), float8, float zero points (HQQ),
  3-bit, sparse outliers.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyquant.export.base import ExportError, ExportResult, Exporter, atomic_file, quant_layers, register_exporter

__all__ = ["export_onnx", "matmulnbits_tensors", "onnx_check_layer", "DecoderWithCache", "IR_VERSION"]

log = logging.getLogger(__name__)

IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.30 accepts at most 13 (10 is what its exporter writes)
MS_DOMAIN = "com.microsoft"


# -- the layer --------------------------------------------------------------------------------
def _block_size(qw) -> tuple[int | None, str | None]:
    out, inp = qw.shape
    r, c = qw.block
    if r != 1:
        return None, f"2-D blocks {qw.block} (MatMulNBits has one scale per row block of K)"
    if c >= inp:  # per channel: repeat the row's scale over blocks that divide K
        for b in (128, 64, 32, 16):
            if inp % b == 0:
                return b, None
        return None, f"per-channel weight with K={inp} not divisible by 16"
    if c < 16 or c & (c - 1):
        return None, f"group size {c} is not a power of two >= 16 (MatMulNBits' block_size)"
    return c, None


def onnx_check_layer(qw) -> str | None:
    """Why MatMulNBits cannot hold ``qw`` bit for bit (None when it can)."""
    qt = qw.qt
    if qt.kind != "int":
        return f"qtype {qw.qtype} is not an integer grid (MatMulNBits holds integer codes)"
    if qt.bits not in (2, 4, 8):
        return f"{qt.bits}-bit codes (onnxruntime's CPU MatMulNBits runs 2, 4 and 8 bits)"
    if qw.extras:
        return f"extra tensors {sorted(qw.extras)} (e.g. sparse outliers) have no MatMulNBits input"
    bs, why = _block_size(qw)
    if why:
        return why
    if qw.zero is not None:
        z = qw.zero.to(torch.float32)
        if not bool((z == z.round()).all()):
            return "non-integer zero points (e.g. HQQ's float zeros): MatMulNBits' uint8 zero points cannot hold them"
        zp = z + qt.code_offset
        if zp.min() < 0 or zp.max() > (1 << qt.bits) - 1:
            return f"zero points outside the {qt.bits}-bit code range"
    if qw.g_idx is not None:
        g = qw.g_idx.long()
        counts = torch.bincount(g, minlength=qw.scale.shape[1])
        c = qw.block[1]
        if bool((counts[:-1] != c).any()) or int(counts[-1]) > c:
            return "act-order groups of unequal sizes cannot be made contiguous blocks"
    return None


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[..., n]`` codes -> ``[..., n * bits / 8]`` bytes, low bits first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def matmulnbits_tensors(qw) -> dict[str, Any]:
    """The MatMulNBits inputs and attributes for ``qw`` (``[N, K]``): ``B``, ``scales``, optional
    ``zero_points``, ``g_idx`` or ``perm`` (a column order to gather the activation with first),
    and ``attrs``. Raises ExportError with the reason when the layer cannot be stored exactly."""
    why = onnx_check_layer(qw)
    if why:
        raise ExportError(why)
    n, k = qw.shape
    bits = qw.bits
    bs, _ = _block_size(qw)
    kb = math.ceil(k / bs)
    codes = qw.codes
    scale = qw.scale.to(torch.float32)
    zero = qw.zero
    zp = None if zero is None else (zero.to(torch.float32) + qw.qt.code_offset)
    g_idx = perm = None
    if qw.g_idx is not None:
        g = qw.g_idx.long()
        if zp is None and bits in (2, 4) and qw.qt.code_offset == 1 << (bits - 1):
            g_idx = g.to(torch.int32).numpy()
        else:  # sort the columns by group: each group becomes one contiguous block
            p = torch.argsort(g, stable=True)
            perm, codes = p.numpy().astype(np.int64), codes[:, p]
    c = qw.block[1]
    if c >= k:  # per channel: one scale (zero) per row, repeated over the blocks
        scale = scale.expand(n, kb)
        zp = None if zp is None else zp.expand(n, kb)
    if zp is None and qw.qt.code_offset != 1 << (bits - 1):  # unsigned codes without zero: zp = offset
        zp = torch.full((n, kb), float(qw.qt.code_offset))
    if zp is not None and bool((zp == (1 << (bits - 1))).all()):
        zp = None  # the default zero point
    pad = kb * bs - k
    cn = codes.numpy()
    if pad:
        fill = (1 << (bits - 1)) if zp is None else 0
        cn = np.concatenate([cn, np.full((n, pad), fill, np.uint8)], axis=1)
    B = _pack_bits(cn.reshape(n, kb, bs), bits)
    out = {"B": B, "scales": np.ascontiguousarray(scale.numpy().reshape(-1)),
           "attrs": {"K": k, "N": n, "bits": bits, "block_size": bs}}
    if zp is not None:
        zpn = zp.numpy().astype(np.uint8)
        per = 8 // bits
        zpad = (-kb) % per
        if zpad:
            zpn = np.concatenate([zpn, np.zeros((n, zpad), np.uint8)], axis=1)
        out["zero_points"] = _pack_bits(zpn, bits).reshape(-1)
    if g_idx is not None:
        out["g_idx"] = g_idx
    if perm is not None:
        out["perm"] = perm
    return out


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


def export_onnx(model: nn.Module, tokenizer: Any, out: Path, *, accuracy_level: int = 0, opset: int = 17,
                dynamo: bool = False, verify: bool = True, overwrite: bool = False, source: str | None = None,
                tokenizer_dir: bool = True, share_weights: bool = True) -> ExportResult:
    """Write ``model`` as one ONNX decoder file with KV cache at ``out`` (atomically).

    Args:
        accuracy_level: MatMulNBits' ``accuracy_level`` (0: float activations, bit-exact weights;
            4: int8 activations, faster, approximate).
        opset: ONNX opset of the exported graph (the dynamo exporter needs >= 18).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one.
        verify: run onnxruntime once on a short input and report the largest logit difference from
            the float graph of the same (dequantized) weights.
        tokenizer_dir: also save the tokenizer and config.json in ``<out>.tokenizer/`` beside the file
            (for ``polyquant eval OUT.onnx``).
        share_weights: store a float matrix the graph holds twice once (a tied ``lm_head`` is the
            embedding's transpose: :func:`share_tied_weights`); ``False`` keeps the exporter's copies.
    """
    import onnx

    t0 = time.perf_counter()
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
    qlayers = quant_layers(model)
    refused = []
    for name, ql in qlayers.items():
        why = onnx_check_layer(ql.quantized_weight)
        if why:
            refused.append(f"{name}: {why}")
    if refused:
        raise ExportError("ONNX (MatMulNBits) export refused:\n  " + "\n  ".join(refused))
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not hasattr(model.config, attr):
            raise ExportError(f"model_type {getattr(model.config, 'model_type', None)!r}: the ONNX exporter "
                              f"writes decoder-only causal LMs (config has no {attr})")
    fmodel, keys = _float_copy(model, qlayers)
    result = ExportResult(path=Path(out), target="onnx")
    with tempfile.TemporaryDirectory(prefix="polyquant-onnx-") as tmp:
        fpath = Path(tmp) / "float.onnx"
        _torch_export(fmodel, fpath, opset, dynamo)
        t_export = time.perf_counter() - t0
        proto = onnx.load(str(fpath))
    result.layers = _swap_matmuls(proto, qlayers, keys, accuracy_level)
    shared = share_tied_weights(proto) if share_weights else []
    proto.ir_version = IR_VERSION
    proto.producer_name = "polyquant"
    rec = getattr(model, "polyquant", None)
    meta = {"polyquant.method": getattr(rec, "method", "") or "", "polyquant.source": str(source or ""),
            "polyquant.model_type": str(model.config.model_type)}
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    data = proto.SerializeToString()
    if verify:
        result.extra["verify"] = _verify(data, fmodel)
    with atomic_file(out, overwrite=overwrite) as tmpf:
        tmpf.write_bytes(data)
    if tokenizer_dir:
        from polyquant.formats.io import atomic_dir
        with atomic_dir(Path(str(out) + ".tokenizer"), overwrite=True) as d:
            model.config.to_json_file(str(d / "config.json"))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(d))
    result.bytes = Path(out).stat().st_size
    result.seconds = time.perf_counter() - t0
    result.extra.update({"torch_export_seconds": round(t_export, 2), "exporter": "dynamo" if dynamo else "torchscript",
                         "ir_version": IR_VERSION, "accuracy_level": accuracy_level,
                         "matmulnbits": len(result.layers),
                         "shared_initializers": shared, "shared_bytes": sum(x["bytes"] for x in shared)})
    return result


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


def onnx_layer_type(qw) -> str:
    """The MatMulNBits variant a layer it holds becomes (``MatMulNBits4``, ``+g_idx`` / ``+gather`` for act-order)."""
    t = f"MatMulNBits{qw.bits}"
    if qw.g_idx is not None:
        sym = qw.zero is None and qw.bits in (2, 4) and qw.qt.code_offset == 1 << (qw.bits - 1)
        t += "+g_idx" if sym else "+gather"
    return t


#: Why optimum-onnx's ``ORTModelForCausalLM`` is not a verified reader (checked on this machine).
OPTIMUM_ONNX_NOTE = ("does not load with transformers 5: optimum-onnx 0.1.0 (the latest) requires "
                     "transformers<4.58 and optimum~=2.1; installed beside transformers 5.24 with --no-deps, "
                     "`from optimum.onnxruntime import ORTModelForCausalLM` fails with ImportError: cannot import "
                     "name 'get_parameter_dtype' from 'transformers.modeling_utils'")


register_exporter(Exporter(
    name="onnx", suffix=".onnx", readers=("onnxruntime",),
    run=export_onnx,
    description="ONNX decoder with KV cache for onnxruntime (com.microsoft.MatMulNBits with polyquant's codes)",
    options={"accuracy_level": "0 (float activations) .. 4 (int8 activations)", "dynamo": "torch.export exporter",
             "opset": "ONNX opset (17)",
             "share_weights": "store a tied lm_head once (the embedding's transpose; default on)"},
    check_layer=onnx_check_layer,
    layer_type=onnx_layer_type,
    untested_readers={"optimum-onnx": OPTIMUM_ONNX_NOTE},
))


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
