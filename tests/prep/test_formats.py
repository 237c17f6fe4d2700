"""Reading each input format into lines and documents, within the line and document limits (prep/formats.py)."""

import json
import re
import tracemalloc
from pathlib import Path

import pytest

from prep.corpus import iter_lines, read_documents
from prep.errors import BertError
from prep.formats import detect_format
from prep.textio import ReadStats
from tests.prep.inputs import (JSONL_DOCS, JSONL_RECORDS, TEXT_DOCS, TEXT_SAMPLE, WIKITEXT_DOCS, WIKITEXT_SAMPLE,
                               jsonl_bytes, write)


def doc_lines(paths, **kwargs) -> list[tuple[str, ...]]:
    return [doc.lines for doc in read_documents(paths, ReadStats(), **kwargs)]


@pytest.mark.parametrize("name", ["notes.txt", "notes.txt.zst"])
def test_text_blocks_are_documents(tmp_path, name):
    """Blank-line-separated blocks are documents, lines stripped (CR, BOM, whitespace-only lines are blank): the
    unit every later stage packs and splits on, in plain and zstandard-compressed (multi-frame) files alike."""
    path = write(tmp_path / name, TEXT_SAMPLE)
    assert detect_format(path) == "text"
    stats = ReadStats()
    docs = list(read_documents([path], stats))
    assert [d.lines for d in docs] == TEXT_DOCS
    assert [d.index for d in docs] == [0, 1, 2]
    assert stats.as_dict() == {
        "files": 1, "bytes": len(TEXT_SAMPLE.encode()), "lines": 5,
        "invalid_utf8": 0, "long_lines_split": 0, "long_documents_split": 0,
    }


@pytest.mark.parametrize("name", ["wiki.train.tokens", "wiki.train.tokens.zst"])
def test_wikitext_titles_start_articles(tmp_path, name):
    """Only a one-'=' title starts a document; deeper headings stay inside as their bare words, and text before
    the first title is a document of its own: otherwise an article would be cut at every section."""
    path = write(tmp_path / name, WIKITEXT_SAMPLE)
    assert detect_format(path) == "wikitext"
    assert doc_lines([path]) == WIKITEXT_DOCS


@pytest.mark.parametrize("name", ["recs.jsonl", "recs.ndjson", "recs.jsonl.zst"])
def test_jsonl_records_are_documents(tmp_path, name):
    """Each record's "text" is one document split on newlines; a record with only blank text gets no index, so
    indices stay dense."""
    path = write(tmp_path / name, jsonl_bytes(JSONL_RECORDS))
    assert detect_format(path) == "jsonl"
    docs = list(read_documents([path], ReadStats()))
    assert [d.lines for d in docs] == JSONL_DOCS
    assert [d.index for d in docs] == [0, 1, 2]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.JSONL.zst", "", "jsonl"),
        ("article.txt", "\n \n = Some Title = \n \n Body . \n", "wikitext"),
        ("article.txt.zst", " = Some Title = \n", "wikitext"),
        ("section.txt", " = = Sub = = \n Body . \n", "text"),
        ("notes.md", "Plain = text = here\n", "text"),
        ("empty.txt", "", "text"),
    ],
)
def test_detect_format(tmp_path, name, content, expected):
    """The format comes from the name (looking through .zst), else from a title as first non-blank line: a
    WikiText dump renamed .txt must still split into articles."""
    assert detect_format(write(tmp_path / name, content)) == expected


def test_wikitext2_documents_are_articles(wiki_valid, wiki_test):
    """On real WikiText-2 every ' = Title = ' line starts exactly one document whose first line is the title, and
    every other non-blank line (sub-headings included, '=' markers removed, WikiText's markers turned back into
    BERT's) stays, in order, inside it."""
    title = re.compile(r"^ = [^=].* = $")
    for path in (wiki_valid, wiki_test):
        raw_lines = path.read_text(encoding="utf-8").split("\n")
        titles = [line.strip()[2:-2] for line in raw_lines if title.match(line)]
        expected_lines = [
            line.strip().lstrip("= ").rstrip(" =") if line.strip().startswith("= ") and line.strip().endswith(" =")
            else line.strip().replace("<unk>", "[UNK]").replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            for line in raw_lines
            if line.strip()
        ]
        docs = list(read_documents([path], ReadStats()))
        assert len(docs) == len(titles) > 50
        assert [d.lines[0] for d in docs] == titles
        assert [line for d in docs for line in d.lines] == expected_lines


def test_wikitext_markers_become_bert_tokens(tmp_path):
    """WikiText's "<unk>" is BERT's [UNK] (one special token, never a prediction target) and its " @-@ " style
    splits rejoin the word, so three-token "< unk >" runs and "@" tokens never reach the shards."""
    path = tmp_path / "wiki.x.tokens"
    path.write_text(" = T = \n \n a <unk> well @-@ known 1 @,@ 000 @.@ 5 km\n", encoding="utf-8")
    docs = list(read_documents([path], ReadStats()))
    assert docs[0].lines == ("T", "a [UNK] well-known 1,000.5 km")


