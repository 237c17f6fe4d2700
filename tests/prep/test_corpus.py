"""Reading inputs into documents, sentence splitting, line sampling and the validation split (prep/corpus.py)."""

import hashlib
import json
import re
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from prep import corpus
from prep.corpus import (
    Document,
    ReadStats,
    detect_format,
    input_record,
    is_validation,
    iter_lines,
    read_documents,
    sample_lines,
    split_sentences,
)
from prep.errors import BertError

TEXT_SAMPLE = (
    "\ufeffFirst doc line one.\r\n"
    "  line two  \r\n"
    "\r\n"
    "   \t \n"
    "Second doc.\n"
    "\n\n\n"
    "Third doc a\n"
    "Third doc b"
)
TEXT_DOCS = [("First doc line one.", "line two"), ("Second doc.",), ("Third doc a", "Third doc b")]

WIKITEXT_SAMPLE = (
    " Preface text . \n"
    " \n"
    " = Alpha = \n"
    " \n"
    " Alpha is a letter . \n"
    " \n"
    " = = History = = \n"
    " \n"
    " It is old . \n"
    " = = = Early = = = \n"
    " Very old . \n"
    " \n"
    " = Beta = \n"
    " Beta follows . \n"
)
WIKITEXT_DOCS = [
    ("Preface text .",),
    ("Alpha", "Alpha is a letter .", "History", "It is old .", "Early", "Very old ."),
    ("Beta", "Beta follows ."),
]

JSONL_RECORDS = [
    {"text": "One.\nTwo.\n\n  Three.  ", "id": 1},
    {"text": "   \n  "},
    {"text": "Solo"},
    {"text": "Über ☃"},
]
JSONL_DOCS = [("One.", "Two.", "Three."), ("Solo",), ("Über ☃",)]


def jsonl_bytes(records) -> bytes:
    lines = [json.dumps(r) for r in records]
    lines.insert(1, "")  # a blank line between records is allowed
    return ("\n".join(lines) + "\n").encode()


def write(path: Path, data: bytes | str) -> Path:
    """Write data to path, zstandard-compressed in two frames when the name ends in .zst."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.name.endswith(".zst"):
        half = len(data) // 2
        compressor = zstandard.ZstdCompressor()
        data = compressor.compress(data[:half]) + compressor.compress(data[half:])
    path.write_bytes(data)
    return path


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


def test_indices_run_over_all_inputs_in_order(tmp_path):
    """Indices are unique and follow input order across files of mixed formats, so a document is named by its
    index alone in the manifest."""
    paths = [
        write(tmp_path / "a.jsonl", jsonl_bytes(JSONL_RECORDS)),
        write(tmp_path / "b.txt", TEXT_SAMPLE),
        write(tmp_path / "c.tokens.zst", WIKITEXT_SAMPLE),
    ]
    stats = ReadStats()
    docs = list(read_documents(paths, stats))
    assert [d.lines for d in docs] == JSONL_DOCS + TEXT_DOCS + WIKITEXT_DOCS
    assert [d.index for d in docs] == list(range(9))
    assert stats.files == 3
    assert list(iter_lines(paths, ReadStats())) == [line for d in docs for line in d.lines]


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


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    """Undecodable bytes become U+FFFD exactly as bytes.decode(errors="replace") does, and only the ones we
    insert are counted (a U+FFFD already in the text is not): the manifest's count tells how dirty a corpus is."""
    data = (
        b"ok \xff line\n"  # 1 replacement
        b"trunc \xe2\x82 x\n"  # a cut-off 3-byte sequence: 1 replacement
        b"literal \xef\xbf\xbd kept\n"  # a real U+FFFD: 0
        b"surrogate \xed\xa0\x80 bytes\n"  # an encoded surrogate: 3
        b"end \xc3"  # cut off at end of file: 1
    )
    path = write(tmp_path / "dirty.txt", data)
    stats = ReadStats()
    lines = list(iter_lines([path], stats))
    assert lines == data.decode("utf-8", errors="replace").split("\n")
    assert stats.invalid_utf8 == 6


