"""The plan check (formats/preflight.py) and the per-model defaults, on a tiny llama whose
in_features (192, 384) are not all multiples of 128, as the default model's 576 is not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_llama, tiny_tokenizer_dir, run_cli as run

import polyquant
from polyquant.formats.preflight import PlanError, check_plan, linear_shapes, plan_config
from polyquant.methods import METHODS, RTNConfig


def _tiny576():
    return tiny_llama(seed=3, hidden=192, layers=1)  # in_features 192 (q/k/v/gate/up) and 384 (down)


@pytest.fixture(scope="module")
def model():
    return _tiny576()


@pytest.fixture(scope="module")
def tiny576_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny576") / "m"
    _tiny576().save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer_dir(d)
    return d


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_at_its_defaults_has_a_plan_that_passes(model, method):
    """Each registered method with no options: the plan (defaults adapted to the model) passes every
    check, or it is refused with the reason and a fix."""
    cfg = METHODS[method].config_cls()
    try:
        planned, notes = plan_config(model, cfg)
    except PlanError as e:  # e.g. EETQ: CUTLASS needs out_features % 64, k_proj has 96
        msg = str(e)
        assert "cannot store it" in msg or "cannot run" in msg or ": " in msg.split("layer", 1)[1], msg
        assert "model.layers.0." in msg and "Fix:" in msg and "--exclude" in msg, msg
        return
    assert check_plan(model, planned) == []
    if notes:  # only the granularity changed, and the note says to what
        assert planned == cfg.replace(group_size=planned.group_size) and planned.group_size != cfg.group_size
        assert f"using group_size {planned.group_size}" in notes[0]
    else:
        assert planned == cfg


def test_the_check_agrees_with_the_real_save(model, tmp_path):
    """What check_plan refuses is what save refuses after the work (same reason), and the config it
    adapts saves: the stand-in is faithful."""
    cfg = RTNConfig()  # g128
    problems = check_plan(model, cfg)
    assert {p.shape[1] for p in problems} == {192} and all(p.stage == "format" for p in problems)
    q = polyquant.quantize(model, cfg, show_progress=False)
    with pytest.raises(ValueError) as e:
        polyquant.save(q, tmp_path / "a")
    assert "128 does not divide in_features 192" in str(e.value) and "128 does not divide in_features 192" in \
        problems[0].reason
    fixed, _ = plan_config(model, cfg)
    polyquant.save(polyquant.quantize(model, fixed, show_progress=False), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "polyquant.json").read_text())["config"]["group_size"] == 64


def test_one_stand_in_per_distinct_shape(model):
    shapes = linear_shapes(model, RTNConfig())
    assert set(shapes) == {(192, 192), (96, 192), (384, 192), (192, 384)}
    assert shapes[(96, 192)] == "model.layers.0.self_attn.k_proj"


def test_an_explicit_setting_that_cannot_work_is_refused_with_the_fix(model):
    with pytest.raises(PlanError) as e:
        plan_config(model, RTNConfig(group_size=7), explicit={"group_size"})
    msg = str(e.value)
    assert "group size 7 does not divide in_features 192" in msg and "--group-size that divides" in msg
    with pytest.raises(PlanError, match="kernel 'cpu-int8' cannot run"):
        plan_config(model, RTNConfig(bits=4, group_size=64), kernel="cpu-int8")


def test_quantize_with_no_options_works_and_says_what_it_chose(capsys, tmp_path, tiny576_dir):
    code, out, err = run(capsys, "quantize", tiny576_dir, "-o", tmp_path / "q", "-q")
    assert code == 0, err
    assert "using group_size 64" in err and "Loading weights" not in err
    rec = json.loads((tmp_path / "q" / "polyquant.json").read_text())
    assert rec["config"]["group_size"] == 64 and rec["source"] == str(tiny576_dir.resolve())
    assert rec["runtime"]["kernel"] == "auto" and rec["runtime"]["threads"] >= 1


@pytest.mark.parametrize("extra", [["--group-size", "7"], ["--method", "rtn", "--bits", "8", "--group-size", "100"],
                                   ["--kernel", "cpu-int8"]])
def test_a_setting_that_cannot_work_is_refused_before_quantizing(capsys, tmp_path, tiny576_dir, monkeypatch, extra):
    def never(*a, **k):
        raise AssertionError("quantization started")
    monkeypatch.setattr(polyquant, "quantize", never)
    monkeypatch.setattr(polyquant, "load_model", never)  # checked on the config.json skeleton, before the weights
    code, out, err = run(capsys, "quantize", tiny576_dir, *extra, "-o", tmp_path / "q", "-q")
    assert code == 2 and "Traceback" not in err, err
    assert "cannot quantize and save this model" in err and "Fix:" in err
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def default_model():
    return polyquant.load_model("default")[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_working_plan_on_the_default_model(default_model, method):
    """`polyquant quantize default --method M` with no options passes the plan check for every
    registered method (RTN, AWQ, torchao-int4: group 128 -> 64, as 128 does not divide 576)."""
    cfg = METHODS[method].config_cls()
    planned, notes = plan_config(default_model, cfg)
    assert check_plan(default_model, planned) == []
    if getattr(cfg, "group_size", None) == 128 and notes:
        assert planned.group_size == 64
