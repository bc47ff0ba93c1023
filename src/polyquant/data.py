"""Text data: the default text (CPython's pydoc topics), loading a user's text file, and the
token slices that evaluation and calibration draw from.

The slices are defined once, here. A text is tokenized once, as a whole, without special tokens;
then

* evaluation uses tokens ``[0, split)`` and
* calibration uses tokens ``[split, end)``,

with ``split = int(EVAL_FRACTION * n_tokens)`` (90%), so the two never overlap. For the default
text with SmolLM2's tokenizer that is 113,108 tokens: 101,797 for evaluation (198 windows of
512) and 11,311 for calibration (22 windows of 512).

A text the user supplies for evaluation (``--text FILE``) is used whole by default
(``holdout=False``): it is the user's test set, and calibration is expected to come from
elsewhere. Pass ``holdout=True`` to keep its last 10% out of evaluation.

A second built-in text, of another domain, is the **enwiki excerpt** (:func:`enwiki_text`): the
107 articles of the shortened English Wikipedia dump that gensim 4.4.0 ships as test data
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
CC BY-SA), with the wiki markup stripped by :func:`strip_wiki_markup`. It is read from an installed
``gensim`` package (never imported) or from the file / gensim wheel named by ``$POLYQUANT_ENWIKI``
(``pip download --no-deps gensim==4.4.0`` fetches the wheel). The same 90 / 10 split applies to
it, so evaluating on its first 90% never sees the tokens calibration draws from its last 10%.
It is not WikiText-2: its perplexities compare only with each other.
"""
from __future__ import annotations

import functools
import html
import importlib.util
import os
import re
import zipfile
from pathlib import Path

import torch

__all__ = ["EVAL_FRACTION", "DEFAULT_TEXT_CHARS", "default_text", "load_text", "tokenize",
           "split_index", "eval_tokens", "calibration_tokens", "ENWIKI_ENV_VAR", "ENWIKI_MEMBER",
           "enwiki_available", "enwiki_text", "strip_wiki_markup", "builtin_text", "builtin_tokens",
           "BUILTIN_TEXTS"]

#: Share of a text's tokens (from the start) reserved for evaluation; the rest (the end) is the
#: calibration slice.
EVAL_FRACTION = 0.9

#: Length of :func:`default_text` on CPython 3.11 (differs slightly across Python versions).
DEFAULT_TEXT_CHARS = 465_126


@functools.lru_cache(maxsize=1)
def default_text() -> str:
    """CPython's pydoc topics, joined in sorted key order with blank lines (465,126 chars on 3.11).

    Ships with every CPython, so evaluation and calibration need no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | os.PathLike | None = None) -> str:
    """Read a UTF-8 text file, or return :func:`default_text` when ``path`` is None."""
    if path is None:
        return default_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {p} is empty")
    return text


def _encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: a whole text is longer than model_max_length on purpose; no warning.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _default_ids(tokenizer) -> torch.Tensor:
    return _encode(tokenizer, default_text())


def tokenize(tokenizer, text: str | None = None) -> torch.Tensor:
    """Token ids of a whole text (1-D LongTensor, no special tokens). The default text's
    tokenization is cached in memory per tokenizer object; the returned tensor is a copy."""
    if text is None:
        try:
            return _default_ids(tokenizer).clone()
        except TypeError:  # an unhashable tokenizer: no cache
            return _encode(tokenizer, default_text())
    if not isinstance(text, str):
        raise ValueError(f"text must be a string (use load_text for a file), got {type(text).__name__}")
    return _encode(tokenizer, text)


def split_index(n_tokens: int) -> int:
    """First calibration token: ``int(EVAL_FRACTION * n_tokens)``."""
    return int(EVAL_FRACTION * n_tokens)


def eval_tokens(tokenizer, text: str | None = None, *, holdout: bool | None = None) -> torch.Tensor:
    """Evaluation tokens. Default text: the first 90% of its tokens (disjoint from
    :func:`calibration_tokens`). A user text: all of it, unless ``holdout=True``."""
    ids = tokenize(tokenizer, text)
    if holdout is None:
        holdout = text is None
    return ids[:split_index(len(ids))] if holdout else ids


def calibration_tokens(tokenizer, text: str | None = None) -> torch.Tensor:
    """Calibration tokens: the last 10% of the text's tokens (``[split, end)``)."""
    ids = tokenize(tokenizer, text)
    return ids[split_index(len(ids)):]


