"""``polyquant convert``: any checkpoint polyquant reads -> a plain float Hugging Face folder."""
from __future__ import annotations

import time
from pathlib import Path

from polyquant.cli.base import UsageError, arg, command
from polyquant.cli.paths import check_output, dir_bytes
from polyquant.cli.render import out


@command("convert", help="dequantize a checkpoint to a plain float folder", order=40,
         description="Dequantize any checkpoint polyquant reads into a plain Hugging Face folder that "
                     "transformers loads without a quantization config (activation quantization is dropped).",
         args=[arg("checkpoint", metavar="CKPT"),
               arg("--to", choices=("bf16", "fp16", "fp32"), default="bf16", help="float dtype (default bf16)"),
               arg("-o", "--output", required=True, metavar="DIR", help="output folder"),
               arg("--overwrite", action="store_true", help="replace an existing output folder")])
def cmd_convert(args) -> int:
    """Dequantize a checkpoint into a plain float folder (``polyquant.convert.convert``)."""
    from polyquant.convert import convert
    p = Path(args.checkpoint).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise UsageError(f"{args.checkpoint!r} is not a checkpoint folder (no config.json)")
    folder = Path(args.output).expanduser()
    check_output(folder, args.overwrite)
    t0 = time.perf_counter()
    convert(p, to=args.to, out_dir=folder, overwrite=args.overwrite)
    out(f"wrote {folder} ({args.to}, {dir_bytes(folder) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0
