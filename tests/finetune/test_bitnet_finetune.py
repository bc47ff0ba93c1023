"""Ternary fine-tuning on a tiny model: the distillation loss goes down, an interrupted run resumes to the
same weights as an uninterrupted one (bit for bit), a different config is refused, and the result saves
as a BitNet checkpoint that loads back with the same logits."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from polyquant.finetune.distill import kl_loss
from polyquant.finetune.ternary import STEBitLinear, TernaryFinetuneConfig, finetune_ternary, to_bitnet
from polyquant.formats import load, save

TOKENS = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))


def _cfg(**kw):
    base = dict(steps=6, seq_len=48, batch_size=2, lr=3e-3, lr_warmup=1, quant_warmup=2, checkpoint_every=2)
    base.update(kw)
    return TernaryFinetuneConfig(**base)


def _kl_now(student, teacher, ids):
    with torch.no_grad():
        return float(kl_loss(student(ids).logits, teacher(ids).logits, 1.0))


def test_loss_goes_down_and_the_result_saves(tmp_path):
    teacher = tiny_llama(tie=False)
    with torch.no_grad():  # a sharper teacher (a random tiny model is near uniform)
        teacher.lm_head.weight.mul_(8)
    ids = TOKENS[:96].reshape(2, 48)
    cfg = _cfg(steps=40, lr=1e-3, quant_warmup=0)
    student0, _ = finetune_ternary(teacher, TOKENS, _cfg(steps=1, lr=1e-12, quant_warmup=0), show_progress=False)
    student, info = finetune_ternary(teacher, TOKENS, cfg, show_progress=False)
    assert info["done"] and len(info["losses"]) == 40
    assert _kl_now(student, teacher, ids) < 0.9 * _kl_now(student0, teacher, ids)
    assert sum(info["losses"][-5:]) < 0.8 * sum(info["losses"][:5])
    assert sum(isinstance(m, STEBitLinear) for m in student.modules()) == 14
    q = to_bitnet(student, cfg, info)
    assert q.polyquant.method == "bitnet"
    out = save(q, tmp_path / "ft")
    back, _ = load(out)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_resume_gives_the_same_weights(tmp_path):
    teacher = tiny_llama(tie=False)
    cfg = _cfg()
    full, _ = finetune_ternary(teacher, TOKENS, cfg, show_progress=False)
    part, info = finetune_ternary(teacher, TOKENS, cfg, checkpoint_dir=tmp_path, stop_after=3, show_progress=False)
    assert not info["done"] and info["step"] == 3
    resumed, info = finetune_ternary(teacher, TOKENS, cfg, checkpoint_dir=tmp_path, show_progress=False)
    assert info["resumed_from"] == 3 and info["done"]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another fine-tuning config"):
        finetune_ternary(teacher, TOKENS, _cfg(lr=1e-3), checkpoint_dir=tmp_path, show_progress=False)


@pytest.mark.parametrize("kw,field", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"linear_class": "x"}, "linear_class")])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        TernaryFinetuneConfig(**kw)
