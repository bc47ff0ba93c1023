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
- ternary (BitNet): ``bits=2`` with zero point 1 (codes 0, 1, 2 are -1, 0, 1), a per-tensor scale repeated
  over every row and block.
- activation rules (BitNet's int8, LLM.int8, W8A8) are not carried: MatMulNBits runs float activations
  (``accuracy_level`` 4: its own int8 blocks); the result marks each such layer.
- refused by layer name with the reason: code books (NF4 / FP4), float8, float zero points (HQQ),
  3-bit, sparse outliers.

The parts: :mod:`~polyquant.export.onnx_nbits` (a layer's MatMulNBits tensors),
:mod:`~polyquant.export.onnx_graph` (export and graph surgery), :mod:`~polyquant.export.onnx_runtime`
(running the file: ``feeds``, :class:`OnnxCausalLM`); this module is the exporter and its registration,
and every name stays importable from here.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from polyquant.export.base import (ExportError, ExportResult, Exporter, atomic_file, note_activation_rules, quant_layers,
                                   register_exporter)
from polyquant.export.onnx_graph import (MS_DOMAIN, DecoderWithCache, _float_copy, _swap_matmuls,  # noqa: F401
                                         _torch_export, io_names, kv_shape, share_tied_weights)
from polyquant.export.onnx_nbits import matmulnbits_tensors, onnx_check_layer, onnx_layer_type
from polyquant.export.onnx_runtime import OnnxCausalLM, _verify, feeds

__all__ = ["export_onnx", "matmulnbits_tensors", "onnx_check_layer", "onnx_layer_type", "DecoderWithCache",
           "IR_VERSION", "OnnxCausalLM", "feeds", "share_tied_weights", "io_names", "kv_shape"]

IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.30 accepts at most 13 (10 is what its exporter writes)


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
    note_activation_rules(model, result, "MatMulNBits runs float activations" if accuracy_level == 0 else
                          f"MatMulNBits accuracy_level {accuracy_level} quantizes activations its own way")
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

