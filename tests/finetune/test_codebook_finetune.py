"""Global (end-to-end) fine-tuning of an AQLM model: the KL to the float model falls on held-out
windows, only code books, scales and norms move (codes stay, the layout and kernel are kept), the
result saves as an AQLM checkpoint that loads back with the same logits, an interrupted run resumes to
the same model bit for bit, and models it does not apply to are refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import polyquant
from helpers import run_cli, tiny_llama, tiny_model_dir, words
from polyquant.calibration import Calibration
from polyquant.finetune.codebook import CodebookFinetuneConfig, finetune_codebooks
from polyquant.finetune.distill import kl_loss
from polyquant.formats import load, save
from polyquant.methods import RTNConfig
from polyquant.methods.aqlm import AQLMConfig
from polyquant.nn.quant_linear import QuantLinear

TOKENS = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))
HELD = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_llama(tie=False)
    with torch.no_grad():  # a sharper teacher (a random tiny model is near uniform)
        teacher.lm_head.weight.mul_(8)
    calib = [TOKENS[i * 48:(i + 1) * 48].reshape(1, -1) for i in range(6)]
    q = polyquant.quantize(copy.deepcopy(teacher), AQLMConfig(num_codebooks=2, nbits_per_codebook=6, max_iters=1,
                                                               init_iters=3),
                           calibration=Calibration(calib, autocast=None), show_progress=False)
    return teacher, q


def _cfg(**kw):
    return CodebookFinetuneConfig(**({"steps": 6, "seq_len": 48, "batch_size": 2, "lr": 3e-3, "lr_warmup": 1,
                                      "checkpoint_every": 2} | kw))


def _kl(model, teacher) -> float:
    with torch.no_grad():
        return float(kl_loss(model(HELD).logits, teacher(HELD).logits, 1.0))


def _layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_kl_falls_only_codebooks_scales_norms_move_and_it_saves(pair, tmp_path):
    teacher, q = pair
    before = copy.deepcopy(q.state_dict())
    tuned, info = finetune_codebooks(teacher, q, TOKENS, _cfg(steps=60, lr=1e-3), show_progress=False)
    assert info["done"] and len(info["losses"]) == 60
    assert _kl(tuned, teacher) < 0.85 * _kl(q, teacher)  # measured: 0.075 -> 0.057
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # the source is untouched
    old, new = _layers(q), _layers(tuned)
    assert old.keys() == new.keys() and len(new) == 14
    moved_norms = 0
    for n, m in new.items():
        a, b = old[n].quantized_weight, m.quantized_weight
        assert torch.equal(a.codes, b.codes) and m.kernel_name == old[n].kernel_name
        assert b.codebooks.dtype == torch.float16 and not torch.equal(a.codebooks, b.codebooks)
    for k, v in tuned.state_dict().items():
        if "norm" in k:
            moved_norms += not torch.equal(v, before[k])
        elif not k.startswith(tuple(new)) and not k.split(".")[-1].startswith(("qw_", "k_")):
            assert torch.equal(v, before[k]), k  # embeddings, head, biases frozen
    assert moved_norms > 0
    assert tuned.polyquant.method == "aqlm" and tuned.polyquant.extra["global_finetune"]["step"] == 60
    out = save(tuned, tmp_path / "ft")
    back, _ = load(out)
    with torch.no_grad():
        assert torch.equal(tuned(HELD).logits, back(HELD).logits)


def test_resume_gives_the_same_model(pair, tmp_path):
    teacher, q = pair
    full, _ = finetune_codebooks(teacher, q, TOKENS, _cfg(), show_progress=False)
    _, info = finetune_codebooks(teacher, q, TOKENS, _cfg(), checkpoint_dir=tmp_path, stop_after=3, show_progress=False)
    assert not info["done"] and info["step"] == 3
    resumed, info = finetune_codebooks(teacher, q, TOKENS, _cfg(), checkpoint_dir=tmp_path, show_progress=False)
    assert info["resumed_from"] == 3 and info["done"]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another fine-tuning config"):
        finetune_codebooks(teacher, q, TOKENS, _cfg(lr=1e-3), checkpoint_dir=tmp_path, show_progress=False)


def test_refuses_what_it_does_not_apply_to(pair):
    teacher, q = pair
    with pytest.raises(ValueError, match="quantized by polyquant"):
        finetune_codebooks(teacher, teacher, TOKENS, _cfg())
    with pytest.raises(ValueError, match="teacher must be the float model"):
        finetune_codebooks(q, q, TOKENS, _cfg())
    rtn = polyquant.quantize(teacher, RTNConfig(bits=4, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="no code-book layer"):
        finetune_codebooks(teacher, rtn, TOKENS, _cfg())
    other = tiny_llama(tie=False)
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 64, bias=False)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is \[64, 32\] there, \[64, 64\]"):
        finetune_codebooks(other, q, TOKENS, _cfg())
    with pytest.raises(ValueError, match="layer 'model.layers.1.self_attn.q_proj' is missing"):
        shallow = tiny_llama(tie=False, layers=1)
        finetune_codebooks(shallow, q, TOKENS, _cfg())
    with pytest.raises(ValueError, match="not the same vocabulary"):
        wide = tiny_llama(tie=False, vocab=300)
        finetune_codebooks(wide, q, TOKENS, _cfg())
    with pytest.raises(ValueError, match="seq_len"):
        CodebookFinetuneConfig(seq_len=1)


def test_finetune_aqlm_command(tmp_path, tmp_path_factory, capsys):
    model_dir = tiny_model_dir(tmp_path_factory, 0, "ft-aqlm")
    text = tmp_path / "text.txt"
    text.write_text(words(400, 0))
    q = tmp_path / "q"
    rc, _, err = run_cli(capsys, "quantize", model_dir, "--method", "aqlm", "--opt", "num_codebooks=1", "--opt",
                         "nbits_per_codebook=4", "--opt", "max_iters=1", "--calib-samples", "2", "--calib-seqlen", "32",
                         "--calib-text", text, "-o", q, "-q")
    assert rc == 0, err
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "finetune-aqlm", q, "--steps", "3", "--seq-len", "32", "--checkpoint-every", "1",
                         "--text", text, "-o", out, "-q")  # teacher: the recorded source
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "aqlm"
    assert json.loads((out / "polyquant.json").read_text())["global_finetune"]["step"] == 3
    assert not (tmp_path / ".out.finetune-resume").exists()
    la, lb = _layers(load(q)[0]), _layers(load(out)[0])
    assert la.keys() == lb.keys() and all(torch.equal(la[n].quantized_weight.codes, lb[n].quantized_weight.codes)
                                          for n in la)
    rtn = tmp_path / "rtn"
    assert run_cli(capsys, "quantize", model_dir, "--method", "rtn", "-o", rtn, "-q")[0] == 0
    rc, _, err = run_cli(capsys, "finetune-aqlm", rtn, "-o", tmp_path / "x", "-q")
    assert rc != 0 and "tunes aqlm checkpoints" in err
    rc, _, err = run_cli(capsys, "finetune-aqlm", model_dir, "-o", tmp_path / "x", "-q")
    assert rc != 0 and "not a quantized checkpoint" in err
