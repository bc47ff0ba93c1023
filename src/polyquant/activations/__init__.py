"""Activation quantization: the layer between ``tensor/`` and ``kernels/``.

One typed description of a rule (:class:`ActRule`), the rules themselves (each an
:class:`ActivationQuantizer` whose ``forward`` is the reference fake quantization) and the
registry ``ACT_RULES`` (kind -> class). Kernels declare the rules they compute natively by
description (``Kernel.act_rules``), methods produce rules (``MethodSpec.act_rule``), formats save
and rebuild them (``rule.to_dict()`` / :func:`act_from_dict`). Static rules are calibrated by
:mod:`polyquant.calibration.activations`.

Rules: ``llm-int8`` (bitsandbytes), ``int8-dynamic`` and ``float8-dynamic`` (torchao), ``fp8``
(FBGEMM / DeepSeek / compressed-tensors float8 recipes, dynamic or static), ``quanto`` (static,
calibrated).
"""
from polyquant.activations.base import (ACT_RULES, ActivationQuantizer, ActRule, act_from_dict, register_act_rule,
                                        rule_of)
from polyquant.activations.bitnet import BitNetActivation
from polyquant.activations.float8 import Float8DynamicActivation
from polyquant.activations.fp8 import Fp8ActQuant
from polyquant.activations.int8 import Int8DynamicActivation
from polyquant.activations.llm_int8 import LLMInt8Activation
from polyquant.activations.quanto import QuantoActivation

__all__ = ["ACT_RULES", "ActRule", "ActivationQuantizer", "BitNetActivation", "Float8DynamicActivation", "Fp8ActQuant",
           "Int8DynamicActivation", "LLMInt8Activation", "QuantoActivation", "act_from_dict", "register_act_rule",
           "rule_of"]
