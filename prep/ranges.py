"""The input cut into ranges: fixed spans of text that any process can read on its own.

Range k of an input holds the documents that start in its decompressed bytes [k × range_bytes, (k+1) × range_bytes):
it begins at `boundary(k × range_bytes)`, the first document start found from there (a blank line's end, a WikiText
title, a record's end), and ends where range k+1 begins. A boundary is a function of the bytes around it alone, so
the ranges are the same whichever process reads them and however many there are. A plain file is read from a seek;
a .zst file from the frame its range starts in (many small frames make it as seekable as a plain file; a single
frame is decompressed from its start, so its ranges are read in a few runs that each make one pass).
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from prep.blocks import TextBlock, block_documents
from prep.errors import BertError
from prep.formats import DEFAULT_MAX_DOC_CHARS, detect_format, is_title
from prep.textio import ReadStats, is_zstd, open_binary, open_or_fail, zstd_frames

RANGE_BYTES = 1 << 20  # text per range: fine enough to balance workers, coarse enough that its padded rows cost ~0
MAX_RUNS_PER_FRAME = 16  # a single-frame .zst is read in at most this many passes, each decompressing from the start

_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_TITLE_CANDIDATE = re.compile(rb"\n[ \t]*= [^\n]* =[ \t\r]*(?=\n)")  # a whole line: a cut-off one may lose its end
_FIRST_SEARCH_BYTES = 1 << 16
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class InputText:
    """One input as the range reader sees it: its format, its decompressed size, and where its frames start."""

    path: str
    format: str
    text_bytes: int
    frame_offsets: tuple[int, ...] = (0,)  # byte offset in the file of each frame a reader may start at
    frame_text_offsets: tuple[int, ...] = (0,)  # and the offset of that frame's first byte in the text

    def ranges(self, range_bytes: int) -> int:
        """How many ranges the input is cut into (at least one, which an empty input leaves empty)."""
        return max(1, -(-self.text_bytes // range_bytes))


def inspect_input(path: Path) -> InputText:
    """Format, size and frame table of one input. A .zst file's frames are walked (that also finds a truncated
    file); when one does not record its size, the file is decompressed once to count, and readers start at the
    first frame. Raises BertError for a missing, unreadable or corrupt input."""
    path = Path(path)
    fmt = detect_format(path)
    if not is_zstd(path):
        return InputText(str(path), fmt, path.stat().st_size)
    with open_or_fail(path, "rb") as raw:
        frames = zstd_frames(raw, path)
    sizes = [size for _, size in frames]
    if frames and None not in sizes:
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        return InputText(str(path), fmt, starts[-1], tuple(offset for offset, _ in frames), tuple(starts[:-1]))
    text_bytes = 0
    with open_binary(path, checked=True) as stream:
        while chunk := stream.read(_READ_BYTES):
            text_bytes += len(chunk)
    return InputText(str(path), fmt, text_bytes)


@dataclass(frozen=True)
class RangeRun:
    """Consecutive ranges [first, stop) of one input, read in one pass; `first_id` numbers the input's range 0 among
    all ranges of the job. A .zst input is decompressed from the frame at `file_offset` (text offset `text_offset`),
    the last one starting before the run's text."""

    path: str
    format: str
    ranges: int  # the input's ranges
    first_id: int
    first: int
    stop: int
    file_offset: int = 0
    text_offset: int = 0
    text_bytes: int = 0  # about how much text the run reads (the input's last range may be short)