def test_lone_surrogate_escape_in_jsonl_is_replaced(tmp_path):
    """A JSON escape can spell a lone surrogate, which cannot be written as UTF-8 downstream: it is replaced
    and counted like an undecodable byte."""
    path = write(tmp_path / "s.jsonl", '{"text": "bad \\ud800 char"}\n')
    stats = ReadStats()
    assert doc_lines([path]) == [("bad \ufffd char",)]
    list(read_documents([path], stats))
    assert stats.invalid_utf8 == 1


def test_huge_single_line_read_in_bounded_memory(tmp_path):
    """A 5 MB file with no newline is streamed: cut at spaces into pieces of at most max_line_chars, no word lost,
    counted once as a split line, and the reader's peak memory stays far below the line's size (a corpus with one
    10 GB line must not exhaust RAM)."""
    path = write(tmp_path / "oneline.txt", b"abcdefghi " * 500_000)
    stats = ReadStats()
    pieces = 0
    words = 0
    longest = 0
    tracemalloc.start()
    try:
        for line in iter_lines([path], stats, max_line_chars=100_000):
            pieces += 1
            words += len(line.split())
            longest = max(longest, len(line))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Words are 10 characters with their space, so each window of 100_000 characters ends right after a word.
    assert (pieces, words, longest) == (50, 500_000, 99_999)
    assert stats.long_lines_split == 1
    assert stats.lines == 50
    assert peak < 2_500_000


def test_long_lines_cut_at_whitespace_within_document(tmp_path):
    """Pieces of a cut line stay consecutive lines of the same document; a window without whitespace is cut
    hard; each cut line counts once."""
    path = write(tmp_path / "long.txt", "short\naaa bbb ccc ddd\n" + "w" * 25 + "\nlast\n\nnext doc\n")
    stats = ReadStats()
    docs = list(read_documents([path], stats, max_line_chars=8, max_doc_chars=1000))
    assert [d.lines for d in docs] == [
        ("short", "aaa bbb", "ccc ddd", "wwwwwwww", "wwwwwwww", "wwwwwwww", "w", "last"),
        ("next doc",),
    ]
    assert stats.long_lines_split == 2


def test_long_jsonl_text_lines_are_cut(tmp_path):
    """The line limit applies to the lines of a jsonl record's text too, so no format can smuggle in a line
    longer than max_line_chars."""
    path = write(tmp_path / "r.jsonl", json.dumps({"text": "aaa bbb ccc ddd\nok"}) + "\n")
    stats = ReadStats()
    assert [d.lines for d in read_documents([path], stats, max_line_chars=8)] == [("aaa bbb", "ccc ddd", "ok")]
    assert stats.long_lines_split == 1


def test_long_documents_split_between_lines(tmp_path):
    """A document over max_doc_chars becomes consecutive documents of whole lines, each within the limit, counted
    once; the next document keeps its own index."""
    lines = [f"{i:02d}" + "x" * 98 for i in range(10)]  # 10 lines of 100 characters
    path = write(tmp_path / "big.txt", "\n".join(lines) + "\n\nsmall\n")
    stats = ReadStats()
    docs = list(read_documents([path], stats, max_line_chars=100, max_doc_chars=250))
    assert [d.lines for d in docs] == [tuple(lines[i : i + 2]) for i in range(0, 10, 2)] + [("small",)]
    assert [d.index for d in docs] == list(range(6))
    assert stats.long_documents_split == 1


@pytest.mark.parametrize(
    ("line3", "problem"),
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('{"body": "no text field"}', 'no string "text" field'),
        ('{"text": 42}', 'no string "text" field'),
        ('["text"]', 'no string "text" field'),
    ],
)
def test_bad_jsonl_record_names_file_and_line(tmp_path, line3, problem):
    """A bad record stops the run with file:line, so the user can open the exact record (line numbers count
    blank lines, as an editor does)."""
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n' + line3 + "\n")
    with pytest.raises(BertError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        list(read_documents([path], ReadStats()))


def test_oversized_jsonl_record_is_refused(tmp_path):
    """A record line too long to hold a max_doc_chars document is refused (with file:line) instead of being read
    whole into memory."""
    path = write(tmp_path / "huge.jsonl", '{"text": "ok"}\n' + json.dumps({"text": "y" * 200}) + "\n")
    with pytest.raises(BertError, match=re.escape(f"{path}:2: record is longer than 120 characters")):
        list(read_documents([path], ReadStats(), max_line_chars=10, max_doc_chars=20))


def test_line_limit_must_fit_document_limit():
    """A line limit above the document limit could not be honoured; the error names both limits."""
    with pytest.raises(BertError, match=r"max_doc_chars \(10\) must be at least max_line_chars \(20\)"):
        list(read_documents([Path("unused")], ReadStats(), max_line_chars=20, max_doc_chars=10))
