"""Calibration windows: GPTQ-protocol random windows from the calibration slice (disjoint from the
evaluation slice), determinism, refusals, and the normalisation of user calibration data."""
from __future__ import annotations

import pytest
import torch

from polyquant import data
from polyquant.calibration import as_samples, calibration_data, window_offsets
from helpers import tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def positional_default_text(monkeypatch):
    """The default text tokenizes to 0, 1, 2, ... so a token id *is* its position in the stream."""
    n = 5000
    real = data.tokenize

    def fake(tokenizer, text=None):
        return torch.arange(n) if text is None else real(tokenizer, text)
    monkeypatch.setattr(data, "tokenize", fake)
    return n


def test_windows_come_from_the_calibration_slice_never_the_eval_slice(tok, positional_default_text):
    n = positional_default_text
    split = data.split_index(n)
    eval_ids = data.eval_tokens(tok)
    assert int(eval_ids.max()) == split - 1  # evaluation: positions [0, split)
    wins = calibration_data(tok, n_samples=64, seqlen=100, seed=3, mix=("pydoc",))
    assert len(wins) == 64
    for w in wins:
        assert w.shape == (1, 100) and w.dtype == torch.long
        assert int(w.min()) >= split and int(w.max()) < n  # inside [split, end): no overlap with eval
        assert torch.equal(w[0], torch.arange(int(w[0, 0]), int(w[0, 0]) + 100))  # contiguous window
    starts = {int(w[0, 0]) for w in wins}
    assert len(starts) > 32  # random offsets, not one repeated window


def test_windows_are_deterministic_per_seed(tok, positional_default_text):
    a = calibration_data(tok, n_samples=16, seqlen=50, seed=0, mix=("pydoc",))
    b = calibration_data(tok, n_samples=16, seqlen=50, seed=0, mix=("pydoc",))
    c = calibration_data(tok, n_samples=16, seqlen=50, seed=1, mix=("pydoc",))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_window_offsets_cover_the_whole_range():
    offs = window_offsets(20, 2000, 10, seed=0)
    assert min(offs) == 0 and max(offs) == 10  # both ends reachable: [0, n - seqlen]
    assert window_offsets(10, 3, 10) == [0, 0, 0]  # seqlen == length: the only window


def test_user_text_and_file_are_used_whole(tok, tmp_path):
    text = " ".join(f"w{i % 200}" for i in range(300))
    wins = calibration_data(tok, text=text, n_samples=50, seqlen=300)
    assert all(torch.equal(w[0], torch.tensor([i % 200 for i in range(300)])) for w in wins)
    p = tmp_path / "calib.txt"
    p.write_text(text, encoding="utf-8")
    wins2 = calibration_data(tok, text=p, n_samples=5, seqlen=120, seed=7)
    ref = calibration_data(tok, text=text, n_samples=5, seqlen=120, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(wins2, ref))


@pytest.mark.parametrize("kw, match", [
    ({"n_samples": 0}, "n_samples"),
    ({"n_samples": -3}, "n_samples"),
    ({"n_samples": 2.5}, "n_samples"),
    ({"seqlen": 0}, "seqlen"),
    ({"seqlen": 301}, "longer than the calibration text"),
])
def test_refusals(tok, kw, match):
    text = " ".join(f"w{i % 200}" for i in range(300))
    with pytest.raises(ValueError, match=match):
        calibration_data(tok, text=text, **{"n_samples": 4, "seqlen": 10, **kw})


def test_refuses_empty_text_and_other_types(tok):
    with pytest.raises(ValueError, match="empty"):
        calibration_data(tok, text="   ")
    with pytest.raises(ValueError, match="text must be"):
        calibration_data(tok, text=123)


def test_as_samples_normalises_user_data():
    t = torch.arange(12).reshape(3, 4)
    s = as_samples(t)
    assert len(s) == 3 and all(x["input_ids"].shape == (1, 4) for x in s)
    assert torch.equal(s[1]["input_ids"][0], torch.tensor([4, 5, 6, 7]))
    s = as_samples([torch.arange(5), torch.ones(2, 3, dtype=torch.int32)])
    assert s[0]["input_ids"].shape == (1, 5) and s[1]["input_ids"].dtype == torch.long
    s = as_samples([{"input_ids": torch.arange(4), "attention_mask": torch.ones(1, 4)}])
    assert set(s[0]) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("bad, match", [
    (None, "needs calibration data"),
    ([], "no calibration samples"),
    (torch.zeros(2, 4), "integer token ids"),
    ([torch.zeros(1, 2, 3, dtype=torch.long)], r"\[batch, seqlen\]"),
    ([{"attention_mask": torch.ones(1, 3)}], "input_ids"),
    ("some text", "calibration must be"),
])
def test_as_samples_refusals(bad, match):
    with pytest.raises(ValueError, match=match):
        as_samples(bad)
