"""Export to other runtimes, measured inside them: polyquant GPTQ W4 g64 -> ONNX Runtime MatMulNBits
against onnxruntime's own MatMulNBitsQuantizer (RTN and its GPTQ mode) on the same float model, and
-> GGUF Q4_0 against gguf-py's reference Q4_0 (llama.cpp's ``quantize_row_q4_0_ref``) of the same
float model.

    # accuracy + export times (heavy: core 1)
    nice -n 5 taskset -c 1 python benchmarks/bench_export.py build --work /tmp/bench-export
    # decode tok/s, rows interleaved (timing: core 0)
    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_export.py speed --work /tmp/bench-export

Same everywhere: the default model (SmolLM2-135M, fp32), the first ``--windows`` windows of 512
tokens of the default evaluation text (polyquant's GPTQ protocol), 1 thread. Calibration: the
same ``--calib-samples`` x ``--calib-seqlen`` windows for polyquant's GPTQ and onnxruntime's
GPTQ. Every quantizer quantizes the same 210 block Linears (the tied lm_head stays float: it is
excluded from onnxruntime's quantizers and restored after its GPTQ, which quantizes every MatMul).

The ``build`` phase's GGUF rows are scored by transformers' GGUF loader (gguf's own dequantizer,
PyTorch matmuls). The ``llamacpp`` phases score inside llama.cpp itself, with its own binaries
(``polyquant.eval.llamacpp``: ``llama-perplexity``, ``llama-quantize``, ``llama-bench`` built from the
llama.cpp vendored in llama-cpp-python's sdist; llama-cpp-python itself is source-only, a 19-minute
build here): our GPTQ W4 g32 sym -> Q4_0 against ``llama-quantize``'s own Q4_0 of the same float
model (an F32 GGUF written by our exporter), both scored by ``llama-perplexity`` on the same text
(its protocol: the second half of each 512-token chunk), and by polyquant on the same tokens:

    nice -n 5 taskset -c 1 python benchmarks/bench_export.py llamacpp --work /tmp/bench-export \
        --llama-bin /tmp/lcp/build/bin
    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_export.py llamacpp-speed \
        --work /tmp/bench-export --llama-bin /tmp/lcp/build/bin
    # the tied lm_head stored once in the .onnx (size before / after, onnxruntime's logits)
    nice -n 5 taskset -c 1 python benchmarks/bench_export.py onnx-share --work /tmp/bench-export
    # BitNet ternary -> TQ2_0 / TQ1_0, byte for byte against llama-quantize's of the same weights
    nice -n 5 taskset -c 1 python benchmarks/bench_export.py ternary --work /tmp/bench-export
    # onnxruntime's GPTQ mode (its INC code), few calibration samples
    nice -n 5 taskset -c 1 python benchmarks/bench_export.py ort-gptq --calib-samples 2 --work /tmp/bench-export

Prints one JSON object (and writes it to ``<work>/<phase>.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import polyquant
from polyquant.export import export
from polyquant.eval.perplexity import make_windows, score_windows

log = logging.getLogger("bench_export")
LM_HEAD = "/model/lm_head/MatMul"  # the TorchScript exporter's node name for the lm_head MatMul


def _ppl(model, windows) -> float:
    return score_windows(model, windows, show_progress=False)["ppl"]


def _windows(tok, n):
    from polyquant import data
    return make_windows(data.eval_tokens(tok), 512, n)


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration windows (no cache)."""

    def __init__(self, config, samples):
        from polyquant.export.onnx import feeds
        self.items = [feeds(config, s.numpy()) for s in samples]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return iter(self.items)


