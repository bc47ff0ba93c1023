"""``polyquant export``: a model or checkpoint -> a file another runtime runs (GGUF for llama.cpp,
ONNX for onnxruntime), keeping polyquant's codes and scales where the target's grid holds them.

Also :func:`eval_onnx`, what ``polyquant eval OUT.onnx`` runs: perplexity on the same windows as
``polyquant eval`` and greedy decode tok/s, both inside onnxruntime; and :func:`eval_gguf_llamacpp`,
what ``polyquant eval OUT.gguf --runtime llama.cpp`` runs: llama-perplexity and llama-bench."""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command
from polyquant.cli.paths import check_model_arg
from polyquant.cli.render import out, print_json, print_mapping

_TARGETS = ("gguf", "onnx")
# polyquant.export.gguf.GGUF_TYPES (kept literal: importing the exporter here would load torch for --help);
# tests/export/test_gguf.py asserts they agree
_GGUF_TYPES = ("auto", "Q4_0", "Q4_1", "Q8_0", "TQ1_0", "TQ2_0")


@command("export", help="export to GGUF (llama.cpp) or ONNX (onnxruntime)", order=45,
         description="Write a model or quantized checkpoint as one file another runtime runs: --to gguf "
                     "(llama.cpp; Q4_0 / Q4_1 / Q8_0 and ternary TQ1_0 / TQ2_0 blocks packed from polyquant's codes and scales, re-rounded "
                     "with the loss reported where the grid differs; act-order refused) or --to onnx "
                     "(onnxruntime; a decoder with KV cache, quantized MatMuls as com.microsoft.MatMulNBits). "
                     "A layer the target cannot hold is refused by name with the reason.",
         args=[arg("model", metavar="MODEL_OR_CKPT"),
               arg("--to", required=True, choices=_TARGETS, help="target runtime's format"),
               arg("-o", "--output", required=True, metavar="FILE", help="output file (.gguf / .onnx)"),
               arg("--type", default="auto", choices=_GGUF_TYPES,
                   help="gguf: type of the quantized layers (default auto: the one that holds each exactly; "
                        "TQ1_0 / TQ2_0: ternary, rows a multiple of 256)"),
               arg("--float-type", default="F16", choices=("F32", "F16", "Q8_0"),
                   help="gguf: type of float 2-D tensors such as the embeddings (default F16)"),
               arg("--no-requantize", action="store_true",
                   help="gguf: refuse layers whose grid is not --type's instead of re-rounding them"),
               arg("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4),
                   help="onnx: MatMulNBits accuracy_level (0 exact float activations .. 4 int8 activations)"),
               arg("--dynamo", action="store_true", help="onnx: use the torch.export-based exporter"),
               arg("--overwrite", action="store_true", help="replace an existing output file"),
               arg("--json", action="store_true", help="print one JSON object")])
def cmd_export(args) -> int:
    """Export a model (``polyquant.export``)."""
    from polyquant.export import ExportError, export
    check_model_arg(args.model)
    target = Path(args.output).expanduser()
    if target.exists() and not args.overwrite:
        raise UsageError(f"{target} exists; pass --overwrite to replace it")
    opts = ({"type": args.type, "float_type": args.float_type, "requantize": not args.no_requantize}
            if args.to == "gguf" else {"accuracy_level": args.accuracy_level, "dynamo": args.dynamo})
    try:
        res = export(args.model, to=args.to, out=target, overwrite=args.overwrite, **opts)
    except ExportError as e:
        raise UsageError(str(e)) from None
    summary = res.summary()
    if args.json:
        print_json({**summary, "layers_detail": res.layers}, indent=None)
        return 0
    requant = {n: i for n, i in res.layers.items() if i.get("source") == "requantized"}
    out(f"wrote {target} ({res.bytes / 1e6:.1f} MB, {args.to}) in {res.seconds:.1f} s")
    print_mapping({k: v for k, v in summary.items() if k not in ("path",)})
    for n, i in list(requant.items())[:20]:
        out(f"  re-rounded {n} -> {i['type']}: {i.get('reason')} (max abs err {i.get('max_abs_err'):.3g}, "
            f"SQNR {i.get('sqnr_db')} dB)")
    return 0


