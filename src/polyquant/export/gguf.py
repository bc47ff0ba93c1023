"""GGUF export for llama.cpp: polyquant's codes and scales packed into Q4_0 / Q4_1 / Q8_0 blocks, and
ternary (BitNet) codes into TQ2_0 / TQ1_0.

The file is laid out as llama.cpp's own ``convert_hf_to_gguf.py`` writes a Llama (or Qwen2)
model: the ``<arch>.*`` hyper-parameters, the tokenizer as a ``gpt2`` (byte-level BPE) vocabulary
with its merges and special ids, the tensors under llama.cpp's names, and for ``llama`` the rows
of ``attn_q`` / ``attn_k`` permuted the way llama.cpp's rotary code expects (transformers' GGUF
loader undoes it on load).

Block layouts and when a layer fits them: :mod:`polyquant.export.gguf_blocks`. d is fp16 in every
type, so a scale that is not an fp16 number is rounded (reported per layer).
Layers that do not fit (NF4 / FP4 code books, float zeros under Q4_0 / Q8_0, float8, a group that
is not a multiple of 32) are re-rounded from polyquant's dequantized weight with gguf's own
quantizer and the loss against that weight reported, or refused with ``requantize=False``;
act-order (``g_idx``) cannot be stored in any GGUF type and is refused by layer name.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyquant.export.base import (ExportError, ExportResult, Exporter, atomic_file, note_activation_rules, quant_layers,
                                   register_exporter)
from polyquant.export.gguf_blocks import (GGUF_TYPES, TERNARY_TYPES, block_len, gguf_blocks,  # noqa: F401
                                          gguf_check_layer, natural_type, pack_q4_0, pack_q4_1, pack_q8_0,
                                          pack_tq1_0, pack_tq2_0)

__all__ = ["export_gguf", "pack_q4_0", "pack_q4_1", "pack_q8_0", "pack_tq1_0", "pack_tq2_0", "gguf_blocks", "GGUF_TYPES", "llama_permutation", "gguf_check_layer"]

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "Q8_0")
ARCHS = {"llama": "llama", "qwen2": "qwen2"}  # HF model_type -> llama.cpp architecture
_FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "TQ1_0": 36, "TQ2_0": 37, "F32": 0, "F16": 1}  # llama.cpp LlamaFileType
_HF_TO_GGUF = {  # per block; llama.cpp's tensor names
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives ``q_proj`` / ``k_proj`` (``n_head`` = heads of that
    projection): within each head the two rotary halves are interleaved."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(n_rows)


# -- tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2 writes it --------------------------------
def _looks_special(tok: str) -> bool:
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<\uff5c") and tok.endswith("\uff5c>"))
            or (tok.startswith("<unused") and tok.endswith(">")))


def _write_vocab(writer, tokenizer, vocab_size: int, pre: str) -> dict[str, Any]:
    import gguf
    with tempfile.TemporaryDirectory(prefix="polyquant-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        tj_path = Path(tmp) / "tokenizer.json"
        if not tj_path.is_file():
            raise ExportError("tokenizer: only fast (tokenizer.json) tokenizers are exported to GGUF")
        kind = json.loads(tj_path.read_text(encoding="utf-8")).get("model", {}).get("type")
        if kind != "BPE":
            raise ExportError(f"tokenizer: a {kind} tokenizer cannot be written as llama.cpp's gpt2 (BPE) "
                              "vocabulary; only BPE tokenizers are exported")
        vocab = tokenizer.get_vocab()
        reverse = {i: t for t, i in vocab.items()}
        added = tokenizer.get_added_vocab()
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        if max(reverse) >= vocab_size:
            raise ExportError(f"tokenizer: token id {max(reverse)} is outside the model's vocab_size {vocab_size}")
        tokens, types = [], []
        T = gguf.TokenType
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(T.UNUSED)
                continue
            t = reverse[i]
            if t in added:
                at = decoder.get(i)
                if (at is not None and at.special) or _looks_special(t):
                    types.append(T.CONTROL)
                else:
                    t = t.replace("\u2581", " ")
                    types.append(T.USER_DEFINED)
            else:
                types.append(T.NORMAL)
            tokens.append(t)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True)
        special.add_to_gguf(writer, quiet=True)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        if cfg_path.is_file():
            tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if "add_prefix_space" in tcfg:
                writer.add_add_space_prefix(tcfg["add_prefix_space"])
        return {"tokens": len(tokens), "merges": len(special.merges), "pre": pre,
                "special": dict(special.special_token_ids)}


def _source_pre(source: str | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF a model came from (the default model is one)."""
    try:
        import gguf
        if source == "default":
            from polyquant.models import default_model_path
            path = default_model_path()
        elif source and str(source).endswith(".gguf") and Path(source).is_file():
            path = Path(source)
        else:
            return None
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        return None if field is None else field.contents()
    except Exception:  # pragma: no cover - best effort
        return None


