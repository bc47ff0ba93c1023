"""Benchmark (issue 4): polyquant's calibration-free methods next to their original libraries on the
default model (SmolLM2-135M), 1 thread, batch 1, CPU.

Every polyquant row (``pq-...``) is paired with the original library at the same setting (lm_head
kept in float everywhere):

- ``hqq`` 4-bit g64 (and 3-bit g64), axis 1 (transformers' default for HQQ models), vs the hqq
  library's ``AutoHQQHFModel.quantize_model`` with ``BaseQuantizeConfig(nbits, group_size=64,
  axis=1)``, compute dtype float32, hqq's default ``PYTORCH`` backend (``-ref``: the 3-bit weights on
  polyquant's float32 reference kernel, hqq's own numerics, instead of auto's bf16 ``cpu-int4``);
- ``bnb-nf4`` (double quant), ``bnb-fp4``, ``bnb-int8`` (LLM.int8, threshold 6) vs bitsandbytes'
  ``Linear4bit`` / ``Linear8bitLt`` with ``Params4bit`` / ``Int8Params`` (what transformers'
  ``BitsAndBytesConfig`` builds; compute dtype float32) on its CPU backend;
- ``eetq`` (polyquant only: the EETQ library needs CUDA to build, the peer row is skipped);
- ``quanto`` qint8 / qint4 / qint2 / qfloat8 weights and qint8 weights + static qint8 activations
  (calibrated on the same 8 x 512 tokens) vs optimum-quanto ``quantize(..., exclude=["lm_head"])``
  (+ ``Calibration``) + ``freeze``;
- ``torchao-int8`` / ``-int8-dynamic`` / ``-float8`` vs ``Int8WeightOnlyConfig`` /
  ``Int8DynamicActivationInt8WeightConfig`` / ``Float8WeightOnlyConfig`` (version 2, the tensor
  subclasses polyquant reproduces; ``-v1`` peer rows give the 0.15 default version 1 too), and
  ``torchao-int4`` g64 ``version=1`` vs ``Int4WeightOnlyConfig(group_size=64, layout=Int4CPULayout(),
  version=1)`` (torchao 0.15's CPU int4 path; its version 2 needs the CUDA-only mslk package), both on
  the model cast to bf16 (that op needs bf16); ``-v2``: polyquant's default rule (torchao 0.18's), unpaired;
- ``fp32``: the float model.

polyquant rows use the kernels ``auto`` picks (recorded per row). Each row runs in its own
subprocess (so peak RSS is its own) and reports ppl (40 windows of 512 of the default pydoc text,
``polyquant.eval`` protocol), weight bytes, quantization seconds, decode tok/s (wall median and
thread-CPU median), prefill tok/s and peak RSS. The parent computes polyquant / peer ratios for ppl,
quantization time and decode speed, checks the issue's targets (ppl <= peer x 1.005, quantization
time <= peer, decode >= peer, HQQ 4-bit g64 under 20 s), prints one JSON line per row, a table and
PASS / FAIL lines, and writes ``bench-results/calibration_free.json``. hqq and bitsandbytes run in
polyquant's environment; torchao and optimum-quanto from the peer virtualenv (``$POLYQUANT_PEERS_VENV``
or ``.venv-peers``, see README); rows whose library is missing are skipped with the reason.

    python benchmarks/bench_calibration_free.py                       # everything (~60 min, 1 core)
    python benchmarks/bench_calibration_free.py --configs fp32,pq-hqq-w4-g64,hqq-w4-g64 --windows 2 --runs 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# lib: which code quantizes the row; env: which python runs it ("main" = polyquant's, "peers" = the
# peer venv); pair: the peer row a polyquant row is compared with; dtype: float dtype of the model.
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"lib": "float"},
    "pq-hqq-w4-g64": {"lib": "polyquant", "method": "hqq", "kw": {"bits": 4, "group_size": 64, "axis": 1},
                      "pair": "hqq-w4-g64"},
    "hqq-w4-g64": {"lib": "hqq", "bits": 4, "group_size": 64},
    "pq-hqq-w3-g64": {"lib": "polyquant", "method": "hqq", "kw": {"bits": 3, "group_size": 64, "axis": 1},
                      "pair": "hqq-w3-g64"},
    # the same weights on the reference kernel (float32 dequantize + matmul, hqq's own numerics): cpu-int4's
    # bf16 scales / activations cost the fragile 3-bit model ~2% ppl
    "pq-hqq-w3-g64-ref": {"lib": "polyquant", "method": "hqq", "kw": {"bits": 3, "group_size": 64, "axis": 1},
                          "kernel": "reference", "pair": "hqq-w3-g64"},
    "hqq-w3-g64": {"lib": "hqq", "bits": 3, "group_size": 64},
    "pq-bnb-nf4-dq": {"lib": "polyquant", "method": "bnb-nf4", "kw": {"double_quant": True}, "pair": "bnb-nf4-dq"},
    "bnb-nf4-dq": {"lib": "bnb", "quant_type": "nf4", "double_quant": True},
    "pq-bnb-fp4": {"lib": "polyquant", "method": "bnb-fp4", "kw": {}, "pair": "bnb-fp4"},
    "bnb-fp4": {"lib": "bnb", "quant_type": "fp4", "double_quant": False},
    "pq-bnb-int8": {"lib": "polyquant", "method": "bnb-int8", "kw": {"threshold": 6.0}, "pair": "bnb-int8"},
    "bnb-int8": {"lib": "bnb", "quant_type": "int8", "threshold": 6.0},
    "pq-eetq": {"lib": "polyquant", "method": "eetq", "kw": {}, "pair": "eetq"},
    "eetq": {"lib": "eetq"},
    "pq-quanto-qint8": {"lib": "polyquant", "method": "quanto", "kw": {"weights": "qint8"}, "pair": "quanto-qint8"},
    "quanto-qint8": {"lib": "quanto", "weights": "qint8"},
    "pq-quanto-qint4": {"lib": "polyquant", "method": "quanto", "kw": {"weights": "qint4"}, "pair": "quanto-qint4"},
    "quanto-qint4": {"lib": "quanto", "weights": "qint4", "grad": "no_grad"},
    "pq-quanto-qint2": {"lib": "polyquant", "method": "quanto", "kw": {"weights": "qint2"}, "pair": "quanto-qint2"},
    "quanto-qint2": {"lib": "quanto", "weights": "qint2", "grad": "no_grad"},
    "pq-quanto-qfloat8": {"lib": "polyquant", "method": "quanto", "kw": {"weights": "qfloat8"},
                          "pair": "quanto-qfloat8"},
    "quanto-qfloat8": {"lib": "quanto", "weights": "qfloat8"},
    "pq-quanto-w8a8": {"lib": "polyquant", "method": "quanto", "kw": {"weights": "qint8", "activations": "qint8"},
                       "calibrate": True, "pair": "quanto-w8a8"},
    "quanto-w8a8": {"lib": "quanto", "weights": "qint8", "activations": "qint8", "calibrate": True,
                    "grad": "no_grad"},
    "pq-torchao-int8": {"lib": "polyquant", "method": "torchao-int8", "kw": {}, "pair": "torchao-int8"},
    "torchao-int8": {"lib": "torchao", "recipe": "int8", "version": 2},
    "torchao-int8-v1": {"lib": "torchao", "recipe": "int8", "version": 1},
    # the peer is torchao 0.15's version-1 Int4CPULayout rule (version 2 needs the mslk package, no CPU
    # build): polyquant's version=1 reproduces it; -v2 is polyquant's default (torchao 0.18's rule), unpaired
    "pq-torchao-int4-g64": {"lib": "polyquant", "method": "torchao-int4", "kw": {"group_size": 64, "version": 1},
                            "dtype": "bf16", "pair": "torchao-int4-g64"},
    "pq-torchao-int4-g64-v2": {"lib": "polyquant", "method": "torchao-int4", "kw": {"group_size": 64},
                               "dtype": "bf16"},
    "torchao-int4-g64": {"lib": "torchao", "recipe": "int4", "group_size": 64, "version": 1, "dtype": "bf16",
                         "env": "peers"},
    "pq-torchao-int8-dynamic": {"lib": "polyquant", "method": "torchao-int8-dynamic", "kw": {},
                                "pair": "torchao-int8-dynamic"},
    "torchao-int8-dynamic": {"lib": "torchao", "recipe": "int8-dynamic", "version": 2},
    "torchao-int8-dynamic-v1": {"lib": "torchao", "recipe": "int8-dynamic", "version": 1},
    "pq-torchao-float8": {"lib": "polyquant", "method": "torchao-float8", "kw": {}, "pair": "torchao-float8"},
    # its float8 linear fails under torch.inference_mode ("Cannot set version_counter for inference tensor")
    "torchao-float8": {"lib": "torchao", "recipe": "float8", "version": 2, "grad": "no_grad"},
}
#: rows measured by default (the ``-v1`` torchao rows are extra references, run on request)
DEFAULT_ROWS = tuple(n for n in CONFIGS if not n.endswith("-v1"))
PEER_MODULES = {"hqq": "hqq", "bnb": "bitsandbytes", "quanto": "optimum.quanto", "torchao": "torchao",
                "eetq": "eetq"}
SKIP_REASONS = {"eetq": "EETQ does not install on this machine: its build compiles CUDA kernels (needs nvcc and a "
                        "GPU); there is no CPU build on PyPI"}
TARGETS = {"ppl_x_peer_max": 1.005, "quant_time_x_peer_max": 1.0, "decode_x_peer_min": 1.0, "hqq_w4_g64_quant_s": 20.0}
CALIB_SAMPLES, CALIB_SEQLEN = 8, 512
COLLAPSED_PPL = 1000.0  # above this the model is destroyed (quanto int2 here) and ppl ratios carry no signal


def _is_peer(cfg: dict[str, Any]) -> bool:
    return cfg["lib"] not in ("polyquant", "float")


# -- worker (one configuration, in its own process) -------------------------------------------------

def _not_head(fqn: str) -> bool:
    return "lm_head" not in fqn


def _linears(model):
    import torch
    return [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and _not_head(n)]


def _set_module(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _took(info: dict[str, Any], t0: float, c0: float) -> None:
    """Quantization time: wall clock and this thread's CPU time (1 thread: the work itself, less
    sensitive to other processes on a shared core)."""
    info["quant_seconds"] = time.perf_counter() - t0
    info["quant_cpu_seconds"] = time.thread_time() - c0


def _calibration(tok):
    import polyquant
    return polyquant.calibration_data(tok, n_samples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN)


def _quant_polyquant(cfg, model, tok, info):
    import polyquant
    from polyquant.methods import get_method
    from polyquant.methods.apply import quantize_model
    from polyquant.nn.quantize import kernel_summary
    spec = get_method(cfg["method"])
    config = spec.config_cls(**cfg["kw"])
    calib = _calibration(tok) if cfg.get("calibrate") else None
    t0, c0 = time.perf_counter(), time.thread_time()
    model = quantize_model(model, config, calib, inplace=True, show_progress=False)
    _took(info, t0, c0)
    if cfg.get("kernel"):  # a kernel other than auto's choice (set after the timed quantization)
        polyquant.set_kernels(model, cfg["kernel"])
    info["kernel"] = ",".join(f"{k}:{v}" for k, v in kernel_summary(model).items())
    info["method_config"] = config.describe()
    info["polyquant"] = polyquant.__version__
    return model


def _quant_hqq(cfg, model, info):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from importlib.metadata import version
    qc = BaseQuantizeConfig(nbits=cfg["bits"], group_size=cfg["group_size"], axis=1)
    t0, c0 = time.perf_counter(), time.thread_time()
    AutoHQQHFModel.quantize_model(model, quant_config=qc, compute_dtype=torch.float32, device="cpu")
    _took(info, t0, c0)
    n = sum(isinstance(m, HQQLinear) for m in model.modules())
    info["kernel"] = (f"hqq {version('hqq')} HQQLinear:{n} backend {HQQLinear.backend.name} "
                      f"(nbits {cfg['bits']}, g{cfg['group_size']}, axis 1, compute fp32)")
    return model


def _quant_bnb(cfg, model, info):
    import bitsandbytes as bnb
    import torch
    t0, c0 = time.perf_counter(), time.thread_time()
    for name, lin in _linears(model):
        w = lin.weight.data
        if cfg["quant_type"] == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=cfg["threshold"])
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch.float32, compress_statistics=cfg["double_quant"],
                                    quant_type=cfg["quant_type"], quant_storage=torch.uint8)
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=cfg["double_quant"],
                                           quant_type=cfg["quant_type"], blocksize=64, module=new)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        new = new.to("cpu")  # quantizes (Params4bit / Int8Params quantize on .to(device))
        _set_module(model, name, new)
    _took(info, t0, c0)
    kind = (f"Linear8bitLt threshold {cfg['threshold']}" if cfg["quant_type"] == "int8" else
            f"Linear4bit {cfg['quant_type']} blocksize 64{' double-quant' if cfg['double_quant'] else ''} compute fp32")
    info["kernel"] = f"bitsandbytes {bnb.__version__} {kind} (CPU backend)"
    return model


def _quant_quanto(cfg, model, tok, info, grad):
    from importlib.metadata import version

    import optimum.quanto as oq
    qt = {"qint2": oq.qint2, "qint4": oq.qint4, "qint8": oq.qint8, "qfloat8": oq.qfloat8}
    acts = qt[cfg["activations"]] if cfg.get("activations") else None
    calib = _calibration(tok) if cfg.get("calibrate") else None
    t0, c0 = time.perf_counter(), time.thread_time()
    oq.quantize(model, weights=qt[cfg["weights"]], activations=acts, exclude=["lm_head"])
    if calib is not None:
        with C.grad_context(grad)(), oq.Calibration(momentum=0.9):
            for x in calib:
                model(input_ids=x, use_cache=False)
    oq.freeze(model)
    _took(info, t0, c0)
    groups = sorted({m.weight_group_size for m in model.modules() if getattr(m, "weight_group_size", None)})
    info["kernel"] = (f"optimum-quanto {version('optimum-quanto')} weights {cfg['weights']}"
                      + (f" activations {cfg['activations']} (Calibration, momentum 0.9)" if acts else "")
                      + (f" groups {groups}" if groups else ""))
    return model


def _quant_torchao(cfg, model, info):
    import torchao
    from torchao.quantization import quantize_
    import torchao.quantization as tq
    r, v = cfg["recipe"], cfg["version"]
    if r == "int8":
        conf = tq.Int8WeightOnlyConfig(version=v)
    elif r == "int8-dynamic":
        conf = tq.Int8DynamicActivationInt8WeightConfig(version=v)
    elif r == "float8":
        conf = tq.Float8WeightOnlyConfig(version=v)
    else:
        from torchao.dtypes import Int4CPULayout
        conf = tq.Int4WeightOnlyConfig(group_size=cfg["group_size"], layout=Int4CPULayout(), version=v)
    t0, c0 = time.perf_counter(), time.thread_time()
    quantize_(model, conf, filter_fn=lambda m, fqn: type(m).__name__ == "Linear" and _not_head(fqn))
    _took(info, t0, c0)
    info["kernel"] = f"torchao {torchao.__version__} {type(conf).__name__}(version={v}" + (
        f", group_size={cfg['group_size']}, layout=Int4CPULayout)" if r == "int4" else ")")
    return model


def _quantize(cfg, model, tok, info, grad):
    lib = cfg["lib"]
    if lib == "polyquant":
        return _quant_polyquant(cfg, model, tok, info)
    if lib == "hqq":
        return _quant_hqq(cfg, model, info)
    if lib == "bnb":
        return _quant_bnb(cfg, model, info)
    if lib == "quanto":
        return _quant_quanto(cfg, model, tok, info, grad)
    if lib == "torchao":
        return _quant_torchao(cfg, model, info)
    raise ValueError(lib)  # pragma: no cover


def peer_weight_bytes(model) -> int:
    """Stored bytes of a peer model: parameters (tensor subclasses flattened) plus the statistics
    that hqq (``meta``) and bitsandbytes (``quant_state``, ``SCB``) keep outside parameters; each
    storage once."""
    import torch
    seen, total = set(), 0

    def add(t):
        nonlocal total
        for leaf in C._leaf_tensors(t):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), leaf.numel(), leaf.dtype)
            if key not in seen:
                seen.add(key)
                total += leaf.numel() * leaf.element_size()

    def add_state(qs):
        for k in ("absmax", "code", "offset"):
            t = getattr(qs, k, None)
            if isinstance(t, torch.Tensor):
                add(t)
        if getattr(qs, "state2", None) is not None:
            add_state(qs.state2)

    for p in model.parameters():
        add(p)
        if getattr(p, "quant_state", None) is not None:
            add_state(p.quant_state)
        if isinstance(getattr(p, "SCB", None), torch.Tensor):
            add(p.SCB)
    for m in model.modules():
        meta = getattr(m, "meta", None)
        if isinstance(meta, dict):
            for k in ("scale", "zero"):
                if isinstance(meta.get(k), torch.Tensor):
                    add(meta[k])
    return total


def worker(name: str, args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    import polyquant
    cfg = CONFIGS[name]
    grad = cfg.get("grad", "inference_mode")
    model, tok = polyquant.load_model("default")
    model.eval()
    dtype = torch.bfloat16 if cfg.get("dtype") == "bf16" else torch.float32
    if dtype != torch.float32:
        model = model.to(dtype)
    info: dict[str, Any] = {"float_dtype": str(dtype).replace("torch.", ""), "quant_seconds": 0.0}
    lib = cfg["lib"]
    if lib == "float":
        info["kernel"] = f"dense {info['float_dtype']}"
        info["quant_cpu_seconds"] = 0.0
    elif args.quant_repeats > 1:  # timing only (a separate process: the copies would inflate peak RSS)
        import copy
        import statistics
        base, walls, cpus = model, [], []
        for _ in range(args.quant_repeats):
            model = _quantize(cfg, copy.deepcopy(base), tok, info, grad)
            walls.append(info["quant_seconds"])
            cpus.append(info["quant_cpu_seconds"])
        info.update(quant_seconds_runs=walls, quant_cpu_seconds_runs=cpus, quant_seconds=statistics.median(walls),
                    quant_cpu_seconds=statistics.median(cpus))
    else:
        model = _quantize(cfg, model, tok, info, grad)
    res: dict[str, Any] = {"config": name, "lib": lib, "peer": _is_peer(cfg), "pair": cfg.get("pair"),
                           "lm_head": "float", "grad_mode": grad, **info,
                           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if lib == "polyquant":
        from polyquant.eval.memory import runtime_bytes, weight_bytes
        res.update(weight_bytes=weight_bytes(model), runtime_bytes=runtime_bytes(model))
    elif lib == "float":
        res["weight_bytes"] = C.generic_weight_bytes(model)
    else:
        res["weight_bytes"] = peer_weight_bytes(model)
    res["rss_after_setup_bytes"] = C.current_rss_bytes(trim=True)
    if args.quant_only:
        res["peak_rss_bytes"] = C.peak_rss_bytes()
        C.emit(res)
        return
    if not args.no_ppl:
        res.update(C.measure_ppl(model, tok, args.seqlen, args.windows, grad))
    stream = C.eval_stream(tok)
    res.update(C.measure_prefill(model, stream[:args.seqlen], args.prefill_runs, grad))
    res.update(C.measure_decode(model, stream[:C.PROMPT_TOKENS], args.decode_tokens, args.runs, grad))
    if lib == "polyquant":  # again after running: kernel caches built on the first forward (fp8-emulated) count
        from polyquant.eval.memory import runtime_bytes
        res["runtime_bytes"] = runtime_bytes(model)
    res["peak_rss_bytes"] = C.peak_rss_bytes()
    C.emit(res)


# -- parent: run the rows, compare, report ----------------------------------------------------------

def speed_basis(results: list[dict[str, Any]], requested: str) -> str:
    """``wall`` or ``cpu`` (thread CPU time); ``auto``: cpu when any row's decode ran with a load
    average above half the cores (a shared machine)."""
    if requested != "auto":
        return requested
    loads = [x for r in results for x in r.get("loadavg_decode", []) + r.get("loadavg_start", [])[:1]]
    return "cpu" if loads and max(loads) > 0.5 * (os.cpu_count() or 1) else "wall"


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r and "skipped" not in r


def _ratios(results: list[dict[str, Any]], basis: str) -> None:
    key = "decode_tok_s_cpu" if basis == "cpu" else "decode_tok_s"
    by = {r["config"]: r for r in results}
    fp32 = by.get("fp32") if _ok(by.get("fp32")) else None
    for r in results:
        if not _ok(r):
            continue
        r["speed_basis"] = basis
        if fp32 is not None and r.get("ppl") and fp32.get("ppl"):
            r["ppl_rel_fp32"] = r["ppl"] / fp32["ppl"] - 1
        if fp32 is not None and key in r and key in fp32:
            r["x_fp32_decode"] = r[key] / fp32[key]
        p = by.get(r.get("pair") or "")
        if r.get("lib") != "polyquant" or not _ok(p):
            continue
        if r.get("ppl") and p.get("ppl"):
            r["ppl_x_peer"] = r["ppl"] / p["ppl"]
        qkey = "quant_cpu_seconds" if basis == "cpu" else "quant_seconds"
        if p.get(qkey) and r.get(qkey) is not None:
            r["quant_time_x_peer"] = r[qkey] / p[qkey]
            r["quant_time_x_peer_wall"] = r["quant_seconds"] / p["quant_seconds"]
            r["quant_time_x_peer_cpu"] = r["quant_cpu_seconds"] / p["quant_cpu_seconds"]
        if key not in r or key not in p:
            continue
        r["decode_x_peer"] = r[key] / p[key]
        r["decode_x_peer_wall"] = r["decode_tok_s"] / p["decode_tok_s"]
        r["decode_x_peer_cpu"] = r["decode_tok_s_cpu"] / p["decode_tok_s_cpu"]
        if r.get("prefill_tok_s") and p.get("prefill_tok_s"):
            r["prefill_x_peer"] = r["prefill_tok_s"] / p["prefill_tok_s"]
        r["weight_bytes_x_peer"] = r["weight_bytes"] / p["weight_bytes"]


def _checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {r["config"]: r for r in results}
    for r in results:
        if r.get("lib") != "polyquant":
            continue
        c, peer = r["config"], r.get("pair")
        if not _ok(r):
            continue
        if not _ok(by.get(peer)):
            why = (by.get(peer) or {}).get("skipped") or (by.get(peer) or {}).get("error") or "not run"
            out.append({"config": c, "check": f"vs {peer}", "pass": None, "value": None, "note": f"no peer: {why}"})
        else:
            p = by[peer]
            if "ppl_x_peer" in r and p["ppl"] > COLLAPSED_PPL:
                out.append({"config": c, "check": f"ppl <= {peer} x {TARGETS['ppl_x_peer_max']}", "pass": None,
                            "value": round(r["ppl_x_peer"], 4),
                            "note": f"{r['ppl']:.4g} vs {p['ppl']:.4g}: the model collapses in both (ppl > "
                                    f"{COLLAPSED_PPL:g}), the ratio says nothing"})
            elif "ppl_x_peer" in r:
                out.append({"config": c, "check": f"ppl <= {peer} x {TARGETS['ppl_x_peer_max']}",
                            "value": round(r["ppl_x_peer"], 4), "pass": r["ppl_x_peer"] <= TARGETS["ppl_x_peer_max"],
                            "note": f"{r['ppl']:.3f} vs {p['ppl']:.3f}"})
            if "quant_time_x_peer" in r:
                out.append({"config": c, "check": f"quant time <= {peer} ({r['speed_basis']})",
                            "value": round(r["quant_time_x_peer"], 3),
                            "pass": r["quant_time_x_peer"] <= TARGETS["quant_time_x_peer_max"],
                            "note": f"wall {r['quant_seconds']:.2f} s vs {p['quant_seconds']:.2f} s, thread-CPU "
                                    f"{r['quant_cpu_seconds']:.2f} s vs {p['quant_cpu_seconds']:.2f} s"})
            if "decode_x_peer" not in r:
                continue
            out.append({"config": c, "check": f"decode >= {peer} ({r['speed_basis']})",
                        "value": round(r["decode_x_peer"], 3), "pass": r["decode_x_peer"] >= TARGETS["decode_x_peer_min"],
                        "note": f"wall x{r['decode_x_peer_wall']:.3f}, thread-CPU x{r['decode_x_peer_cpu']:.3f}; "
                                f"{r['decode_tok_s']:.2f} vs {p['decode_tok_s']:.2f} tok/s wall"})
        if c == "pq-hqq-w4-g64":
            qs = r["quant_cpu_seconds"] if r.get("speed_basis") == "cpu" else r["quant_seconds"]
            out.append({"config": c, "check": f"HQQ 4-bit g64 whole model < {TARGETS['hqq_w4_g64_quant_s']:.0f} s "
                        f"({r.get('speed_basis', 'wall')})", "value": round(qs, 2),
                        "pass": qs < TARGETS["hqq_w4_g64_quant_s"],
                        "note": f"wall {r['quant_seconds']:.2f} s, thread-CPU {r['quant_cpu_seconds']:.2f} s"})
    return out


_fmt = C.fmt


def _table(results: list[dict[str, Any]]) -> str:
    hdr = (f"{'config':24s} {'ppl':>8s} {'x peer':>6s} {'MB':>6s} {'quant s':>7s} {'cpu s':>6s} {'x peer':>6s} "
           f"{'tok/s':>6s} {'cpu':>6s} {'x peer':>6s} {'prefill':>7s} {'RSS MB':>6s}  dtype / kernel")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        if not _ok(r):
            lines.append(f"{r['config']:24s} {'SKIPPED: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        lines.append(
            f"{r['config']:24s} {_fmt(r.get('ppl'), '{:8.3f}')} {_fmt(r.get('ppl_x_peer'), '{:6.4f}')} "
            f"{_fmt(r['weight_bytes'] / 1e6, '{:6.1f}')} {_fmt(r.get('quant_seconds'), '{:7.2f}')} "
            f"{_fmt(r.get('quant_cpu_seconds'), '{:6.2f}')} {_fmt(r.get('quant_time_x_peer'), '{:6.2f}')} "
            f"{_fmt(r.get('decode_tok_s'), '{:6.2f}')} {_fmt(r.get('decode_tok_s_cpu'), '{:6.2f}')} "
            f"{_fmt(r.get('decode_x_peer'), '{:6.2f}')} {_fmt(r.get('prefill_tok_s'), '{:7.0f}')} "
            f"{_fmt(r['peak_rss_bytes'] / 1e6 if 'peak_rss_bytes' in r else None, '{:6.0f}')}  "
            f"{r.get('float_dtype', '')} / {r.get('kernel', '')}")
    return "\n".join(lines)


def _print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        status = "SKIP" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        val = "" if c["value"] is None else f": {c['value']}"
        print(f"{status}  {c['config']:24s} {c['check']}{val}" + (f"  ({c['note']})" if c.get("note") else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated rows (default: all but the -v1 references); known: {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="timed decode runs per row")
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (speed only)")
    ap.add_argument("--quant-only", action="store_true", help="quantize and measure size only (no ppl, no speed)")
    ap.add_argument("--quant-repeats", type=int, default=3,
                    help="quantization timings per row, each on a fresh copy of the float model in a separate "
                         "process (the median is reported; 1: only the measured row's own quantization)")
    ap.add_argument("--speed-basis", choices=("auto", "wall", "cpu"), default="auto",
                    help="decode ratios on wall-clock median, thread CPU time, or auto (cpu when loaded)")
    ap.add_argument("--out", default=str(C.ROOT / "bench-results" / "calibration_free.json"))
    ap.add_argument("--timeout", type=float, default=2400, help="seconds per row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    peer_py, peer_src = C.peers_python()
    env_info: dict[str, Any] = {"python": sys.executable, "peers_venv": peer_src, "cpu": platform.processor(),
                                "nproc": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                                "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    libs = {CONFIGS[n]["lib"] for n in names if _is_peer(CONFIGS[n])}
    main_mods = [PEER_MODULES[lib] for lib in libs if CONFIGS_ENV(lib) == "main"]
    peer_mods = [PEER_MODULES[lib] for lib in libs if CONFIGS_ENV(lib) == "peers"]
    versions: dict[str, str] = dict(C.probe_python(sys.executable, main_mods)) if main_mods else {}
    if peer_mods:
        if peer_py is None:
            versions.update({m: f"missing: no virtualenv at {peer_src}" for m in peer_mods})
        else:
            pv = C.probe_python(peer_py, peer_mods)
            versions.update({m: pv[m] for m in peer_mods})
            versions["torch (peers venv)"] = pv.get("torch", "?")
    versions["torch"] = C.probe_python(sys.executable, [])["torch"]
    env_info["versions"] = versions

    def missing(n: str) -> str | None:
        cfg = CONFIGS[n]
        if not _is_peer(cfg):
            return None
        mod = PEER_MODULES[cfg["lib"]]
        ver = versions.get(mod, "missing")
        if ver.startswith("missing"):
            return SKIP_REASONS.get(cfg["lib"], f"{mod} not available") + f" ({mod}: {ver})"
        return None

    script = Path(__file__).resolve()
    passthrough = ["--threads", str(args.threads), "--windows", str(args.windows), "--seqlen", str(args.seqlen),
                   "--decode-tokens", str(args.decode_tokens), "--runs", str(args.runs),
                   "--prefill-runs", str(args.prefill_runs)] + (["--no-ppl"] if args.no_ppl else []) + (
                   ["--quant-only"] if args.quant_only else [])
    results: list[dict[str, Any]] = []
    for n in names:
        cfg = CONFIGS[n]
        base = {"config": n, "lib": cfg["lib"], "peer": _is_peer(cfg), "pair": cfg.get("pair")}
        why = missing(n)
        if why:
            r = {**base, "skipped": why}
            print(json.dumps(r), flush=True)
            results.append(r)
            continue
        load0 = os.getloadavg()
        python = peer_py if CONFIGS_ENV(cfg["lib"]) == "peers" else sys.executable
        r = C.run_worker(python, script, ["--worker", n, *passthrough, "--quant-repeats", "1"], args.threads,
                         args.timeout)
        if cfg["lib"] != "float" and args.quant_repeats > 1 and "error" not in r:
            t = C.run_worker(python, script, ["--worker", n, *passthrough, "--quant-only", "--quant-repeats",
                                              str(args.quant_repeats)], args.threads, args.timeout)
            if "error" in t:
                r["quant_timing_error"] = t["error"]
            else:  # the median over the measured row's own quantization and the repeats
                walls = [r["quant_seconds"], *t["quant_seconds_runs"]]
                cpus = [r["quant_cpu_seconds"], *t["quant_cpu_seconds_runs"]]
                r.update(quant_seconds_runs=walls, quant_cpu_seconds_runs=cpus,
                         quant_seconds=statistics.median(walls), quant_cpu_seconds=statistics.median(cpus))
        for k, v in base.items():
            r.setdefault(k, v)
        r["loadavg_start"] = [round(x, 2) for x in load0]
        print(json.dumps(r), flush=True)
        results.append(r)
    basis = speed_basis(results, args.speed_basis)
    _ratios(results, basis)
    checks = _checks(results)
    print()
    print(_table(results))
    print(f"\nratios polyquant / peer; decode on speed basis: {basis} (wall-clock and thread-CPU ratios in each line)")
    _print_checks(checks)
    for r in results:
        if "skipped" in r:
            print(f"skipped {r['config']}: {r['skipped']}")
        if "error" in r:
            print(f"error {r['config']}: {r['error']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env_info, "targets": TARGETS, "speed_basis": basis, "results": results,
                               "checks": checks}, indent=1))
    print(f"\nwrote {out}")
    return 0


def CONFIGS_ENV(lib: str) -> str:  # noqa: N802 - reads like a table
    """Which python runs a library's rows: hqq and bitsandbytes are in polyquant's environment (test
    extras); torchao and optimum-quanto in the peer virtualenv."""
    return "peers" if lib in ("quanto", "torchao") else "main"


if __name__ == "__main__":
    sys.exit(main())
