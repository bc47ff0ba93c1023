"""Benchmark (issue 2): polyquant RTN against fp32 and the peer CPU weight-only paths on the
default model (SmolLM2-135M), 1 thread, batch 1.

Rows: fp32; dense bf16 (a reference: the whole model cast, nothing quantized); polyquant RTN W8
per-channel, W4 g64 sym and asym -- each as plain QuantLinears (float parts fp32) and with the
runtime options of ``polyquant.nn.runtime`` (``-fast``: q/k/v and gate/up fused, the float lm_head
computed in bf16 -- a float cast, not quantization); torchao 0.15 ``Int8WeightOnlyConfig`` and
int4 weight-only with ``Int4CPULayout`` (its fast CPU path needs the model in bf16); optimum-quanto
``qint8`` / ``qint4``. Every quantized row keeps the lm_head in float unless its name ends in
``-qhead`` (torchao's own default quantizes it).

Each row runs in its own subprocess (so peak RSS is its own) and reports ppl (40 windows of 512
of the default pydoc text), weight bytes (and, for polyquant, stored vs ideal bytes of the
quantized layers), quantization seconds, decode tok/s (wall median and best, thread-CPU median),
prefill tok/s and peak RSS; the parent adds ratios to fp32 and to the best peer of the same bit
width, checks the issue's targets, prints one JSON line per row and a table, and writes
``bench-results/rtn.json``. Peers run from a separate virtualenv (``$POLYQUANT_PEERS_VENV`` or
``.venv-peers`` in the repository); rows whose library is missing there are skipped, with the
reason.

    python benchmarks/bench_rtn.py                    # everything (about 15-30 min on 1 core)
    python benchmarks/bench_rtn.py --configs fp32,pq-w4-g64-sym-fast --runs 7
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FAST_RUNTIME = "fuse+bf16-head"

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"lib": "float", "bits": 32},
    "bf16": {"lib": "float", "bits": 16, "dtype": "bf16"},
    "pq-w8-pc": {"lib": "polyquant", "bits": 8, "group_size": -1, "sym": True},
    "pq-w8-pc-fast": {"lib": "polyquant", "bits": 8, "group_size": -1, "sym": True, "runtime": FAST_RUNTIME},
    "pq-w4-g64-sym": {"lib": "polyquant", "bits": 4, "group_size": 64, "sym": True},
    "pq-w4-g64-sym-fast": {"lib": "polyquant", "bits": 4, "group_size": 64, "sym": True, "runtime": FAST_RUNTIME},
    "pq-w4-g64-asym": {"lib": "polyquant", "bits": 4, "group_size": 64, "sym": False},
    "pq-w4-g64-asym-fast": {"lib": "polyquant", "bits": 4, "group_size": 64, "sym": False, "runtime": FAST_RUNTIME},
    "pq-w4-g64-asym-qhead-fast": {"lib": "polyquant", "bits": 4, "group_size": 64, "sym": False,
                                  "quantize_head": True, "runtime": "fuse"},
    "torchao-int8wo": {"lib": "torchao", "bits": 8, "peer": True},
    "torchao-int4-cpu": {"lib": "torchao", "bits": 4, "group_size": 64, "peer": True, "dtype": "bf16"},
    "torchao-int4-cpu-qhead": {"lib": "torchao", "bits": 4, "group_size": 64, "peer": True, "dtype": "bf16",
                               "quantize_head": True},
    "quanto-qint8": {"lib": "quanto", "bits": 8, "peer": True},
    "quanto-qint4": {"lib": "quanto", "bits": 4, "peer": True, "grad": "no_grad"},
}
#: Rows of the interleaved speed phase (the decisions hang on these; the slow peers are left out).
INTERLEAVE_DEFAULT = ("fp32", "pq-w8-pc", "pq-w8-pc-fast", "pq-w4-g64-sym", "pq-w4-g64-sym-fast",
                      "pq-w4-g64-asym-fast", "pq-w4-g64-asym-qhead-fast", "torchao-int4-cpu", "torchao-int4-cpu-qhead")
PEER_MODULES = {"torchao": "torchao", "quanto": "optimum.quanto"}
TARGETS = {"w8_speed_x_fp32": 1.0, "w4_speed_x_fp32": 1.8, "w8_ppl_rel": 0.01, "w4_ppl_rel": 0.25,
           "bytes_vs_ideal": 0.05}


# -- worker (one configuration, in its own process) -------------------------------------------------

def _apply_runtime(model, spec: str) -> dict[str, Any]:
    import torch
    from polyquant.nn import runtime as rt
    for part in filter(None, spec.split("+")):
        if part == "fuse":
            rt.fuse_projections(model)
        elif part == "bf16-head":
            rt.set_float_dtype(model, torch.bfloat16, scope="lm_head")
        elif part == "bf16-all":
            rt.set_float_dtype(model, torch.bfloat16, scope="all")
        else:
            raise ValueError(f"unknown runtime option {part!r} (fuse, bf16-head, bf16-all)")
    return rt.runtime_info(model)


def _quantize(name: str, cfg: dict[str, Any], model, runtime: str | None) -> tuple[Any, dict[str, Any]]:
    """Quantize ``model`` as row ``name`` says; ``info['quant_seconds']`` times the quantization
    alone (polyquant's runtime options are timed apart, as ``runtime_seconds``)."""
    import torch
    from torch import nn
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    lib = cfg["lib"]
    if cfg.get("dtype") == "bf16":
        model = model.to(torch.bfloat16)
    info["float_compute"] = "bf16" if cfg.get("dtype") == "bf16" else "fp32"
    if lib == "float":
        info["kernel"] = "dense " + info["float_compute"]
        return model, info
    not_head = lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn  # noqa: E731
    if lib == "polyquant":
        from polyquant.methods.rtn import RTNConfig
        from polyquant.methods.apply import quantize_model
        from polyquant.nn.quantize import kernel_summary
        model = quantize_model(model, RTNConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                                                quantize_lm_head=bool(cfg.get("quantize_head"))),
                               inplace=True, show_progress=False)
        info["quant_seconds"] = time.perf_counter() - t0
        info["kernel"] = ",".join(f"{k}:{v}" for k, v in kernel_summary(model).items())
        info["runtime_options"] = runtime or ""
        if runtime:
            t1 = time.perf_counter()
            info.update(_apply_runtime(model, runtime))
            info["runtime_seconds"] = time.perf_counter() - t1
    elif lib == "torchao":
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        filt = None if cfg.get("quantize_head") else not_head
        if cfg["bits"] == 8:
            quantize_(model, Int8WeightOnlyConfig(), filter_fn=filt)
            info["kernel"] = f"torchao {torchao.__version__} Int8WeightOnlyConfig (plain layout)"
        else:
            from torchao.dtypes import Int4CPULayout
            quantize_(model, Int4WeightOnlyConfig(group_size=cfg["group_size"], layout=Int4CPULayout(), version=1),
                      filter_fn=filt)
            info["kernel"] = f"torchao {torchao.__version__} Int4WeightOnlyConfig v1 Int4CPULayout g{cfg['group_size']}"
    elif lib == "quanto":
        from optimum.quanto import freeze, qint4, qint8, quantize
        quantize(model, weights=qint8 if cfg["bits"] == 8 else qint4, exclude=["lm_head"])
        freeze(model)
        from importlib.metadata import version
        groups = sorted({m.weight_group_size for m in model.modules() if getattr(m, "weight_group_size", None)})
        info["kernel"] = f"optimum-quanto {version('optimum-quanto')} {'qint8' if cfg['bits'] == 8 else 'qint4'}"
        if groups:
            info["kernel"] += f" (groups {groups})"
    else:  # pragma: no cover
        raise ValueError(lib)
    return model, info