def test_invalid_utf8_count_exact_across_read_chunks(tmp_path):
    """Multi-byte characters and a literal U+FFFD that straddle the reader's chunk boundaries decode as whole
    characters and are not counted as invalid: the count must not depend on where reads happen to fall."""
    chunk = corpus._CHUNK_BYTES
    data = bytearray(b"a" * (3 * chunk + 100))
    data[chunk - 1 : chunk + 2] = b"\xef\xbf\xbd"  # literal U+FFFD across the first boundary
    data[2 * chunk - 1 : 2 * chunk + 1] = "é".encode()  # valid 2-byte character across the second
    data[3 * chunk - 1] = 0xFF  # one invalid byte just before the third
    path = write(tmp_path / "straddle.txt", bytes(data))
    stats = ReadStats()
    text = "".join(iter_lines([path], stats))
    assert text == bytes(data).decode("utf-8", errors="replace")
    assert stats.invalid_utf8 == 1


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


def test_missing_input(tmp_path):
    """A typo in a path is reported with the path, before any reading."""
    path = tmp_path / "nope.txt"
    with pytest.raises(BertError, match=re.escape(f"input not found: {path} ")):
        list(read_documents([path], ReadStats()))
    with pytest.raises(BertError, match=re.escape(f"input not found: {path} ")):
        input_record(path)


def test_directory_input(tmp_path):
    """A directory is refused with a hint to pass its files."""
    with pytest.raises(BertError, match=re.escape(f"input is a directory: {tmp_path}; pass the files")):
        list(read_documents([tmp_path], ReadStats()))


def test_empty_input(tmp_path):
    """Inputs with no non-blank text fail loudly instead of producing an empty dataset."""
    paths = [write(tmp_path / "blank.txt", "\n  \n\t\n"), write(tmp_path / "empty.jsonl", "")]
    with pytest.raises(BertError, match="the input is empty"):
        list(read_documents(paths, ReadStats()))
    with pytest.raises(BertError, match="the input is empty"):
        list(iter_lines(paths, ReadStats()))


def test_corrupt_zstandard_input(tmp_path):
    """A .zst file that is not zstandard data is a user error naming the file, not a traceback."""
    path = write(tmp_path / "fake.txt.zst", b"")
    path.write_bytes(b"this is not zstd data\n")
    with pytest.raises(BertError, match=re.escape(f"{path}: corrupt zstandard data")):
        list(read_documents([path], ReadStats()))


@pytest.mark.parametrize("keep", [0.3, 0.999])  # not 0.5: write() makes two frames of equal size
def test_truncated_zstandard_input(tmp_path, keep):
    """A cut-off .zst (an interrupted download) is refused: the decompressor alone would report a clean end of
    data and the dataset would silently lack the rest of the corpus."""
    path = write(tmp_path / "cut.txt.zst", TEXT_SAMPLE * 1000)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BertError, match=re.escape(f"{path}: truncated zstandard data")):
        list(read_documents([path], ReadStats()))


def test_line_limit_must_fit_document_limit():
    """A line limit above the document limit could not be honoured; the error names both limits."""
    with pytest.raises(BertError, match=r"max_doc_chars \(10\) must be at least max_line_chars \(20\)"):
        list(read_documents([Path("unused")], ReadStats(), max_line_chars=20, max_doc_chars=10))


def test_input_record_hashes_bytes_on_disk(tmp_path):
    """The manifest identifies each input by size and sha256 of its bytes on disk, so a changed input is seen."""
    path = write(tmp_path / "wiki.tokens.zst", WIKITEXT_SAMPLE)
    data = path.read_bytes()
    assert input_record(path) == {
        "path": str(path.resolve()),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "wikitext",
    }


class CountedLine(str):
    """A str that counts how many instances are alive, to observe how many lines a consumer holds."""

    alive = 0
    most_alive = 0

    def __new__(cls, value):
        CountedLine.alive += 1
        CountedLine.most_alive = max(CountedLine.most_alive, CountedLine.alive)
        return super().__new__(cls, value)

    def __del__(self):
        CountedLine.alive -= 1


