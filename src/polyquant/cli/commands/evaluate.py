"""``polyquant eval`` (perplexity, KL / top-1, size, speed) and ``polyquant info`` (a checkpoint's contents)."""
from __future__ import annotations

import logging
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command, group, positive
from polyquant.cli.paths import check_model_arg, is_checkpoint, load_any, read_text_arg, recorded_source
from polyquant.cli.render import out, print_json, print_mapping

log = logging.getLogger("polyquant.cli")

_EVAL_ARGS = [
    arg("model", metavar="MODEL_OR_CKPT"),
    arg("--text", metavar="FILE", help="evaluation text (default: the built-in pydoc text)"),
    arg("--seqlen", type=positive, default=512, help="tokens per window (default 512)"),
    arg("--max-windows", type=positive, metavar="N", help="evaluate at most N windows"),
    arg("--threads", type=positive, metavar="N", help="torch threads"),
    group(arg("--reference", metavar="MODEL", help="unquantized model for KL / top-1 (default: the "
                                                   "checkpoint's recorded source when it is 'default')"),
          arg("--no-reference", action="store_true", help="skip KL / top-1")),
    arg("--decode-tokens", type=positive, default=64, help="tokens to decode for speed (default 64)"),
    arg("--no-speed", action="store_true", help="skip the speed measurement"),
    arg("--kernel", help="run quantized layers with this kernel (default: auto)"),
    arg("--fuse", action="store_true", help="run q/k/v and gate/up as one packed matmul each (exact; faster decode)"),
    arg("--head-dtype", choices=("float32", "bfloat16"),
        help="compute the float lm_head in this dtype (bfloat16 is a lossy float cast, not quantization: "
             "faster decode, check the perplexity); recorded under 'runtime'"),
    arg("--runtime", choices=("plain", "fast", "graph", "llama.cpp"), default="plain",
        help="decode runtime: 'plain' (the model's own forward) or 'fast' (static KV cache, fused projections, "
             "the same greedy tokens; Llama-family decoders, others fall back with the reason recorded); "
             "'graph' (on a GPU each token is one CUDA graph launch of that step; eagerly elsewhere); "
             "'llama.cpp' scores and times a .gguf with llama.cpp's own binaries ($LLAMA_CPP_BIN or PATH)"),
    arg("-q", "--quiet", action="store_true", help="no progress bars"),
    arg("--json", action="store_true", help="print one JSON object"),
]


@command("eval", help="perplexity, KL / top-1 to the reference, size, speed", args=_EVAL_ARGS, order=20,
         description="Evaluate a model or quantized checkpoint: perplexity on the text, KL and top-1 agreement "
                     "with the unquantized reference, weight size, decode speed (prefill and decode phases "
                     "show a progress bar; about 15-90 s on the default model at one thread).")
def cmd_eval(args) -> int:
    import polyquant
    from polyquant.nn import runtime as rt
    from polyquant.nn import set_kernels

    if args.runtime == "llama.cpp":  # a GGUF scored and timed by llama.cpp's own binaries
        from polyquant.cli.commands.export import eval_gguf_llamacpp
        return eval_gguf_llamacpp(args)
    if str(args.model).endswith(".onnx"):  # an exported ONNX decoder: scored and timed in onnxruntime
        from polyquant.cli.commands.export import eval_onnx
        return eval_onnx(args)
    check_model_arg(args.model)
    if args.reference:
        check_model_arg(args.reference, allow_checkpoint=False)
    text = read_text_arg(args.text, "--text")
    if args.quiet:
        from polyquant.cli.commands.quantize import _quiet_loaders
        _quiet_loaders()
    model, tok = load_any(args.model)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer files; evaluation needs one")
    if args.kernel:
        set_kernels(model, args.kernel)
    if args.fuse:
        rt.fuse_projections(model)  # exact: the members' codes and scales concatenated
    if args.head_dtype:
        import torch
        rt.set_float_dtype(model, getattr(torch, args.head_dtype), scope="lm_head")
    reference = None
    if not args.no_reference:
        ref_spec = args.reference
        if ref_spec is None and is_checkpoint(args.model):
            src = recorded_source(args.model)
            if src == "default":
                ref_spec = "default"
            else:
                log.warning("no reference model for KL/top1 (checkpoint source: %s); pass --reference MODEL", src)
        if ref_spec is not None:
            reference, _ = polyquant.load_model(ref_spec)
    res = polyquant.evaluate(model, tok, text=text, seqlen=args.seqlen, max_windows=args.max_windows,
                             reference=reference, threads=args.threads, decode_tokens=args.decode_tokens,
                             measure_speed=not args.no_speed, show_progress=not args.quiet,
                             runtime=args.runtime)
    res["runtime"] = rt.runtime_info(model)  # float compute dtype and fused groups, as measured
    if args.json:
        print_json(res, indent=None)
    else:
        print_mapping(res)
    return 0


@command("info", help="what is in a checkpoint", order=21,
         description="Show a checkpoint's format, method, bits, group, layers and size.",
         args=[arg("checkpoint", metavar="CKPT"), arg("--json", action="store_true", help="print JSON")])
def cmd_info(args) -> int:
    from polyquant.formats import checkpoint_info
    p = Path(args.checkpoint).expanduser()
    if not p.exists():
        raise UsageError(f"checkpoint {args.checkpoint!r} does not exist")
    if not p.is_dir():
        raise UsageError(f"checkpoint {args.checkpoint!r} is not a folder")
    if not (p / "config.json").is_file():
        raise UsageError(f"{args.checkpoint!r} has no config.json: not a Hugging Face checkpoint folder")
    info = checkpoint_info(p)
    from polyquant.formats.spqr import outlier_info  # SpQR: the share of weights kept as sparse outliers
    info.update(outlier_info(p) or {})
    if args.json:
        print_json(info)
    else:
        print_mapping(info)
    return 0

