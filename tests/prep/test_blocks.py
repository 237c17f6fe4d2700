"""Reading inputs in blocks parsed apart, as the parallel shard job does (prep/blocks.py)."""

import json

import pytest

from prep.blocks import _plain_block_documents, block_documents, read_blocks
from prep.corpus import read_documents
from prep.errors import BertError
from prep.formats import format_events, group_documents
from prep.textio import ReadStats
from tests.prep.inputs import write


def _read_in_blocks(paths, block_bytes, **limits):
    stats = ReadStats()
    docs = [doc for block in read_blocks(paths, stats, block_bytes=block_bytes)
            for doc in block_documents(block, stats, **limits)]
    return docs, stats


@pytest.mark.parametrize("block_bytes", [64, 4096, 1 << 18])
def test_blocks_read_apart_give_the_documents_of_the_sequential_reader(tmp_path, wiki_valid, block_bytes):
    """`bertprep shard` has its workers read the input in blocks cut where documents start (WikiText titles, blank
    lines, record ends). Read apart, at any block size, the blocks give exactly the documents and counts of the
    one-pass reader: on real WikiText-2 (where a title cut off at the end of a block must not count as one), on
    text with CR line ends, whitespace-only lines, a BOM and invalid UTF-8, compressed or not, and on JSON Lines."""
    wiki = wiki_valid.read_text(encoding="utf-8")
    paragraphs = [line.strip() for line in wiki.split("\n") if line.strip() and not line.startswith(" =")]
    text = "\ufeff" + "".join(f"{p}\r\n{'  ' if i % 3 else ''}\r\n" if i % 4 else f"{p}\n" for i, p in enumerate(paragraphs))
    inputs = [
        wiki_valid,
        write(tmp_path / "plain.txt", text.encode("utf-8") + b"\xff broken \xc3 bytes\n\nend"),
        write(tmp_path / "plain.txt.zst", text),
        write(tmp_path / "records.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:300])),
    ]
    invalid = []
    for path in inputs:
        sequential = ReadStats()
        expected = [doc.lines for doc in read_documents([path], sequential)]
        docs, stats = _read_in_blocks([path], block_bytes)
        assert docs == expected and len(docs) > 50, path
        assert stats == sequential, path
        invalid.append(stats.invalid_utf8)
    assert invalid == [0, 2, 0, 0]


def test_whole_blocks_of_wikitext_take_the_one_pass_reader(wiki_valid):
    """Blocks within the limits are read in one pass over their lines instead of line by line through generators
    (the shard job's workers spend a third less CPU reading); that reader must give the documents the general one
    gives, and it must really serve real WikiText-2 rather than fall back every time."""
    stats = ReadStats()
    blocks = list(read_blocks([wiki_valid], stats))
    for block in blocks:
        text = block.data.decode("utf-8-sig" if block.at_start else "utf-8")
        fast = _plain_block_documents(text, True, 20_000, 200_000)
        events = format_events("wikitext", [text], ReadStats(), 20_000, 1_200_000, wiki_valid, block.first_line)
        assert fast is not None and fast == list(group_documents(events, ReadStats(), 200_000))
    assert _plain_block_documents("a\n" + "b" * 101 + "\n", False, 100, 1000) is None  # a long line
    assert _plain_block_documents("a b\nc d\n\ne f\n", False, 100, 5) is None  # a long document


def test_block_reading_keeps_the_limits_and_line_numbers(tmp_path):
    """Within blocks the long-line and long-document rules hold as in one pass, and a bad JSON Lines record in a
    later block is reported with its line number in the file."""
    path = write(tmp_path / "long.txt", "w " * 40 + "\nshort\n\n" + "\n".join(["x" * 90] * 5))
    limits = dict(max_line_chars=30, max_doc_chars=250)
    expected_stats = ReadStats()
    expected = [doc.lines for doc in read_documents([path], expected_stats, **limits)]
    docs, stats = _read_in_blocks([path], 16, **limits)
    assert docs == expected and stats == expected_stats
    assert stats.long_lines_split == 6 and stats.long_documents_split == 1

    records = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' * 500 + "{oops\n")
    with pytest.raises(BertError, match=r"bad.jsonl:501: not valid JSON"):
        _read_in_blocks([records], 1024)


def test_a_document_without_end_is_cut_into_bounded_blocks(tmp_path):
    """Text with no blank line is one document however large: blocks stop growing at 4 × max_doc_chars bytes (cut
    at a line end), every line arrives once and in order, no document exceeds the limit, and the document counts
    once as cut."""
    lines = [f"line {i} " + "word " * (i % 7) for i in range(400)]
    path = write(tmp_path / "one_document.txt", "\n".join(lines) + "\n")
    stats = ReadStats()
    blocks = list(read_blocks([path], stats, block_bytes=64, max_doc_chars=200))
    assert len(blocks) > 5 and all(len(b.data) <= 800 + 64 for b in blocks)
    assert [b.continues for b in blocks] == [False] + [True] * (len(blocks) - 1)
    docs = [doc for block in blocks
            for doc in block_documents(block, stats, max_line_chars=100, max_doc_chars=200)]
    assert [line for doc in docs for line in doc] == [line.strip() for line in lines]
    assert max(sum(map(len, doc)) for doc in docs) <= 200
    assert stats.long_documents_split == 1