def _restore_lm_head(proto, float_proto):
    """Put the float lm_head MatMul back where onnxruntime's GPTQ quantized it."""
    out = next(n.output[0] for n in float_proto.graph.node if n.name == LM_HEAD)
    orig = next(n for n in float_proto.graph.node if n.name == LM_HEAD)
    g = proto.graph
    for i, n in enumerate(g.node):
        if out in n.output and n.op_type == "MatMulNBits":
            drop = set(n.input[1:])
            g.node.remove(n)
            g.node.insert(i, orig)
            init = next(t for t in float_proto.graph.initializer if t.name == orig.input[1])
            keep = [t for t in g.initializer if t.name not in drop]
            del g.initializer[:]
            g.initializer.extend(keep + [init])
            return True
    return False


def _partial(work: Path, res: dict) -> None:
    (work / "build.partial.json").write_text(json.dumps(res, indent=2, default=str))


def _count(proto, op):
    return sum(n.op_type == op for n in proto.graph.node)


def build(a) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    from polyquant.calibration import Calibration, calibration_data
    from polyquant.export.onnx import IR_VERSION, OnnxCausalLM
    from polyquant.methods import GPTQConfig
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    res: dict = {"windows": a.windows, "seqlen": 512, "threads": 1,
                 "calibration": f"{a.calib_samples} x {a.calib_seqlen}", "block_size": 64}
    model, tok = polyquant.load_model("default")
    windows = _windows(tok, a.windows)
    calib = calibration_data(tok, n_samples=a.calib_samples, seqlen=a.calib_seqlen, seed=0)

    ckpt = work / "gptq-w4g64"  # kept: a rerun reuses it (the checkpoint is what every row is compared with)
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        q = polyquant.quantize(model, GPTQConfig(bits=4, group_size=64, sym=True), calibration=Calibration(calib),
                               show_progress=False)
        (work / "gptq-seconds.txt").write_text(f"{time.perf_counter() - t:.1f}")
        polyquant.save(q, ckpt, tokenizer=tok, overwrite=True)
        del q
    q, _ = polyquant.load(ckpt)
    res["polyquant_gptq_seconds"] = float((work / "gptq-seconds.txt").read_text())
    res["polyquant_checkpoint_format"] = q.polyquant.format
    res["ppl_fp32_polyquant"] = _ppl(model, windows)
    res["ppl_gptq_polyquant"] = _ppl(q, windows)

    # --- ONNX Runtime ---
    t = time.perf_counter()
    r = export(q, to="onnx", out=work / "ours.onnx", tokenizer=tok, overwrite=True)
    res["onnx_export_seconds"] = round(time.perf_counter() - t, 1)
    res["onnx_export"] = r.summary()
    export(q, to="onnx", out=work / "ours-acc4.onnx", tokenizer=tok, overwrite=True, accuracy_level=4,
                     verify=False)
    export(model, to="onnx", out=work / "fp32.onnx", tokenizer=tok, overwrite=True, verify=False)
    fp = onnx.load(str(work / "fp32.onnx"))
    if not any(n.name == LM_HEAD for n in fp.graph.node):
        raise SystemExit(f"no {LM_HEAD} node in the float graph: cannot keep the lm_head float for onnxruntime")
    t = time.perf_counter()
    rtn = MatMulNBitsQuantizer(fp, bits=4, block_size=64, is_symmetric=True, nodes_to_exclude=[LM_HEAD],
                               algo_config=DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=True))
    rtn.process()
    res["ort_rtn_seconds"] = round(time.perf_counter() - t, 1)
    rtn_p = rtn.model.model
    rtn_p.ir_version = IR_VERSION
    onnx.save(rtn_p, str(work / "ort-rtn.onnx"))
    res["ort_rtn_matmulnbits"] = _count(rtn_p, "MatMulNBits")
    for name in ("fp32", "ours", "ours-acc4", "ort-rtn"):
        res[f"ppl_onnxruntime_{name}"] = _ppl(OnnxCausalLM(work / f"{name}.onnx", config=model.config), windows)
        _partial(work, res)
    res["onnx_ppl_ratio_ours_vs_polyquant"] = res["ppl_onnxruntime_ours"] / res["ppl_gptq_polyquant"]

    # --- GGUF (scored through transformers' GGUF loader) ---
    import gguf
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    g = export(q, to="gguf", out=work / "ours-q4_0.gguf", tokenizer=tok, type="Q4_0", overwrite=True,
                         float_type="F32")
    res["gguf_export_seconds"] = round(time.perf_counter() - t, 1)
    res["gguf_export"] = g.summary()
    export(model, to="gguf", out=work / "ref-q4_0.gguf", tokenizer=tok, type="Q4_0", overwrite=True,
                     float_type="F32")
    # our file decoded by gguf's own dequantizer against polyquant's dequantized weights
    rd = gguf.GGUFReader(str(work / "ours-q4_0.gguf"))
    t0 = next(t for t in rd.tensors if t.name == "blk.0.ffn_down.weight")
    dq = gguf.quants.dequantize(np.asarray(t0.data), t0.tensor_type)
    ours = q.model.layers[0].mlp.down_proj.quantized_weight.dequantize().numpy()
    res["gguf_blk0_ffn_down_max_abs_diff"] = float(np.abs(dq - ours).max())
    res["gguf_blk0_ffn_down_max_abs_weight"] = float(np.abs(ours).max())
    for name in ("ours-q4_0", "ref-q4_0"):
        m = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=f"{name}.gguf", dtype=torch.float32).eval()
        res[f"ppl_transformers_gguf_{name}"] = _ppl(m, windows)
        del m
    res["gguf_ppl_ratio_ours_vs_polyquant"] = res["ppl_transformers_gguf_ours-q4_0"] / res["ppl_gptq_polyquant"]
    res["llama_cpp"] = "not scored: llama-cpp-python is source-only (a 19-minute build on 2 cores), a bench extra"
    _partial(work, res)
    if not a.skip_ort_gptq:
        t = time.perf_counter()
        gq = MatMulNBitsQuantizer(onnx.load(str(work / "fp32.onnx")), bits=4, block_size=64, is_symmetric=True,
                                  algo_config=GPTQWeightOnlyQuantConfig(
                                      calibration_data_reader=_Reader(model.config, calib), percdamp=0.01,
                                      block_size=128))
        gq.process()
        res["ort_gptq_seconds"] = round(time.perf_counter() - t, 1)
        gp = gq.model.model
        res["ort_gptq_lm_head_restored"] = _restore_lm_head(gp, fp)
        gp.ir_version = IR_VERSION
        res["ort_gptq_matmulnbits"] = _count(gp, "MatMulNBits")
        onnx.save(gp, str(work / "ort-gptq.onnx"))
        res["ppl_onnxruntime_ort-gptq"] = _ppl(OnnxCausalLM(work / "ort-gptq.onnx", config=model.config), windows)
    return res


