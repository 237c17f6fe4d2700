"""Documents over all inputs, input records, line sampling, sentence splitting and the validation split
(prep/corpus.py)."""

import hashlib

import pytest

from prep.corpus import (
    Document,
    input_record,
    is_validation,
    iter_lines,
    read_documents,
    sample_lines,
    split_sentences,
)
from prep.errors import BertError
from prep.textio import ReadStats
from tests.prep.inputs import (JSONL_DOCS, JSONL_RECORDS, TEXT_DOCS, TEXT_SAMPLE, WIKITEXT_DOCS, WIKITEXT_SAMPLE,
                               jsonl_bytes, write)


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


def test_empty_input(tmp_path):
    """Inputs with no non-blank text fail loudly instead of producing an empty dataset."""
    paths = [write(tmp_path / "blank.txt", "\n  \n\t\n"), write(tmp_path / "empty.jsonl", "")]
    with pytest.raises(BertError, match="the input is empty"):
        list(read_documents(paths, ReadStats()))
    with pytest.raises(BertError, match="the input is empty"):
        list(iter_lines(paths, ReadStats()))


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