# -- the enwiki excerpt ------------------------------------------------------------------------
#: Environment variable naming the enwiki excerpt: the ``.bz2`` dump itself or a gensim wheel.
ENWIKI_ENV_VAR = "POLYQUANT_ENWIKI"
#: The excerpt's path inside the gensim package (and, under ``gensim/``, inside its wheel).
ENWIKI_MEMBER = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _enwiki_location() -> tuple[Path, str | None] | None:
    """``(file, member inside it or None)`` of the excerpt, or None when it is not on this machine."""
    env = os.environ.get(ENWIKI_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${ENWIKI_ENV_VAR}={env}: no such file (the enwiki .bz2 or a gensim wheel)")
        return (p, "gensim/" + ENWIKI_MEMBER) if zipfile.is_zipfile(p) else (p, None)
    try:
        spec = importlib.util.find_spec("gensim")  # locates the package without importing it
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(folder) / ENWIKI_MEMBER
        if p.is_file():
            return p, None
    return None


def enwiki_available() -> bool:
    """Whether :func:`enwiki_text` can find the excerpt on this machine."""
    return _enwiki_location() is not None


_WIKI_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.I), ""),
    (re.compile(r"<ref[^>]*>.*?</ref\s*>", re.I | re.S), ""),
    (re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)\b.*?</\1\s*>", re.I | re.S), ""),
    (re.compile(r"</?[A-Za-z][^<>]*>"), ""),                       # other tags: keep the inner text
    (re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]"), r"\1"),     # [http://x label] -> label
    (re.compile(r"https?://\S+"), ""),
    (re.compile(r"'{2,}"), ""),                                    # bold / italics
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),             # == heading ==
    (re.compile(r"^[*#:;]+\s*", re.M), ""),                         # list and indent markers
    (re.compile(r"^\s*(?:-{4,}|__[A-Z]+__)\s*$", re.M), ""),
]
_SPECIAL = r"(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):"
_NESTED = [(re.compile(r"\{\{[^{}]*\}\}"), ""),                              # templates, innermost first
           (re.compile(r"\{\|(?:(?!\{\|)(?!\|\}).)*?\|\}", re.S), ""),                  # tables
           (re.compile(r"\[\[(?!" + _SPECIAL + r")[^\[\]|]*\|([^\[\]]*)\]\]", re.I), r"\1"),  # [[target|label]]
           (re.compile(r"\[\[(?!" + _SPECIAL + r")([^\[\]]*)\]\]", re.I), r"\1"),              # [[target]]
           (re.compile(r"\[\[" + _SPECIAL + r"[^\[\]]*\]\]", re.I), "")]  # files, categories, other languages


def strip_wiki_markup(wikitext: str) -> str:
    """Plain text of a MediaWiki page: templates, tables, references, files, categories and
    interlanguage links dropped, links replaced by their label, emphasis and list markup removed,
    HTML entities decoded, blank lines collapsed. Deterministic; our own rules (not gensim's)."""
    t = wikitext
    while True:  # innermost first until nothing changes (they nest)
        t2 = t
        for pat, rep in _NESTED:
            t2 = pat.sub(rep, t2)
        if t2 == t:
            break
        t = t2
    for pat, rep in _WIKI_SUBS:
        t = pat.sub(rep, t)
    t = html.unescape(t).replace("\u00a0", " ")
    t = re.sub(r"[ \t]+", " ", t)
    t = re.sub(r" *\n *", "\n", t)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


@functools.lru_cache(maxsize=2)
def _enwiki_text_at(path: str, member: str | None, mtime: float) -> str:
    import bz2
    import xml.etree.ElementTree as ET
    if member is None:
        raw = Path(path).read_bytes()
    else:
        with zipfile.ZipFile(path) as z:
            try:
                raw = z.read(member)
            except KeyError:
                raise ValueError(f"{path} has no {member} (is it the gensim 4.4.0 wheel?)") from None
    try:
        xml = bz2.decompress(raw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}{'::' + member if member else ''}: not a bz2 file ({e})") from None
    articles = []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"{path}: the enwiki dump is not well-formed XML ({e})") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        body = page.findtext(f"{ns}revision/{ns}text") or ""
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        plain = strip_wiki_markup(body)
        if plain:
            articles.append(f"{page.findtext(f'{ns}title') or ''}\n\n{plain}")
    if not articles:
        raise ValueError(f"{path}: no articles in the enwiki dump")
    return "\n\n".join(articles)


def enwiki_text() -> str:
    """The enwiki excerpt as plain text (articles in dump order, each its title, a blank line and
    its text). Raises FileNotFoundError saying how to get it when it is not on this machine."""
    loc = _enwiki_location()
    if loc is None:
        raise FileNotFoundError(
            "the enwiki excerpt is not on this machine: install gensim (`pip install --no-deps gensim==4.4.0`; "
            f"only its test data is read) or set ${ENWIKI_ENV_VAR} to the gensim 4.4.0 wheel "
            "(`pip download --no-deps gensim==4.4.0`) or to the .bz2 file itself")
    path, member = loc
    return _enwiki_text_at(str(path), member, path.stat().st_mtime)


#: Built-in texts by name: every one installs offline.
BUILTIN_TEXTS = {"pydoc": default_text, "enwiki": enwiki_text}


def builtin_text(name: str) -> str:
    """A built-in text by name (``"pydoc"``, ``"enwiki"``)."""
    if name not in BUILTIN_TEXTS:
        raise ValueError(f"unknown built-in text {name!r}; known: {sorted(BUILTIN_TEXTS)}")
    return BUILTIN_TEXTS[name]()


@functools.lru_cache(maxsize=4)
def _builtin_ids(tokenizer, name: str) -> torch.Tensor:
    return _encode(tokenizer, builtin_text(name))


def builtin_tokens(tokenizer, name: str) -> torch.Tensor:
    """Token ids of a built-in text, whole (cached per tokenizer object like the default text's;
    the returned tensor is a copy). Slice it with :func:`split_index`."""
    if name == "pydoc":
        return tokenize(tokenizer)
    builtin_text(name)  # raises for an unknown name or a missing file before the cache is touched
    try:
        return _builtin_ids(tokenizer, name).clone()
    except TypeError:  # an unhashable tokenizer: no cache
        return _encode(tokenizer, builtin_text(name))
