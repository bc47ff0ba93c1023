"""The fine-tuning commands: ``polyquant finetune-ternary`` trains an ordinary model into a BitNet b1.58
(ternary) one and writes a BitNet checkpoint (:mod:`polyquant.finetune.ternary`); ``polyquant
finetune-aqlm`` tunes an AQLM checkpoint's code books, scales and norms end to end against the float
model (:mod:`polyquant.finetune.codebook`). Both resume from ``.<output>.finetune-resume``."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command, positive
from polyquant.cli.paths import (check_model_arg, check_output, dir_bytes, is_checkpoint, read_text_arg, recorded_source,
                                 source_of)
from polyquant.cli.render import err, out


def _schedule_args(steps: int, lr: float, every: int) -> list:
    """The distillation schedule's options, shared by the fine-tuning commands."""
    return [arg("--steps", type=positive, default=steps, help=f"optimizer steps (default {steps})"),
            arg("--seq-len", type=positive, default=512, help="tokens per window (default 512)"),
            arg("--batch-size", type=positive, default=1, help="windows per step (default 1)"),
            arg("--lr", type=float, default=lr, help=f"peak AdamW learning rate (default {lr:g})"),
            arg("--checkpoint-every", type=int, default=every, help=f"steps between checkpoints (default {every})")]


def _run_args(text_default: str) -> list:
    return [arg("--text", metavar="FILE", help=f"training text (default: {text_default})"),
            arg("--seed", type=int, default=0, help="window seed (default 0)"),
            arg("--threads", type=positive, metavar="N", help="torch threads"),
            arg("-o", "--output", required=True, metavar="DIR", help="output folder"),
            arg("--overwrite", action="store_true", help="replace an existing output folder"),
            arg("-q", "--quiet", action="store_true", help="no progress bar")]


def _finish(model, fmt: str, what: str, folder: Path, resume: Path, tok, cfg, info: dict, args, t0: float) -> int:
    """Save the tuned model and its loss history (``finetune.json``), drop the resume state, report."""
    from polyquant.formats import save
    from polyquant.report.store import atomic_write_text
    save(model, folder, format=fmt, tokenizer=tok, overwrite=args.overwrite)
    atomic_write_text(folder / "finetune.json", json.dumps({"config": cfg.to_dict(), "losses": info["losses"],
                                                            "seconds": info["seconds"]}, indent=1))
    shutil.rmtree(resume, ignore_errors=True)
    kl = f"; KL {info['losses'][0]:.4f} -> {info['losses'][-1]:.4f}" if info["losses"] else ""
    out(f"wrote {folder} ({what}, {dir_bytes(folder) / 1e6:.1f} MB){kl} over {cfg.steps} steps "
        f"in {time.perf_counter() - t0:.0f} s")
    return 0


@command("finetune-ternary", help="train a ternary BitNet b1.58 model from a float one (distillation)", order=25,
         description="Replace the model's Linears by ternary BitLinears (absmean weights, int8 per-token "
                     "activations, straight-through gradients) and train them for --steps steps on windows of "
                     "the calibration text with the float model's logits as the teacher (KL), on the CPU; then "
                     "write a BitNet checkpoint (transformers' quant_method bitnet). State is checkpointed every "
                     "--checkpoint-every steps in .<output>.finetune-resume beside the output: a rerun with the "
                     "same arguments resumes (to the same weights as an uninterrupted run).",
         args=[arg("model", metavar="MODEL", help="'default', a local Hugging Face folder or a .gguf"),
               *_schedule_args(200, 1e-4, 25),
               arg("--quant-warmup", type=int, default=50,
                   help="steps over which quantization is blended in (default 50; 0: ternary from the start)"),
               arg("--linear-class", choices=("autobitlinear", "bitlinear"), default="autobitlinear",
                   help="BitNet class written (default autobitlinear, as Microsoft's BitNet b1.58 2B4T)"),
               *_run_args("the built-in pydoc text's calibration slice")])