def speed(a) -> dict:
    from polyquant import data
    from polyquant.export.onnx import OnnxCausalLM
    from transformers import AutoConfig, AutoTokenizer
    work = Path(a.work)
    cfg = AutoConfig.from_pretrained(str(work / "ours.onnx.tokenizer"))
    tok = AutoTokenizer.from_pretrained(str(work / "ours.onnx.tokenizer"))
    prompt = data.eval_tokens(tok)[:32]
    names = [n for n in ("fp32", "ours", "ours-acc4", "ort-rtn", "ort-gptq") if (work / f"{n}.onnx").is_file()]
    models = {n: OnnxCausalLM(work / f"{n}.onnx", config=cfg, threads=1) for n in names}
    for m in models.values():
        m.greedy(prompt, 4)  # warm-up
    secs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.rounds):  # interleaved rows
        for n, m in models.items():
            _, s = m.greedy(prompt, a.tokens)
            secs[n].append(s)
    res = {"tokens": a.tokens, "rounds": a.rounds, "threads": 1, "load_avg": os.getloadavg()}
    if not a.skip_export_timing:  # export time of the default model's GPTQ checkpoint (wall and CPU seconds)
        torch.set_num_threads(1)
        q, qtok = polyquant.load(work / "gptq-w4g64")
        for to, opts in (("gguf", {"type": "Q4_0"}), ("onnx", {"tokenizer_dir": False})):
            w0, c0 = time.perf_counter(), time.process_time()
            export(q, to=to, out=work / f"timing.{to}", tokenizer=qtok, overwrite=True, **opts)
            res[f"export_{to}_wall_s"] = round(time.perf_counter() - w0, 1)
            res[f"export_{to}_cpu_s"] = round(time.process_time() - c0, 1)
            (work / f"timing.{to}").unlink()
        del q
    for n in names:
        res[f"decode_tok_s_{n}"] = round((a.tokens - 1) / statistics.median(secs[n]), 1)
    for n in names:
        if n != "fp32":
            res[f"decode_ratio_{n}_vs_fp32"] = round(res[f"decode_tok_s_{n}"] / res["decode_tok_s_fp32"], 3)
    if "ort-rtn" in names:
        res["decode_ratio_ours_vs_ort_rtn"] = round(res["decode_tok_s_ours"] / res["decode_tok_s_ort-rtn"], 3)
    return res


