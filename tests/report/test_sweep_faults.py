"""Crash safety of ``compare`` sweeps: a sweep killed at any moment (mid-append of a record, right
after one, at random moments, by SIGKILL or SIGTERM) loses no finished run and counts none twice
when rerun; a rerun with other settings or a changed source model is refused naming the
difference; two sweeps never write one folder at once."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_model_dir, words

from polyquant.cli import main
from polyquant.methods import RTNConfig
from polyquant.report.compare import Run, SweepMismatch, run_compare
from polyquant.report.resume import SweepLock, identity_differences, source_fingerprint
from polyquant.report.store import ResultsStore

KW = dict(seqlen=16, max_windows=1, measure_speed=False, show_progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=2, name="tiny")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text(words(600, seed=1))
    return p


# The child: a `polyquant compare` whose store can be made to die at a chosen record
# (POLYQUANT_TEST_FAULT=torn:N  -> SIGKILL itself half-way through writing record N;
#  after:N -> SIGKILL itself right after record N is durable, before results.json).
_CHILD = """
import os, signal, sys
from polyquant.report.store import ResultsStore
fault = os.environ.get("POLYQUANT_TEST_FAULT", "")
real = ResultsStore.append
n = [0]
def append(self, record):
    n[0] += 1
    kind, _, at = fault.partition(":")
    if kind == "torn" and n[0] == int(at):
        line = __import__("json").dumps(record, sort_keys=True)
        with open(self.jsonl_path, "a") as f:
            f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, record)
    if kind == "after" and n[0] == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
ResultsStore.append = append
from polyquant.cli import main
print("go", flush=True)
sys.exit(main(sys.argv[1:]))
"""


def _child(args: list[str], fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "POLYQUANT_TEST_FAULT": fault,
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)


def _lines(out: Path) -> tuple[int, list[dict]]:
    raw = [x for x in (out / "runs.jsonl").read_text().splitlines() if x.strip()] if (out / "runs.jsonl").exists() else []
    recs = []
    for x in raw:
        try:
            recs.append(json.loads(x))
        except ValueError:
            pass
    return len(raw), recs


def test_killed_at_any_moment_a_rerun_completes_each_run_exactly_once(tmp_path, tiny_dir, text_file):
    out = tmp_path / "rep"
    args = ["compare", str(tiny_dir), "-o", str(out), "--methods", "rtn", "--seqlen", "16", "--max-windows", "1",
            "--no-speed", "--text", str(text_file), "-q"]
    rng = random.Random(17)
    outcomes = []
    # SIGKILLs at the two moments that matter (inside a record's write, right after one), then a
    # SIGTERM at a random moment (benchmarks/bench_sweep_faults.py: 20 SIGKILLs at random moments)
    for fault, sig in (("torn:2", None), ("after:3", None), ("", signal.SIGTERM)):
        proc = _child(args, fault)
        try:
            assert proc.stdout.readline().strip() == "go"
            if sig is not None:
                time.sleep(rng.uniform(0.0, 1.5))
                proc.send_signal(sig)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        outcomes.append(proc.returncode)
        raw, recs = _lines(out)
        oks = [r["key"] for r in recs if r["status"] == "ok"]
        assert len(oks) == len(set(oks)), f"a run counted twice after {fault or sig}"
    assert outcomes[:2] == [-signal.SIGKILL, -signal.SIGKILL]
    assert outcomes[2] in (130, 0, -signal.SIGTERM)  # like Ctrl-C once the sweep began (or it had ended)
    raw, recs = _lines(out)
    assert raw == len(recs) + 1  # the torn record is there, and ignored
    n_before = len(recs)

    assert main(args) == 0  # the rerun completes
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["runs"]]
    assert names == ["fp32", "rtn-w8-pc", "rtn-w4-g64-sym", "rtn-w4-g64-asym", "rtn-w3-g64"]
    assert all(r["status"] == "ok" for r in res["runs"])
    raw, recs = _lines(out)
    oks = [r["key"] for r in recs if r["status"] == "ok"]
    assert sorted(oks) == sorted(r["key"] for r in res["runs"])  # each run exactly once in the store
    assert len(recs) == 5 and n_before >= 2  # what the killed runs had finished was kept
    assert res["invocations"][-1]["reused"] == n_before


def test_a_rerun_with_other_settings_or_a_changed_model_is_refused_naming_the_difference(tmp_path, tiny_dir,
                                                                                          text_file, capsys):
    text = text_file.read_text()
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "rep"
    runs = [Run("fp32"), Run("w4", RTNConfig(bits=4, group_size=32))]
    run_compare(model, out, runs, text=text, **KW)
    with pytest.raises(SweepMismatch, match=r"seqlen: 16 in the folder, 8 now; threads: 1 in the folder, 2 now"):
        run_compare(model, out, runs, text=text, **{**KW, "seqlen": 8}, threads=2)
    with pytest.raises(SweepMismatch, match=r"text_sha256: "):
        run_compare(model, out, runs, text=text + " w1", **KW)

    st = model / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-3] ^= 0x40  # one weight changes
    st.write_bytes(bytes(data))
    args = ["compare", str(model), "-o", str(out), "--methods", "rtn", "--seqlen", "16", "--max-windows", "1",
            "--no-speed", "--text", str(text_file), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "source model file model.safetensors changed (sha256 " in err and "--fresh" in err
    assert len(_lines(out)[1]) == 2  # nothing was run or rewritten
    assert main(args + ["--fresh"]) == 0  # starts over: the earlier sweep moved aside
    assert len(_lines(out)[1]) == 5 and len(list((out / "previous").glob("*-runs.jsonl"))) == 1
    assert main(args) == 0 and len(_lines(out)[1]) == 5  # and resumes as itself


def test_fingerprint_differences_and_the_folder_lock(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".hidden").write_text("ignored")
    fp = source_fingerprint(tmp_path)
    assert sorted(fp) == ["a.safetensors", "config.json"] and source_fingerprint(tmp_path) == fp
    (tmp_path / "b.safetensors").write_bytes(b"y")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert identity_differences({"source": fp, "seqlen": 4}, {"source": source_fingerprint(tmp_path), "seqlen": 4}) == [
        "source model file b.safetensors added", f"source model file config.json changed (sha256 "
        f"{fp['config.json'][:12]}... -> {source_fingerprint(tmp_path)['config.json'][:12]}...)"]
    assert source_fingerprint(tmp_path / "nowhere") == {}

    store = ResultsStore(tmp_path / "sweep")
    with SweepLock(store.folder):
        with pytest.raises(ValueError, match=rf"in use by another polyquant compare \(pid {os.getpid()}\)"):
            with SweepLock(store.folder):
                pass
    with SweepLock(store.folder):  # released when the first one ended
        pass
