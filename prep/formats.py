"""Input formats: which format a file is in, and how its decoded text becomes lines and documents.

Three input formats, each optionally zstandard-compressed (a ``.zst`` suffix):

- ``text``: blank-line-separated blocks of lines; each block is a document.
- ``wikitext``: WikiText-style articles; a `` = Title = `` line starts a new document, deeper headings
  (`` = = Sub = = ``) stay inside it as a line holding the heading words.
- ``jsonl``: one JSON object per line; its ``"text"`` string is one document.

A reader turns decoded text into events: each non-empty line as a str, None where a document ends or starts.
`group_documents` makes documents of them. Memory stays bounded by a chunk, ``max_line_chars`` and
``max_doc_chars`` whatever the size of one line.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from prep.errors import BertError
from prep.textio import ReadStats, check_input, decoded_chunks

FORMATS = ("text", "wikitext", "jsonl")

DEFAULT_MAX_LINE_CHARS = 1_000_000
DEFAULT_MAX_DOC_CHARS = 10_000_000
# A JSON-escaped character takes at most 6 characters (\uXXXX), so a record line this long can still hold a
# document of max_doc_chars; a longer record is refused rather than read whole.
JSON_ESCAPE_FACTOR = 6
_DETECT_BYTES = 1 << 16

# "= Title =" (one '=' each side) or "= = Sub = =" (deeper), after stripping; group 1 holds one side's markers.
_HEADING = re.compile(r"(=(?: =)*) (.*\S) \1")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_limits(max_line_chars: int, max_doc_chars: int) -> None:
    """Raise BertError unless 1 <= max_line_chars <= max_doc_chars."""
    if max_line_chars < 1:
        raise BertError(f"max_line_chars must be at least 1, got {max_line_chars}")
    if max_doc_chars < max_line_chars:
        raise BertError(
            f"max_doc_chars ({max_doc_chars}) must be at least max_line_chars ({max_line_chars}); "
            "raise the document limit or lower the line limit"
        )


def detect_format(path: Path) -> str:
    """Return "text", "wikitext" or "jsonl" for an input path.

    A ``.zst`` suffix is looked through. ``.jsonl``/``.ndjson`` -> jsonl; a name ending in ``.tokens`` -> wikitext;
    otherwise wikitext when the first non-blank line is a `` = Title = `` heading, else text.
    Raises BertError if the path is missing or a directory.
    """
    path = Path(path)
    check_input(path)
    name = path.name.lower()
    if name.endswith(".zst"):
        name = name[: -len(".zst")]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".tokens"):
        return "wikitext"
    return "wikitext" if _starts_with_title(path) else "text"


def _starts_with_title(path: Path) -> bool:
    """True if the first non-blank line of the (decompressed) file is a " = Title = " heading."""
    head = ""
    at_eof = True
    with contextlib.closing(decoded_chunks(path, ReadStats(), chunk_bytes=_DETECT_BYTES)) as chunks:
        for text in chunks:
            head += text
            if "\n" in head.lstrip() or len(head) > _DETECT_BYTES:
                at_eof = False
                break
    line, newline, _ = head.lstrip().partition("\n")
    if not newline and not at_eof:
        return False  # a first line longer than the peek is no title
    return is_title(line)


def is_title(line: str) -> bool:
    """True if ``line``, stripped, is a WikiText title (`` = Title = ``, one '=' each side)."""
    heading = _HEADING.fullmatch(line.strip())
    return heading is not None and heading.group(1) == "="


def format_events(fmt: str, chunks: Iterable[str], stats: ReadStats, max_line_chars: int, max_record_chars: int,
                  path: Path, first_line: int = 1) -> Iterator[str | None]:
    """One input's decoded text as lines and document boundaries (None), read by its format's rules.

    Lines are stripped, non-empty and at most ``max_line_chars`` characters (longer ones are cut at whitespace);
    a jsonl record line longer than ``max_record_chars`` is refused. ``path`` and ``first_line`` (the 1-based
    number of the text's first line in its file) name a bad record in the BertError. Counts lines and what was
    cut or replaced in ``stats``.
    """
    readers = {"text": _text_events, "wikitext": _wikitext_events, "jsonl": _jsonl_events}
    for line in readers[fmt](chunks, stats, max_line_chars, max_record_chars, path, first_line):
        if line is not None:
            stats.lines += 1
        yield line


def group_documents(events: Iterable[str | None], stats: ReadStats, max_doc_chars: int,
                    continued: bool = False) -> Iterator[tuple[str, ...]]:
    """Lines between None markers as documents of at most max_doc_chars characters (a longer one is cut between
    lines into consecutive documents and counted once; `continued`: the first was counted already); no empty
    document."""
    lines: list[str] = []
    doc_chars = 0
    doc_was_cut = continued
    for line in events:
        if line is None:
            if lines:
                yield tuple(lines)
                lines, doc_chars = [], 0
            doc_was_cut = False
            continue
        if lines and doc_chars + len(line) > max_doc_chars:
            yield tuple(lines)
            lines, doc_chars = [], 0
            if not doc_was_cut:
                stats.long_documents_split += 1
                doc_was_cut = True
        lines.append(line)
        doc_chars += len(line)
    if lines:
        yield tuple(lines)


def _cut(text: str, max_chars: int) -> tuple[list[str], str]:
    """Cut ``text`` from the front into stripped non-empty pieces of at most ``max_chars`` characters.

    Each cut is at the last space or tab of its window (a hard cut when the window has none). Returns the pieces
    and the uncut rest, which has at most ``max_chars`` characters. Walks indices, so it is linear in len(text).
    """
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        gap = max(text.rfind(" ", start + 1, end + 1), text.rfind("\t", start + 1, end + 1))
        cut, resume = (gap, gap + 1) if gap > 0 else (end, end)
        piece = text[start:cut].strip()
        if piece:
            pieces.append(piece)
        start = resume
    return pieces, text[start:]


def _file_lines(chunks: Iterable[str], max_chars: int, stats: ReadStats,
                first_line: int = 1) -> Iterator[tuple[int, str, bool]]:
    """Split decoded text into stripped lines: yield (1-based line number, text, complete).

    A line longer than ``max_chars`` comes out as several pieces with the same line number, each at most
    ``max_chars`` characters and non-empty; all but the last have ``complete=False``. Only complete lines may be
    empty (blank lines). Never holds more than one chunk plus ``max_chars`` characters of a line.
    """
    carry = ""  # the start of a line whose newline has not been read yet
    line_no = first_line
    line_was_cut = False
    for text in chunks:
        parts = text.split("\n")
        parts[0] = carry + parts[0]
        carry = parts.pop()
        for part in parts:
            part = part.strip()
            if len(part) > max_chars:
                pieces, part = _cut(part, max_chars)
                part = part.strip()
                if pieces and not line_was_cut:
                    stats.long_lines_split += 1
                    line_was_cut = True
                for piece in pieces:
                    yield line_no, piece, False
            # An empty rest after pieces is no blank line: blank lines separate documents.
            if part or not line_was_cut:
                yield line_no, part, True
            line_was_cut = False
            line_no += 1
        if len(carry) > max_chars:
            pieces, carry = _cut(carry, max_chars)
            if pieces and not line_was_cut:
                stats.long_lines_split += 1
                line_was_cut = True
            for piece in pieces:
                yield line_no, piece, False
    carry = carry.strip()
    if carry:
        yield line_no, carry, True


def _text_events(chunks: Iterable[str], stats: ReadStats, max_line_chars: int, max_record_chars: int, path: Path,
                 first_line: int) -> Iterator[str | None]:
    for _, line, _ in _file_lines(chunks, max_line_chars, stats, first_line):
        yield line or None


# WikiText marks words outside its vocabulary as "<unk>" and splits hyphens and separators inside numbers and
# words as " @-@ ", " @,@ ", " @.@ ". Read literally they cost three tokens per "<unk>" (4% of all tokens) that the
# model would learn to predict; BERT's own [UNK] (never masked) and rejoined words are what a user means.
_WIKITEXT_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def _untokenize_wikitext(line: str) -> str:
    if "<unk>" in line:
        line = line.replace("<unk>", "[UNK]")
    if " @" in line:
        for marker, char in _WIKITEXT_JOINS:
            line = line.replace(marker, char)
    return line


def _wikitext_events(chunks: Iterable[str], stats: ReadStats, max_line_chars: int, max_record_chars: int, path: Path,
                     first_line: int) -> Iterator[str | None]:
    for _, line, _ in _file_lines(chunks, max_line_chars, stats, first_line):
        if line:  # blank lines separate paragraphs, not articles
            yield from wikitext_line(line)


def wikitext_line(line: str) -> tuple[str | None, ...]:
    """One stripped non-empty WikiText line as events: a title is None (a new document) and its words, a deeper
    heading its words, any other line itself with WikiText's markers undone."""
    heading = _HEADING.fullmatch(line) if line[0] == "=" else None
    if heading is None:
        return (_untokenize_wikitext(line),)
    return (None, heading.group(2)) if heading.group(1) == "=" else (heading.group(2),)


def _jsonl_events(chunks: Iterable[str], stats: ReadStats, max_line_chars: int, max_record_chars: int, path: Path,
                  first_line: int) -> Iterator[str | None]:
    for line_no, record_line, complete in _file_lines(chunks, max_record_chars, stats, first_line):
        if not complete:
            raise BertError(
                f"{path}:{line_no}: record is longer than {max_record_chars} characters; "
                "split the document into several records"
            )
        if not record_line:
            continue
        text = _record_text(record_line, path, line_no)
        if _LONE_SURROGATE.search(text):
            # JSON escapes can spell lone surrogates, which cannot be encoded as UTF-8 later.
            text, replaced = _LONE_SURROGATE.subn("\ufffd", text)
            stats.invalid_utf8 += replaced
        yield None
        for line in text.split("\n"):
            line = line.strip()
            if len(line) > max_line_chars:
                pieces, rest = _cut(line, max_line_chars)
                stats.long_lines_split += 1
                yield from pieces
                line = rest.strip()
            if line:
                yield line
        yield None


def _record_text(record_line: str, path: Path, line_no: int) -> str:
    hint = 'each line of a .jsonl file must be one JSON object with a string "text" field'
    try:
        record = json.loads(record_line)
    except ValueError as e:
        raise BertError(f"{path}:{line_no}: not valid JSON ({e}); {hint}") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise BertError(f'{path}:{line_no}: record has no string "text" field; {hint}')
    return text
