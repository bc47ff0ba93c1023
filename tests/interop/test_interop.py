"""The interop suite: for every registered format, every home tool it names reads polyquant's
checkpoint with polyquant's logits, and every home tool that writes it produces a checkpoint that
polyquant loads with the tool's logits. The rows come from the registry (``Format.readers`` /
``writers``: verified here; ``untested_readers`` / ``untested_writers``: named with a reason) and
the adapters in ``tools.py``; a new format gets its rows by declaring them."""
from __future__ import annotations

import copy

import pytest
import torch

import polyquant
from helpers import tiny_llama
from interop.conftest import record
from interop.tools import READERS, WRITERS, missing_modules
from polyquant.formats import list_formats
from polyquant.nn.quant_linear import QuantLinear

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _rows(direction: str):
    out = []
    for fmt in list_formats():
        verified = fmt.readers if direction == "read" else fmt.writers
        untested = fmt.untested_readers if direction == "read" else fmt.untested_writers
        for tool in verified:
            out.append(pytest.param(fmt.name, tool, True, id=f"{fmt.name}-{tool}"))
        for tool in untested:
            out.append(pytest.param(fmt.name, tool, False, id=f"{fmt.name}-{tool}-untested"))
    return out


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("float") / "tiny"
    tiny_llama(seed=11, hidden=128, tie=False).save_pretrained(str(d))
    return d


def _config_for(fmt_name: str, model):
    """The first registered calibration-free method setting whose every layer this format stores
    (methods that name the format first are tried first)."""
    from polyquant.formats import get_format
    from polyquant.methods import list_methods
    fmt = get_format(fmt_name)
    specs = [s for s in list_methods() if fmt_name in s.formats and not s.needs_calibration]
    specs.sort(key=lambda s: s.formats.index(fmt_name))  # the format's own methods first; weight-only preferred
    with_acts = None
    for spec in specs:
        try:
            q = polyquant.quantize(model, spec.config_cls(), show_progress=False, kernel="reference")
        except (ValueError, RuntimeError):
            continue
        layers = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear)]
        if layers and all(fmt.check_layer(n, m.quantized_weight, m) is None for n, m in layers):
            if all(m.act_quant is None for _, m in layers):
                return q
            with_acts = with_acts or q
    return with_acts


def _compare(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float, strict: bool = True) -> tuple[str, str]:
    diff = (ours - theirs).abs().max().item()
    rel = diff / max(theirs.abs().max().item(), 1e-30)
    if diff == 0:
        return "exact", ""
    detail = f"max |Δ| {diff:.3g} ({rel:.2e} of max |logit|)"
    if rel > tolerance:
        assert not strict, f"logits differ: {detail}, tolerance {tolerance:g}"
        return "wrong logits", detail
    return "within tolerance", f"{detail}; bound {tolerance:g}"


def _unavailable(fmt, direction, tool, verified, adapter, reason):
    if adapter is None:
        assert not verified, f"{fmt} declares {tool} as a verified {direction}er but tests/interop/tools.py has " \
                             "no adapter for it"
        record(fmt, *_dir(direction), tool, "not run", reason)
        pytest.skip(f"{tool} ({direction}): {reason}")
    miss = missing_modules(adapter.needs)
    if miss:
        cpu = not verified and any(w in reason for w in ("CUDA", "GPU", "XPU"))
        record(fmt, *_dir(direction), tool, "not installable on a CPU" if cpu else "not installed",
               reason or f"needs {', '.join(miss)}")
        pytest.skip(f"{tool} needs {', '.join(miss)}: {reason}")


def _dir(direction):
    return ("reads ours",) if direction == "read" else ("writes, polyquant reads",)


def _refused(fmt, direction, tool, reason, exc):
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    record(fmt, *_dir(direction), tool, "refused", f"{reason} ({type(exc).__name__}: {first[:160]})")


@pytest.mark.parametrize("fmt,tool,verified", _rows("read"))
def test_home_tool_reads_our_checkpoint(fmt, tool, verified, float_dir, tmp_path):
    from polyquant.formats import get_format
    reason = "" if verified else get_format(fmt).untested_readers[tool]
    adapter = READERS.get((tool, fmt))
    _unavailable(fmt, "read", tool, verified, adapter, reason)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    q = adapter.config(model) if adapter.config else _config_for(fmt, model)
    assert q is not None, f"no registered calibration-free method writes {fmt} for the tiny model"
    folder = polyquant.save(q, tmp_path / "ours", format=fmt)
    ours, _ = polyquant.load(folder, kernel="reference")
    if adapter.float_activations:
        for m in ours.modules():
            if isinstance(m, QuantLinear):
                m.act_quant = None
    with torch.no_grad():
        a = ours(X).logits
    try:
        theirs = adapter.run(folder)
        with torch.no_grad():
            b = theirs(X).logits
    except Exception as e:
        if verified:
            raise
        _refused(fmt, "read", tool, reason, e)
        return
    result, detail = _compare(a, b.float(), adapter.tolerance, strict=verified)
    assert verified or result == "wrong logits", \
        f"{tool} now reads {fmt} ({result}): move it from untested_readers to readers"
    if result == "wrong logits":
        detail = f"{reason} ({detail})"
    record(fmt, "reads ours", tool, result, "; ".join(x for x in (detail, adapter.note if detail else "") if x))


@pytest.mark.parametrize("fmt,tool,verified", _rows("write"))
def test_polyquant_reads_home_tool_checkpoint(fmt, tool, verified, float_dir, tmp_path):
    from polyquant.formats import get_format
    reason = "" if verified else get_format(fmt).untested_writers[tool]
    adapter = WRITERS.get((tool, fmt))
    _unavailable(fmt, "write", tool, verified, adapter, reason)
    out = tmp_path / "theirs"
    try:
        theirs = adapter.run(float_dir, out)
        with torch.no_grad():
            b = theirs(X).logits
    except Exception as e:
        if verified:
            raise
        _refused(fmt, "write", tool, reason, e)
        return
    ours, _ = polyquant.load(out, kernel="reference")
    assert ours.polyquant.format == fmt
    with torch.no_grad():
        a = ours(X).logits
    result, detail = _compare(a, b.float(), adapter.tolerance, strict=verified)
    assert verified or result == "wrong logits", f"{tool} now writes {fmt} that polyquant reads ({result}): move it to writers"
    record(fmt, "writes, polyquant reads", tool, result,
           "; ".join(x for x in (detail, adapter.note if detail else "") if x))


def test_every_verified_tool_has_an_adapter():
    for fmt in list_formats():
        for tool in fmt.readers:
            assert (tool, fmt.name) in READERS, f"{fmt.name}: reader {tool!r} has no adapter in tests/interop/tools.py"
        for tool in fmt.writers:
            assert (tool, fmt.name) in WRITERS, f"{fmt.name}: writer {tool!r} has no adapter in tests/interop/tools.py"
        assert not set(fmt.readers) & set(fmt.untested_readers), fmt.name
        assert not set(fmt.writers) & set(fmt.untested_writers), fmt.name
