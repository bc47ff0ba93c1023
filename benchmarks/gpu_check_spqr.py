"""GPU check (prepared; run where a CUDA GPU, transformers and ``spqr_quant`` are installed): our SpQR
checkpoint loaded by transformers + spqr_quant gives polyquant's logits.

    pip install -c /work/notes/torch-constraint.txt "spqr_quant[gpu]" accelerate   # on the GPU machine
    python benchmarks/gpu_check_spqr.py --out /tmp/gpu_check_spqr.json [--model default]

Steps: quantize a model with SpQR (3-bit, the transformers layout; a tiny seeded Llama by default,
``--model default`` for SmolLM2-135M) on the CPU, save it with ``format="spqr"``, then

1. per layer: ``spqr_quant``'s ``QuantizedLinear.dequantize()`` (its CUDA ``dequantize_compressed``
   of our ``dense_weights`` / ``row_offsets`` / ``col_vals``) against polyquant's dequantized weight in
   the permuted order (float16 arithmetic there, so a tolerance of float16 rounding);
2. the whole model: ``transformers.AutoModelForCausalLM.from_pretrained(dir, dtype=float16,
   device_map="cuda")`` (``SpQRHfQuantizer``) on a few token windows against polyquant's loaded
   checkpoint (reference kernel, float32 on the CPU): max |logit difference|, relative error, top-1
   agreement.

Prints one JSON object (and writes it to ``--out``); exit status 1 when a check fails.
Pass: every layer's max |w_spqr_quant - w_polyquant| <= 2e-3 * max|w| + 1e-4, the model's logits
relative error (Frobenius) < 2e-2 and top-1 agreement >= 0.95 (float16 activations vs float32).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _model(name: str):
    import polyquant
    if name == "default":
        return polyquant.load_model("default")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import polyquant
    from polyquant.methods.spqr import SpQRConfig
    from polyquant.nn import QuantLinear

    res: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        res["error"] = "no CUDA device: transformers' SpQR path and spqr_quant need one"
        print(json.dumps(res))
        return 1
    res["gpu"] = torch.cuda.get_device_name(0)
    model, tok = _model(a.model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, vocab, (1, 128), generator=g) for _ in range(8)]
    q = polyquant.quantize(model, SpQRConfig(bits=3), calibration=calib, show_progress=False)
    folder = Path(a.dir or tempfile.mkdtemp(prefix="spqr-gpu-check-")) / "spqr"
    polyquant.save(q, folder, format="spqr", tokenizer=tok, overwrite=True)
    res["checkpoint"] = str(folder)
    ours, _ = polyquant.load(folder, kernel="reference")

    ok = True
    # 1. per-layer dequantization by spqr_quant's CUDA code
    try:
        import spqr_quant
        from safetensors.torch import load_file
        res["spqr_quant"] = getattr(spqr_quant, "__version__", "unknown")
        from spqr_quant import QuantizedLinear as SQL
        tensors = {}
        for f in folder.glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        layers = {}
        for n, m in ours.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            qw = m.quantized_weight
            rows, cols = qw.shape
            lin = SQL(rows, cols, 3, 16, 16, *(tensors[f"{n}.{k}"].cuda() for k in
                                                ("dense_weights", "row_offsets", "col_vals")),
                      tensors[f"{n}.in_perm"].cuda() if tensors[f"{n}.in_perm"].numel() else None)
            w_sq = lin.dequantize().float().cpu()  # permuted order
            perm = qw.extras.get("in_perm")
            w_pq = qw.dequantize() if perm is None else qw.dequantize()[:, perm.long() & 0xFFFF]
            err = float((w_sq - w_pq).abs().max())
            tol = 2e-3 * float(w_pq.abs().max()) + 1e-4
            layers[n] = {"max_abs_diff": err, "tol": tol, "ok": err <= tol}
            ok &= err <= tol
        res["layers"] = layers
    except Exception as e:  # noqa: BLE001 - the report says what failed
        res["layers_error"] = f"{type(e).__name__}: {e}"
        ok = False

    # 2. the model through transformers
    try:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cuda")
        x = torch.randint(0, vocab, (2, 64), generator=g)
        with torch.inference_mode():
            ref = ours(x).logits.float()
            got = hf(x.cuda()).logits.float().cpu()
        rel = float((got - ref).norm() / ref.norm())
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        res["model"] = {"max_abs_diff": float((got - ref).abs().max()), "rel_err": rel, "top1": top1,
                        "ok": rel < 2e-2 and top1 >= 0.95}
        ok &= res["model"]["ok"]
    except Exception as e:  # noqa: BLE001
        res["model_error"] = f"{type(e).__name__}: {e}"
        ok = False
    res["ok"] = bool(ok)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
