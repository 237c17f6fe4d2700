"""Inputs in blocks for the parallel shard job: raw bytes cut where documents start, parsed apart in workers.

`read_blocks` (in the main process) finds document starts in raw bytes without decoding; `block_documents` (in
a worker) parses one block and gives exactly the documents and counts `prep.corpus.read_documents` would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from prep.errors import BertError
from prep.formats import (DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, JSON_ESCAPE_FACTOR, check_limits,
                          detect_format, format_events, group_documents, is_title, wikitext_line)
from prep.textio import ReadStats, checked_inputs, open_binary

BLOCK_BYTES = 1 << 18  # text per block handed to a worker

_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_TITLE_CANDIDATE = re.compile(rb"\n[ \t]*= [^\n]* =[ \t\r]*(?=\n)")  # a whole line: a cut-off one may lose its end
_TITLE_SEARCH_TAIL = 1 << 16  # bytes at a block's end searched for a title first (WikiText-2 has one every ~20 KB)


@dataclass(frozen=True)
class TextBlock:
    """Raw bytes of one input holding whole documents: cut where a document starts, so that blocks can be parsed
    apart (in worker processes) and give the documents `read_documents` gives."""

    path: str
    format: str
    data: bytes
    first_line: int  # 1-based number of the block's first line in its file
    at_start: bool  # the block opens its file, so a UTF-8 byte-order mark may lead
    continues: bool = False  # the block goes on with a document too long for the last one, already counted as cut


def read_blocks(paths: Sequence[Path], stats: ReadStats, *, block_bytes: int = BLOCK_BYTES,
                max_doc_chars: int = DEFAULT_MAX_DOC_CHARS) -> Iterator[TextBlock]:
    """The inputs as blocks of about `block_bytes` (decompressed), each ending where a document starts: before a
    WikiText title, after a blank line, after a JSON Lines record. Counts files and bytes in `stats`; nothing is
    decoded here. A document with no start in `4 × max_doc_chars` bytes (so at least max_doc_chars characters,
    which `block_documents` cuts and counts) is cut at a line end, or at a space, and the next block goes on with it;
    a JSON Lines record that long is an error. Raises BertError like read_documents, except for an input that
    holds no document (see `empty_input_error`)."""
    max_block_bytes = max(block_bytes, 4 * max_doc_chars)
    for path in checked_inputs(paths):
        fmt = detect_format(path)
        stats.files += 1
        first_line, at_start, continues, pending = 1, True, False, bytearray()
        searched = 0  # pending[:searched] holds no document start (but for one cut off at its end)
        with open_binary(path) as f:
            while True:
                raw = f.read(block_bytes)
                stats.bytes += len(raw)
                pending += raw
                if raw and len(pending) < block_bytes:
                    continue
                cut = _last_document_start(pending, fmt, searched) if raw else len(pending)
                if raw and not cut:
                    searched = len(pending)
                    if len(pending) < max_block_bytes:
                        continue
                    if fmt == "jsonl":
                        raise BertError(f"{path}:{first_line}: record is longer than {max_block_bytes} bytes; "
                                        "split the document into several records")
                    cut = (pending.rfind(b"\n") + 1) or (pending.rfind(b" ") + 1) or len(pending)
                    forced = True
                else:
                    forced = False
                if cut:
                    data = bytes(pending[:cut])
                    del pending[:cut]
                    searched = 0
                    yield TextBlock(str(path), fmt, data, first_line, at_start, continues)
                    first_line += data.count(b"\n")
                    at_start, continues = False, forced
                if not raw:
                    break


def block_documents(block: TextBlock, stats: ReadStats, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
                    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS) -> list[tuple[str, ...]]:
    """The documents (their lines) of one block, read by the rules of `read_documents`; counts what it reads in
    `stats` (lines, invalid UTF-8, long lines and documents split)."""
    check_limits(max_line_chars, max_doc_chars)
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


def _last_document_start(data: bytearray, fmt: str, searched: int = 0) -> int:
    """The offset of the last document start in `data` after its first byte, or 0 if none is found; `data` up to
    `searched` is known to hold none, so only the line it ends in and what follows are searched (a block that grows
    is not searched again from its start). Only ASCII blank lines and titles count, which can miss a boundary (the
    block then grows) but never invents one."""
    if fmt == "jsonl":
        return data.rfind(b"\n", searched) + 1
    start = max(0, data.rfind(b"\n", 0, searched))  # both patterns begin at a newline
    if fmt == "text":
        found = [m.end() for m in _BLANK_LINE.finditer(data, start)]
    else:
        # Title matches are whole lines and consume no newline, so a search from any offset finds the same matches
        # after it: the block's tail, where the last title usually is, comes first.
        found = _titles_after(data, max(start, len(data) - _TITLE_SEARCH_TAIL)) or _titles_after(data, start)
    return found[-1] if found else 0


def _titles_after(data: bytearray, start: int) -> list[int]:
    return [m.start() + 1 for m in _TITLE_CANDIDATE.finditer(data, start)
            if is_title(bytes(m.group())[1:].decode("utf-8", errors="replace"))]
