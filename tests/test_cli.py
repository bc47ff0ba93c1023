"""The command line, in-process (``polyquant.cli.main``), end to end on a tiny llama saved to disk."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from helpers import run_cli as run, tiny_model_dir, words

import polyquant
from polyquant.cli import UsageError, build_config, convert_value
from polyquant.cli.paths import recorded_source
from polyquant.methods import RTNConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=1, name="tiny")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "words.txt"
    p.write_text(words(2000, seed=0))
    return p


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("polyquant: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- registries ---------------------------------------------------------------------------------

def test_methods_json_lists_rtn_with_its_options(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    methods = {m["name"]: m for m in json.loads(out)}
    rtn = methods["rtn"]
    assert rtn["needs_calibration"] is False
    assert rtn["default_format"] == rtn["formats"][0] == "compressed-tensors"
    assert rtn["options"]["bits"] == 4 and rtn["options"]["group_size"] == 128
    assert set(methods) == set(polyquant.METHODS)


def test_methods_table_and_formats_kernels(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and re.search(r"^rtn\s+integer weight-only", out, re.M)
    code, out, _ = run(capsys, "formats", "--json")
    assert code == 0
    names = {f["name"]: f for f in json.loads(out)}
    assert names["compressed-tensors"]["quant_method"] == "compressed-tensors"
    code, out, _ = run(capsys, "kernels", "--json")
    kernels = {k["name"]: k for k in json.loads(out)}
    assert kernels["reference"]["fast"] is False and "cpu" in kernels["cpu-int4"]["devices"]


@pytest.mark.parametrize("block, command", [("methods", "methods"), ("formats", "formats")])
def test_readme_tables_match_the_registries(capsys, block, command):
    """README's method and format tables are `polyquant methods|formats --markdown`. When a method or
    format is added, regenerate them: POLYQUANT_UPDATE_README=1 python -m pytest tests/test_cli.py -k readme"""
    path = ROOT / "README.md"
    readme = path.read_text()
    pattern = re.compile(rf"(<!-- {block}:start -->\n)(.*?)(<!-- {block}:end -->)", re.S)
    m = pattern.search(readme)
    assert m, f"README.md lacks the <!-- {block}:start/end --> block"
    code, out, _ = run(capsys, command, "--markdown")
    assert code == 0
    if os.environ.get("POLYQUANT_UPDATE_README") == "1":
        path.write_text(pattern.sub(lambda mm: mm.group(1) + out.strip() + "\n" + mm.group(3), readme))
        return
    assert m.group(2).strip() == out.strip(), (
        f"README {block} table is stale: run POLYQUANT_UPDATE_README=1 python -m pytest tests/test_cli.py -k readme")


import polyquant.cli.commands  # noqa: E402  (registers the commands)
from polyquant.cli.base import COMMANDS  # noqa: E402

BUILT_IN = ["methods", "formats", "kernels", "quantize", "eval", "info", "compare", "convert", "report", "matrix",
            "diagrams", "recommend"]


def test_every_command_module_imports_and_the_built_ins_are_there():
    assert polyquant.cli.commands.BROKEN == {}
    assert set(BUILT_IN) <= set(COMMANDS)


@pytest.mark.parametrize("cmd", sorted(set(BUILT_IN) | set(COMMANDS)))
def test_every_command_has_help(capsys, cmd):
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0 and out.startswith(f"usage: polyquant {cmd}")


# -- config from flags ------------------------------------------------------------------------

def test_generic_flags_and_opts_set_config_fields():
    cfg = build_config("rtn", bits=3, group_size=32, sym=False, include=["mlp"], exclude=["down"], lm_head=True,
                       opts=["clip_search=true", "clip-grid=5", "clip_min=0.75"])
    assert cfg == RTNConfig(bits=3, group_size=32, sym=False, include=["mlp"], exclude=["down"],
                            quantize_lm_head=True, clip_search=True, clip_grid=5, clip_min=0.75)
    assert isinstance(cfg.clip_grid, int) and isinstance(cfg.clip_min, float)
    # list | None field via --opt: comma list, JSON list, none
    assert build_config("rtn", opts=["include=a,b"]).include == ["a", "b"]
    assert build_config("rtn", opts=['include=["x.y", "z"]']).include == ["x.y", "z"]
    assert build_config("rtn", opts=["include=none"]).include is None


@pytest.mark.parametrize("method", sorted(polyquant.METHODS))
def test_every_method_option_can_be_set_from_the_command_line(method):
    """Each config field of every registered method survives --opt key=<its default as text>."""
    import dataclasses
    import typing
    cls = polyquant.METHODS[method].config_cls
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        v = getattr(default, f.name)
        raw = ("none" if v is None else str(v).lower() if isinstance(v, bool)
               else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        assert convert_value(raw, hints[f.name], f.name) == v, f"{method}.{f.name} from {raw!r}"
    assert build_config(method) == default


def test_convert_value_types():
    from typing import Literal, Optional
    assert convert_value("-1", int, "g") == -1
    assert convert_value("off", bool, "s") is False
    assert convert_value("1,2", tuple[int, int], "b") == (1, 2)
    assert convert_value("fp4", Literal["nf4", "fp4"], "t") == "fp4"
    assert convert_value("null", Optional[float], "x") is None
    for raw, tp in (("x", int), ("maybe", bool), ("1,2,3", tuple[int, int]), ("int3", Literal["nf4"])):
        with pytest.raises(ValueError):
            convert_value(raw, tp, "f")


@pytest.mark.parametrize("kw, needle", [
    (dict(opts=["nope=1"]), "no option 'nope'"),
    (dict(opts=["clip_grid"]), "key=value"),
    (dict(opts=["clip_grid=abc"]), "clip_grid must be an integer"),
    (dict(act_order=True), "no option --act-order"),
    (dict(bits=9), "bits"),
    (dict(bits=7), "bits must be one of [2, 3, 4, 5, 6, 8] for rtn, got 7"),
])
def test_build_config_refuses_with_the_reason(kw, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        build_config("rtn", **kw)


@pytest.mark.parametrize("method", sorted(polyquant.METHODS))
def test_group_size_sets_each_methods_own_granularity_field(method):
    """``--group-size`` means the weight's group size for every method, whatever its home library
    calls the field (bitsandbytes ``blocksize``, fine-grained FP8's ``weight_block_size`` block);
    a method without one refuses it naming its options."""
    import dataclasses
    cls = polyquant.METHODS[method].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    field = cls.group_field if cls.group_field in names else None
    if field is None:
        with pytest.raises(UsageError, match=re.escape(f"method {method!r} has no group size (--group-size)")):
            build_config(method, group_size=32)
        return
    value = getattr(build_config(method, group_size=32), field)
    assert value == ([32] * len(value) if isinstance(value, list) else 32)
    assert value != getattr(cls(), field)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(UsageError) as e:
        build_config("rtn", opts=["clip_gird=3"])
    assert "clip_grid" in str(e.value) and "group_size" in str(e.value)


# -- quantize -> info -> eval ----------------------------------------------------------------

def test_quantize_info_eval_end_to_end(capsys, tmp_path, tiny_dir, text_file):
    out_dir = tmp_path / "q"
    code, out, err = run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "--asym",
                         "-o", out_dir)
    assert code == 0, err
    assert "14 layers" in out and "compressed-tensors" in out and str(out_dir) in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    assert json.loads((out_dir / "config.json").read_text())["quantization_config"]

    code, out, err = run(capsys, "info", out_dir, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["format"], info["method"], info["bits"], info["group_size"], info["quantized_layers"]) == \
        ("compressed-tensors", "rtn", 4, 32, 14)

    args = ["eval", out_dir, "--json", "--max-windows", "2", "--seqlen", "16", "--no-speed", "--text", text_file]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out.count("\n") == 1, "eval --json prints exactly one JSON object on stdout"
    res = json.loads(out)
    assert {"ppl", "kl", "top1", "weight_bytes", "kernel", "decode_tok_s"} <= set(res)
    assert math.isfinite(res["ppl"]) and res["windows"] == 2 and res["seqlen"] == 16
    assert res["kl"] is None and res["decode_tok_s"] is None  # source is a local path: no reference
    assert "--reference" in err

    # the checkpoint is the model the flags describe: same perplexity as quantizing in-process
    model, tok = polyquant.load_model(tiny_dir)
    q = polyquant.quantize(model, RTNConfig(bits=4, group_size=32, sym=False), show_progress=False)
    ref = polyquant.evaluate(q, tok, text=text_file.read_text(), seqlen=16, max_windows=2, measure_speed=False,
                             show_progress=False)
    assert res["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)

    code, out, err = run(capsys, *args, "--reference", tiny_dir)
    assert code == 0, err
    res = json.loads(out)
    assert 0 <= res["kl"] < 0.05 and 0.5 <= res["top1"] <= 1
    assert res["runtime"] == {"float_compute": "fp32", "float_compute_scope": None, "fused_projections": 0}

    # the fast runtime: fusing is exact (same ppl to rounding), the bf16 head is recorded
    code, out, err = run(capsys, *args, "--fuse", "--head-dtype", "bfloat16")
    assert code == 0, err
    fast = json.loads(out)
    assert fast["runtime"] == {"float_compute": "bf16", "float_compute_scope": "lm_head", "fused_projections": 4}
    assert fast["ppl"] == pytest.approx(ref["ppl"], rel=2e-2) and fast["ppl"] != ref["ppl"]
    code, out, err = run(capsys, *args, "--fuse")
    assert code == 0, err
    assert json.loads(out)["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)


def test_eval_of_a_default_sourced_checkpoint_loads_default_as_reference(capsys, tmp_path, tiny_dir, text_file,
                                                                         monkeypatch):
    out_dir = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "--bits", "8", "--group-size", "-1", "-o", out_dir, "-q")[0] == 0
    assert recorded_source(out_dir) == str(tiny_dir.resolve())
    rec = json.loads((out_dir / "polyquant.json").read_text())
    rec["source"] = "default"
    (out_dir / "polyquant.json").write_text(json.dumps(rec))
    asked = []
    real = polyquant.load_model
    monkeypatch.setattr(polyquant, "load_model", lambda spec, **kw: (asked.append(str(spec)), real(tiny_dir))[1])
    code, out, err = run(capsys, "eval", out_dir, "--json", "--max-windows", "1", "--seqlen", "16", "--no-speed",
                         "--text", text_file)
    assert code == 0, err
    assert asked == ["default"]
    assert json.loads(out)["kl"] is not None
    asked.clear()
    code, out, _ = run(capsys, "eval", out_dir, "--json", "--max-windows", "1", "--seqlen", "16", "--no-speed",
                       "--text", text_file, "--no-reference")
    assert code == 0 and asked == [] and json.loads(out)["kl"] is None


def test_overwrite_replaces_an_existing_checkpoint(capsys, tmp_path, tiny_dir):
    out_dir = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "-o", out_dir, "-q")[0] == 0
    code, _, err = run(capsys, "quantize", tiny_dir, "--bits", "8", "--group-size", "-1", "-o", out_dir,
                       "--overwrite", "-q")
    assert code == 0, err
    assert json.loads((out_dir / "polyquant.json").read_text())["config"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# -- bad input: exit 2, one line naming the problem, nothing written --------------------------

@pytest.mark.parametrize("case, extra, needle", [
    ("bits1", ["--bits", "1"], "bits must be in [2, 8], got 1"),
    ("bits9", ["--bits", "9"], "bits must be in [2, 8], got 9"),
    ("method", ["--method", "no-such-method"], "unknown method 'no-such-method'"),
    ("format", ["--format", "no-such-format"], "unknown format 'no-such-format'"),
    ("opt", ["--opt", "wat=1"], "no option 'wat'"),
])
def test_quantize_refuses_bad_flags(capsys, tmp_path, tiny_dir, case, extra, needle):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "quantize", tiny_dir, *extra, "-o", out_dir)
    assert code == 2
    assert needle in error_line(err)
    assert out == "" and not out_dir.exists()


@pytest.mark.parametrize("model, needle", [
    ("missing", "does not exist"),
    ("org/model", "does not download"),
    ("empty", "has no config.json"),
    ("textfile", "not a .gguf"),
])
def test_quantize_refuses_bad_models(capsys, tmp_path, model, needle):
    if model == "missing":
        model = tmp_path / "nothing-here"
    elif model == "empty":
        model = tmp_path / "empty"
        model.mkdir()
    elif model == "textfile":
        model = tmp_path / "model.txt"
        model.write_text("hi")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "quantize", model, "--bits", "4", "-o", out_dir)
    assert code == 2
    assert needle in error_line(err)
    assert not out_dir.exists()


def test_existing_output_without_overwrite_is_refused_and_untouched(capsys, tmp_path, tiny_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", tiny_dir, "-o", out_dir)
    assert code == 2 and "already exists" in error_line(err) and "--overwrite" in err
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


def test_overwrite_refuses_a_folder_that_is_not_a_model(capsys, tmp_path, tiny_dir):
    out_dir = tmp_path / "docs"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("precious")
    code, _, err = run(capsys, "quantize", tiny_dir, "-o", out_dir, "--overwrite")
    assert code == 2 and "not a model folder" in error_line(err)
    assert (out_dir / "notes.txt").read_text() == "precious"


def test_a_failing_save_leaves_no_folder(capsys, tmp_path, tiny_dir, monkeypatch):
    import polyquant.formats.api as api

    def broken_write(folder, tensors, *a, **kw):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(api, "write_safetensors", broken_write)
    out_dir = tmp_path / "sub" / "out"
    code, _, err = run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "-o", out_dir, "-q")
    assert code == 1 and "disk on fire" in error_line(err)
    assert list(tmp_path.iterdir()) == []  # neither the folder, nor its temporary, nor the parent we made


def test_quantize_refuses_a_checkpoint_and_info_a_plain_model(capsys, tmp_path, tiny_dir):
    out_dir = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "-o", out_dir, "-q")[0] == 0
    code, _, err = run(capsys, "quantize", out_dir, "-o", tmp_path / "q2")
    assert code == 2 and "already a quantized checkpoint" in error_line(err)
    code, _, err = run(capsys, "info", tmp_path / "nope")
    assert code == 2 and "does not exist" in error_line(err)


def test_usage_errors_and_debug(capsys, tmp_path):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in error_line(err)
    code, _, err = run(capsys, "quantize", "default")  # no -o
    assert code == 2 and "-o/--output" in error_line(err)
    code, _, err = run(capsys, "eval", tmp_path / "none", "--seqlen", "0")
    assert code == 2 and "positive integer" in error_line(err)
    code, _, err = run(capsys, "--debug", "quantize", tmp_path / "none", "-o", tmp_path / "o")
    assert code == 2 and "Traceback" in err


def test_python_dash_m_entry_point():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "polyquant", "quantize", "org/model", "-o", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("polyquant: error: 'org/model' is not a local path")


def test_interrupted_gptq_quantize_resumes_with_the_same_arguments(capsys, tmp_path, tiny_dir, text_file):
    from polyquant.methods import get_method
    spec = get_method("gptq")
    real = spec.quantize_weight
    calls = {"n": 0}

    def counting(w, cfg, stats, fail_after=None):
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise KeyboardInterrupt  # Ctrl-C in the middle of block 2
        return real(w, cfg, stats)

    out = tmp_path / "gptq"
    args = ["quantize", tiny_dir, "--method", "gptq", "--bits", "4", "--group-size", "16", "--calib-text", text_file,
            "--calib-samples", "4", "--calib-seqlen", "32", "-o", out, "-q"]
    per_block = 7
    from polyquant.formats.preflight import linear_shapes
    pre = len(linear_shapes(polyquant.load_model(tiny_dir)[0], spec.config_cls()))  # the plan check's stand-ins
    object.__setattr__(spec, "quantize_weight", lambda w, c, s: counting(w, c, s, pre + per_block + 3))  # frozen
    try:
        code, _, err = run(capsys, *args)
        resume = tmp_path / ".gptq.calibration-resume"
        assert code == 130 and "interrupted" in err.lower(), (code, err)
        assert str(resume) in err and "rerun the same command to resume" in err, err
        assert not out.exists() and resume.is_dir()  # nothing half-written; block 1 kept for the rerun
        calls["n"] = 0
        object.__setattr__(spec, "quantize_weight", lambda w, c, s: counting(w, c, s))
        code, _, err = run(capsys, *args)
    finally:
        object.__setattr__(spec, "quantize_weight", real)
    assert code == 0, err
    assert calls["n"] == pre + per_block  # block 1 came from the resume folder: only block 2 was quantized
    assert out.is_dir() and not resume.exists()