def ort_gptq(a) -> dict:
    """onnxruntime's GPTQ mode of MatMulNBitsQuantizer alone (its INC weight_only code: one session run
    per calibration sample for every distinct MatMul input, Hessians in float64 numpy), on the fp32
    ONNX model of the build phase, with ``--calib-samples`` x ``--calib-seqlen`` of the same
    calibration text; the lm_head it also quantizes is put back to float (like the other rows)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from polyquant.calibration import calibration_data
    from polyquant.export.onnx import IR_VERSION, OnnxCausalLM
    work = Path(a.work)
    torch.set_num_threads(1)
    model, tok = polyquant.load_model("default")
    windows = _windows(tok, a.windows)
    calib = calibration_data(tok, n_samples=a.calib_samples, seqlen=a.calib_seqlen, seed=0)
    fp = onnx.load(str(work / "fp32.onnx"))
    res: dict = {"windows": a.windows, "calibration": f"{a.calib_samples} x {a.calib_seqlen}", "block_size": 64,
                 "percdamp": 0.01, "gptq_blocksize": 128, "is_symmetric": True, "load_avg_start": os.getloadavg()}
    t, c = time.perf_counter(), time.process_time()
    gq = MatMulNBitsQuantizer(onnx.load(str(work / "fp32.onnx")), bits=4, block_size=64, is_symmetric=True,
                              algo_config=GPTQWeightOnlyQuantConfig(
                                  calibration_data_reader=_Reader(model.config, calib), percdamp=0.01,
                                  block_size=128))
    gq.process()
    res["ort_gptq_seconds"] = round(time.perf_counter() - t, 1)
    res["ort_gptq_cpu_seconds"] = round(time.process_time() - c, 1)
    res["load_avg_end"] = os.getloadavg()
    gp = gq.model.model
    res["ort_gptq_lm_head_restored"] = _restore_lm_head(gp, fp)
    gp.ir_version = IR_VERSION
    res["ort_gptq_matmulnbits"] = _count(gp, "MatMulNBits")
    out = work / f"ort-gptq-{a.calib_samples}x{a.calib_seqlen}.onnx"
    onnx.save(gp, str(out))
    res["ppl_onnxruntime_ort-gptq"] = _ppl(OnnxCausalLM(out, config=model.config), windows)
    return res


def onnx_share(a) -> dict:
    """The tied lm_head stored once against both copies (the exporter's folded E^T beside the
    embedding): the build phase's ``ours.onnx`` (written before sharing existed, so it has both) with
    :func:`~polyquant.export.onnx.share_tied_weights` applied, as ``export`` now does by default: file
    size, and onnxruntime's logits on the same windows (identical, and the perplexity from them)."""
    import onnx
    from polyquant.export.onnx import OnnxCausalLM, share_tied_weights
    work = Path(a.work)
    torch.set_num_threads(1)
    two, one = work / "ours.onnx", work / "ours-shared.onnx"
    from transformers import AutoConfig, AutoTokenizer
    cfg = AutoConfig.from_pretrained(str(work / "ours.onnx.tokenizer"))
    tok = AutoTokenizer.from_pretrained(str(work / "ours.onnx.tokenizer"))
    windows = _windows(tok, a.windows)
    proto = onnx.load(str(two))
    res: dict = {"windows": a.windows, "source_file": str(two)}
    res["float_initializers_before"] = sum(len(i.dims) == 2 and i.data_type == 1 for i in proto.graph.initializer)
    t = time.perf_counter()
    res["shared_initializers"] = share_tied_weights(proto)
    res["share_seconds"] = round(time.perf_counter() - t, 2)
    res["float_initializers_after"] = sum(len(i.dims) == 2 and i.data_type == 1 for i in proto.graph.initializer)
    one.write_bytes(proto.SerializeToString())
    del proto
    res["bytes_before"], res["bytes_after"] = two.stat().st_size, one.stat().st_size
    mods = {"before": OnnxCausalLM(two, config=cfg), "after": OnnxCausalLM(one, config=cfg)}
    diff, equal, nll = 0.0, True, {k: [] for k in mods}
    for i in range(windows.shape[0]):
        w = windows[i:i + 1]
        outs = {k: m(w, labels=w) for k, m in mods.items()}
        diff = max(diff, float((outs["before"].logits - outs["after"].logits).abs().max()))
        equal = equal and bool(torch.equal(outs["before"].logits, outs["after"].logits))
        for k, o in outs.items():
            nll[k].append(float(o.loss))
    res["logits_max_abs_diff"], res["logits_identical"] = diff, equal
    for k in mods:
        res[f"ppl_onnxruntime_{k}"] = math.exp(sum(nll[k]) / len(nll[k]))
    return res


