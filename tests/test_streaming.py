"""Streaming quantization (#17): lazy reading bounded by one unit, streamed == in memory bit for bit,
sharded output readable by transformers, resume refused on changed arguments / source, resumed
runs identical to uninterrupted ones, and SIGKILLs at random moments of a CLI run."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import shutil
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import polyquant
from helpers import tiny_llama, tiny_tokenizer_dir
from polyquant.cli import main
from polyquant.formats import get_format, save
from polyquant.formats.lazy import LazyModel
from polyquant.formats.partial import ResumeMismatch, partial_dir_for
from polyquant.formats.stream import quantize_stream
from polyquant.methods.registry import get_method


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A 3-layer Llama saved in small shards (several files), untied head, with a tokenizer."""
    d = tmp_path_factory.mktemp("stream") / "src"
    tiny_llama(seed=1, layers=3, tie=False).save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer_dir(d)
    return d


def _calib(n: int = 4, L: int = 32):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 250, (1, L), generator=g)} for _ in range(n)]


def _cfg(method: str, **kw):
    return get_method(method).config_cls(**{"group_size": 32, **kw})


def _tensors(folder: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).contiguous()
                out[k] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stream(src, cfg, out, calib=None, **kw):
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    return quantize_stream(src, cfg, out, calibration=calib, tokenizer=AutoTokenizer.from_pretrained(str(src)),
                           show_progress=False, **kw)


def test_lazy_reading_holds_one_unit_at_a_time(src, tmp_path, monkeypatch):
    """Every tensor read is tracked (a weak reference to what the skeleton holds): the bytes alive at
    any read never exceed the largest unit (RTN), or the largest unit plus the embeddings the
    calibration capture runs (GPTQ); every source tensor is read, and RTN reads each exactly once."""
    lazy = LazyModel(src)
    units: dict[str, int] = {}
    for k in lazy.state_keys:
        info = lazy.index.tensors[lazy.source_key[k]]
        unit = ".".join(k.split(".")[:3]) if k.startswith("model.layers.") else k.rpartition(".")[0]
        units[unit] = units.get(unit, 0) + info.nbytes
    embed = units["model.embed_tokens"]
    for method, calib, bound in (("rtn", None, max(units.values())), ("gptq", _calib(), max(units.values()) + embed)):
        live: list[tuple[weakref.ref, int]] = []
        reads: list[str] = []
        peak = [0]
        orig = LazyModel._assign

        def counting(self, key, value, orig=orig, live=live, reads=reads, peak=peak):
            orig(self, key, value)
            if value.is_meta:
                return
            reads.append(key)
            live.append((weakref.ref(self._current(key)), value.numel() * value.element_size()))
            peak[0] = max(peak[0], sum(n for r, n in live if r() is not None))

        monkeypatch.setattr(LazyModel, "_assign", counting)
        _stream(src, _cfg(method), tmp_path / method, calib)
        monkeypatch.setattr(LazyModel, "_assign", orig)
        assert set(reads) == set(lazy.state_keys)
        if method == "rtn":
            assert len(reads) == len(lazy.state_keys)
        assert 0 < peak[0] <= bound, (method, peak[0], bound)
        assert peak[0] < sum(units.values()) / 2


@pytest.mark.parametrize("method,fmt", [("rtn", None), ("gptq", None), ("awq", None), ("hqq", None),
                                        ("spqr", "polyquant-spqr"), ("bitnet", None), ("fbgemm-fp8", None),
                                        ("fp8-static", None), ("bnb-int8", None)])
def test_streamed_checkpoint_equals_in_memory(src, tmp_path, method, fmt):
    spec = get_method(method)
    cfg = _cfg(method) if "group_size" in {f.name for f in dataclasses.fields(spec.config_cls)} else spec.config_cls()
    calib = _calib() if spec.needs_calibration else None
    model, tok = polyquant.load_model(str(src))
    torch.manual_seed(0)
    save(polyquant.quantize(model, cfg, calib, show_progress=False), tmp_path / "mem", format=fmt, tokenizer=tok)
    res = _stream(src, cfg, tmp_path / "str", calib, format=fmt)
    assert res["units"] == 6 and res["resumed_units"] == 0  # embeddings, 3 blocks, norm, head
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    fa, fb = _files(tmp_path / "mem"), _files(tmp_path / "str")
    omitted = set(get_format(res["format"]).whole_model_files)  # hqq's qmodel.pt
    assert not omitted & set(fb)
    for name in set(fa) - {"polyquant.json", "model.safetensors"} - omitted:
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            assert fa[name] == fb[name], name  # config.json (quantization_config), extra files, tokenizer
    index = json.loads(fb["model.safetensors.index.json"])
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) == 6
    rec = json.loads(fb["polyquant.json"])
    assert rec["runtime"]["stream"] is True and rec["method"] == method
    assert rec.get("act_rules") == json.loads(fa["polyquant.json"]).get("act_rules")  # activation rules too
    assert not partial_dir_for(tmp_path / "str").exists()


