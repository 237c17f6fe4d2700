"""Input text: read files into documents and lines, split sentences, sample lines, pick the validation split.

Three input formats, each optionally zstandard-compressed (a ``.zst`` suffix):

- ``text``: blank-line-separated blocks of lines; each block is a document.
- ``wikitext``: WikiText-style articles; a `` = Title = `` line starts a new document, deeper headings
  (`` = = Sub = = ``) stay inside it as a line holding the heading words.
- ``jsonl``: one JSON object per line; its ``"text"`` string is one document.

Reading streams: files are read in binary chunks of ``_CHUNK_BYTES`` and decoded incrementally, so memory stays
bounded by the chunk size, ``max_line_chars`` and ``max_doc_chars`` whatever the size of a file or of one line.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

from prep.errors import BertError

FORMATS = ("text", "wikitext", "jsonl")

_CHUNK_BYTES = 1 << 18
_BLOCK_BYTES = 1 << 18  # text per block handed to a worker
_DETECT_BYTES = 1 << 16
# A JSON-escaped character takes at most 6 characters (\uXXXX), so a record line this long can still hold a
# document of max_doc_chars; a longer record is refused rather than read whole.
_JSON_ESCAPE_FACTOR = 6
_DEFAULT_MAX_LINE_CHARS = 1_000_000
_DEFAULT_MAX_DOC_CHARS = 10_000_000

# "= Title =" (one '=' each side) or "= = Sub = =" (deeper), after stripping; group 1 holds one side's markers.
_HEADING = re.compile(r"(=(?: =)*) (.*\S) \1")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ReadStats:
    """Counts gathered while reading; reported in the shard manifest."""

    files: int = 0
    bytes: int = 0  # bytes of text read, after zstandard decompression
    lines: int = 0  # non-empty lines delivered (a cut long line counts once per piece)
    invalid_utf8: int = 0  # U+FFFD replacement characters we inserted for undecodable bytes
    long_lines_split: int = 0  # lines longer than max_line_chars, cut at whitespace into pieces
    long_documents_split: int = 0  # documents longer than max_doc_chars, cut into several documents

    def as_dict(self) -> dict:
        """The counts as a plain dict of ints, ready for JSON or msgpack."""
        return asdict(self)

    def add(self, other: "ReadStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Document:
    """One document: the unit that sentence pairs are drawn from and that goes wholly to train or validation."""

    index: int  # 0-based position in input order over all inputs (unique)
    lines: tuple[str, ...]  # the document's non-empty lines (paragraphs), stripped of surrounding whitespace


def detect_format(path: Path) -> str:
    """Return "text", "wikitext" or "jsonl" for an input path.

    A ``.zst`` suffix is looked through. ``.jsonl``/``.ndjson`` -> jsonl; a name ending in ``.tokens`` -> wikitext;
    otherwise wikitext when the first non-blank line is a `` = Title = `` heading, else text.
    Raises BertError if the path is missing or a directory.
    """
    path = Path(path)
    _check_input(path)
    name = path.name.lower()
    if name.endswith(".zst"):
        name = name[: -len(".zst")]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".tokens"):
        return "wikitext"
    return "wikitext" if _starts_with_title(path) else "text"


def read_documents(
    paths: Sequence[Path],
    stats: ReadStats,
    *,
    max_line_chars: int = _DEFAULT_MAX_LINE_CHARS,
    max_doc_chars: int = _DEFAULT_MAX_DOC_CHARS,
) -> Iterator[Document]:
    """Yield the documents of all inputs in order, each with a unique 0-based index.

    Every line is stripped and non-empty, at most ``max_line_chars`` characters (longer lines are cut at whitespace
    into consecutive lines); every document holds at most ``max_doc_chars`` characters of line text (a longer one
    is cut between lines into consecutive documents). Documents without a non-empty line are skipped and get no
    index. Updates ``stats`` as it goes. Raises BertError for a missing input, a directory, a bad jsonl record or
    corrupt zstandard data, and when the inputs hold no document at all.
    """
    _check_limits(max_line_chars, max_doc_chars)
    paths = _checked_inputs(paths)
    index = 0
    for lines in _group_documents(_line_events(paths, stats, max_line_chars, _JSON_ESCAPE_FACTOR * max_doc_chars),
                                  stats, max_doc_chars):
        yield Document(index, lines)
        index += 1
    if index == 0:
        raise empty_input_error(paths)


def _group_documents(events: Iterable[str | None], stats: ReadStats, max_doc_chars: int,
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


def read_blocks(paths: Sequence[Path], stats: ReadStats, *, block_bytes: int = _BLOCK_BYTES,
                max_doc_chars: int = _DEFAULT_MAX_DOC_CHARS) -> Iterator[TextBlock]:
    """The inputs as blocks of about `block_bytes` (decompressed), each ending where a document starts: before a
    WikiText title, after a blank line, after a JSON Lines record. Counts files and bytes in `stats`; nothing is
    decoded here. A document with no start in `4 × max_doc_chars` bytes (so at least max_doc_chars characters,
    which `block_documents` cuts and counts) is cut at a line end, or at a space, and the next block goes on with it;
    a JSON Lines record that long is an error. Raises BertError like read_documents, except for an input that holds no document (see
    `empty_input_error`)."""
    max_block_bytes = max(block_bytes, 4 * max_doc_chars)
    for path in _checked_inputs(paths):
        fmt = detect_format(path)
        stats.files += 1
        first_line, at_start, continues, pending = 1, True, False, bytearray()
        searched = 0  # pending[:searched] holds no document start (but for one cut off at its end)
        with _open_binary(path) as f:
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


def block_documents(block: TextBlock, stats: ReadStats, *, max_line_chars: int = _DEFAULT_MAX_LINE_CHARS,
                    max_doc_chars: int = _DEFAULT_MAX_DOC_CHARS) -> list[tuple[str, ...]]:
    """The documents (their lines) of one block, read by the rules of `read_documents`; counts what it reads in
    `stats` (lines, invalid UTF-8, long lines and documents split)."""
    _check_limits(max_line_chars, max_doc_chars)
    text = block.data.decode("utf-8-sig" if block.at_start else "utf-8", errors="replace")
    if "\ufffd" in text:
        stats.invalid_utf8 += text.count("\ufffd") - block.data.count(b"\xef\xbf\xbd")
    if block.format != "jsonl" and not block.continues:
        documents = _plain_block_documents(text, block.format == "wikitext", max_line_chars, max_doc_chars)
        if documents is not None:
            stats.lines += sum(map(len, documents))
            return documents
    events = _format_events(block.format, [text], stats, max_line_chars, _JSON_ESCAPE_FACTOR * max_doc_chars,
                            Path(block.path), block.first_line)
    return list(_group_documents(events, stats, max_doc_chars, continued=block.continues))


def _plain_block_documents(text: str, wikitext: bool, max_line_chars: int,
                           max_doc_chars: int) -> list[tuple[str, ...]] | None:
    """`block_documents` of a text or WikiText block in which no line or document reaches a limit, by a few calls
    over the whole block rather than a chain of generators per line; None when a limit is reached (the general
    reader then cuts and counts). tests/prep/test_corpus.py checks that both give the same."""
    lines = text.split("\n")
    if max(map(len, lines)) > max_line_chars:
        return None
    lines = list(map(str.strip, lines))
    if wikitext:
        lines = _wikitext_lines([line for line in lines if line])
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


def _wikitext_lines(lines: list[str]) -> list[str | None]:
    """What `_wikitext_events` makes of stripped non-empty lines."""
    return [event for line in lines for event in _wikitext_line(line)]


def _wikitext_line(line: str) -> tuple[str | None, ...]:
    """One stripped non-empty WikiText line as events: a title is None (a new document) and its words, a deeper
    heading its words, any other line itself with WikiText's markers undone."""
    heading = _HEADING.fullmatch(line) if line[0] == "=" else None
    if heading is None:
        return (_untokenize_wikitext(line),)
    return (None, heading.group(2)) if heading.group(1) == "=" else (heading.group(2),)


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_TITLE_CANDIDATE = re.compile(rb"\n[ \t]*= [^\n]* =[ \t\r]*(?=\n)")  # a whole line: a cut-off one may lose its end
_TITLE_SEARCH_TAIL = 1 << 16  # bytes at a block's end searched for a title first (WikiText-2 has one every ~20 KB)


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
    return [m.start() + 1 for m in _TITLE_CANDIDATE.finditer(data, start) if _is_title(bytes(m.group())[1:])]


