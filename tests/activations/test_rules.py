"""The activation layer: every registered rule describes itself (``ActRule``), is rebuilt from that
description with identical numbers, and kernels pick rules by description."""
import pytest
import torch

from polyquant.activations import (ACT_RULES, ActivationQuantizer, ActRule, Float8DynamicActivation, Fp8ActQuant,
                                   Int8DynamicActivation, LLMInt8Activation, QuantoActivation, act_from_dict,
                                   register_act_rule, rule_of)
from polyquant.activations import base as act_base
from polyquant.kernels import KERNELS


def _rules():
    return [LLMInt8Activation(6.0), LLMInt8Activation(0.0, "float32"), Int8DynamicActivation("row"),
            Int8DynamicActivation("tensor"), Float8DynamicActivation("row", 1e-3, 10.0),
            Float8DynamicActivation("tensor"), Fp8ActQuant("fbgemm", scale_ub=1200.0), Fp8ActQuant("deepseek", 32),
            Fp8ActQuant("ct", scale=torch.tensor(0.02)), QuantoActivation("qint8", input_scale=torch.tensor(0.03)),
            QuantoActivation("qfloat8", momentum=0.8)]


@pytest.mark.parametrize("act", _rules(), ids=lambda a: f"{a.kind}-{a.extra_repr()}")
def test_rule_round_trips_through_its_description(act):
    x = torch.randn(5, 64) * 3
    x[0, 3] = 40.0  # an LLM.int8 outlier column
    d = act.to_dict()
    assert ActRule.from_dict(d) == act.rule
    tensors = {"scale": act.scale} if isinstance(act, Fp8ActQuant) and act.static else {}
    if isinstance(act, QuantoActivation):
        tensors = {"input_scale": act.input_scale}
    again = act_from_dict(d, **tensors)
    assert type(again) is type(act) and again.rule == act.rule
    assert torch.equal(again(x), act(x))


def test_every_registered_rule_is_covered_and_describes_itself():
    assert {a.kind for a in _rules()} == {"llm-int8", "int8-dynamic", "float8-dynamic", "fp8", "quanto"} <= set(ACT_RULES)
    for a in _rules():
        assert rule_of(a) == a.rule and a.rule.kind in ACT_RULES


def test_rule_description_validates():
    with pytest.raises(ValueError, match="granularity"):
        ActRule("x", "int8", "row")
    with pytest.raises(ValueError, match="group_size"):
        ActRule("x", "int8", "group")
    with pytest.raises(ValueError, match="unknown activation rule fields"):
        ActRule.from_dict({"kind": "x", "dtype": "int8", "bogus": 1})
    with pytest.raises(ValueError, match="unknown activation rule"):
        act_from_dict({"kind": "nope", "dtype": "int8"})


def test_kernels_pick_rules_by_description_and_a_new_rule_is_one_class(monkeypatch):
    monkeypatch.setattr(act_base, "ACT_RULES", dict(ACT_RULES))

    @register_act_rule
    class Halve(ActivationQuantizer):
        kind = "test-halve"

        @property
        def rule(self):
            return ActRule(self.kind, "int8", "tensor")

        @classmethod
        def from_rule(cls, rule, **tensors):
            return cls()

        def forward(self, x):
            return x * 0.5

    assert act_from_dict(Halve().to_dict())(torch.ones(2)).tolist() == [0.5, 0.5]
    int8k = KERNELS["int8-dynamic"]
    assert int8k.runs_act(Int8DynamicActivation()) and not int8k.runs_act(Halve())
    assert not int8k.runs_act(None) and KERNELS["reference"].runs_act(Halve())
    with pytest.raises(ValueError, match="already registered"):
        register_act_rule(Halve)


@pytest.mark.parametrize("args,tensors", [
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}, {}),
    ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": 16, "dynamic": True}, {}),
    ({"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False},
     {"scale": torch.tensor([0.05]), "zero_point": torch.tensor([3])}),
])
def test_a_formats_rule_describes_itself_too(args, tensors):
    from polyquant.formats.compressed_tensors import CTActivationQuant
    a = CTActivationQuant(args, **tensors)
    b = act_from_dict(a.to_dict(), **tensors)
    x = torch.randn(4, 64) * 3
    assert rule_of(a) == b.rule and a.rule.recipe == "compressed-tensors" and torch.equal(a(x), b(x))
