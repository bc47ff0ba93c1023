"""Text data: the default text, file loading, and the disjoint eval / calibration token slices."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from polyquant import data
from helpers import tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def _words(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 250, (n,), generator=g).tolist())


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="pydoc topics differ across CPython versions")
def test_default_text_is_pydoc_topics():
    from pydoc_data.topics import topics
    text = data.default_text()
    assert len(text) == data.DEFAULT_TEXT_CHARS == 465_126
    first = sorted(topics)[0]
    assert text.startswith(topics[first]) and text[len(topics[first]):].startswith("\n\n")
    assert data.load_text() == text


def test_load_text_reads_utf8_and_refuses_missing(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert data.load_text(p) == "héllo wörld\n"
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "missing.txt")


def test_user_text_slices_disjoint_and_cover(tok):
    text = _words(1000)
    ids = data.tokenize(tok, text)
    assert len(ids) == 1000 and ids.dtype == torch.long
    split = data.split_index(1000)
    assert split == 900
    ev = data.eval_tokens(tok, text, holdout=True)
    cal = data.calibration_tokens(tok, text)
    assert torch.equal(torch.cat([ev, cal]), ids)          # cover, in order, no overlap
    assert len(ev) == 900 and len(cal) == 100
    assert torch.equal(data.eval_tokens(tok, text), ids)   # a user's text is used whole by default


def test_default_slices_disjoint_cover_and_cached(tok):
    data._default_ids.cache_clear()
    ids = data.tokenize(tok)
    hits = data._default_ids.cache_info().hits
    ev, cal = data.eval_tokens(tok), data.calibration_tokens(tok)
    assert data._default_ids.cache_info().hits == hits + 2   # tokenized once
    assert len(ev) == int(data.EVAL_FRACTION * len(ids)) and len(ev) + len(cal) == len(ids)
    assert torch.equal(torch.cat([ev, cal]), ids)
    ev[:] = -1  # callers get copies: the cache is not corrupted
    assert torch.equal(data.eval_tokens(tok)[:5], ids[:5])


def test_no_special_tokens_and_no_length_warning(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"[UNK]": 250, "<s>": 251})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 251)])
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", model_max_length=16)
    assert t("w1 w2")["input_ids"] == [251, 1, 2]  # the tokenizer adds BOS by default ...
    text = _words(100)
    tlog = logging.getLogger("transformers")
    old, tlog.propagate = tlog.propagate, True     # let caplog see transformers' warnings
    try:
        with caplog.at_level(logging.WARNING):
            ids = data.tokenize(t, text)            # ... tokenize does not, and does not warn
    finally:
        tlog.propagate = old
    assert 251 not in ids.tolist() and len(ids) == 100
    assert "longer than the specified maximum" not in caplog.text