def test_sharded_stream_output_loads_in_transformers(src, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    _stream(src, _cfg("rtn"), tmp_path / "ct")
    ours, _ = polyquant.load(tmp_path / "ct", kernel="reference")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32, device_map="cpu").eval()
    x = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


class _Stop(Exception):
    pass


def _stop_after(k):
    def hook(u, lazy):
        if u == k:
            raise _Stop
    return hook


def test_resume_is_bit_identical_and_refuses_changed_arguments(src, tmp_path):
    cfg, calib = _cfg("gptq"), _calib()
    _stream(src, cfg, tmp_path / "ref", calib)
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        _stream(src, cfg, out, calib, _after_unit=_stop_after(2))
    assert not out.exists() and (partial_dir_for(out) / "manifest.json").is_file()
    with pytest.raises(ResumeMismatch, match=r"config\.bits: 4 -> 3"):
        _stream(src, _cfg("gptq", bits=3), out, calib)
    with pytest.raises(ResumeMismatch, match="calibration"):
        _stream(src, cfg, out, _calib(L=24))
    res = _stream(src, cfg, out, calib)
    assert res["resumed_units"] == 3
    assert _files(out) == _files(tmp_path / "ref")
    assert not partial_dir_for(out).exists()


def test_resume_keeps_static_activation_scales(src, tmp_path):
    """fp8-static's calibrated input scales live on each layer's activation rule: a resumed run
    rebuilds the finished layers' rules from the partial state and writes the same folder."""
    cfg, calib = get_method("fp8-static").config_cls(), _calib()
    _stream(src, cfg, tmp_path / "ref", calib)
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        _stream(src, cfg, out, calib, _after_unit=_stop_after(2))
    res = _stream(src, cfg, out, calib)
    assert res["resumed_units"] == 3
    assert _files(out) == _files(tmp_path / "ref")
    rules = json.loads((out / "polyquant.json").read_text())["act_rules"]
    assert rules and all(r["dynamic"] is False for r in rules.values())


def test_resume_refuses_a_changed_source(tmp_path):
    src = tmp_path / "src"
    tiny_llama(seed=2, layers=2, tie=True).save_pretrained(src)
    tiny_tokenizer_dir(src)
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        _stream(src, _cfg("rtn"), out, _after_unit=_stop_after(1))
    tiny_llama(seed=3, layers=2, tie=True).save_pretrained(src)  # same shapes, other weights
    with pytest.raises(ResumeMismatch, match="source file model.safetensors"):
        _stream(src, _cfg("rtn"), out)


