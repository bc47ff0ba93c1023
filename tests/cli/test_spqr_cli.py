"""``polyquant quantize --method spqr`` with its fields as options, and ``polyquant info`` showing the
outlier share."""
from __future__ import annotations

import json
import random

import torch

import polyquant
from helpers import tiny_llama, tiny_tokenizer_dir
from polyquant.cli import main


def test_quantize_spqr_from_the_cli_and_info_shows_the_outlier_share(tmp_path, capsys):
    d = tmp_path / "tiny"
    tiny_llama(seed=1).save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer_dir(d)
    text = tmp_path / "words.txt"
    rng = random.Random(0)
    text.write_text(" ".join(f"w{rng.randrange(250)}" for _ in range(2000)))
    out = tmp_path / "spqr"
    code = main([str(a) for a in ["quantize", d, "--method", "spqr", "--bits", "3", "--opt", "outlier_threshold=0.5",
                                  "--opt", "qq_groupsize=16", "--calib-text", text, "--calib-samples", "4",
                                  "--calib-seqlen", "32", "-o", out, "-q"]])
    _, err = capsys.readouterr()
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "spqr" and qc["bits"] == 3
    rec = json.loads((out / "polyquant.json").read_text())
    assert rec["method"] == "spqr" and rec["config"]["outlier_threshold"] == 0.5
    code = main(["info", str(out), "--json"])
    info = json.loads(capsys.readouterr()[0])
    q, _ = polyquant.load(out)
    qws = [m.quantized_weight for m in q.modules() if hasattr(m, "quantized_weight")]
    nnz = sum(w.outliers.nnz for w in qws)
    assert code == 0 and info["format"] == "spqr" and info["outliers"] == nnz > 0
    assert abs(info["outlier_share"] - nnz / sum(w.shape[0] * w.shape[1] for w in qws)) < 1e-6
    assert len(info["outlier_share_by_layer"]) == 14
    # a 2-bit run is refused by the transformers layout (the plan check, before any work), naming the other
    code = main([str(a) for a in ["quantize", d, "--method", "spqr", "--bits", "2", "--calib-text", text,
                                  "--calib-samples", "2", "--calib-seqlen", "32", "-o", tmp_path / "w2", "-q"]])
    err = capsys.readouterr()[1]
    assert code != 0 and "polyquant-spqr" in err
