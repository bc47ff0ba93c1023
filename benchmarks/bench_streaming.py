"""Streaming quantization (#17): peak RSS and time, streamed against in memory, on a random-weight
Llama-shaped model of about 1.5B parameters (fp32 sharded safetensors, about 6 GB, generated
here), and bit-identity of streamed and in-memory checkpoints on the default model.

    python benchmarks/bench_streaming.py make /tmp/pq-1p5b            # generate the model (once)
    python benchmarks/bench_streaming.py rss /tmp/pq-1p5b --run rtn   # one row: stream + memory
    python benchmarks/bench_streaming.py identity                     # default model, rtn/gptq/awq

Each quantization runs as its own ``polyquant quantize`` process; its peak RSS is the child's
own high-water mark (``VmHWM``, read every 0.2 s until it exits; its ``ru_maxrss``, also
recorded, includes this process's resident size at the fork), its time the wall clock and the CPU time (user + system) of the
process (loading included; on a shared machine the CPU time is the comparable figure). Run
heavy jobs with ``nice -n 5 taskset -c 1``. Results: JSON on stdout and in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"rtn": ["-m", "rtn", "-b", "4", "-g", "64"],
        "hqq": ["-m", "hqq", "-b", "4"],
        "gptq": ["-m", "gptq", "-b", "4", "-g", "64", "--calib-samples", "16", "--calib-seqlen", "512"],
        "awq": ["-m", "awq", "-b", "4", "-g", "64"]}


# -- the model -------------------------------------------------------------------------------------
def make(folder: Path, layers: int = 26, hidden: int = 2048, inter: int = 5632, seed: int = 0) -> dict:
    """A random-weight Llama (std 0.02 weights, unit norms), one shard per two layers, with the
    default model's tokenizer (vocab 49152): about 1.54B parameters, 6.2 GB in fp32."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from polyquant import models
    tok_src = models.cache_dir() / "gguf" / models._gguf_key(models.default_model_path())
    if not (tok_src / "config.json").is_file():
        models.load_model("default")
    vocab = json.loads((tok_src / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_src / f).is_file():
            shutil.copy(tok_src / f, tmp / f)
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    groups = [["model.embed_tokens.weight"]] + [list(range(i, min(i + 2, layers))) for i in range(0, layers, 2)] + [["tail"]]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for name, grp in zip(names, groups):
        t: dict[str, torch.Tensor] = {}
        if grp == ["model.embed_tokens.weight"]:
            t["model.embed_tokens.weight"] = w(vocab, hidden)
        elif grp == ["tail"]:
            t["model.norm.weight"] = torch.ones(hidden)
            t["lm_head.weight"] = w(vocab, hidden)
        else:
            for i in grp:
                p = f"model.layers.{i}."
                for proj in ("q", "k", "v", "o"):
                    t[p + f"self_attn.{proj}_proj.weight"] = w(hidden, hidden)
                t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
                t[p + "mlp.up_proj.weight"] = w(inter, hidden)
                t[p + "mlp.down_proj.weight"] = w(hidden, inter)
                t[p + "input_layernorm.weight"] = torch.ones(hidden)
                t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * 4 for v in t.values())
        del t
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return {"folder": str(folder), "params": total // 4, "bytes": total, "layers": layers, "hidden": hidden,
            "intermediate": inter, "vocab": vocab}


# -- measuring ---------------------------------------------------------------------------------------
def _units_done(out: Path, stream: bool) -> int:
    """Units (streamed) or blocks (in memory, the calibration resume folder) finished so far."""
    try:
        if stream:
            return int(json.loads((out.parent / f"{out.name}.partial" / "manifest.json").read_text())["done"])
        return int(json.loads((out.parent / f".{out.name}.calibration-resume" / "state.json").read_text())["blocks_done"])
    except (OSError, ValueError, KeyError):
        return 0


def quantize(model: str, out: Path, flags: list[str], stream: bool, stop_after: int | None = None) -> dict:
    """One ``polyquant quantize`` process: wall seconds, CPU seconds, peak RSS (MiB), exit code.
    ``stop_after``: SIGTERM it once that many units (streamed) / blocks (in memory) are done."""
    import signal

    from polyquant.eval.memory import vm_hwm_bytes  # not ru_maxrss: it carries this process's RSS at the fork
    shutil.rmtree(out, ignore_errors=True)
    for p in (out.parent / f"{out.name}.partial", out.parent / f".{out.name}.calibration-resume"):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [sys.executable, "-m", "polyquant", "quantize", model, *flags, "-o", str(out), "-q", "--threads", "1",
           "--stream" if stream else "--no-stream"]
    t0 = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        stopped, hwm = None, 0
        while True:
            hwm = max(hwm, vm_hwm_bytes(p.pid) or 0)  # before wait4 reaps it (its memory map is gone then)
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)  # the child's own rusage once it ends
            if pid:
                break
            time.sleep(0.2)
            if stop_after is not None and stopped is None and _units_done(out, stream) >= stop_after:
                stopped = _units_done(out, stream)
                p.send_signal(signal.SIGTERM)
        p.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    row = {"stream": stream, "seconds": round(time.perf_counter() - t0, 1),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "peak_rss_mib": round(hwm / 2**20, 1),
           "ru_maxrss_mib": round(ru.ru_maxrss / 1024, 1),
           "rc": p.returncode, "cmd": " ".join(cmd[1:]), "tail": text.strip().splitlines()[-2:]}
    if stop_after is not None:
        row["stopped_after_units" if stream else "stopped_after_blocks"] = stopped
    return row


