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

GGUF rows are scored by transformers' GGUF loader (gguf's own dequantizer, PyTorch matmuls):
scoring inside llama.cpp waits for llama-cpp-python (source-only, a 19-minute build here).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "speed"])
    ap.add_argument("--work", default="/tmp/bench-export")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--skip-ort-gptq", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-export-timing", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = build(a) if a.phase == "build" else speed(a)
    text = json.dumps(res, indent=2, default=str)
    (Path(a.work) / f"{a.phase}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