def cmd_finetune_ternary(args) -> int:
    """Fine-tune ternary and save a BitNet checkpoint."""
    import torch

    import polyquant
    from polyquant.data import calibration_tokens, tokenize
    from polyquant.finetune.ternary import TernaryFinetuneConfig, finetune_ternary, to_bitnet
    check_model_arg(args.model, allow_checkpoint=False)
    folder = Path(args.output).expanduser()
    check_output(folder, args.overwrite)
    cfg = TernaryFinetuneConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                quant_warmup=args.quant_warmup, checkpoint_every=args.checkpoint_every,
                                linear_class=args.linear_class, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text_arg(args.text, "--text")
    model, tok = polyquant.load_model(args.model)
    tokens = tokenize(tok, text) if text is not None else calibration_tokens(tok)
    resume = folder.parent / f".{folder.name}.finetune-resume"
    t0 = time.perf_counter()
    student, info = finetune_ternary(model, tokens, cfg, checkpoint_dir=resume, show_progress=not args.quiet)
    if info["resumed_from"]:
        err(f"polyquant: resumed from step {info['resumed_from']} ({resume})")
    q = to_bitnet(student, cfg, info)
    q.polyquant.source = source_of(args.model)
    return _finish(q, "bitnet", f"bitnet {cfg.linear_class}, {len(info['modules'])} ternary layers", folder, resume,
                   tok, cfg, info, args, t0)


@command("finetune-aqlm", help="tune an AQLM checkpoint end to end against the float model (distillation)", order=26,
         description="Load an AQLM checkpoint, make its code books, per-row scales and norms trainable (codes fixed) "
                     "and train them for --steps steps on windows of the calibration text with the float model's "
                     "logits as the teacher (KL): the AQLM paper's global fine-tuning, after the per-layer fit and "
                     "the optional block fine-tuning of `quantize --method aqlm`. Writes an AQLM checkpoint of the "
                     "same layout. The teacher is --teacher, else the model the checkpoint was quantized from "
                     "(polyquant.json's source). State is checkpointed every --checkpoint-every steps in "
                     ".<output>.finetune-resume beside the output: a rerun with the same arguments resumes.",
         args=[arg("checkpoint", metavar="CHECKPOINT", help="an AQLM checkpoint folder"),
               arg("--teacher", metavar="MODEL", help="the float model ('default', a local folder or a .gguf; "
                                                      "default: the checkpoint's source)"),
               *_schedule_args(100, 1e-3, 10),
               arg("--freeze-norms", action="store_true", help="train code books and scales only"),
               *_run_args("the calibration slices of the built-in pydoc + enwiki mix, as quantize calibrates")])
def cmd_finetune_aqlm(args) -> int:
    """Tune an AQLM checkpoint globally and save it."""
    import torch

    import polyquant
    from polyquant.calibration import calibration_stream
    from polyquant.data import tokenize
    from polyquant.finetune.codebook import CodebookFinetuneConfig, finetune_codebooks
    from polyquant.formats import load
    ckpt = Path(args.checkpoint).expanduser()
    if not is_checkpoint(ckpt):
        raise UsageError(f"{args.checkpoint!r} is not a quantized checkpoint folder (quantize it first: "
                         f"polyquant quantize MODEL --method aqlm -o DIR)")
    qcfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "aqlm":
        raise UsageError(f"{args.checkpoint!r} is a {qcfg.get('quant_method')!r} checkpoint; finetune-aqlm tunes "
                         "aqlm checkpoints (for ternary models see finetune-ternary)")
    teacher_spec = args.teacher or recorded_source(ckpt)
    if not teacher_spec:
        raise UsageError(f"{args.checkpoint!r} does not record the model it was quantized from: give --teacher MODEL")
    check_model_arg(teacher_spec, allow_checkpoint=False)
    folder = Path(args.output).expanduser()
    check_output(folder, args.overwrite)
    if folder.resolve() == ckpt.resolve():
        raise UsageError("the output must be a new folder: the source checkpoint is never modified")
    cfg = CodebookFinetuneConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                 checkpoint_every=args.checkpoint_every, seed=args.seed,
                                 train_norms=not args.freeze_norms)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text_arg(args.text, "--text")
    teacher, tok = polyquant.load_model(teacher_spec)
    q, qtok = load(ckpt)
    tok = qtok or tok
    tokens = tokenize(tok, text) if text is not None else calibration_stream(tok)
    resume = folder.parent / f".{folder.name}.finetune-resume"
    t0 = time.perf_counter()
    tuned, info = finetune_codebooks(teacher, q, tokens, cfg, checkpoint_dir=resume, show_progress=not args.quiet)
    if info["resumed_from"]:
        err(f"polyquant: resumed from step {info['resumed_from']} ({resume})")
    tuned.polyquant.source = source_of(teacher_spec)
    return _finish(tuned, "aqlm", f"aqlm, {len(info['modules'])} tuned layers", folder, resume, tok, cfg, info, args, t0)
