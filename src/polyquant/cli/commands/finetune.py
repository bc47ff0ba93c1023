"""``polyquant finetune-ternary``: train an ordinary model into a BitNet b1.58 (ternary) one and write a
BitNet checkpoint (:mod:`polyquant.finetune.ternary`)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from polyquant.cli.base import arg, command, positive
from polyquant.cli.paths import check_model_arg, check_output, dir_bytes, read_text_arg, source_of
from polyquant.cli.render import err, out


@command("finetune-ternary", help="train a ternary BitNet b1.58 model from a float one (distillation)", order=25,
         description="Replace the model's Linears by ternary BitLinears (absmean weights, int8 per-token "
                     "activations, straight-through gradients) and train them for --steps steps on windows of "
                     "the calibration text with the float model's logits as the teacher (KL), on the CPU; then "
                     "write a BitNet checkpoint (transformers' quant_method bitnet). State is checkpointed every "
                     "--checkpoint-every steps in .<output>.finetune-resume beside the output: a rerun with the "
                     "same arguments resumes (to the same weights as an uninterrupted run).",
         args=[arg("model", metavar="MODEL", help="'default', a local Hugging Face folder or a .gguf"),
               arg("--steps", type=positive, default=200, help="optimizer steps (default 200)"),
               arg("--seq-len", type=positive, default=512, help="tokens per window (default 512)"),
               arg("--batch-size", type=positive, default=1, help="windows per step (default 1)"),
               arg("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)"),
               arg("--quant-warmup", type=int, default=50,
                   help="steps over which quantization is blended in (default 50; 0: ternary from the start)"),
               arg("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)"),
               arg("--linear-class", choices=("autobitlinear", "bitlinear"), default="autobitlinear",
                   help="BitNet class written (default autobitlinear, as Microsoft's BitNet b1.58 2B4T)"),
               arg("--text", metavar="FILE", help="training text (default: the built-in text's calibration slice)"),
               arg("--seed", type=int, default=0, help="window seed (default 0)"),
               arg("--threads", type=positive, metavar="N", help="torch threads"),
               arg("-o", "--output", required=True, metavar="DIR", help="output folder"),
               arg("--overwrite", action="store_true", help="replace an existing output folder"),
               arg("-q", "--quiet", action="store_true", help="no progress bar")])
def cmd_finetune_ternary(args) -> int:
    """Fine-tune ternary and save a BitNet checkpoint."""
    import torch

    import polyquant
    from polyquant.data import calibration_tokens, tokenize
    from polyquant.finetune.ternary import TernaryFinetuneConfig, finetune_ternary, to_bitnet
    from polyquant.formats import save
    from polyquant.report.store import atomic_write_text
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
    save(q, folder, format="bitnet", tokenizer=tok, overwrite=args.overwrite)
    atomic_write_text(folder / "finetune.json", json.dumps({"config": cfg.to_dict(), "losses": info["losses"],
                                                            "seconds": info["seconds"]}, indent=1))
    shutil.rmtree(resume, ignore_errors=True)
    kl = f"; KL {info['losses'][0]:.4f} -> {info['losses'][-1]:.4f}" if info["losses"] else ""
    out(f"wrote {folder} (bitnet {cfg.linear_class}, {len(info['modules'])} ternary layers, "
        f"{dir_bytes(folder) / 1e6:.1f} MB){kl} over {cfg.steps} steps in {time.perf_counter() - t0:.0f} s")
    return 0
