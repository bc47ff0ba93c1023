"""``polyquant finetune-ternary`` on a tiny local model: writes a BitNet checkpoint that loads back."""
from __future__ import annotations

import json

from helpers import tiny_llama, tiny_tokenizer_dir
from polyquant.cli import main


def test_finetune_ternary_command(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama(tie=False).save_pretrained(str(model_dir))
    tiny_tokenizer_dir(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250}" for i in range(400)))
    out = tmp_path / "out"
    rc = main(["finetune-ternary", str(model_dir), "--steps", "3", "--seq-len", "32", "--quant-warmup", "0",
               "--checkpoint-every", "1", "--text", str(text), "-o", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitnet" and qcfg["linear_class"] == "autobitlinear"
    assert len(json.loads((out / "finetune.json").read_text())["losses"]) == 3
    assert not (tmp_path / ".out.finetune-resume").exists()
    from polyquant.formats import load
    m, tok = load(out)
    assert m.polyquant.format == "bitnet" and tok is not None
