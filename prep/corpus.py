"""The corpus: inputs read as documents and lines, line sampling, sentence splitting, the validation split.

`read_documents` and `iter_lines` tie the readers together: `prep.textio` opens and decodes each input,
`prep.formats` parses its format; `prep.blocks` reads the same documents in blocks for the parallel shard job.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from prep.errors import BertError
from prep.formats import (DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, JSON_ESCAPE_FACTOR, check_limits,
                          detect_format, format_events, group_documents)
from prep.textio import (CHUNK_BYTES, ReadStats, check_input, checked_inputs, decoded_chunks, empty_input_error,
                         open_or_fail)


@dataclass(frozen=True)
class Document:
    """One document: the unit that sentence pairs are drawn from and that goes wholly to train or validation."""

    index: int  # 0-based position in input order over all inputs (unique)
    lines: tuple[str, ...]  # the document's non-empty lines (paragraphs), stripped of surrounding whitespace


def read_documents(
    paths: Sequence[Path],
    stats: ReadStats,
    *,
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
) -> Iterator[Document]:
    """Yield the documents of all inputs in order, each with a unique 0-based index.

    Every line is stripped and non-empty, at most ``max_line_chars`` characters (longer lines are cut at whitespace
    into consecutive lines); every document holds at most ``max_doc_chars`` characters of line text (a longer one
    is cut between lines into consecutive documents). Documents without a non-empty line are skipped and get no
    index. Updates ``stats`` as it goes. Raises BertError for a missing input, a directory, a bad jsonl record or
    corrupt zstandard data, and when the inputs hold no document at all.
    """
    check_limits(max_line_chars, max_doc_chars)
    paths = checked_inputs(paths)
    index = 0
    for lines in group_documents(_line_events(paths, stats, max_line_chars, JSON_ESCAPE_FACTOR * max_doc_chars),
                                 stats, max_doc_chars):
        yield Document(index, lines)
        index += 1
    if index == 0:
        raise empty_input_error(paths)


def iter_lines(
    paths: Sequence[Path], stats: ReadStats, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS
) -> Iterator[str]:
    """Yield every non-empty line of all inputs in order, as read_documents would put them in documents.

    Same decoding, heading and long-line rules as read_documents (jsonl: the lines of each record's text;
    wikitext: heading words without '=' markers). Raises BertError like read_documents.
    """
    max_doc_chars = max(max_line_chars, DEFAULT_MAX_DOC_CHARS)  # here it only bounds a jsonl record's length
    check_limits(max_line_chars, max_doc_chars)
    paths = checked_inputs(paths)
    found = False
    for line in _line_events(paths, stats, max_line_chars, JSON_ESCAPE_FACTOR * max_doc_chars):
        if line is not None:
            found = True
            yield line
    if not found:
        raise empty_input_error(paths)


def _line_events(
    paths: Sequence[Path], stats: ReadStats, max_line_chars: int, max_record_chars: int
) -> Iterator[str | None]:
    """The non-empty lines of all inputs in order, with None marking a document boundary (at least one per file)."""
    for path in paths:
        stats.files += 1
        yield from format_events(detect_format(path), decoded_chunks(path, stats), stats, max_line_chars,
                                 max_record_chars, path)
        yield None


def input_record(path: Path) -> dict:
    """Describe one input for the manifest: resolved path, size in bytes on disk, sha256 of those bytes, format.

    The hash streams the file in chunks. Raises BertError if the path is missing or a directory.
    """
    path = Path(path)
    check_input(path)
    sha = hashlib.sha256()
    size = 0
    with open_or_fail(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return {"path": str(path.resolve()), "bytes": size, "sha256": sha.hexdigest(), "format": detect_format(path)}


def sample_lines(lines: Iterable[str], max_lines: int) -> list[str]:
    """Return an evenly spaced sample of at most ``max_lines`` lines, in input order, in one pass.

    Keeps every s-th line (s a power of two, starting at 1); whenever more than ``max_lines`` are held, every other
    kept line is dropped and s doubles. So the result is lines 0, s, 2s, ... for the smallest power of two s that
    gives at most ``max_lines`` of them, memory never exceeds ``max_lines + 1`` lines, and the output is
    deterministic. If the input has at most ``max_lines`` lines, all of them are returned.
    """
    if max_lines < 1:
        raise BertError(f"max_lines must be at least 1, got {max_lines}; ask for a positive number of lines")
    kept: list[str] = []
    step = 1
    for i, line in enumerate(lines):
        if i % step:
            continue
        kept.append(line)
        if len(kept) > max_lines:
            # kept[j] is line j*step, so kept[::2] is exactly the lines at multiples of 2*step.
            kept = kept[::2]
            step *= 2
    return kept


# Characters a sentence may start with: uppercase letters (Latin, Greek, Cyrillic, ... below U+3000), digits,
# opening quotes and brackets. Built once; str.isupper is the only portable Unicode test re lacks.
_SENTENCE_START = "".join(ch for ch in map(chr, range(0x3000)) if ch.isupper() or ch.istitle())
_SENTENCE_BOUNDARY = re.compile(
    # a terminator that does not end a listed abbreviation or a single capital initial ("Mr.", "J."); the
    # lookbehinds come after the character class so that the scan only stops at '.', '!' and '?'
    r"[.!?](?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bNo\.)(?<!\bvs\.)(?<!\bProf\.)"
    r"(?<!\b[A-Z]\.)"
    r"[.!?]*"  # "?!", "..."
    r"[\"'\u201d\u2019\u00bb)\]]*"  # closing quotes/brackets glued to the terminator
    r"(\s+)"  # the gap we split at
    r"(?=[" + re.escape(_SENTENCE_START) + r"0-9\"'\u201c\u2018\u00ab(\[])"
)


def split_sentences(line: str) -> list[str]:
    """Split one line into sentences; never returns empty strings.

    Splits after ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) when whitespace and then
    an uppercase letter, a digit or an opening quote/bracket follow. Works on ordinary prose and on WikiText's
    spaced tokens ("the sea . It is"). ``" ".join(result)`` equals the stripped line with the whitespace at each
    split point collapsed to one space.

    Known limits (rule-based, no model): no split before a lowercase start ("H. americanus" stays whole, and so
    does "e.g. the"); no split after a single capital initial or a listed title ("J. R. R. Tolkien", "Mr. Smith",
    "No. 2", but also "World War I. Then"); other abbreviations before a capital split wrongly ("Corp. Ltd");
    WikiText's detached closing quote (`` said . " Then``) starts the next sentence.
    """
    text = line.strip()
    if not text:
        return []
    sentences = []
    start = 0
    for match in _SENTENCE_BOUNDARY.finditer(text):
        sentences.append(text[start : match.start(1)])
        start = match.end(1)
    sentences.append(text[start:])
    return sentences


def is_validation(doc: Document, seed: int, val_fraction: float) -> bool:
    """True if ``doc`` belongs to the validation split.

    Decided by the seed and the document's lines alone (a keyed 64-bit blake2b hash mapped to [0, 1) and compared
    with ``val_fraction``), never by its index: the same text goes the same way in every dataset built from the
    corpus with the same seed, and duplicate documents never straddle the split.
    """
    return is_validation_text("\n".join(doc.lines), seed, val_fraction)


def is_validation_text(text: str, seed: int, val_fraction: float) -> bool:
    """`is_validation` of the document whose lines joined by newlines are ``text``."""
    if not 0.0 <= val_fraction < 1.0:
        raise BertError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.01 to hold out 1%")
    digest = _validation_hash(int(seed)).copy()  # copying a keyed state costs less than keying a new one per document
    digest.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest(), "big") / 2.0**64 < val_fraction


@functools.lru_cache(maxsize=8)
def _validation_hash(seed: int):
    return hashlib.blake2b(digest_size=8, key=str(seed).encode("ascii"), person=b"bertprep-val")