def worker(name: str, args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    import polyquant
    cfg = CONFIGS[name]
    grad = cfg.get("grad", "inference_mode")
    runtime = args.runtime if (args.runtime is not None and cfg.get("runtime")) else cfg.get("runtime")
    model, tok = polyquant.load_model("default")
    model.eval()
    t0 = time.perf_counter()
    model, info = _quantize(name, cfg, model, runtime)
    quant_s = info.pop("quant_seconds", time.perf_counter() - t0)
    res: dict[str, Any] = {"config": name, "lib": cfg["lib"], "bits": cfg["bits"],
                           "group_size": cfg.get("group_size"), "sym": cfg.get("sym"),
                           "lm_head": "quantized" if cfg.get("quantize_head") else "float",
                           "peer": bool(cfg.get("peer")), "grad_mode": grad, **info,
                           "quant_seconds": quant_s if cfg["lib"] != "float" else 0.0,
                           "threads": torch.get_num_threads(), "torch": torch.__version__}
    res["rss_after_setup_bytes"] = C.current_rss_bytes(trim=True)
    if cfg["lib"] == "polyquant":
        from polyquant.eval.memory import quantized_layer_bytes, runtime_bytes, weight_bytes
        stored, ideal = quantized_layer_bytes(model)
        res.update(weight_bytes=weight_bytes(model), runtime_bytes=runtime_bytes(model),
                   weight_bytes_quantized_layers=stored, weight_bytes_ideal=ideal, bytes_vs_ideal=stored / ideal - 1)
    else:
        res["weight_bytes"] = C.generic_weight_bytes(model)
    if not args.no_ppl:
        res.update(C.measure_ppl(model, tok, args.seqlen, args.windows, grad))
    stream = C.eval_stream(tok)
    res.update(C.measure_prefill(model, stream[:args.seqlen], args.prefill_runs, grad))
    res.update(C.measure_decode(model, stream[:C.PROMPT_TOKENS], args.decode_tokens, args.runs, grad))
    res["peak_rss_bytes"] = C.peak_rss_bytes()
    C.emit(res)


def interleave_worker(names: list[str], args: argparse.Namespace) -> None:
    """All ``names`` in one process, decode runs taken round-robin (``args.interleave`` rounds), so
    that a load change on a shared machine hits every row alike. Peak RSS is not per row here."""
    import torch
    torch.set_num_threads(args.threads)
    import polyquant
    models = {}
    infos: dict[str, dict[str, Any]] = {}
    tok = None
    for n in names:
        cfg = CONFIGS[n]
        m, tok = polyquant.load_model("default")
        m.eval()
        runtime = args.runtime if (args.runtime is not None and cfg.get("runtime")) else cfg.get("runtime")
        models[n], infos[n] = _quantize(n, cfg, m, runtime)
    prompt = C.eval_stream(tok)[:C.PROMPT_TOKENS]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for n in names:  # warm-up
        C.measure_decode(models[n], prompt, min(8, args.decode_tokens), 1, CONFIGS[n].get("grad", "inference_mode"))
    for _ in range(args.interleave):
        for n in names:
            runs[n].append(C.measure_decode(models[n], prompt, args.decode_tokens, 1,
                                            CONFIGS[n].get("grad", "inference_mode"), warmup=False))
    out = {}
    for n, rr in runs.items():
        walls = sorted(r["decode_ms_per_token"] for r in rr)
        cpus = sorted(r["decode_tok_s_cpu"] for r in rr)
        out[n] = {"decode_tok_s": 1e3 / walls[len(walls) // 2], "decode_tok_s_best": 1e3 / walls[0],
                  "decode_tok_s_cpu": cpus[len(cpus) // 2], "decode_ms_per_token": walls[len(walls) // 2],
                  "decode_runs_tok_s": [round(1e3 / r["decode_ms_per_token"], 2) for r in rr],
                  "loadavg": [r["loadavg_decode"][0] for r in rr],
                  **{k: v for k, v in infos[n].items() if k in ("kernel", "float_compute", "float_compute_scope",
                                                                 "fused_projections")}}
    C.emit(out)


# -- parent: run the rows, compare, report ----------------------------------------------------------

def speed_basis(results: list[dict[str, Any]], requested: str) -> str:
    """``wall`` (wall-clock median) or ``cpu`` (thread CPU time); ``auto`` picks cpu when the load
    average during any row's decode exceeded half the cores (a shared machine)."""
    if requested != "auto":
        return requested
    loads = [x for r in results for x in r.get("loadavg_decode", []) + r.get("loadavg", [])]
    return "cpu" if loads and max(loads) > 0.5 * (os.cpu_count() or 1) else "wall"


def _ratios(results: list[dict[str, Any]], basis: str) -> None:
    """Ratios to fp32 and to the fastest peer of the same bit width, on the speed ``basis``; the
    peer is taken among those treating the lm_head alike (``best_peer``) and among all
    (``best_peer_any``)."""
    key = "decode_tok_s_cpu" if basis == "cpu" else "decode_tok_s"
    ok = [r for r in results if "error" not in r and "skipped" not in r and key in r]
    fp32 = next((r for r in ok if r["config"] == "fp32"), None)
    peers = [r for r in ok if r.get("peer")]
    for r in ok:
        r["speed_basis"] = basis
        if fp32:
            r["x_fp32_decode"] = r[key] / fp32[key]
            r["x_fp32_decode_wall"] = r["decode_tok_s"] / fp32["decode_tok_s"]
            r["x_fp32_decode_cpu"] = r["decode_tok_s_cpu"] / fp32["decode_tok_s_cpu"]
            if "prefill_tok_s" in r and "prefill_tok_s" in fp32:
                r["x_fp32_prefill"] = r["prefill_tok_s"] / fp32["prefill_tok_s"]
            if r.get("ppl") and fp32.get("ppl"):
                r["ppl_rel_fp32"] = r["ppl"] / fp32["ppl"] - 1
        if r.get("lib") == "float":
            continue
        head = CONFIGS[r["config"]].get("quantize_head", False)
        same = [p for p in peers if p["bits"] == r["bits"] and CONFIGS[p["config"]].get("quantize_head", False) == head]
        anyp = [p for p in peers if p["bits"] == r["bits"]]
        if same:
            bp = max(same, key=lambda p: p[key])
            r["best_peer"], r["x_best_peer_decode"] = bp["config"], r[key] / bp[key]
        if anyp:
            bp = max(anyp, key=lambda p: p[key])
            r["best_peer_any"], r["x_best_peer_any_decode"] = bp["config"], r[key] / bp[key]


def _checks(results: list[dict[str, Any]], tag: str = "") -> list[dict[str, Any]]:
    out = []
    for r in results:
        if r.get("lib") != "polyquant" or "error" in r or "skipped" in r:
            continue
        w = "w8" if r["bits"] == 8 else "w4"
        c = r["config"] + tag
        if "bytes_vs_ideal" in r:
            out.append({"config": c, "check": "quantized-layer bytes within 5% of ideal",
                        "value": round(r["bytes_vs_ideal"], 4), "pass": r["bytes_vs_ideal"] <= TARGETS["bytes_vs_ideal"]})
        if "ppl_rel_fp32" in r:
            lim = TARGETS[f"{w}_ppl_rel"]
            out.append({"config": c, "check": f"ppl within {lim:.0%} of fp32",
                        "value": round(r["ppl_rel_fp32"], 4), "pass": r["ppl_rel_fp32"] <= lim})
        if "x_fp32_decode" in r and not CONFIGS[r["config"]].get("quantize_head"):
            lim = TARGETS[f"{w}_speed_x_fp32"]
            out.append({"config": c, "check": f"decode >= {lim}x fp32 ({r['speed_basis']})",
                        "value": round(r["x_fp32_decode"], 3), "pass": r["x_fp32_decode"] >= lim,
                        "wall": round(r["x_fp32_decode_wall"], 3), "cpu": round(r["x_fp32_decode_cpu"], 3)})
        if r["bits"] == 4 and "x_best_peer_decode" in r:
            out.append({"config": c, "check": f"decode >= best peer 4-bit, same lm_head ({r['best_peer']}, "
                        f"{r['speed_basis']})", "value": round(r["x_best_peer_decode"], 3),
                        "pass": r["x_best_peer_decode"] >= 1.0})
    return out


_fmt = C.fmt


def _table(results: list[dict[str, Any]]) -> str:
    hdr = (f"{'config':26s} {'ppl':>7s} {'dppl%':>6s} {'MB':>6s} {'quant s':>7s} {'tok/s':>6s} {'best':>6s} "
           f"{'cpu':>6s} {'ms/tok':>6s} {'x fp32':>6s} {'x peer':>6s} {'prefill':>7s} {'RSS MB':>6s}  kernel / float")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['config']:26s} {'SKIPPED: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        lines.append(
            f"{r['config']:26s} {_fmt(r.get('ppl'), '{:7.3f}')} "
            f"{_fmt(100 * r['ppl_rel_fp32'] if 'ppl_rel_fp32' in r else None, '{:6.2f}')} "
            f"{_fmt(r['weight_bytes'] / 1e6 if 'weight_bytes' in r else None, '{:6.1f}')} "
            f"{_fmt(r.get('quant_seconds'), '{:7.2f}')} {r['decode_tok_s']:6.2f} {r['decode_tok_s_best']:6.2f} "
            f"{r['decode_tok_s_cpu']:6.2f} {r['decode_ms_per_token']:6.1f} {_fmt(r.get('x_fp32_decode'), '{:6.2f}')} "
            f"{_fmt(r.get('x_best_peer_decode'), '{:6.2f}')} {_fmt(r.get('prefill_tok_s'), '{:7.0f}')} "
            f"{_fmt(r['peak_rss_bytes'] / 1e6 if 'peak_rss_bytes' in r else None, '{:6.0f}')}  "
            f"{r.get('kernel', '')} / {r.get('float_compute', '')}"
            + (f" ({r['float_compute_scope']})" if r.get("float_compute_scope") else "")
            + (f" fused={r['fused_projections']}" if r.get("fused_projections") else ""))
    return "\n".join(lines)


def _print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        extra = f" (wall {c['wall']}, thread-CPU {c['cpu']})" if "wall" in c else ""
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['config']:30s} {c['check']}: {c['value']}{extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="timed decode runs per row")
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--runtime", default=None, help=f"runtime options for the -fast rows (default {FAST_RUNTIME})")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (speed only)")
    ap.add_argument("--interleave", type=int, default=5,
                    help="rounds of the interleaved speed phase over --interleave-configs (0: skip)")
    ap.add_argument("--interleave-configs", default=",".join(INTERLEAVE_DEFAULT))
    ap.add_argument("--speed-basis", choices=("auto", "wall", "cpu"), default="auto",
                    help="what the ratios and checks use: wall-clock median, thread CPU time, or auto "
                         "(cpu when the machine was loaded)")
    ap.add_argument("--out", default=str(C.ROOT / "bench-results" / "rtn.json"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-interleave", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    if args.worker_interleave:
        interleave_worker(args.worker_interleave.split(","), args)
        return 0
    names = [n for n in args.configs.split(",") if n]
    inames = [n for n in args.interleave_configs.split(",") if n] if args.interleave > 0 else []
    unknown = [n for n in names + inames if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    peer_py, peer_src = C.peers_python()
    env_info: dict[str, Any] = {"python": sys.executable, "peers_venv": peer_src, "cpu": platform.processor(),
                                "nproc": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    peer_versions: dict[str, str] = {}
    if any(CONFIGS[n].get("peer") for n in names + inames):
        if peer_py is None:
            peer_versions = {m: f"missing: no virtualenv at {peer_src}" for m in ["torch", *PEER_MODULES.values()]}
        else:
            peer_versions = C.probe_python(peer_py, list(PEER_MODULES.values()))
        main_torch = C.probe_python(sys.executable, [])["torch"]
        if peer_versions.get("torch") != main_torch and not peer_versions.get("torch", "").startswith("missing"):
            print(f"warning: the peer venv has torch {peer_versions.get('torch')}, polyquant's is {main_torch}",
                  file=sys.stderr)
        env_info["peer_versions"] = peer_versions

    def missing(n: str) -> str | None:
        cfg = CONFIGS[n]
        if not cfg.get("peer"):
            return None
        mod = PEER_MODULES[cfg["lib"]]
        ver = peer_versions.get(mod, "missing")
        return f"{mod} not available in {peer_src}: {ver}" if peer_py is None or ver.startswith("missing") else None

    script = Path(__file__).resolve()
    passthrough = ["--threads", str(args.threads), "--windows", str(args.windows), "--seqlen", str(args.seqlen),
                   "--decode-tokens", str(args.decode_tokens), "--runs", str(args.runs),
                   "--prefill-runs", str(args.prefill_runs), "--interleave", str(args.interleave)] + (
                   ["--no-ppl"] if args.no_ppl else []) + (["--runtime", args.runtime] if args.runtime is not None else [])
    results: list[dict[str, Any]] = []
    for n in names:
        cfg = CONFIGS[n]
        why = missing(n)
        if why:
            r = {"config": n, "lib": cfg["lib"], "bits": cfg["bits"], "skipped": why}
            print(json.dumps(r), flush=True)
            results.append(r)
            continue
        load0 = os.getloadavg()
        r = C.run_worker(peer_py if cfg.get("peer") else sys.executable, script, ["--worker", n, *passthrough],
                         args.threads, args.timeout)
        r.setdefault("config", n)
        r.setdefault("lib", cfg["lib"])
        r.setdefault("bits", cfg["bits"])
        r.setdefault("peer", bool(cfg.get("peer")))
        r["loadavg_start"] = [round(x, 2) for x in load0]
        print(json.dumps(r), flush=True)
        results.append(r)
    basis = speed_basis(results, args.speed_basis)
    _ratios(results, basis)
    checks = _checks(results)

    inter: list[dict[str, Any]] = []
    if inames:
        skipped = {n: missing(n) for n in inames if missing(n)}
        run_names = [n for n in inames if n not in skipped]
        python = peer_py if any(CONFIGS[n].get("peer") for n in run_names) else sys.executable
        print(f"\ninterleaved speed phase: {args.interleave} rounds over {', '.join(run_names)} in one process",
              flush=True)
        raw = C.run_worker(python, script, ["--worker-interleave", ",".join(run_names), *passthrough],
                           args.threads, args.timeout)
        if "error" in raw:
            print(f"interleaved phase failed: {raw['error']}")
        else:
            raw.pop("wall_seconds", None)
            for n in run_names:
                row = {"config": n, "lib": CONFIGS[n]["lib"], "bits": CONFIGS[n]["bits"],
                       "peer": bool(CONFIGS[n].get("peer")), **raw[n]}
                sub = next((r for r in results if r["config"] == n and "error" not in r and "skipped" not in r), None)
                if sub is not None:  # accuracy / size / setup from the row's own process
                    for k in ("ppl", "weight_bytes", "kernel", "float_compute", "float_compute_scope",
                              "fused_projections", "quant_seconds"):
                        if k in sub:
                            row[k] = sub[k]
                inter.append(row)
            inter += [{"config": n, "lib": CONFIGS[n]["lib"], "bits": CONFIGS[n]["bits"], "skipped": why}
                      for n, why in skipped.items()]
            ibasis = speed_basis(inter, args.speed_basis)
            _ratios(inter, ibasis)
            for r in inter:
                print(json.dumps({"interleaved": True, **r}), flush=True)

    print()
    print(_table(results))
    print(f"\nratios and checks on speed basis: {basis}")
    _print_checks(checks)
    ichecks: list[dict[str, Any]] = []
    if inter:
        print(f"\ninterleaved speed phase ({args.interleave} rounds, one process; basis {ibasis}):")
        print(_table(inter))
        ichecks = [c for c in _checks(inter, " [interleaved]") if "decode" in c["check"]]
        _print_checks(ichecks)
    for r in results + inter:
        if "skipped" in r:
            print(f"skipped {r['config']}: {r['skipped']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env_info, "targets": TARGETS, "speed_basis": basis, "results": results,
                               "checks": checks, "interleaved": inter, "interleaved_checks": ichecks}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
