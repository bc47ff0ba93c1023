"""``polyquant.json``'s ``act_rules``: the description (:class:`ActRule`) of each quantized layer's
activation rule, written by ``save`` for the layers that carry one and read back by ``load``, where
it rebuilds a dynamic rule the checkpoint's own format does not describe (or describes otherwise)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from polyquant.activations.base import ActRule, act_from_dict, rule_of
from polyquant.formats.base import CheckpointError

__all__ = ["act_rule_record", "recorded_rules", "apply_recorded_rule", "POLYQUANT_FILE"]

log = logging.getLogger(__name__)

POLYQUANT_FILE = "polyquant.json"


def act_rule_record(layers: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """``polyquant.json``'s ``act_rules``: layer name -> the description (``ActRule.to_dict()``) of
    its activation rule, for the layers that carry a described one."""
    out = {}
    for name, m in layers.items():
        rule = rule_of(getattr(m, "act_quant", None))
        if rule is not None:
            out[name] = rule.to_dict()
    return out


def recorded_rules(folder: Path, record: dict[str, Any] | None) -> dict[str, ActRule]:
    """The ``act_rules`` of a ``polyquant.json`` as ``ActRule`` objects (CheckpointError naming the
    file and layer for a malformed entry)."""
    raw = (record or {}).get("act_rules") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder / POLYQUANT_FILE}: act_rules must map layer names to rule descriptions")
    out = {}
    for name, d in raw.items():
        try:
            out[name] = ActRule.from_dict(d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder / POLYQUANT_FILE}: act_rules[{name!r}]: {e}") from None
    return out


def apply_recorded_rule(folder: Path, name: str, m: nn.Module, want: ActRule) -> None:
    """A loaded layer's activation rule made the one ``polyquant.json`` describes: a dynamic rule
    (no tensors) is rebuilt from its description when the layer has none or another; a static one
    needs its calibrated scales from the checkpoint, so a mismatch is only warned about."""
    have = rule_of(m.act_quant)
    if have == want:
        return
    if want.dynamic:
        try:
            m.act_quant = act_from_dict(want.to_dict())
            return
        except (ValueError, NotImplementedError) as e:
            log.warning("%s: layer %r: cannot rebuild activation rule %r from polyquant.json: %s",
                        folder, name, want.kind, e)
            return
    log.warning("%s: layer %r: polyquant.json describes the static activation rule %r, the checkpoint gives %s",
                folder, name, want.kind, have.kind if have is not None else "none")