def _is_title(line: bytes) -> bool:
    heading = _HEADING.fullmatch(line.decode("utf-8", errors="replace").strip())
    return heading is not None and heading.group(1) == "="


def iter_lines(
    paths: Sequence[Path], stats: ReadStats, *, max_line_chars: int = _DEFAULT_MAX_LINE_CHARS
) -> Iterator[str]:
    """Yield every non-empty line of all inputs in order, as read_documents would put them in documents.

    Same decoding, heading and long-line rules as read_documents (jsonl: the lines of each record's text;
    wikitext: heading words without '=' markers). Raises BertError like read_documents.
    """
    max_doc_chars = max(max_line_chars, _DEFAULT_MAX_DOC_CHARS)  # here it only bounds a jsonl record's length
    _check_limits(max_line_chars, max_doc_chars)
    paths = _checked_inputs(paths)
    found = False
    for line in _line_events(paths, stats, max_line_chars, _JSON_ESCAPE_FACTOR * max_doc_chars):
        if line is not None:
            found = True
            yield line
    if not found:
        raise empty_input_error(paths)


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
    # lookbehinds come after the character class so that the scan only stops at '.', '!' and '?' (30x faster)
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
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"),
        digest_size=8,
        key=str(int(seed)).encode("ascii"),
        person=b"bertprep-val",
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def input_record(path: Path) -> dict:
    """Describe one input for the manifest: resolved path, size in bytes on disk, sha256 of those bytes, format.

    The hash streams the file in chunks. Raises BertError if the path is missing or a directory.
    """
    path = Path(path)
    _check_input(path)
    sha = hashlib.sha256()
    size = 0
    with _open_or_fail(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return {"path": str(path.resolve()), "bytes": size, "sha256": sha.hexdigest(), "format": detect_format(path)}


def _check_limits(max_line_chars: int, max_doc_chars: int) -> None:
    if max_line_chars < 1:
        raise BertError(f"max_line_chars must be at least 1, got {max_line_chars}")
    if max_doc_chars < max_line_chars:
        raise BertError(
            f"max_doc_chars ({max_doc_chars}) must be at least max_line_chars ({max_line_chars}); "
            "raise the document limit or lower the line limit"
        )


def _check_input(path: Path) -> None:
    if not path.exists():
        raise BertError(
            f"input not found: {path} (check the path; inputs are text, WikiText .tokens or .jsonl files, "
            "optionally compressed as .zst)"
        )
    if path.is_dir():
        raise BertError(f"input is a directory: {path}; pass the files inside it instead (e.g. {path}/*.txt)")


def _checked_inputs(paths: Sequence[Path]) -> list[Path]:
    """All inputs as Paths, every one checked before any is read: a typo in the last path fails at once."""
    paths = [Path(p) for p in paths]
    for path in paths:
        _check_input(path)
    return paths


def empty_input_error(paths: Sequence[Path]) -> BertError:
    names = ", ".join(str(p) for p in paths) or "(no paths given)"
    return BertError(f"the input is empty: no non-blank text in {names}; check that the files hold text")


@contextlib.contextmanager
def _open_or_fail(path: Path, mode: str) -> Iterator[BinaryIO]:
    try:
        f = open(path, mode)
    except OSError as e:
        raise BertError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    with f:
        yield f


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's content as a binary stream, decompressed when the name ends in .zst."""
    with _open_or_fail(path, "rb") as raw:
        if path.name.lower().endswith(".zst"):
            import zstandard  # only .zst inputs need it (a GPU machine's image may lack it)

            _check_zstd_frames(raw, path)
            raw.seek(0)
            # read_across_frames: files written by pzstd or appended to hold several frames.
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as z:
                yield _ZstdStream(z, path, zstandard.ZstdError)
        else:
            yield raw


class _ZstdStream:
    """A decompressing stream whose corrupt data raises BertError."""

    def __init__(self, stream, path: Path, error: type):
        self.stream, self.path, self.error = stream, path, error

    def read(self, n_bytes: int) -> bytes:
        try:
            return self.stream.read(n_bytes)
        except self.error as e:
            raise BertError(f"{self.path}: corrupt zstandard data ({e}); recompress the file or drop the .zst "
                            "suffix") from None


def _check_zstd_frames(f: BinaryIO, path: Path) -> None:
    """Walk the frame and block headers of a zstandard file (seeking, not decompressing) and raise BertError
    unless they end exactly at the end of the file.

    Needed because the decompressor reports a cut-off file (an interrupted download) as a clean end of data, which
    would silently drop the rest of the corpus. Layout per RFC 8878, section 3.1.
    """

    truncated = BertError(f"{path}: truncated zstandard data (the file ends inside a frame); fetch it again")

    def read_at(pos: int, n: int) -> bytes:
        f.seek(pos)
        data = f.read(n)
        if len(data) < n:
            raise truncated
        return data

    size = f.seek(0, 2)
    pos = 0
    while pos < size:
        magic = int.from_bytes(read_at(pos, 4), "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: 4-byte length, then that many bytes
            pos += 8 + int.from_bytes(read_at(pos + 4, 4), "little")
            continue
        if magic != 0xFD2FB528:
            raise BertError(
                f"{path}: corrupt zstandard data (no frame at byte {pos}); recompress the file or drop the .zst suffix"
            )
        descriptor = read_at(pos + 4, 1)[0]
        single_segment = descriptor >> 5 & 1
        pos += 5 + (1 - single_segment)  # magic, descriptor, window byte unless single-segment
        pos += (0, 1, 2, 4)[descriptor & 3]  # dictionary id
        pos += (single_segment, 2, 4, 8)[descriptor >> 6]  # frame content size
        last_block = False
        while not last_block:
            block = int.from_bytes(read_at(pos, 3), "little")
            last_block = bool(block & 1)
            pos += 3 + (1 if (block >> 1 & 3) == 1 else block >> 3)  # an RLE block stores one byte
        pos += 4 * (descriptor >> 2 & 1)  # content checksum
    if pos != size:
        raise truncated


def _decoded_chunks(path: Path, stats: ReadStats, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[str]:
    """Decode the file as UTF-8 (a leading BOM dropped) in chunks, replacing invalid bytes with U+FFFD.

    Adds the bytes read to ``stats.bytes`` and the U+FFFD we inserted (not those already in the text) to
    ``stats.invalid_utf8``.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    with _open_binary(path) as f:
        while True:
            raw = f.read(chunk_bytes)
            # Bytes the decoder still holds from the last chunk: a literal U+FFFD may straddle the chunk boundary.
            pending = decoder.getstate()[0]
            text = decoder.decode(raw, final=not raw)
            stats.bytes += len(raw)
            if "\ufffd" in text:
                # EF BF BD always decodes to one U+FFFD of the text's own; every other U+FFFD is ours.
                stats.invalid_utf8 += text.count("\ufffd") - (pending + raw).count(b"\xef\xbf\xbd")
            if text:
                yield text
            if not raw:
                return


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


def _line_events(
    paths: Sequence[Path], stats: ReadStats, max_line_chars: int, max_record_chars: int
) -> Iterator[str | None]:
    """The non-empty lines of all inputs in order, with None marking a document boundary (at least one per file)."""
    for path in paths:
        stats.files += 1
        yield from _format_events(detect_format(path), _decoded_chunks(path, stats), stats, max_line_chars,
                                  max_record_chars, path)
        yield None


def _format_events(fmt: str, chunks: Iterable[str], stats: ReadStats, max_line_chars: int, max_record_chars: int,
                   path: Path, first_line: int = 1) -> Iterator[str | None]:
    """One input's decoded text as lines and document boundaries (None), read by its format's rules."""
    readers = {"text": _text_events, "wikitext": _wikitext_events, "jsonl": _jsonl_events}
    for line in readers[fmt](chunks, stats, max_line_chars, max_record_chars, path, first_line):
        if line is not None:
            stats.lines += 1
        yield line


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
            yield from _wikitext_line(line)


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


def _starts_with_title(path: Path) -> bool:
    """True if the first non-blank line of the (decompressed) file is a " = Title = " heading."""
    head = ""
    at_eof = True
    with contextlib.closing(_decoded_chunks(path, ReadStats(), chunk_bytes=_DETECT_BYTES)) as chunks:
        for text in chunks:
            head += text
            if "\n" in head.lstrip() or len(head) > _DETECT_BYTES:
                at_eof = False
                break
    line, newline, _ = head.lstrip().partition("\n")
    if not newline and not at_eof:
        return False  # a first line longer than the peek is no title
    heading = _HEADING.fullmatch(line.strip())
    return heading is not None and heading.group(1) == "="