# -- the model ---------------------------------------------------------------------------------
def _rope(cfg) -> tuple[float | None, dict[str, Any]]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta")
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    return theta, {"type": kind or "default", "factor": params.get("factor", scaling.get("factor"))}


def _gguf_name(name: str, n_layers: int) -> tuple[str, int | None] | None:
    """HF parameter owner ``name`` (module path) -> (llama.cpp tensor stem, block index)."""
    if name in _TOP:
        return _TOP[name], None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _HF_TO_GGUF and int(m.group(1)) < n_layers:
        return f"blk.{m.group(1)}.{_HF_TO_GGUF[m.group(2)]}", int(m.group(1))
    return None


def llama_tensor_order(name: str) -> tuple[int, str]:
    """Sort key of llama.cpp's ``weight_name_comparer`` (the order llama-quantize writes): tensors outside
    the blocks first, then block by block (numerically: blk.2 before blk.10), by name within each. A file in
    this order puts every tensor at the offset llama-quantize would (decode speed is the same either way:
    measured with ``llama-bench -mmp 0``, benchmarks/README, export)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _float_tensor(t: torch.Tensor, float_type: str):
    import gguf
    a = t.detach().to(torch.float32).contiguous().numpy()
    if a.ndim == 1 or float_type == "F32":
        return a, None, "F32"
    if float_type == "F16":
        return a.astype(np.float16), None, "F16"
    if a.shape[-1] % 32:
        return a.astype(np.float16), None, "F16"
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, "Q8_0"


def _loss(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    diff = (got.astype(np.float64) - ref.astype(np.float64))
    err = float(np.abs(diff).max()) if diff.size else 0.0
    p = float((ref.astype(np.float64) ** 2).sum())
    n = float((diff ** 2).sum())
    return {"max_abs_err": err, "sqnr_db": float("inf") if n == 0 else round(float(10 * np.log10(max(p, 1e-30) / n)), 2)}


def export_gguf(model: nn.Module, tokenizer: Any, out: Path, *, type: str = "auto", float_type: str = "F16",
                requantize: bool = True, verify: bool = True, tokenizer_pre: str | None = None,
                source: str | None = None, overwrite: bool = False, name: str | None = None) -> ExportResult:
    """Write ``model`` as a llama.cpp GGUF file at ``out`` (atomically).

    Args:
        type: GGUF type of the quantized Linears: ``Q4_0`` / ``Q4_1`` / ``Q8_0``, or ``auto`` (each
            layer in the smallest type that holds its grid exactly). A float model's block Linears
            are quantized to ``type`` by gguf's own (llama.cpp's reference) quantizer.
        float_type: type of the 2-D float tensors (embeddings, an unquantized ``lm_head``): ``F32``,
            ``F16`` (llama.cpp's converter default) or ``Q8_0``; norms are always F32.
        requantize: re-round layers whose grid is not ``type``'s from polyquant's dequantized weight
            (the loss is reported); ``False`` refuses them by name instead. Act-order is always refused.
        verify: decode every packed tensor with gguf's own dequantizer and report the largest
            difference from polyquant's dequantized weight (``exact`` when it is 0).
        tokenizer_pre: ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name); by default the one of
            the GGUF the model came from (the default model), else ``default``.
    """
    import gguf

    t0 = time.perf_counter()
    if type != "auto" and type not in GGUF_TYPES:
        raise ValueError(f"type must be 'auto' or one of {GGUF_TYPES}, got {type!r}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHS:
        raise ExportError(f"model_type {mt!r}: the GGUF exporter writes {sorted(ARCHS)} models")
    arch = ARCHS[mt]
    if tokenizer is None:
        raise ExportError("a GGUF file needs the tokenizer: pass tokenizer= (or export a folder that has one)")
    theta, rope = _rope(cfg)
    if rope["type"] not in ("default", "linear"):
        raise ExportError(f"rope type {rope['type']!r} is not exported (llama.cpp's converter writes extra "
                          "rope tensors for it)")
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    qlayers = quant_layers(model)
    any_quant = bool(qlayers)

    # plan every tensor before writing anything: refusals name the layer and come first
    modules = dict(model.named_modules())
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and "lm_head" not in qlayers
    plan: list[tuple[str, str, nn.Module]] = []  # (hf module, gguf stem, module)
    for mname, mod in modules.items():
        g = _gguf_name(mname, n_layers)
        if g is None:
            continue
        if mname == "lm_head" and tied:
            continue
        plan.append((mname, g[0], mod))
    covered = {p[0] for p in plan}
    missing = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in covered
               and not (tied and n.startswith("lm_head."))]
    missing += [n + ".*" for n in qlayers if n not in covered]
    if missing:
        raise ExportError(f"tensors with no llama.cpp {arch} name: {missing[:8]}")

    refused = []
    for mname, stem, mod in plan:
        if mname in qlayers:
            qw = mod.quantized_weight
            if qw.g_idx is not None:
                refused.append(f"{mname}: act-order (g_idx) cannot be represented in any GGUF type; "
                               "quantize without act-order")
            elif not requantize:
                t = natural_type(qw) if type == "auto" else type
                data, why = gguf_blocks(qw, t)
                if data is None:
                    refused.append(f"{mname}: cannot be stored as {t} without re-rounding: {why}")
            else:
                t = natural_type(qw) if type == "auto" else type
                if qw.shape[1] % block_len(t):
                    refused.append(f"{mname}: in_features {qw.shape[1]} is not a multiple of {t}'s "
                                   f"{block_len(t)}-weight blocks")
        elif (isinstance(mod, nn.Linear) and not any_quant and type != "auto" and stem.startswith("blk.")
              and mod.in_features % block_len(type)):
            refused.append(f"{mname}: in_features {mod.in_features} is not a multiple of {type}'s "
                           f"{block_len(type)}-weight blocks")
    if refused:
        raise ExportError("GGUF export refused:\n  " + "\n  ".join(refused))

    if source is None:  # a model loaded with load_model("default") (and quantized in memory) keeps its name
        from polyquant.models import DEFAULT_NAME
        if getattr(model, "name_or_path", None) == DEFAULT_NAME:
            source = "default"
    pre = tokenizer_pre or _source_pre(source) or "default"
    result = ExportResult(path=Path(out), target="gguf")
    file_types = []
    with atomic_file(out, overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(name or Path(str(getattr(model, "name_or_path", "") or "model")).name or "model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        if theta is not None:
            w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        if rope["type"] == "linear" and rope["factor"]:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        tok_info = _write_vocab(w, tokenizer, cfg.vocab_size, pre)
        if arch == "llama" and cfg.vocab_size == 49152:  # llama.cpp's converter: granite / SmolLM vocab
            w.add_add_bos_token(False)

        tensors: list[tuple[str, np.ndarray, Any]] = []  # (name, data, raw dtype), added in llama.cpp's order
        for mname, stem, mod in plan:
            perm = None
            if arch == "llama" and stem.endswith(".attn_q"):
                perm = llama_permutation(mod.out_features if hasattr(mod, "out_features") else 0, n_head)
            elif arch == "llama" and stem.endswith(".attn_k"):
                perm = llama_permutation(mod.out_features, n_kv)
            bias = getattr(mod, "bias", None)
            if mname in qlayers:
                qw = mod.quantized_weight
                t = natural_type(qw) if type == "auto" else type
                gt = gguf.GGMLQuantizationType[t]
                data, why = gguf_blocks(qw, t, rows=perm)
                ref = qw.dequantize()
                if perm is not None:
                    ref = ref[perm]
                ref = ref.numpy()
                info: dict[str, Any] = {"type": t, "qtype": qw.qtype, "block": list(qw.block),
                                        "fp16_scales": bool(torch.equal(qw.scale.to(torch.float16).to(qw.scale.dtype),
                                                                        qw.scale))}
                if data is None:
                    data = gguf.quants.quantize(ref, gt)
                    info.update(source="requantized", reason=why)
                else:
                    info["source"] = "codes"
                if verify or info["source"] == "requantized":
                    info.update(_loss(ref, gguf.quants.dequantize(data, gt)))
                    info["exact"] = info["max_abs_err"] == 0.0
                tensors.append((f"{stem}.weight", data, gt))
                file_types.append(t)
                result.layers[mname] = info
            elif isinstance(mod, nn.Linear) and not any_quant and type != "auto" and stem.startswith("blk."):
                wt = mod.weight.detach().to(torch.float32)
                if perm is not None:
                    wt = wt[perm]
                ref = wt.contiguous().numpy()
                gt = gguf.GGMLQuantizationType[type]
                data = gguf.quants.quantize(ref, gt)
                info = {"type": type, "source": "requantized", "reason": "float weight",
                        **_loss(ref, gguf.quants.dequantize(data, gt))}
                info["exact"] = info["max_abs_err"] == 0.0
                tensors.append((f"{stem}.weight", data, gt))
                file_types.append(type)
                result.layers[mname] = info
            else:
                wt = mod.weight
                if perm is not None:
                    wt = wt[perm]
                arr, raw, ft = _float_tensor(wt, float_type)
                if raw is None:
                    tensors.append((f"{stem}.weight", arr, None))
                else:
                    tensors.append((f"{stem}.weight", arr, raw))
                result.layers[mname] = {"type": ft, "source": "float"}
            if bias is not None:
                b = bias.detach().to(torch.float32)
                if perm is not None:
                    b = b[perm]
                tensors.append((f"{stem}.bias", b.contiguous().numpy(), None))
        note_activation_rules(model, result, "llama.cpp quantizes activations its own way (8-bit blocks of "
                                             "32 or 256 in its dot products)")
        for tname, data, raw in sorted(tensors, key=lambda t: llama_tensor_order(t[0])):
            if raw is None:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, data, raw_dtype=raw)
        ftype = max(set(file_types), key=file_types.count) if file_types else (
            "F32" if float_type == "F32" else "F16")
        w.add_file_type(_FILE_TYPE.get(ftype, 1))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    result.bytes = Path(out).stat().st_size
    result.seconds = time.perf_counter() - t0
    result.extra.update({"tokenizer": tok_info, "architecture": arch, "file_type": ftype})
    return result


register_exporter(Exporter(
    name="gguf", suffix=".gguf", readers=("llama.cpp", "transformers (gguf_file=)"),
    run=export_gguf,
    description="llama.cpp GGUF (Q4_0 / Q4_1 / Q8_0, ternary TQ1_0 / TQ2_0, packed from polyquant's codes and scales)",
    options={"type": "auto | Q4_0 | Q4_1 | Q8_0 | TQ1_0 | TQ2_0", "float_type": "F32 | F16 | Q8_0 (embeddings)",
             "requantize": "re-round layers whose grid is not the type's (else refuse)",
             "tokenizer_pre": "llama.cpp pre-tokenizer name"},
    check_layer=gguf_check_layer,
    layer_type=natural_type,
))