def tensors_of(folder: Path) -> dict:
    """``key -> (dtype, shape, sha256 of the bytes)``, one tensor in memory at a time. Digests, not bytes:
    this process's peak RSS passes to the next child it forks (Linux carries the pre-exec RSS into the
    child's ``ru_maxrss``), so holding two 1.6 GB checkpoints here read as a 4.7-4.9 GB peak of the
    *next* streamed run (2026-12-07; the same run alone: 1.0-1.4 GB)."""
    import hashlib
    import torch
    from safetensors import safe_open
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                raw = t.contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else b""
                out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
                del t, raw
    return out


def same_checkpoint(a: Path, b: Path) -> dict:
    """Tensor-by-tensor byte equality, config.json (with quantization_config) and extra files equal."""
    ta, tb = tensors_of(a), tensors_of(b)
    diff = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    skip = {"config.json", "polyquant.json", "model.safetensors.index.json", "qmodel.pt"}
    files = sorted({p.name for p in a.iterdir() if not p.name.endswith(".safetensors")} - skip)
    other = [f for f in files if not (b / f).is_file() or (a / f).read_bytes() != (b / f).read_bytes()]
    return {"tensors": len(ta), "tensors_differing": diff[:10], "config_equal": ca == cb, "files_differing": other,
            "identical": not diff and ca == cb and not other}


def cmd_rss(args) -> dict:
    rows = []
    for run in args.run:
        for stream in (True, False):
            out = Path(args.work) / f"out-{run}-{'stream' if stream else 'memory'}"
            r = quantize(args.model, out, RUNS[run], stream, args.stop_after)
            r["run"] = run
            rows.append(r)
            print(json.dumps(r), flush=True)
        a, b = Path(args.work) / f"out-{run}-stream", Path(args.work) / f"out-{run}-memory"
        if a.is_dir() and b.is_dir() and args.stop_after is None:
            same = same_checkpoint(a, b)
            rows[-1]["identical_to_stream"] = same["identical"]
            if not same["identical"]:
                rows[-1]["difference"] = same
                continue  # kept for a look
        for p in (a, b):
            shutil.rmtree(p, ignore_errors=True)
    return {"model": args.model, "rows": rows}


def cmd_identity(args) -> dict:
    rows = []
    for run in args.run:
        flags = list(RUNS[run])
        if "--calib-samples" not in flags and run in ("gptq", "awq"):
            flags += ["--calib-samples", str(args.calib_samples)]
        outs = {}
        for stream in (True, False):
            outs[stream] = Path(args.work) / f"id-{run}-{'stream' if stream else 'memory'}"
            r = quantize(args.model, outs[stream], flags, stream)
            print(json.dumps({"run": run, **r}), flush=True)
        rows.append({"run": run, "flags": flags, **same_checkpoint(outs[True], outs[False])})
        print(json.dumps(rows[-1]), flush=True)
        for p in outs.values():
            shutil.rmtree(p, ignore_errors=True)
    return {"model": args.model, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder")
    m.add_argument("--layers", type=int, default=26)
    r = sub.add_parser("rss")
    r.add_argument("model")
    r.add_argument("--run", nargs="+", default=["rtn", "hqq", "gptq"], choices=sorted(RUNS))
    r.add_argument("--work", default="/tmp/pq-stream-bench")
    r.add_argument("--stop-after", type=int, help="SIGTERM each run after this many units / blocks (a partial row)")
    i = sub.add_parser("identity")
    i.add_argument("--model", default="default")
    i.add_argument("--run", nargs="+", default=["rtn", "gptq", "awq"], choices=sorted(RUNS))
    i.add_argument("--calib-samples", type=int, default=32)
    i.add_argument("--work", default="/tmp/pq-stream-bench")
    args = ap.parse_args()
    if args.cmd == "make":
        res = make(Path(args.folder), layers=args.layers)
    else:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        res = cmd_rss(args) if args.cmd == "rss" else cmd_identity(args)
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(json.dumps(res, indent=1))
    if args.cmd != "make":
        RESULTS.mkdir(exist_ok=True)
        part = f"-first{args.stop_after}" if getattr(args, "stop_after", None) else ""
        name = f"streaming-{args.cmd}-{'-'.join(args.run)}{part}-{time.strftime('%Y-%m-%d')}.json"
        (RESULTS / name).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