# -- llama.cpp: its own binaries (polyquant.eval.llamacpp) ---------------------------------------
def _text_file(work: Path, tok, windows) -> Path:
    """The start of the default evaluation text as a file for llama-perplexity, long enough for its
    chunks; its tokens (our tokenizer) must start with exactly the windows polyquant scores."""
    from polyquant import data
    text = data.default_text()
    n = 4 * windows.numel() * 4  # characters: about 3-4 per token here, with room to spare
    ids = data.tokenize(tok, text[:n])
    while ids.numel() < 2 * windows.numel() + 64:
        n *= 2
        ids = data.tokenize(tok, text[:n])
    k = windows.numel()
    if not torch.equal(ids[:k], windows.reshape(-1)):
        raise SystemExit("the text file's first tokens differ from polyquant's windows")
    path = work / "llamacpp-text.txt"
    path.write_text(text[:n], encoding="utf-8")
    return path


def llamacpp(a) -> dict:
    """Our GPTQ W4 g32 sym -> Q4_0 against llama-quantize's own Q4_0 of the same float model, both
    scored by llama-perplexity on the same text (and by polyquant, same tokens, same protocol)."""
    from polyquant.eval import llamacpp as lc
    from transformers import AutoModelForCausalLM
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    res: dict = {"windows": a.windows, "ctx": 512, "threads": 1, "calibration": f"{a.calib_samples} x {a.calib_seqlen}",
                 "amx": lc.has_amx()}
    model, tok = polyquant.load_model("default")
    windows = _windows(tok, a.windows)
    text = _text_file(work, tok, windows)
    res["text"] = {"file": str(text), "chars": len(text.read_text()), "first_tokens_equal_windows": True}

    ckpt = _gptq_checkpoint(a, work, model, tok, a.ckpt_group)
    q, _ = polyquant.load(ckpt)
    res["polyquant_checkpoint"] = f"GPTQ W4 g{a.ckpt_group} sym ({ckpt.name})"

    files = _gguf_files(work, a.ckpt_group)
    t = time.perf_counter()
    # source="default": every file gets the default model's tokenizer.ggml.pre (smollm), so llama.cpp
    # tokenizes the text the same way for all of them (and as transformers does)
    g = export(q, to="gguf", out=files["ours-gptq-q4_0"], tokenizer=tok, type="Q4_0", float_type="F32",
               overwrite=True, source="default")
    res["ours_export"] = {**g.summary(), "seconds_wall": round(time.perf_counter() - t, 1)}
    if not files["fp32"].is_file():
        export(model, to="gguf", out=files["fp32"], tokenizer=tok, type="auto", float_type="F32", source="default")
    if not files["gguf-py-ref-q4_0"].is_file():
        export(model, to="gguf", out=files["gguf-py-ref-q4_0"], tokenizer=tok, type="Q4_0", float_type="F32",
               source="default")
    # llama.cpp's own Q4_0 of the same float file; embeddings kept F32 like ours (only the Linears differ)
    if not files["llama-quantize-q4_0"].is_file():
        res["llama_quantize"] = lc.quantize(a.llama_bin, files["fp32"], files["llama-quantize-q4_0"], "Q4_0",
                                            extra=["--token-embedding-type", "f32", "--output-tensor-type", "f32"])
    res["tensor_types"] = {k: lc.gguf_tensor_types(f) for k, f in files.items()}
    res["bytes"] = {k: f.stat().st_size for k, f in files.items()}
    res["llama_quantize_equals_gguf_py_ref"] = _same_tensors(files["llama-quantize-q4_0"], files["gguf-py-ref-q4_0"])
    _partial(work, res)

    # scored by llama.cpp (llama-perplexity, its kernels); gguf-py's reference file only if it differs
    for k, f in files.items():
        if k == "gguf-py-ref-q4_0" and res["llama_quantize_equals_gguf_py_ref"]["identical"]:
            continue
        res[f"llama_perplexity_{k}"] = lc.perplexity(a.llama_bin, f, text, ctx=512, chunks=a.windows, threads=1)
        _partial(work, res)
    # scored by polyquant (PyTorch), the same tokens: llama-perplexity's protocol and polyquant's own
    res["polyquant_second_half_fp32"] = lc.second_half_ppl(model, windows)["ppl"]
    res["polyquant_second_half_ours-gptq"] = lc.second_half_ppl(q, windows)["ppl"]
    res["polyquant_ppl_fp32"] = _ppl(model, windows)
    res["polyquant_ppl_ours-gptq"] = _ppl(q, windows)
    for k in ("llama-quantize-q4_0",):
        m = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=files[k].name, dtype=torch.float32).eval()
        res[f"polyquant_second_half_{k}"] = lc.second_half_ppl(m, windows)["ppl"]
        res[f"polyquant_ppl_{k}"] = _ppl(m, windows)
        del m
    lp = {k: res[f"llama_perplexity_{k}"]["ppl"] for k in files if f"llama_perplexity_{k}" in res}
    res["ratio_llama_perplexity_ours_vs_llama_quantize"] = lp["ours-gptq-q4_0"] / lp["llama-quantize-q4_0"]
    res["ratio_llama_perplexity_vs_polyquant_second_half_ours"] = (lp["ours-gptq-q4_0"]
                                                                   / res["polyquant_second_half_ours-gptq"])
    res["ratio_llama_perplexity_vs_polyquant_second_half_fp32"] = lp["fp32"] / res["polyquant_second_half_fp32"]
    return res


