"""polyquant.json records each quantized layer's activation rule (``act_rules``: the ``ActRule``
description) and ``load`` reads it back: a dynamic rule the checkpoint's format does not describe
is rebuilt from it, so the loaded model computes what the saved one did."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import polyquant
from helpers import tiny_llama
from polyquant.activations.base import rule_of
from polyquant.activations.int8 import Int8DynamicActivation
from polyquant.formats import CheckpointError, load, save
from polyquant.nn.quant_linear import QuantLinear

Q = "model.layers.0.self_attn.q_proj"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = polyquant.quantize(tiny_llama(seed=5), polyquant.RTNConfig(bits=4, group_size=32, sym=False),
                               show_progress=False)
    # a rule the gptq format has no field for: only polyquant.json can carry it
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_quant = Int8DynamicActivation("row")
            m.set_kernel("reference")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    return model, save(model, tmp_path_factory.mktemp("act") / "m", format="gptq_v2"), ids


@pytest.fixture(scope="module")
def without_rules(saved, tmp_path_factory):
    """The same folder with ``act_rules`` removed from polyquant.json."""
    dst = tmp_path_factory.mktemp("act") / "no-rules"
    shutil.copytree(saved[1], dst)
    rec = json.loads((dst / "polyquant.json").read_text())
    del rec["act_rules"]
    (dst / "polyquant.json").write_text(json.dumps(rec))
    return dst


def test_every_layer_rule_is_written_and_read_back(saved, without_rules):
    model, path, ids = saved
    rec = json.loads((path / "polyquant.json").read_text())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(rec["act_rules"]) == set(layers)
    want = Int8DynamicActivation("row").rule.to_dict()
    assert all(d == want for d in rec["act_rules"].values())
    m2, _ = load(path, kernel="reference")
    for n in layers:
        assert rule_of(m2.get_submodule(n).act_quant) == rule_of(layers[n].act_quant)
    # the stored weights (gptq keeps fp16 scales) with the rule set by hand: the same numbers
    ref, _ = load(without_rules, kernel="reference")
    for n in layers:
        ref.get_submodule(n).act_quant = Int8DynamicActivation("row")
    assert torch.equal(_logits(m2, ids), _logits(ref, ids))


def test_without_the_record_the_rule_is_lost(saved, without_rules):
    """The control: without ``act_rules`` the folder loads weight-only (other logits), so the
    read-back above is what restores the rule."""
    _, path, ids = saved
    bare, _ = load(without_rules, kernel="reference")
    assert rule_of(bare.get_submodule(Q).act_quant) is None
    m2, _ = load(path, kernel="reference")
    assert not torch.equal(_logits(bare, ids), _logits(m2, ids))


def test_a_malformed_rule_is_refused_naming_file_and_layer(saved, tmp_path):
    _, path, _ = saved
    dst = tmp_path / "bad"
    shutil.copytree(path, dst)
    rec = json.loads((dst / "polyquant.json").read_text())
    rec["act_rules"][Q] = {**rec["act_rules"][Q], "granularity": "diagonal"}
    (dst / "polyquant.json").write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=rf"polyquant.json: act_rules\['{Q}'\]: granularity"):
        load(dst)
