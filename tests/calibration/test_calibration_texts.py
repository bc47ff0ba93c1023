"""Built-in texts for calibration and out-of-domain evaluation: the enwiki excerpt (found through
$POLYQUANT_ENWIKI or an installed gensim, read from the bz2 dump or the gensim wheel, markup
stripped), and the default calibration mix (pydoc + enwiki, each from its calibration slice only)."""
from __future__ import annotations

import bz2
import zipfile

import pytest
import torch

from polyquant import data
from polyquant.calibration import calibration_data, window_offsets
from polyquant.calibration import data as cdata
from helpers import tiny_tokenizer_dir

_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Redirected</title><ns>0</ns><redirect title="X" />
    <revision><text xml:space="preserve">#REDIRECT [[X]]</text></revision></page>
  <page><title>Talk:Thing</title><ns>1</ns><revision><text>talk page</text></revision></page>
  <page><title>Alpha</title><ns>0</ns><revision><text xml:space="preserve">{{Infobox|a={{nested|b}}}}
'''Alpha''' is a [[letter (alphabet)|letter]] of the [[Greek alphabet]].&lt;ref&gt;A source.&lt;/ref&gt;
[[File:Alpha.png|thumb|An [[uppercase]] alpha]]
== History ==
* It came from [[Phoenician alphabet|Phoenician]] ''aleph''.
{| class="wikitable"
| cell || cell
|}
See [https://example.org the site]. &amp;nbsp;Done.
[[Category:Letters]]
[[de:Alpha]]</text></revision></page>
</mediawiki>"""

_ALPHA = ("Alpha\n\nAlpha is a letter of the Greek alphabet.\n\nHistory\nIt came from Phoenician aleph.\n\n"
          "See the site. Done.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def _clear():
    data._enwiki_text_at.cache_clear()
    data._builtin_ids.cache_clear()


def test_strip_wiki_markup_keeps_prose_only():
    s = data.strip_wiki_markup("{{a|{{b}}}}x [[t|label]] [[plain]] ''it'' '''bold''' <!-- c --> y<ref name=r/>"
                               "<ref>z</ref> [[Image:i.png|thumb|cap [[l]]]] [http://a.b c] &amp; &lt;")
    assert s == "x label plain it bold y c & <"


@pytest.mark.parametrize("container", ["bz2", "wheel"])
def test_enwiki_read_from_the_dump_or_the_gensim_wheel(tmp_path, monkeypatch, container):
    raw = bz2.compress(_DUMP.encode())
    if container == "bz2":
        p = tmp_path / "enwiki.xml.bz2"
        p.write_bytes(raw)
    else:
        p = tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("gensim/" + data.ENWIKI_MEMBER, raw)
            z.writestr("gensim/__init__.py", "")
    monkeypatch.setenv(data.ENWIKI_ENV_VAR, str(p))
    _clear()
    assert data.enwiki_available()
    assert data.enwiki_text() == _ALPHA  # redirects and other namespaces dropped, markup stripped
    assert data.builtin_text("enwiki") == _ALPHA


def test_enwiki_missing_or_bad_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENWIKI_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_enwiki_location", lambda: None)
    assert not data.enwiki_available()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim==4.4.0"):
        data.enwiki_text()
    monkeypatch.undo()
    monkeypatch.setenv(data.ENWIKI_ENV_VAR, str(tmp_path / "nope.bz2"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.enwiki_text()
    bad = tmp_path / "bad.bz2"
    bad.write_bytes(b"not bz2")
    monkeypatch.setenv(data.ENWIKI_ENV_VAR, str(bad))
    _clear()
    with pytest.raises(ValueError, match="not a bz2 file"):
        data.enwiki_text()
    with pytest.raises(ValueError, match="unknown built-in text"):
        data.builtin_text("wikitext2")


@pytest.fixture
def positional_texts(monkeypatch):
    """pydoc tokenizes to 0..4999 and enwiki to 100000..107999: a token id tells its text and
    its position."""
    lens = {"pydoc": 5000, "enwiki": 8000}
    base = {"pydoc": 0, "enwiki": 100_000}
    monkeypatch.setattr(data, "builtin_tokens", lambda tokenizer, name: base[name] + torch.arange(lens[name]))
    monkeypatch.setattr(data, "enwiki_available", lambda: True)
    return lens, base


def test_default_mix_draws_half_from_each_calibration_slice(tok, positional_texts):
    lens, base = positional_texts
    assert cdata.default_sources() == cdata.DEFAULT_MIX == ("pydoc", "enwiki")
    wins = calibration_data(tok, n_samples=33, seqlen=100, seed=5)
    assert len(wins) == 33
    kinds = ["enwiki" if int(w[0, 0]) >= 100_000 else "pydoc" for w in wins]
    assert kinds == ["pydoc", "enwiki"] * 16 + ["pydoc"]  # alternating, remainder to the first text
    for w, k in zip(wins, kinds):
        n = lens[k]
        lo, hi = base[k] + data.split_index(n), base[k] + n
        assert int(w.min()) >= lo and int(w.max()) < hi  # its calibration slice: never its eval slice
        assert torch.equal(w[0], torch.arange(int(w[0, 0]), int(w[0, 0]) + 100))
    # a pydoc-only mix gives the windows of the former pydoc-only default, window for window
    solo = calibration_data(tok, n_samples=7, seqlen=100, seed=5, mix=("pydoc",))
    split = data.split_index(lens["pydoc"])
    offs = window_offsets(lens["pydoc"] - split, 7, 100, 5)
    assert [int(w[0, 0]) for w in solo] == [split + o for o in offs]
    assert all(torch.equal(x, y) for x, y in zip(calibration_data(tok, n_samples=33, seqlen=100, seed=5), wins))
    one = calibration_data(tok, n_samples=1, seqlen=100, seed=5)  # fewer windows than texts: the first
    assert len(one) == 1 and torch.equal(one[0], solo[0])


def test_default_falls_back_to_pydoc_with_a_warning(tok, positional_texts, monkeypatch):
    monkeypatch.setattr(data, "enwiki_available", lambda: False)
    assert cdata.default_sources() == ("pydoc",)
    with pytest.warns(RuntimeWarning, match="pydoc text alone"):
        wins = calibration_data(tok, n_samples=4, seqlen=50)
    assert all(int(w.max()) < 5000 for w in wins)


@pytest.mark.parametrize("kw, match", [
    ({"mix": ()}, "distinct built-in texts"),
    ({"mix": ("pydoc", "pydoc")}, "distinct built-in texts"),
    ({"mix": ("pydoc", "c4")}, "unknown built-in text 'c4'"),
    ({"n_samples": 0}, "positive integer"),
    ({"text": "w1 w2 w3", "mix": ("pydoc",)}, "cannot be combined"),
])
def test_mix_refusals(tok, positional_texts, kw, match):
    with pytest.raises(ValueError, match=match):
        calibration_data(tok, **{"n_samples": 4, "seqlen": 10, **kw})


def test_calibration_stream_is_the_calibration_slices_in_mix_order(tok, positional_texts, monkeypatch):
    from polyquant.calibration import calibration_stream
    lens, base = positional_texts
    s = calibration_stream(tok)
    want = [base[k] + torch.arange(data.split_index(lens[k]), lens[k]) for k in ("pydoc", "enwiki")]
    assert torch.equal(s, torch.cat(want))  # never a token of either evaluation slice
    assert torch.equal(calibration_stream(tok, mix=("enwiki",)), want[1])
    for mix, match in ((("pydoc", "pydoc"), "distinct"), (("c4",), "unknown built-in text 'c4'")):
        with pytest.raises(ValueError, match=match):
            calibration_stream(tok, mix=mix)
    monkeypatch.setattr(data, "enwiki_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="pydoc text alone"):
        assert torch.equal(calibration_stream(tok), want[0])