def plan_runs(texts: list[InputText], range_bytes: int, workers: int, first_id: int = 0) -> list[RangeRun]:
    """The reading tasks for the inputs' ranges, numbered from `first_id` in input order. A range is a task of its
    own where a reader can start near it; the ranges that start in one frame of a .zst file are grouped into at
    most `MAX_RUNS_PER_FRAME` (and 2 × workers) runs, since each run decompresses the frame from its start. The runs
    decide only who reads what, never the bytes of the output."""
    runs = []
    for text in texts:
        count = text.ranges(range_bytes)
        zstd = is_zstd(Path(text.path))
        search_starts = np.maximum(np.arange(count) * range_bytes - 1, 0)  # a range's start is searched from there
        frame_of_range = np.searchsorted(text.frame_text_offsets, search_starts, side="right") - 1
        for frame in np.unique(frame_of_range).tolist():
            members = np.flatnonzero(frame_of_range == frame)
            pieces = min(len(members), MAX_RUNS_PER_FRAME, 2 * max(1, workers)) if zstd else len(members)
            for part in np.array_split(members, pieces):
                offsets = (text.frame_offsets[frame], text.frame_text_offsets[frame]) if zstd else (0, 0)
                first, stop = int(part[0]), int(part[-1]) + 1
                text_bytes = min(stop * range_bytes, text.text_bytes) - first * range_bytes
                runs.append(RangeRun(text.path, text.format, count, first_id, first, stop, *offsets, text_bytes))
        first_id += count
    return runs


def read_run(run: RangeRun, range_bytes: int, max_doc_chars: int = DEFAULT_MAX_DOC_CHARS
             ) -> Iterator[tuple[int, TextBlock]]:
    """(range id, its text) for each range of `run` in order: raw bytes from one boundary to the next. A range with
    no document start in `4 × max_doc_chars` bytes after its offset starts at a line end (or, in a line that long,
    at a character) instead, and is marked as continuing the document before it; a JSON Lines record that long is
    an error."""
    path, max_scan = Path(run.path), 4 * max_doc_chars
    with _open_window(run, run.first, range_bytes) as window:
        begin, continues = _boundary(window, run.first * range_bytes, run.format, max_scan, path)
        # A document is counted as cut once: where the range before did not start inside it too.
        after_cut = continues and run.first > 0 and _starts_cut(run, run.first - 1, range_bytes, max_scan)
        for index in range(run.first, run.stop):
            end, forced = ((window.read_to_end(), False) if index == run.ranges - 1
                           else _boundary(window, (index + 1) * range_bytes, run.format, max_scan, path))
            end = max(begin, end)
            block = TextBlock(run.path, run.format, window.take(begin, end), at_start=begin == 0,
                              continues=continues, first_cut=continues and not after_cut, offset=begin)
            window.drop_before(min(end, (index + 2) * range_bytes - 1))  # keep what the next search starts in
            yield run.first_id + index, block
            begin, continues, after_cut = end, forced, continues


@contextmanager
def _open_window(run: RangeRun, index: int, range_bytes: int) -> Iterator["_Window"]:
    """A window on the input's text starting where range `index`'s start is searched from (the byte before its
    offset): a plain file is opened there, a .zst one at the run's frame (or, before it, at the file's start)."""
    path = Path(run.path)
    start_at = max(0, index * range_bytes - 1)
    if not is_zstd(path):
        file_offset = text_offset = start_at
    elif start_at >= run.text_offset:
        file_offset, text_offset = run.file_offset, run.text_offset
    else:
        file_offset = text_offset = 0
    with open_binary(path, file_offset, checked=True) as stream:
        window = _Window(stream, text_offset)
        window.skip_to(start_at)
        yield window


def _starts_cut(run: RangeRun, index: int, range_bytes: int, max_scan: int) -> bool:
    """Whether range `index` starts with a forced cut (asked only at the rare document too long to find an end in)."""
    with _open_window(run, index, range_bytes) as window:
        return _boundary(window, index * range_bytes, run.format, max_scan, Path(run.path))[1]