def _gptq_checkpoint(a, work: Path, model, tok, group: int) -> Path:
    """Our GPTQ W4 sym checkpoint at ``group`` (64: the build phase's; made here when missing)."""
    from polyquant.calibration import Calibration, calibration_data
    from polyquant.methods import GPTQConfig
    ckpt = work / ("gptq-w4g64" if group == 64 else f"gptq-w4g{group}sym")
    if not (ckpt / "config.json").is_file():
        calib = calibration_data(tok, n_samples=a.calib_samples, seqlen=a.calib_seqlen, seed=0)
        t = time.perf_counter()
        q = polyquant.quantize(model, GPTQConfig(bits=4, group_size=group, sym=True), calibration=Calibration(calib),
                               show_progress=False)
        (work / f"gptq-g{group}-seconds.txt").write_text(f"{time.perf_counter() - t:.1f}")
        polyquant.save(q, ckpt, tokenizer=tok, overwrite=True)
    return ckpt


def _gguf_files(work: Path, group: int) -> dict[str, Path]:
    return {"fp32": work / "fp32.gguf", "ours-gptq-q4_0": work / f"ours-g{group}-q4_0-smollm.gguf",
            "llama-quantize-q4_0": work / "lcpp-q4_0.gguf", "gguf-py-ref-q4_0": work / "gguf-ref-q4_0.gguf"}


