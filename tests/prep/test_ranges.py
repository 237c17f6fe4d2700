"""The input cut into ranges that workers read apart (prep/ranges.py): the same documents as one pass, whoever reads."""

import json

import pytest
import zstandard

from prep.corpus import read_documents
from prep.errors import BertError
from prep.formats import is_title
from prep.ranges import inspect_input, plan_runs, range_documents, read_run
from prep.textio import ReadStats
from tests.prep.inputs import write


def read_in_ranges(paths, range_bytes, workers=1, max_doc_chars=10_000_000, **limits):
    """Every range of the inputs read by the tasks `plan_runs` makes for `workers`, then parsed apart."""
    stats = ReadStats(files=len(paths))
    texts = [inspect_input(p) for p in paths]
    blocks = sorted((range_id, block) for run in plan_runs(texts, range_bytes, workers)
                    for range_id, block in read_run(run, range_bytes, max_doc_chars))
    docs = []
    for _, block in blocks:
        stats.bytes += len(block.data)
        docs += range_documents(block, stats, max_doc_chars=max_doc_chars, **limits)
    assert [range_id for range_id, _ in blocks] == list(range(sum(t.ranges(range_bytes) for t in texts)))
    return docs, stats, [block for _, block in blocks]


@pytest.mark.parametrize("range_bytes", [300, 4096, 1 << 18])
def test_ranges_read_apart_give_the_documents_of_the_sequential_reader(tmp_path, wiki_valid, range_bytes):
    """Workers each read their own ranges of the input, cut where documents start (WikiText titles, blank lines,
    record ends). Read apart, at any range size and however the ranges are shared out, they give exactly the
    documents and counts of the one-pass reader: on real WikiText-2 (where a title cut off at the end of a window must
    not count as one), on text with CR line ends, whitespace-only lines, a BOM and invalid UTF-8, zstandard-compressed
    in one frame, in two, and without recorded sizes, and on JSON Lines."""
    wiki = wiki_valid.read_text(encoding="utf-8")
    paragraphs = [line.strip() for line in wiki.split("\n") if line.strip() and not line.startswith(" =")]
    text = "\ufeff" + "".join(f"{p}\r\n{'  ' if i % 3 else ''}\r\n" if i % 4 else f"{p}\n"
                              for i, p in enumerate(paragraphs))
    unsized = tmp_path / "unsized.txt.zst"
    unsized.write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(text.encode("utf-8")))
    one_frame = tmp_path / "one_frame.tokens.zst"
    one_frame.write_bytes(zstandard.ZstdCompressor().compress(wiki_valid.read_bytes()))
    inputs = [
        wiki_valid,
        write(tmp_path / "plain.txt", text.encode("utf-8") + b"\xff broken \xc3 bytes\n\nend"),
        write(tmp_path / "plain.txt.zst", text),  # two frames
        unsized,
        one_frame,
        write(tmp_path / "records.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:300])),
    ]
    invalid = []
    for path in inputs:
        sequential = ReadStats()
        expected = [doc.lines for doc in read_documents([path], sequential)]
        docs, stats, blocks = read_in_ranges([path], range_bytes)
        assert docs == expected and len(docs) > 50, path
        assert stats == sequential, path
        assert read_in_ranges([path], range_bytes, workers=8)[2] == blocks, path  # other tasks, same ranges
        invalid.append(stats.invalid_utf8)
    assert invalid == [0, 2, 0, 0, 0, 0]


def test_ranges_are_fixed_spans_of_text(wiki_valid):
    """Range k starts at the first document start at or after byte k × range_bytes (here a WikiText title; an
    article longer than a range leaves the range after it empty), the ranges tile the input, and their number
    follows from its size."""
    range_bytes = 20_000
    raw = wiki_valid.read_bytes()
    _, _, blocks = read_in_ranges([wiki_valid], range_bytes)
    assert len(blocks) == -(-len(raw) // range_bytes)
    assert [b.offset for b in blocks[1:]] == [a.offset + len(a.data) for a in blocks[:-1]]
    assert blocks[0].offset == 0 and blocks[-1].offset + len(blocks[-1].data) == len(raw)
    line_starts = [i + 1 for i in range(len(raw)) if raw[i] == 10]
    titles = [start for start in line_starts if is_title(raw[start : raw.find(b"\n", start)].decode())]
    for k, block in enumerate(blocks[1:], start=1):
        first_title = min((t for t in titles if t >= k * range_bytes), default=len(raw))
        assert block.offset == first_title and not block.at_start
    assert sum(1 for b in blocks if not b.data) > 0  # some articles are longer than a range


def test_range_reading_keeps_the_limits_and_line_numbers(tmp_path):
    """Within ranges the long-line and long-document rules hold as in one pass, and a bad JSON Lines record in a
    later range is reported with its line number in the file."""
    path = write(tmp_path / "long.txt", "w " * 40 + "\nshort\n\n" + "\n".join(["x" * 90] * 5))
    limits = dict(max_line_chars=30, max_doc_chars=250)
    expected_stats = ReadStats()
    expected = [doc.lines for doc in read_documents([path], expected_stats, **limits)]
    docs, stats, _ = read_in_ranges([path], 16, **limits)
    expected_stats.files = 1
    assert docs == expected and stats == expected_stats
    assert stats.long_lines_split == 6 and stats.long_documents_split == 1

    records = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' * 500 + "{oops\n")
    with pytest.raises(BertError, match=r"bad.jsonl:501: not valid JSON"):
        read_in_ranges([records], 1024)


def test_a_document_without_end_is_cut_into_bounded_ranges(tmp_path):
    """Text with no blank line is one document however large: where a range finds no document start within
    4 × max_doc_chars bytes it starts at a line end instead, so no range exceeds range_bytes + 4 × max_doc_chars and
    most stay near range_bytes; every line arrives once and in order, no document exceeds the limit, and the
    document counts once as cut."""
    lines = [f"line {i} " + "word " * (i % 7) for i in range(400)]
    path = write(tmp_path / "one_document.txt", "\n".join(lines) + "\n")
    for workers in (1, 8):
        docs, stats, blocks = read_in_ranges([path], 64, workers, max_line_chars=100, max_doc_chars=200)
        assert all(len(b.data) <= 64 + 800 for b in blocks) and sum(len(b.data) <= 64 + 40 for b in blocks) > 100
        assert [b.continues for b in blocks if b.data] == [False] + [True] * (sum(1 for b in blocks if b.data) - 1)
        assert [line for doc in docs for line in doc] == [line.strip() for line in lines]
        assert max(sum(map(len, doc)) for doc in docs) <= 200
        assert stats.long_documents_split == 1


def test_a_record_longer_than_the_search_is_refused(tmp_path):
    """A JSON Lines record is never cut: one with no end in 4 × max_doc_chars bytes is an error that says what to
    do."""
    path = write(tmp_path / "huge.jsonl", json.dumps({"text": "word " * 400}) + "\n" + '{"text": "after"}\n')
    with pytest.raises(BertError, match="longer than 800 bytes; split the document into several records"):
        read_in_ranges([path], 64, max_doc_chars=200, max_line_chars=100)