def test_cli_resume_with_other_bits_is_refused_naming_it(src, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(_Stop):
        _stream(src, _cfg("rtn"), out, _after_unit=_stop_after(1))
    code = main(["quantize", str(src), "-m", "rtn", "-b", "3", "-g", "32", "-o", str(out), "--stream", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "config.bits: 4 -> 3" in err and not out.exists()
    code = main(["quantize", str(src), "-m", "rtn", "-b", "3", "-g", "32", "-o", str(out), "--stream", "-q",
                 "--overwrite"])
    assert code == 0 and json.loads((out / "polyquant.json").read_text())["config"]["bits"] == 3


def test_state_left_by_a_kill_after_the_final_rename_is_cleared_by_the_rerun(src, tmp_path, capsys, monkeypatch):
    """A kill between renaming the assembled checkpoint into place and removing OUT.partial leaves a
    complete output and a stale state: the next run of the command removes the state (and, the
    output existing, refuses to overwrite it); a state whose output never appeared is kept."""
    from polyquant.formats.partial import ASSEMBLED, PartialState, clear_stale_partial
    out = tmp_path / "q"
    monkeypatch.setattr(PartialState, "remove", lambda self: None)  # the kill lands just before the cleanup
    _stream(src, _cfg("rtn"), out)
    monkeypatch.undo()
    partial = partial_dir_for(out)
    assert (partial / ASSEMBLED).is_file() and (out / "config.json").is_file()
    files = _files(out)
    code = main(["quantize", str(src), "-m", "rtn", "-g", "32", "-o", str(out), "--stream", "-q"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert not partial.exists() and _files(out) == files
    partial.mkdir()
    (partial / ASSEMBLED).write_text("x")
    shutil.rmtree(out)
    assert not clear_stale_partial(out) and partial.exists()  # no output: every unit done, rerun assembles


def test_sigkill_at_random_moments_then_rerun_gives_identical_files(src, tmp_path, capsys):
    """Two SIGKILLs of `polyquant quantize --stream` (GPTQ) at random moments once it is working,
    each followed by a check that the output path holds nothing or the complete checkpoint; a
    final rerun completes with every file identical to an uninterrupted run's."""
    args = ["quantize", str(src), "-m", "gptq", "-g", "32", "--calib-samples", "4", "--calib-seqlen", "32",
            "--threads", "1", "--stream", "-q"]
    assert main(args + ["-o", str(tmp_path / "ref")]) == 0
    ref = _files(tmp_path / "ref")
    out = tmp_path / "out"
    partial = partial_dir_for(out)
    rng = random.Random(17)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-m", "polyquant", *args, "-o", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not partial.exists() and p.poll() is None and time.time() - t0 < 60:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if out.exists():  # only ever the complete checkpoint
            assert _files(out) == ref
            main(args + ["-o", str(out)])  # a kill after the rename left the state: the rerun clears it
            break
    capsys.readouterr()
    if not out.exists():
        assert main(args + ["-o", str(out)]) == 0
    assert kills >= 1
    assert _files(out) == ref
    assert not partial.exists()


def test_cli_streams_automatically_when_the_model_does_not_fit(src, tmp_path, capsys, monkeypatch):
    import polyquant.cli.stream as cli_stream
    from polyquant.cli.stream import float_bytes
    monkeypatch.setattr(cli_stream, "available_bytes", lambda: int(float_bytes(src)))  # needs 1.5x that
    assert main(["quantize", str(src), "-m", "rtn", "-g", "32", "-o", str(tmp_path / "auto"), "-q"]) == 0
    assert json.loads((tmp_path / "auto" / "polyquant.json").read_text())["runtime"]["stream"] is True
    monkeypatch.setattr(cli_stream, "available_bytes", lambda: 10 * int(float_bytes(src)))
    assert main(["quantize", str(src), "-m", "rtn", "-g", "32", "-o", str(tmp_path / "mem"), "-q"]) == 0
    assert json.loads((tmp_path / "mem" / "polyquant.json").read_text())["runtime"]["stream"] is False
    # the need is the method's own: 3x the float model is room for RTN in memory, not for HQQ (3.5x)
    monkeypatch.setattr(cli_stream, "available_bytes", lambda: 3 * int(float_bytes(src)))
    assert main(["quantize", str(src), "-m", "hqq", "-g", "32", "-o", str(tmp_path / "hqq"), "-q"]) == 0
    assert json.loads((tmp_path / "hqq" / "polyquant.json").read_text())["runtime"]["stream"] is True
    assert main(["quantize", str(src), "-m", "rtn", "-g", "32", "-o", str(tmp_path / "rtn3"), "-q"]) == 0
    assert json.loads((tmp_path / "rtn3" / "polyquant.json").read_text())["runtime"]["stream"] is False
    capsys.readouterr()
    code = main(["quantize", str(src), "-m", "quanto", "-o", str(tmp_path / "no"), "--stream", "-q"])
    assert code == 2 and "--stream: quanto calibrates the whole quantized model" in capsys.readouterr().err


def test_streamed_calibration_fixes_the_heap_before_the_plan_check(src, tmp_path, monkeypatch):
    """The plan check quantizes stand-ins; run on glibc's adaptive heap it left 1.5 GB free but
    resident for a whole streamed GPTQ run of the 1.5B benchmark model."""
    import polyquant.cli.commands.quantize as cmd
    import polyquant.formats.stream as fstream
    calls = []
    monkeypatch.setattr(fstream, "_bounded_heap", lambda: calls.append("heap"))
    plan = cmd._plan
    monkeypatch.setattr(cmd, "_plan", lambda *a, **k: (calls.append("plan"), plan(*a, **k))[1])
    base = ["quantize", str(src), "-g", "32", "-q", "--calib-samples", "2", "--calib-seqlen", "16"]
    assert main(base + ["-m", "gptq", "-o", str(tmp_path / "g"), "--stream"]) == 0
    assert calls[:2] == ["heap", "plan"]
    calls.clear()
    assert main(base[:4] + ["-m", "rtn", "-o", str(tmp_path / "r"), "--stream"]) == 0  # no calibration: adaptive
    assert calls == ["plan"]
    calls.clear()
    assert main(base + ["-m", "gptq", "-o", str(tmp_path / "m"), "--no-stream"]) == 0  # in memory: adaptive
    assert "heap" not in calls


def test_source_without_generation_config_gives_the_in_memory_generation_config(src, tmp_path):
    """A folder without generation_config.json (as a generated model): the streamed checkpoint's file is
    the one from_pretrained derives from config.json, as the in-memory save writes it."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "generation_config.json").unlink()
    cfg = _cfg("rtn")
    model, tok = polyquant.load_model(str(bare))
    save(polyquant.quantize(model, cfg, show_progress=False), tmp_path / "mem", tokenizer=tok)
    _stream(bare, cfg, tmp_path / "str")
    a = json.loads((tmp_path / "mem" / "generation_config.json").read_text())
    b = json.loads((tmp_path / "str" / "generation_config.json").read_text())
    assert a == b and "output_attentions" not in b
