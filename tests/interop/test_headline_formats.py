"""Which formats each README headline row can be saved in, on the default model's shapes
(SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 KV heads): one stand-in layer per
distinct shape is quantized by the method and every registered format is asked ``check_layer``.
The README's ``headline-formats`` section is this table (``POLYQUANT_UPDATE_README=1`` rewrites it)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
SHAPES = {(576, 576): "q_proj / o_proj", (192, 576): "k_proj / v_proj", (1536, 576): "gate_proj / up_proj",
          (576, 1536): "down_proj"}


def headline_formats() -> list[tuple[str, str, list[str], dict[str, str]]]:
    """``(run name, method, formats that store every layer, {default format: why not})``."""
    from polyquant.formats import list_formats
    from polyquant.formats.preflight import _stand_in
    from polyquant.methods import get_method
    from polyquant.nn.quantize import make_quant_linear
    from polyquant.report.compare import HEADLINE
    rows = []
    for run, method, fields in HEADLINE:
        spec = get_method(method)
        config = spec.config_cls(**fields)
        gen = torch.Generator().manual_seed(0)
        layers = []
        for (out, inp), name in SHAPES.items():
            lin, qw = _stand_in(spec, config, out, inp, False, gen)
            layers.append((name, make_quant_linear(spec, config, qw, lin)))
        ok, why = [], {}
        for fmt in list_formats():
            reasons = [fmt.check_layer(n, m.quantized_weight, m) for n, m in layers]
            bad = next(((n, r) for (n, _), r in zip(layers, reasons) if r), None)
            if bad is None:
                ok.append(fmt.name)
            elif fmt.name == spec.default_format:
                why[fmt.name] = f"{bad[0]}: {bad[1]}"
        rows.append((run, method, ok, why))
    return rows


def headline_markdown() -> str:
    lines = ["| headline run | method | can be saved in (default model) | its default format refuses it because |",
             "|---|---|---|---|"]
    for run, method, ok, why in headline_formats():
        lines.append(f"| {run} | {method} | {', '.join(ok) or '-'} | "
                     f"{'; '.join(f'{k}: {v}' for k, v in why.items()).replace('|', '/') or ''} |")
    return "\n".join(lines)


@pytest.mark.slow  # ~50 s: GPTQ / AWQ / SpQR stand-ins at the default model's shapes
def test_readme_headline_formats_are_current():
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- headline-formats:start -->\n", "<!-- headline-formats:end -->"
    table = headline_markdown()
    if os.environ.get("POLYQUANT_UPDATE_README") and start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: start + table + "\n" + end, text,
                      flags=re.S)
        tmp = README.with_name(README.name + ".tmp-headline")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, README)  # atomic: a concurrent reader never sees a half-written README
    assert start in text and end in text, "README.md lacks the headline-formats section"
    got = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert got == table, "README's headline formats are stale: POLYQUANT_UPDATE_README=1 python -m pytest " \
                         "tests/interop/test_headline_formats.py"
