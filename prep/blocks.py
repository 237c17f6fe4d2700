"""One block of raw input bytes holding whole documents, parsed into documents in the worker that read it.

`prep.ranges` cuts the inputs into such blocks where documents start; `block_documents` gives exactly the documents
and counts `prep.corpus.read_documents` gives for that stretch of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prep.formats import (DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, JSON_ESCAPE_FACTOR, check_limits,
                          format_events, group_documents, wikitext_line)
from prep.textio import ReadStats


@dataclass(frozen=True)
class TextBlock:
    """Raw bytes of one input holding whole documents: cut where a document starts, so that blocks can be parsed
    apart (in worker processes) and give the documents `read_documents` gives."""

    path: str
    format: str
    data: bytes
    first_line: int = 1  # 1-based number of the block's first line in its file, as far as known (for messages)
    at_start: bool = True  # the block opens its file, so a UTF-8 byte-order mark may lead
    continues: bool = False  # the block goes on with a document too long for the last one
    first_cut: bool = False  # and that document was cut here first (the cut counts as a long document split)
    offset: int = 0  # the block's first byte in the file's (decompressed) text


def block_documents(block: TextBlock, stats: ReadStats, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
                    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS) -> list[tuple[str, ...]]:
    """The documents (their lines) of one block, read by the rules of `read_documents`; counts what it reads in
    `stats` (lines, invalid UTF-8, long lines and documents split)."""
    check_limits(max_line_chars, max_doc_chars)
    stats.long_documents_split += block.first_cut
    text = block.data.decode("utf-8-sig" if block.at_start else "utf-8", errors="replace")
    if "\ufffd" in text:
        stats.invalid_utf8 += text.count("\ufffd") - block.data.count(b"\xef\xbf\xbd")
    if block.format != "jsonl" and not block.continues:
        documents = _plain_block_documents(text, block.format == "wikitext", max_line_chars, max_doc_chars)
        if documents is not None:
            stats.lines += sum(map(len, documents))
            return documents
    events = format_events(block.format, [text], stats, max_line_chars, JSON_ESCAPE_FACTOR * max_doc_chars,
                           Path(block.path), block.first_line)
    return list(group_documents(events, stats, max_doc_chars, continued=block.continues))


def _plain_block_documents(text: str, wikitext: bool, max_line_chars: int,
                           max_doc_chars: int) -> list[tuple[str, ...]] | None:
    """`block_documents` of a text or WikiText block in which no line or document reaches a limit, by a few calls
    over the whole block rather than a chain of generators per line; None when a limit is reached (the general
    reader then cuts and counts). tests/prep/test_blocks.py checks that both give the same."""
    lines = text.split("\n")
    if max(map(len, lines)) > max_line_chars:
        return None
    lines = list(map(str.strip, lines))
    if wikitext:
        lines = [event for line in lines if line for event in wikitext_line(line)]
    documents, current, doc_chars = [], [], 0
    for line in lines:
        if not line:  # a blank line of text, or None before a WikiText title: a document ends
            if current:
                documents.append(tuple(current))
                current, doc_chars = [], 0
            continue
        if current and doc_chars + len(line) > max_doc_chars:
            return None
        current.append(line)
        doc_chars += len(line)
    if current:
        documents.append(tuple(current))
    return documents