def test_sample_lines_evenly_spaced():
    """The sample is lines 0, s, 2s, ... for the smallest power of two s giving at most max_lines: spread over the
    whole corpus (not its first lines), with a count known in advance."""
    lines = [f"line {i}" for i in range(1000)]
    assert sample_lines(iter(lines), 100) == lines[::16]  # 1000/8 = 125 > 100 >= 1000/16 -> 63 lines
    assert sample_lines(lines, 100) == sample_lines(lines, 100)
    assert sample_lines(lines[:101], 100) == lines[:101:2]
    assert sample_lines(lines[:100], 100) == lines[:100]
    assert sample_lines(lines[:7], 1) == ["line 0"]
    assert sample_lines([], 5) == []


def test_sample_lines_buffer_is_bounded():
    """sample_lines holds at most max_lines + 1 lines at any time however long the input, so sampling a huge
    corpus for vocab training fits in memory."""
    CountedLine.alive = CountedLine.most_alive = 0
    sample = sample_lines((CountedLine(f"line {i}") for i in range(20_000)), 50)
    assert len(sample) == 40  # 20000 / 512 -> 40 lines
    assert CountedLine.most_alive <= 50 + 2  # the buffer plus the line being looked at


def test_sample_lines_rejects_zero():
    """Asking for no lines is a user error with a fix, not an empty vocabulary later."""
    with pytest.raises(BertError, match="max_lines must be at least 1"):
        sample_lines(["a"], 0)


def test_split_sentences_wikitext(wiki_valid):
    """On every WikiText-2 line the sentences are non-empty, stripped, and join back to the line up to whitespace
    (no text lost or reordered); the spaced style (' . It') splits, 'H. americanus' does not."""
    docs = list(read_documents([wiki_valid], ReadStats()))
    lines = [line for d in docs for line in d.lines]
    total = 0
    for line in lines:
        sentences = split_sentences(line)
        assert all(s and s == s.strip() for s in sentences)
        assert " ".join(sentences).split() == line.split()
        total += len(sentences)
    assert total > 2 * len(lines)
    assert split_sentences(docs[0].lines[1]) == [
        "Homarus gammarus , known as the European lobster or common lobster , is a species of [UNK] lobster from the"
        " eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea .",
        "It is closely related to the American lobster , H. americanus .",
        "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) , and bears a conspicuous"
        " pair of claws .",
        'In life , the lobsters are blue , only becoming " lobster red " on cooking .',
        "Mating occurs in the summer , producing eggs which are carried by the females for up to a year before"
        " hatching into [UNK] larvae .",
        "Homarus gammarus is a highly esteemed food , and is widely caught using lobster pots , mostly around the"
        " British Isles .",
    ]


def test_split_sentences_prose():
    """Ordinary prose: terminators with closing quotes/brackets, starts with quotes/brackets/digits, and no split
    after a title, an initial or before a lowercase word."""
    text = (
        'Dr. Smith went to Washington. He arrived on Monday!  Did he stay? "Yes," she said. (It rained.) '
        "The U.S. Army was there at 5 p.m. and left. 2020 was odd. He said 'Stop.' Then left"
    )
    assert split_sentences(text) == [
        "Dr. Smith went to Washington.",
        "He arrived on Monday!",
        "Did he stay?",
        '"Yes," she said.',
        "(It rained.)",
        "The U.S. Army was there at 5 p.m. and left.",
        "2020 was odd.",
        "He said 'Stop.'",
        "Then left",
    ]
    assert split_sentences("  no terminator here  ") == ["no terminator here"]
    assert split_sentences(" \t ") == []
    assert split_sentences("Ελλάδα είναι. Η χώρα.") == ["Ελλάδα είναι.", "Η χώρα."]