def gptq_checkpoint(a) -> dict:
    """Only make the GPTQ W4 sym checkpoint at ``--ckpt-group`` (heavy; the llamacpp phase reuses it)."""
    torch.set_num_threads(1)
    model, tok = polyquant.load_model("default")
    ckpt = _gptq_checkpoint(a, Path(a.work), model, tok, a.ckpt_group)
    return {"checkpoint": str(ckpt), "seconds": (Path(a.work) / f"gptq-g{a.ckpt_group}-seconds.txt").read_text()
            if (Path(a.work) / f"gptq-g{a.ckpt_group}-seconds.txt").is_file() else None}


def _same_tensors(a: Path, b: Path) -> dict:
    """Whether two GGUF files hold byte-identical tensors (same names, types and data)."""
    import gguf
    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    diff = [n for n in ta if n not in tb or ta[n].tensor_type != tb[n].tensor_type
            or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    return {"tensors": len(ta), "differing": diff[:10], "n_differing": len(diff), "identical": not diff and len(ta) == len(tb)}


def llamacpp_speed(a) -> dict:
    """llama-bench decode tok/s (1 thread), rows interleaved round by round; run under the core-0 lock."""
    from polyquant.eval import llamacpp as lc
    work = Path(a.work)
    files = {k: v for k, v in _gguf_files(work, a.ckpt_group).items() if k != "gguf-py-ref-q4_0"}
    runs: dict[str, list[float]] = {k: [] for k in files}
    info = {}
    keys = list(files)
    for i in range(a.rounds):
        # each round starts one file later, so every file takes every position equally often; -mmp 0 by
        # default: with mmap the speed follows where a file's page-cache pages sit (a fresh copy of the same
        # bytes decoded up to 5% faster than an old file), which is no property of the file
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            r = lc.bench(a.llama_bin, files[k], n_gen=a.tokens, threads=1, reps=1, mmap=a.mmap)
            runs[k].append(r["tok_s"])
            info[k] = {x: r[x] for x in ("type", "model_size", "backends", "cpu_info", "build", "command")}
    res = {"tokens": a.tokens, "rounds": a.rounds, "threads": 1, "mmap": a.mmap, "load_avg": os.getloadavg(),
           "runs": runs, "info": info}
    for k in files:
        res[f"llama_bench_decode_tok_s_{k}"] = round(statistics.median(runs[k]), 2)
    res["decode_ratio_ours_vs_llama_quantize"] = round(
        res["llama_bench_decode_tok_s_ours-gptq-q4_0"] / res["llama_bench_decode_tok_s_llama-quantize-q4_0"], 3)
    res["decode_ratio_q4_0_vs_fp32"] = round(
        res["llama_bench_decode_tok_s_ours-gptq-q4_0"] / res["llama_bench_decode_tok_s_fp32"], 3)
    return res


def ternary(a) -> dict:
    """BitNet ternary -> TQ2_0 / TQ1_0 against llama-quantize's own TQ2_0 / TQ1_0 of the same weights (an
    F32 GGUF of the BitNet layers' dequantized weights, written by our exporter): the files' tensors are
    compared byte for byte, and llama-perplexity runs both. SmolLM2's 576-wide rows are not a multiple of the
    TQ types' 256-weight blocks, so the model is a Llama of hidden 256 with random weights and the default
    model's tokenizer."""
    import copy
    from transformers import LlamaConfig, LlamaForCausalLM
    from polyquant.eval import llamacpp as lc
    from polyquant.methods.bitnet import BitNetConfig
    from polyquant.nn.quant_linear import QuantLinear
    work = Path(a.work) / "ternary"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _, tok = polyquant.load_model("default")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    q = polyquant.quantize(model, BitNetConfig(), show_progress=False)
    flat = copy.deepcopy(model)
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            mod.qw_scale.copy_(mod.qw_scale.half().float())  # GGUF's d is fp16
            flat.get_submodule(name).weight.data.copy_(mod.quantized_weight.dequantize())
    export(flat, "gguf", work / "f32.gguf", tokenizer=tok, float_type="F32", overwrite=True, source="default")
    text = work / "text.txt"
    from polyquant import data
    text.write_text(data.default_text()[:40000], encoding="utf-8")
    res: dict = {"model": "llama hidden 256 x 4 layers, random weights, BitNet per-tensor", "ctx": 128, "chunks": 8,
                 "ppl_f32_dequantized": lc.perplexity(a.llama_bin, work / "f32.gguf", text, ctx=128, chunks=8)["ppl"]}
    for t in ("TQ2_0", "TQ1_0"):
        ours, theirs = work / f"ours-{t}.gguf", work / f"llama-quantize-{t}.gguf"
        r = export(q, "gguf", ours, tokenizer=tok, float_type="F32", type=t, overwrite=True, source="default")
        lc.quantize(a.llama_bin, work / "f32.gguf", theirs, t,
                    extra=["--token-embedding-type", "f32", "--output-tensor-type", "f32"])
        res[t] = {"ours_layers_from_codes": sum(v.get("source") == "codes" for v in r.layers.values()),
                  "bytes": {"ours": ours.stat().st_size, "llama_quantize": theirs.stat().st_size},
                  "same_tensors": _same_tensors(ours, theirs),
                  "ppl_ours": lc.perplexity(a.llama_bin, ours, text, ctx=128, chunks=8)["ppl"],
                  "ppl_llama_quantize": lc.perplexity(a.llama_bin, theirs, text, ctx=128, chunks=8)["ppl"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "speed", "onnx-share", "llamacpp", "llamacpp-speed", "ort-gptq", "gptq-checkpoint",
                                       "ternary"])
    ap.add_argument("--ckpt-group", type=int, default=32, choices=(32, 64),
                    help="llamacpp phases: group size of our GPTQ W4 sym checkpoint (64: the build phase's)")
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN", "/tmp/lcp/build/bin"),
                    help="folder with llama.cpp's llama-perplexity / llama-quantize / llama-bench")
    ap.add_argument("--work", default="/tmp/bench-export")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--skip-ort-gptq", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mmap", action="store_true", help="llamacpp-speed: llama-bench with mmap (default -mmp 0)")
    ap.add_argument("--skip-export-timing", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = {"build": build, "speed": speed, "onnx-share": onnx_share, "llamacpp": llamacpp, "llamacpp-speed": llamacpp_speed,
           "ort-gptq": ort_gptq, "gptq-checkpoint": gptq_checkpoint, "ternary": ternary}[a.phase](a)
    text = json.dumps(res, indent=2, default=str)
    (Path(a.work) / f"{a.phase}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
