"""GPTQ step by step on single Linears, same Hessian: polyquant's ``gptq_quantize`` against
GPTQModel's ``GPTQ.quantize`` (and RTN), at several dampening values.

Two stages (GPTQModel lives in its own virtualenv, see peer_gptqmodel.py):

    python benchmarks/gptq_layer_vs_gptqmodel.py dump --out /tmp/hessians.pt          # polyquant env
    .venv-gptqmodel/bin/python benchmarks/gptq_layer_vs_gptqmodel.py compare --hessians /tmp/hessians.pt

``dump`` runs the float default model over 32 x 512 pydoc calibration windows, 32 x 512 enwiki
calibration windows (each text's calibration slice) and 8 x 512 held-out windows of each text
(their evaluation slices), and keeps each chosen Linear's weight and Hessians
(``HessianCollector``: ``2/n sum x x^T``). ``compare`` quantizes each weight from the calibration
Hessian and prints the relative output error ``tr(D H D^T) / tr(W H W^T)`` (D = W - Q) on the
calibration Hessian and on the held-out ones: in domain (pydoc) and out of domain (enwiki).
"""
from __future__ import annotations

import argparse
import json

import torch

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.15.self_attn.o_proj",
          "model.layers.15.mlp.gate_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.down_proj"]


def dump(out: str) -> None:
    import polyquant
    from polyquant import data
    from polyquant.calibration import calibration_data
    from polyquant.calibration.stats import HessianCollector
    model, tok = polyquant.load_model("default")
    mods = dict(model.named_modules())
    en = data.enwiki_text()
    sets = {"pydoc_cal": calibration_data(tok, n_samples=32, seqlen=512, seed=0, mix=("pydoc",)),
            "enwiki_cal": calibration_data(tok, n_samples=32, seqlen=512, seed=0, mix=("enwiki",))}
    ev = data.eval_tokens(tok)
    sets["pydoc_eval"] = [ev[i * 512:(i + 1) * 512].unsqueeze(0) for i in range(8)]
    ee = data.eval_tokens(tok, en, holdout=True)
    sets["enwiki_eval"] = [ee[i * 512:(i + 1) * 512].unsqueeze(0) for i in range(8)]
    res = {"W": {n: mods[n].weight.detach().clone() for n in LAYERS}, "H": {}, "n": {}}

    class Stop(Exception):
        pass

    def stop(m, a):
        raise Stop
    for s, wins in sets.items():
        cols = {n: HessianCollector(mods[n].in_features) for n in LAYERS}
        hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: cols[n].add(a[0])) for n in LAYERS]
        hs.append(model.model.norm.register_forward_pre_hook(stop))
        with torch.no_grad():
            for w in wins:
                try:
                    model(input_ids=w)
                except Stop:
                    pass
        for h in hs:
            h.remove()
        res["H"][s] = {n: c.H.clone() for n, c in cols.items()}
        res["n"][s] = cols[LAYERS[0]].n
    torch.save(res, out)


def _rel(W, Q, H) -> float:
    D = W - Q
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def compare(path: str, calib: str, bits: int, out: str | None) -> None:
    from torch import nn

    from polyquant.methods import RTNConfig
    from polyquant.methods.gptq import GPTQConfig, gptq_quantize
    from polyquant.methods.rtn import rtn_quantize
    try:
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ
    except ImportError:
        GPTQ = None

    def gm(W, H, n, damp):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data.copy_(W)
        g = GPTQ(lin, QuantizeConfig(bits=bits, group_size=64, sym=True, desc_act=False, damp_percent=damp))
        g.quantizer.configure(perchannel=True)
        g.H, g.nsamples = H.clone(), n
        return g.quantize(blocksize=128)[0].float()

    d = torch.load(path)
    rows = []
    for name, W in d["W"].items():
        Hc, n = d["H"][calib][name], d["n"][calib]
        res = {"rtn": rtn_quantize(W, RTNConfig(bits=bits, group_size=64, sym=True)).dequantize(torch.float32)}
        for damp in (0.01, 0.05, 0.1, 0.2):
            cfg = GPTQConfig(bits=bits, group_size=64, damp_percent=damp, scale_dtype="float32")
            res[f"polyquant d{damp}"] = gptq_quantize(W, cfg, {"H": Hc, "n": n}).dequantize(torch.float32)
            if GPTQ is not None and damp <= 0.1:
                res[f"gptqmodel d{damp}"] = gm(W, Hc, n, damp)
        cfg = GPTQConfig(bits=bits, group_size=64, damp_percent=0.05)  # the default fp16 scales
        res["polyquant d0.05 fp16"] = gptq_quantize(W, cfg, {"H": Hc, "n": n}).dequantize(torch.float32)
        print(f"== {name} (calibration {calib}, W{bits} g64 sym, group-aware order)")
        ref = res.get("gptqmodel d0.05")
        for k, Q in res.items():
            if ref is not None:  # same grid point as GPTQModel's, weight by weight
                step = ref.reshape(ref.shape[0], -1, 64).abs().amax(-1, keepdim=True) / 7.5  # one grid step
                diff = (Q - ref).reshape(step.shape[0], -1, 64).abs()
                same = float(diff.le(0.25 * step).float().mean())
                print(f"  {k:18s} equal to gptqmodel d0.05 at {same:.4f} of the weights")
            row = {"layer": name, "calib": calib, "bits": bits, "run": k, "calibration": _rel(W, Q, Hc),
                   "pydoc_heldout": _rel(W, Q, d["H"]["pydoc_eval"][name]),
                   "enwiki_heldout": _rel(W, Q, d["H"]["enwiki_eval"][name])}
            rows.append(row)
            print(f"  {k:18s} calibration {row['calibration']:.5f}  pydoc held-out {row['pydoc_heldout']:.5f}"
                  f"  enwiki held-out {row['enwiki_heldout']:.5f}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=("dump", "compare"))
    ap.add_argument("--out")
    ap.add_argument("--hessians", default="/tmp/hessians.pt")
    ap.add_argument("--calib", default="pydoc_cal", choices=("pydoc_cal", "enwiki_cal"))
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.stage == "dump":
        dump(a.out or a.hessians)
    else:
        compare(a.hessians, a.calib, a.bits, a.out)


if __name__ == "__main__":
    main()