def eval_onnx(args) -> int:
    """``polyquant eval OUT.onnx``: perplexity on polyquant's windows and greedy decode tok/s, both
    run by onnxruntime (CPU provider); the tokenizer and config come from ``OUT.onnx.tokenizer/``."""
    from transformers import AutoTokenizer

    from polyquant import data
    from polyquant.eval.perplexity import make_windows, score_windows
    from polyquant.export.onnx import OnnxCausalLM
    path = Path(args.model).expanduser()
    if not path.is_file():
        raise UsageError(f"model {args.model!r} does not exist")
    side = Path(str(path) + ".tokenizer")
    if not (side / "config.json").is_file():
        raise UsageError(f"{side} (config and tokenizer written by polyquant export) is missing")
    threads = getattr(args, "threads", None) or 1
    model = OnnxCausalLM(path, threads=threads)
    tok = AutoTokenizer.from_pretrained(str(side))
    text = data.load_text(args.text) if getattr(args, "text", None) else None
    stream = data.eval_tokens(tok, text)
    windows = make_windows(stream, args.seqlen, args.max_windows)
    scored = score_windows(model, windows, show_progress=not getattr(args, "quiet", False))
    res = {"model": str(path), "runtime": "onnxruntime", "ppl": scored["ppl"], "nll": scored["nll"],
           "windows": int(windows.shape[0]), "seqlen": args.seqlen, "tokens": int(windows.numel()),
           "eval_seconds": round(scored["eval_seconds"], 2), "threads": threads, "file_bytes": path.stat().st_size}
    if not getattr(args, "no_speed", False):
        n = getattr(args, "decode_tokens", 64)
        prompt = stream[:32]
        model.greedy(prompt, 4)
        secs = [model.greedy(prompt, n)[1] for _ in range(3)]
        res.update(decode_tok_s=round((n - 1) / statistics.median(secs), 2), decode_tokens=n, decode_runs=3)
    if getattr(args, "json", False):
        print_json(res, indent=None)
    else:
        print_mapping({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in res.items()})
    return 0


def eval_gguf_llamacpp(args) -> int:
    """``polyquant eval OUT.gguf --runtime llama.cpp``: perplexity by ``llama-perplexity`` (llama.cpp's
    kernels and protocol: each window of ``--seqlen`` tokens scored on its second half, so it reads
    lower than polyquant's whole-window perplexity) over the evaluation part of the text (the first
    90 % of the default text; at most ``--max-windows`` windows), and decode tok/s by ``llama-bench``.
    The binaries come from ``$LLAMA_CPP_BIN`` or PATH (:mod:`polyquant.eval.llamacpp`)."""
    import tempfile

    from transformers import AutoTokenizer

    from polyquant import data
    from polyquant.eval import llamacpp as lc
    path = Path(args.model).expanduser()
    if path.suffix != ".gguf":
        raise UsageError(f"--runtime llama.cpp runs a .gguf file (polyquant export --to gguf), got {args.model!r}")
    if not path.is_file():
        raise UsageError(f"model {args.model!r} does not exist")
    try:
        lc.find_bin("llama-perplexity")
    except lc.LlamaCppError as e:
        raise UsageError(str(e)) from None
    threads = getattr(args, "threads", None) or 1
    text = data.load_text(args.text) if getattr(args, "text", None) else None
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    n_eval = len(data.eval_tokens(tok, text))
    chunks = n_eval // args.seqlen
    if args.max_windows:
        chunks = min(chunks, args.max_windows)
    if chunks < 1:
        raise UsageError(f"the text has {n_eval} evaluation tokens, fewer than --seqlen {args.seqlen}")
    with tempfile.TemporaryDirectory(prefix="polyquant-llamacpp-") as tmp:
        tf = Path(tmp) / "text.txt"
        tf.write_text(text if text is not None else data.default_text(), encoding="utf-8")
        try:
            ppl = lc.perplexity(None, path, tf, ctx=args.seqlen, chunks=chunks, threads=threads)
            speed = None if getattr(args, "no_speed", False) else lc.bench(
                None, path, n_gen=getattr(args, "decode_tokens", 64), threads=threads, reps=3)
        except lc.LlamaCppError as e:
            raise UsageError(str(e)) from None
    res = {"model": str(path), "runtime": "llama.cpp", "ppl": ppl["ppl"], "ppl_err": ppl["ppl_err"],
           "protocol": "llama-perplexity: second half of each window", "windows": ppl["chunks"] or chunks,
           "seqlen": args.seqlen, "threads": threads, "eval_seconds": ppl["seconds"],
           "file_bytes": path.stat().st_size}
    if speed is not None:
        res.update(decode_tok_s=round(speed["tok_s"], 2), decode_tokens=speed["n_gen"], decode_runs=3,
                   llama_cpp_build=speed["build"])
    if getattr(args, "json", False):
        print_json(res, indent=None)
    else:
        print_mapping({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in res.items()})
    return 0
