"""What a new user hits at the edges of the command line: unwritable outputs, closed pipes, Ctrl-C,
file modes, the records, threads, the cache variable, and adding a command."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_cli as run, tiny_model_dir

import polyquant
from polyquant.cli import main
from polyquant.cli.base import COMMANDS, arg, command

SRC = Path(polyquant.__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=1, name="tiny")


@pytest.mark.parametrize("target", ["/proc/polyquant-x", "/sys/polyquant-x", "/proc/a/b"])
def test_an_output_that_cannot_be_written_is_refused_before_loading(capsys, tiny_dir, monkeypatch, target):
    if not Path(target.split("/")[1] and "/" + target.split("/")[1]).is_dir():
        pytest.skip("no such pseudo file system here")
    monkeypatch.setattr(polyquant, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    code, out, err = run(capsys, "quantize", tiny_dir, "-o", target)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"cannot write the output {target}" in err and "choose another -o" in err


def test_a_closed_stdout_is_a_normal_end_in_process(capsys, monkeypatch):
    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["formats", "--markdown"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cmd", [["formats", "--markdown"]])
def test_a_closed_pipe_is_a_normal_end_in_a_subprocess(cmd):
    p = subprocess.Popen([sys.executable, "-m", "polyquant", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before polyquant writes (as `| head -1` after its line)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Error" not in err and "error" not in err, err


def test_files_honour_the_umask_and_the_record_says_how_it_was_made(capsys, tmp_path, tiny_dir):
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "--kernel", "reference",
                           "--threads", "1", "-o", tmp_path / "q", "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    folder = tmp_path / "q"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == \
        {p.name: 0o644 for p in folder.iterdir()}
    rec = json.loads((folder / "polyquant.json").read_text())
    assert rec["runtime"] == {"kernel": "reference", "threads": 1, "chosen_by": "--threads", "stream": False}
    assert rec["source"] == str(tiny_dir.resolve()) and "kernel" not in rec["config"]
    model, _ = polyquant.load(folder)
    assert rec["config"] == model.polyquant.config


def test_calibration_settings_are_recorded(capsys, tmp_path, tiny_dir):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(3000)))
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "gptq", "--group-size", "32", "--calib-text", text,
                       "--calib-samples", "3", "--calib-seqlen", "24", "--seed", "5", "-o", tmp_path / "g", "-q")
    assert code == 0, err
    cal = json.loads((tmp_path / "g" / "polyquant.json").read_text())["calibration"]
    assert {k: cal[k] for k in ("text", "samples", "seqlen", "seed", "dtype")} == \
        {"text": str(text.resolve()), "samples": 3, "seqlen": 24, "seed": 5, "dtype": "auto"}
    assert cal["resumed_blocks"] == 0 and "seconds" in cal


def test_ctrl_c_after_the_save_is_not_a_failure(capsys, tmp_path, tiny_dir, monkeypatch):
    from polyquant.cli.commands import quantize as q

    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(q, "dir_bytes", interrupted)
    code, out, err = run(capsys, "quantize", tiny_dir, "--bits", "8", "--group-size", "-1", "-o", tmp_path / "q", "-q")
    assert code == 0 and "interrupted after the checkpoint was saved" in err
    assert polyquant.load(tmp_path / "q")[0].polyquant.method == "rtn"


def test_ctrl_c_before_anything_is_saved_says_nothing_was_written(capsys, tmp_path, tiny_dir, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(polyquant, "quantize", interrupted)
    code, _, err = run(capsys, "quantize", tiny_dir, "-o", tmp_path / "q", "-q")
    assert code == 130 and "nothing was written" in err and not (tmp_path / "q").exists()


def test_overwrite_clears_a_resume_folder_left_by_other_settings(capsys, tmp_path, tiny_dir):
    resume = tmp_path / ".g.calibration-resume"
    resume.mkdir()
    (resume / "state.json").write_text(json.dumps({"format": "polyquant-calibration-resume", "version": 1,
                                                   "key": {"config": "other"}, "n_blocks": 2, "blocks_done": 1}))
    args = ["quantize", tiny_dir, "--method", "gptq", "--group-size", "32", "--calib-samples", "2",
            "--calib-seqlen", "16", "-o", tmp_path / "g", "-q"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "different run" in err and "--overwrite" in err
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert not resume.exists() and (tmp_path / "g" / "config.json").is_file()


def test_bits_outside_the_methods_list_and_unknown_kernels_are_refused(capsys, tmp_path, tiny_dir):
    code, _, err = run(capsys, "quantize", tiny_dir, "--bits", "7", "-o", tmp_path / "q")
    assert code == 2 and "bits must be one of [2, 3, 4, 5, 6, 8] for rtn, got 7" in err
    code, _, err = run(capsys, "quantize", tiny_dir, "--kernel", "warp-drive", "-o", tmp_path / "q")
    assert code == 2 and "unknown kernel 'warp-drive'" in err
    assert not (tmp_path / "q").exists()


def test_help_shows_the_defaults_and_the_cost(capsys):
    code, out, _ = run(capsys, "quantize", "--help")
    flat = " ".join(out.split())
    assert code == 0
    for needle in ("rtn w4 g128", "gptq w4 g128", "32 x 512 tokens", "125-140 s", "rerunning the same command "
                   "resumes", ".DIR.calibration-resume", "(default 32)", "(default 512)", "--threads"):
        assert needle in flat, needle


def test_threads(monkeypatch):
    from polyquant.cli.threads import apply_threads, free_cores, resolve_threads
    n = free_cores(0.05)
    assert 1 <= n <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None) == (1, "OMP_NUM_THREADS") and resolve_threads(3) == (3, "--threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads(None)[1] == "free cores"
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == {"threads": 2, "chosen_by": "--threads"} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_cache_variable_with_the_old_name_as_alias(monkeypatch, tmp_path):
    from polyquant import models
    from polyquant.kernels import cext
    monkeypatch.delenv("POLYQUANT_CACHE", raising=False)
    monkeypatch.setenv("POLYQUANT_CACHE_DIR", str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a" and cext.cache_dir() == tmp_path / "a" / "cext"
    monkeypatch.delenv("POLYQUANT_CACHE_DIR")
    monkeypatch.setenv("POLYQUANT_CACHE", str(tmp_path / "b"))
    assert models.cache_dir() == tmp_path / "b" and cext.cache_dir() == tmp_path / "b" / "cext"


def test_a_command_is_one_function_in_one_module(capsys):
    @command("hello-test", help="say hello", args=[arg("name"), arg("--twice", action="store_true")])
    def hello(args):
        print(("hello " + args.name + "\n") * (2 if args.twice else 1), end="")
        return 0
    try:
        code, out, _ = run(capsys, "hello-test", "you", "--twice")
        assert code == 0 and out == "hello you\nhello you\n"
        assert run(capsys, "hello-test", "--help")[1].startswith("usage: polyquant hello-test")
    finally:
        COMMANDS.pop("hello-test")


def test_every_cli_file_is_under_500_lines():
    files = sorted((SRC / "cli").rglob("*.py"))
    assert len(files) >= 8 and not (SRC / "cli.py").exists()
    assert {f.name: n for f in files if (n := len(f.read_text().splitlines())) >= 500} == {}


def test_recommend_cites_what_ships(capsys):
    code, out, err = run(capsys, "recommend", "--memory", "200MB")
    assert code in (0, 1)
    assert "peers.md" not in out + err and "issue 7" not in out + err