class _Window:
    """The decompressed bytes of one input from offset `base` on, read forward as they are asked for."""

    def __init__(self, stream: BinaryIO, base: int):
        self.stream, self.base, self.data, self.eof = stream, base, bytearray(), False

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def fill(self, end: int) -> None:
        """Reads until the window reaches offset `end` or the input ends."""
        while self.end < end and not self.eof:
            chunk = self.stream.read(max(_FIRST_SEARCH_BYTES, end - self.end))
            self.eof = not chunk
            self.data += chunk

    def skip_to(self, offset: int) -> None:
        """Moves the window's start to `offset`, decompressing and dropping the text before it."""
        self.drop_before(offset)
        while self.base < offset and not self.eof:
            chunk = self.stream.read(min(_READ_BYTES, offset - self.base))
            self.eof = not chunk
            self.base += len(chunk)

    def drop_before(self, offset: int) -> None:
        cut = min(max(0, offset - self.base), len(self.data))
        del self.data[:cut]
        self.base += cut

    def read_to_end(self) -> int:
        while not self.eof:
            self.fill(self.end + _READ_BYTES)
        return self.end

    def take(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) as a new object."""
        self.fill(stop)
        return bytes(self.data[start - self.base : stop - self.base])


def _boundary(window: _Window, offset: int, fmt: str, max_scan: int, path: Path) -> tuple[int, bool]:
    """(the first document start at or after `offset`, False) as a pure function of the text from `offset - 1` to
    `offset - 1 + max_scan`; where that holds none, (a forced cut, True). The input's end is a boundary."""
    if offset == 0:
        return 0, False
    start, limit = offset - 1, offset - 1 + max_scan
    assert start >= window.base, "the window dropped text a boundary is searched in"
    searched = _FIRST_SEARCH_BYTES
    while True:
        window.fill(min(start + searched, limit))
        stop = min(window.end, limit)
        found = _document_start(window.data, fmt, start - window.base, stop - window.base)
        if found is not None:
            return window.base + found, False
        if stop >= limit or window.eof:
            break
        searched *= 2  # a boundary is searched again from `start`: the text it straddled is whole now
    if window.eof and window.end < limit:
        return window.end, False
    newline = window.data.find(b"\n", start - window.base, limit - window.base)
    if fmt == "jsonl":
        if newline < 0:
            raise BertError(f"{path}: a record near byte {offset} is longer than {max_scan} bytes; split the document "
                            "into several records")
    elif newline < 0:  # a line without end: cut at a character, not inside one
        cut = limit - window.base
        window.fill(limit + 4)
        while cut < len(window.data) and 0x80 <= window.data[cut] < 0xC0:
            cut += 1
        return window.base + cut, True
    return window.base + newline + 1, True


def _document_start(data: bytearray, fmt: str, start: int, stop: int) -> int | None:
    """The first document start in data[start:stop] after its first byte (the leftmost one, so that a search from
    any earlier offset that finds none before `start` finds the same), or None. Only ASCII blank lines and titles
    count, which can miss a boundary but never invents one."""
    if fmt == "jsonl":
        newline = data.find(b"\n", start, stop)
        return newline + 1 if newline >= 0 else None
    if fmt == "text":
        match = _BLANK_LINE.search(data, start, stop)
        return match.end() if match else None
    while (match := _TITLE_CANDIDATE.search(data, start, stop)) is not None:
        if is_title(bytes(match.group())[1:].decode("utf-8", errors="replace")):
            return match.start() + 1
        start = match.start() + 1
    return None


def range_documents(block: TextBlock, stats: ReadStats, **limits) -> list[tuple[str, ...]]:
    """`block_documents` of a range, with a bad record named by its line number in the file (counted only then)."""
    try:
        return block_documents(block, stats, **limits)
    except BertError:
        if block.offset == 0:
            raise
        block_documents(dataclasses.replace(block, first_line=line_number(Path(block.path), block.offset)),
                        ReadStats(), **limits)
        raise


def line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line at text offset `offset` of an input (for messages only: it reads the text up
    to there)."""
    lines, position = 1, 0
    with open_binary(path) as stream:
        while position < offset and (chunk := stream.read(min(_READ_BYTES, offset - position))):
            lines += chunk.count(b"\n")
            position += len(chunk)
    return lines
