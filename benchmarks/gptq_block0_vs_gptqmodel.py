"""Issue 21: which inputs GPTQModel's GPTQ sees for a block's later Linears, checked on block 0.

Block 0's inputs are the same in both tools when GPTQModel loads the model in fp32, so its
o_proj / down_proj statistics can be rebuilt two ways: with the float q/k/v (gate/up) upstream, or
with GPTQModel's own quantized ones put in their place. polyquant's GPTQ solver run on each Hessian
is compared, code by code, with GPTQModel's o_proj / down_proj: the rule that reproduces them is
the one GPTQModel follows. Needs two checkpoints of the same calibration windows (seed 0):

    python benchmarks/bench_gptq_default.py --method gptq --seed 0 --windows 4 --save /tmp/ck/pq
    GPTQMODEL_CPU_WORKERS=2 .venv-gptqmodel/bin/python benchmarks/peer_gptqmodel.py --dtype float32 \\
        --seed 0 --windows 4 --save /tmp/ck/gm32
    python benchmarks/gptq_block0_vs_gptqmodel.py /tmp/ck/pq /tmp/ck/gm32
"""
from __future__ import annotations

import argparse
import json

import torch

import polyquant
from polyquant.calibration.stats import HessianCollector
from polyquant.methods import GPTQConfig, get_method
from polyquant.nn import QuantLinear

ATTN_IN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
MLP_IN = ATTN_IN + ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]


class _Stop(Exception):
    pass


def _stop(*_):
    raise _Stop  # block 1 reached: nothing after block 0 is needed


def _qweights(path: str) -> dict:
    model = polyquant.load(path)[0]
    return {n: m.quantized_weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _hessian(model, windows, target: str, upstream: list[str], gq: dict) -> dict:
    """Block 0's Hessian of ``target`` with ``upstream`` Linears replaced by GPTQModel's dequantized weights."""
    blk = model.model.layers[0]
    saved = {n: blk.get_submodule(n).weight.data for n in upstream}
    for n in upstream:
        blk.get_submodule(n).weight.data = gq[f"model.layers.0.{n}"].dequantize().float()
    lin = blk.get_submodule(target)
    col = HessianCollector(lin.in_features)
    hooks = [lin.register_forward_pre_hook(lambda m, a: col.add(a[0])),
             model.model.layers[1].register_forward_pre_hook(_stop)]
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(input_ids=w.reshape(1, -1), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
        for n, w in saved.items():
            blk.get_submodule(n).weight.data = w
    return col.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ours")
    ap.add_argument("gptqmodel")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = polyquant.load_model("default")
    gq, oq = _qweights(a.gptqmodel), _qweights(a.ours)
    windows = polyquant.calibration_data(tok, n_samples=32, seqlen=512, seed=a.seed, mix=("pydoc",))
    cfg = GPTQConfig(bits=4, group_size=64, sym=True, act_group_aware=True)
    spec = get_method("gptq")
    same = lambda x, y: round((x.codes == y.codes).float().mean().item() * 100, 2)
    rows = []
    for target, quantized in (("self_attn.o_proj", ATTN_IN), ("mlp.down_proj", MLP_IN)):
        for label, up in (("float upstream", []), ("GPTQModel's quantized upstream", quantized)):
            qw = spec.quantize_weight(model.model.layers[0].get_submodule(target).weight.data, cfg,
                                      _hessian(model, windows, target, up, gq))
            rows.append({"linear": f"layers.0.{target}", "upstream": label,
                         "codes_equal_to_gptqmodel_pct": same(qw, gq[f"model.layers.0.{target}"])})
    for n in ATTN_IN[:1] + ["self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]:
        rows.append({"linear": f"layers.0.{n}", "upstream": "polyquant's own run (its checkpoint)",
                     "codes_equal_to_gptqmodel_pct": same(oq[f"model.layers.0.{n}"], gq[f"model.layers.0.{n}"])})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
