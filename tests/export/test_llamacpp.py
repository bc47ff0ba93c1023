"""llama.cpp's binaries from Python (``polyquant.eval.llamacpp``) and ``polyquant eval OUT.gguf
--runtime llama.cpp``: the commands built, their output parsed, failures named; llama-perplexity's
protocol in PyTorch. The binaries are stand-in scripts here (llama.cpp is a benchmark extra: a
build, never a test requirement); benchmarks/bench_export.py runs the real ones."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

import polyquant
from helpers import tiny_llama
from polyquant.cli import main
from polyquant.eval import llamacpp as lc

VOCAB = 320


def _script(d, name, body):
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    log = tmp_path / "calls.txt"
    _script(d, "llama-perplexity", f'echo "$@" >> {log}\n'
            'echo "perplexity: calculating perplexity over 3 chunks, n_ctx=16, batch_size=16, n_seq=1" >&2\n'
            'echo "Final estimate: PPL = 12.3456 +/- 0.78900" >&2\n')
    rows = json.dumps([{"avg_ts": 41.5, "stddev_ts": 0.5, "n_gen": 8, "n_prompt": 0, "model_type": "llama ?B Q4_0",
                        "model_size": 123, "backends": "CPU", "cpu_info": "x", "build_commit": "abc"}])
    _script(d, "llama-bench", f"echo \"$@\" >> {log}\necho 'main: noise'\ncat <<'EOF'\n{rows}\nEOF\n")
    monkeypatch.setenv("LLAMA_CPP_BIN", str(d))
    return d, log


def test_perplexity_and_bench_commands_and_parsing(fake_bin, tmp_path):
    d, log = fake_bin
    r = lc.perplexity(None, tmp_path / "m.gguf", tmp_path / "t.txt", ctx=16, chunks=3, threads=1)
    assert (r["ppl"], r["ppl_err"], r["chunks"], r["ctx"]) == (12.3456, 0.789, 3, 16)
    args = log.read_text().split()
    for flag, val in (("-m", str(tmp_path / "m.gguf")), ("-f", str(tmp_path / "t.txt")), ("-c", "16"),
                      ("--chunks", "3"), ("-t", "1")):
        assert args[args.index(flag) + 1] == val
    assert ("--no-repack" in args) == lc.has_amx()
    b = lc.bench(None, tmp_path / "m.gguf", n_gen=8, threads=1, reps=2)
    assert b["tok_s"] == 41.5 and b["n_gen"] == 8 and b["build"] == "abc"
    lc.bench(None, tmp_path / "m.gguf", n_gen=8, mmap=False)
    first, last = (line.split() for line in log.read_text().splitlines()[-2:])
    assert first[first.index("-n") + 1] == "8" and first[first.index("-r") + 1] == "2" and "json" in first
    assert first[first.index("-mmp") + 1] == "1" and last[last.index("-mmp") + 1] == "0"  # mmap=False: -mmp 0


def test_failures_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(lc.LlamaCppError, match="llama-perplexity was not found .*LLAMA_CPP_BIN"):
        lc.find_bin("llama-perplexity")
    _script(tmp_path, "llama-perplexity", 'echo "llama_model_load: error loading model: bad magic" >&2\nexit 1\n')
    with pytest.raises(lc.LlamaCppError, match="(?s)exited with 1:.*bad magic"):
        lc.perplexity(None, tmp_path / "m.gguf", tmp_path / "t.txt")
    _script(tmp_path, "llama-perplexity", 'echo "nothing useful"\n')
    with pytest.raises(lc.LlamaCppError, match="no 'Final estimate'"):
        lc.perplexity(None, tmp_path / "m.gguf", tmp_path / "t.txt")


def test_second_half_ppl_is_llama_perplexitys_protocol():
    m = tiny_llama(vocab=VOCAB).eval()
    w = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    got = lc.second_half_ppl(m, w)
    assert got["tokens_scored"] == 2 * 7  # positions 8..14 predict tokens 9..15 in each window
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(m(w[i:i + 1]).logits[0, 8:15].double(), w[i, 9:16], reduction="sum")
               for i in range(2)]
    assert got["ppl"] == pytest.approx(math.exp(float(sum(nll)) / 14), rel=1e-12)
    # not the whole-window perplexity (a wrong protocol gives another number)
    from polyquant.eval.perplexity import score_windows
    assert abs(score_windows(m, w, show_progress=False)["ppl"] / got["ppl"] - 1) > 1e-3


def test_cli_eval_gguf_with_llama_cpp(fake_bin, tmp_path, capsys, bpe):
    d, log = fake_bin
    text_file = tmp_path / "t.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog. quantization keeps the weights small. " * 30)
    q = polyquant.quantize(tiny_llama(vocab=VOCAB), polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    polyquant.export(q, to="gguf", out=tmp_path / "m.gguf", tokenizer=bpe, type="Q4_0")
    code = main(["eval", str(tmp_path / "m.gguf"), "--runtime", "llama.cpp", "--seqlen", "16", "--max-windows", "3",
                 "--text", str(text_file), "--decode-tokens", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert (res["runtime"], res["ppl"], res["windows"], res["decode_tok_s"]) == ("llama.cpp", 12.3456, 3, 41.5)
    assert "second half" in res["protocol"]
    calls = log.read_text().splitlines()
    ppl_args = calls[0].split()
    assert ppl_args[ppl_args.index("--chunks") + 1] == "3" and ppl_args[ppl_args.index("-c") + 1] == "16"
    code = main(["eval", str(tmp_path / "x.onnx"), "--runtime", "llama.cpp"])
    assert code == 2 and "runs a .gguf file" in capsys.readouterr().err
