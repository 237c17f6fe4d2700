"""The offline demo corpus built from the standard library's docstrings (prep/democorpus.py)."""

import re
import sys

import pytest

from prep.corpus import read_documents
from prep.democorpus import docstring_paragraphs, write_demo_corpus
from prep.formats import detect_format
from prep.textio import ReadStats

FUNCTION_WORDS = frozenset("the a an of to and or in is are be it this that for with as by on not".split())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo corpus, written once for the module: (path, returned counts)."""
    out = tmp_path_factory.mktemp("demo") / "corpus" / "demo.txt"
    return out, write_demo_corpus(out)


def test_demo_corpus_is_deterministic(demo, tmp_path):
    """Two writes are byte-identical, so the demo dataset, its vocab and the README's numbers reproduce on any
    machine with the same Python."""
    path, counts = demo
    again = tmp_path / "again.txt"
    assert write_demo_corpus(again) == counts
    assert again.read_bytes() == path.read_bytes()


def test_demo_corpus_reads_back_as_counted(demo):
    """The file is plain text whose documents are the modules and whose lines are the paragraphs: read back with
    the corpus reader it gives exactly the returned counts, with no line split or document merged."""
    path, counts = demo
    assert detect_format(path) == "text"
    stats = ReadStats()
    docs = list(read_documents([path], stats))
    assert counts == {"documents": len(docs), "lines": stats.lines, "bytes": path.stat().st_size}
    assert stats.bytes == counts["bytes"]
    assert stats.invalid_utf8 == stats.long_lines_split == stats.long_documents_split == 0
    assert [p.name for p in path.parent.iterdir()] == ["demo.txt"]  # no temporary file left behind


def test_demo_corpus_size(demo):
    """Big enough to train a small vocab and a tiny model for the demo: hundreds of modules, over a megabyte."""
    _, counts = demo
    assert counts["documents"] > 300
    assert counts["lines"] > 8_000
    assert counts["bytes"] > 1_000_000


def test_demo_corpus_is_mostly_english(demo):
    """The text is prose, not code: almost all tokens are words, English function words are frequent (as in
    running English), and no doctest prompt survives."""
    path, _ = demo
    text = path.read_text(encoding="utf-8")
    tokens = text.split()
    words = [t.strip("\"'(),.;:!?").lower() for t in tokens]
    assert sum(w.isalpha() for w in words) / len(tokens) > 0.75
    assert sum(w in FUNCTION_WORDS for w in words) / len(tokens) > 0.15
    assert ">>>" not in text
    assert not re.search(r"^(def \w+\(|class \w+[(:]|import \w|from [\w.]+ import )", text, flags=re.MULTILINE)


def test_demo_corpus_never_imports_modules(demo):
    """Sources are parsed, not imported: importing stdlib modules has side effects (`antigravity` opens a web
    browser, `this` prints), which a data-preparation step must never trigger."""
    assert "antigravity" not in sys.modules
    assert "this" not in sys.modules


def test_docstring_paragraphs_keep_prose_only():
    """Paragraphs are reflowed onto one line; doctest examples, code blocks, reST rules and fragments too short
    to be prose are dropped, since the corpus feeds a language model."""
    docstring = (
        "Return the frobnicated value of x.\n"
        "\n"
        "The value is computed lazily and\n"
        "    cached for later calls.\n"
        "\n"
        "Examples\n"
        "--------\n"
        "\n"
        "Call it like this:\n"
        ">>> frob(3)\n"
        "9\n"
        "\n"
        "    result = frob(x) ** 2 + {'k': [1, 2]}\n"
        "\n"
        "Returns:\n"
    )
    assert docstring_paragraphs(docstring) == [
        "Return the frobnicated value of x.",
        "The value is computed lazily and cached for later calls.",
        "Call it like this:",
    ]