def test_is_validation_depends_on_content_only():
    """The split is a function of seed and text: the same text goes the same way at any index (two datasets of
    one corpus hold out the same documents; duplicates never straddle the split), and the seed matters."""
    docs = [Document(i, (f"Paragraph number {i} .", "Second line .")) for i in range(400)]
    picked = [is_validation(d, 7, 0.3) for d in docs]
    moved = [is_validation(Document(d.index + 1000, d.lines), 7, 0.3) for d in docs]
    assert picked == moved
    assert picked != [is_validation(d, 8, 0.3) for d in docs]
    assert not any(is_validation(d, 7, 0.0) for d in docs)
    with pytest.raises(BertError, match=r"val_fraction must be in \[0, 1\)"):
        is_validation(docs[0], 7, 1.0)


def test_is_validation_is_pinned(wiki_valid):
    """The held-out WikiText-2 articles for seed 0 are fixed: changing the hash would silently change the
    validation set of every existing dataset."""
    docs = list(read_documents([wiki_valid], ReadStats()))
    assert [d.index for d in docs if is_validation(d, 0, 0.1)] == [12, 21, 36, 57]
    assert [d.index for d in docs if is_validation(d, 1, 0.1)] == [7, 14, 15, 20, 26, 37, 45, 47, 54]


def test_is_validation_fraction(wiki_valid, wiki_test):
    """Over the ~3,700 distinct WikiText-2 paragraphs (as one-line documents) the held-out share is val_fraction within
    sampling noise, for several seeds and fractions."""
    paragraphs = sorted({line for line in iter_lines([wiki_valid, wiki_test], ReadStats()) if len(line) > 40})
    docs = [Document(i, (line,)) for i, line in enumerate(paragraphs)]
    assert len(docs) > 3000
    for seed in (0, 1, 2):
        for fraction in (0.05, 0.2):
            share = sum(is_validation(d, seed, fraction) for d in docs) / len(docs)
            assert abs(share - fraction) < 0.025, (seed, fraction, share)


def test_wikitext_markers_become_bert_tokens(tmp_path):
    """WikiText's "<unk>" is BERT's [UNK] (one special token, never a prediction target) and its " @-@ " style
    splits rejoin the word, so three-token "< unk >" runs and "@" tokens never reach the shards."""
    path = tmp_path / "wiki.x.tokens"
    path.write_text(" = T = \n \n a <unk> well @-@ known 1 @,@ 000 @.@ 5 km\n", encoding="utf-8")
    docs = list(read_documents([path], ReadStats()))
    assert docs[0].lines == ("T", "a [UNK] well-known 1,000.5 km")


def _read_in_blocks(paths, block_bytes, **limits):
    stats = ReadStats()
    docs = [doc for block in corpus.read_blocks(paths, stats, block_bytes=block_bytes)
            for doc in corpus.block_documents(block, stats, **limits)]
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
    blocks = list(corpus.read_blocks([wiki_valid], stats))
    for block in blocks:
        text = block.data.decode("utf-8-sig" if block.at_start else "utf-8")
        fast = corpus._plain_block_documents(text, True, 20_000, 200_000)
        events = corpus._format_events("wikitext", [text], ReadStats(), 20_000, 1_200_000, wiki_valid, block.first_line)
        assert fast is not None and fast == list(corpus._group_documents(events, ReadStats(), 200_000))
    assert corpus._plain_block_documents("a\n" + "b" * 101 + "\n", False, 100, 1000) is None  # a long line
    assert corpus._plain_block_documents("a b\nc d\n\ne f\n", False, 100, 5) is None  # a long document


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
    blocks = list(corpus.read_blocks([path], stats, block_bytes=64, max_doc_chars=200))
    assert len(blocks) > 5 and all(len(b.data) <= 800 + 64 for b in blocks)
    assert [b.continues for b in blocks] == [False] + [True] * (len(blocks) - 1)
    docs = [doc for block in blocks
            for doc in corpus.block_documents(block, stats, max_line_chars=100, max_doc_chars=200)]
    assert [line for doc in docs for line in doc] == [line.strip() for line in lines]
    assert max(sum(map(len, doc)) for doc in docs) <= 200
    assert stats.long_documents_split == 1
