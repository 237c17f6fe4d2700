"""Opening inputs: check the paths, decompress zstandard (a ``.zst`` suffix), decode UTF-8 in bounded chunks.

Files are read in binary chunks of ``CHUNK_BYTES`` and decoded incrementally, so memory stays bounded by the chunk
size whatever the size of a file. What is read is counted in a `ReadStats`.
"""

from __future__ import annotations

import codecs
import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from prep.errors import BertError

CHUNK_BYTES = 1 << 18


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


def check_input(path: Path) -> None:
    """Raise BertError if ``path`` is missing or a directory."""
    if not path.exists():
        raise BertError(
            f"input not found: {path} (check the path; inputs are text, WikiText .tokens or .jsonl files, "
            "optionally compressed as .zst)"
        )
    if path.is_dir():
        raise BertError(f"input is a directory: {path}; pass the files inside it instead (e.g. {path}/*.txt)")


def checked_inputs(paths: Sequence[Path]) -> list[Path]:
    """All inputs as Paths, every one checked before any is read: a typo in the last path fails at once."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_input(path)
    return paths


def empty_input_error(paths: Sequence[Path]) -> BertError:
    """The error for inputs that hold no non-blank text, naming them."""
    names = ", ".join(str(p) for p in paths) or "(no paths given)"
    return BertError(f"the input is empty: no non-blank text in {names}; check that the files hold text")


@contextlib.contextmanager
def open_or_fail(path: Path, mode: str) -> Iterator[BinaryIO]:
    """``open(path, mode)``, with an unreadable file raised as BertError."""
    try:
        f = open(path, mode)
    except OSError as e:
        raise BertError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    with f:
        yield f


@contextlib.contextmanager
def open_binary(path: Path, frame_offset: int = 0, checked: bool = False) -> Iterator[BinaryIO]:
    """The file's content as a binary stream, decompressed when the name ends in .zst.

    `frame_offset` starts the stream at that byte of the file: for a .zst file, where a frame begins (one of
    `zstd_frames`). `checked` says the frames were walked already, which a reader of many ranges does once.
    """
    with open_or_fail(path, "rb") as raw:
        if is_zstd(path):
            import zstandard  # only .zst inputs need it (a GPU machine's image may lack it)

            if not checked:
                zstd_frames(raw, path)
            raw.seek(frame_offset)
            # read_across_frames: files written by pzstd or appended to hold several frames.
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as z:
                yield _ZstdStream(z, path, zstandard.ZstdError)
        else:
            raw.seek(frame_offset)
            yield raw


def is_zstd(path: Path) -> bool:
    return Path(path).name.lower().endswith(".zst")


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


def zstd_frames(f: BinaryIO, path: Path) -> list[tuple[int, int | None]]:
    """The frames of a zstandard file as (byte offset in the file, decompressed size or None where the frame does
    not record it), skippable frames left out, found by walking the frame and block headers (seeking, not
    decompressing); BertError unless they end exactly at the end of the file.

    Needed because the decompressor reports a cut-off file (an interrupted download) as a clean end of data, which
    would silently drop the rest of the corpus; the offsets let a reader start at a frame. Layout per RFC 8878,
    section 3.1.
    """

    truncated = BertError(f"{path}: truncated zstandard data (the file ends inside a frame); fetch it again")

    def read_at(pos: int, n: int) -> bytes:
        f.seek(pos)
        data = f.read(n)
        if len(data) < n:
            raise truncated
        return data

    size = f.seek(0, 2)
    frames = []
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
        start = pos
        descriptor = read_at(pos + 4, 1)[0]
        single_segment = descriptor >> 5 & 1
        pos += 5 + (1 - single_segment)  # magic, descriptor, window byte unless single-segment
        pos += (0, 1, 2, 4)[descriptor & 3]  # dictionary id
        size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]  # frame content size
        content_size = None
        if size_bytes:
            content_size = int.from_bytes(read_at(pos, size_bytes), "little") + (256 if size_bytes == 2 else 0)
        pos += size_bytes
        last_block = False
        while not last_block:
            block = int.from_bytes(read_at(pos, 3), "little")
            last_block = bool(block & 1)
            pos += 3 + (1 if (block >> 1 & 3) == 1 else block >> 3)  # an RLE block stores one byte
        pos += 4 * (descriptor >> 2 & 1)  # content checksum
        frames.append((start, content_size))
    if pos != size:
        raise truncated
    return frames


def decoded_chunks(path: Path, stats: ReadStats, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode the file as UTF-8 (a leading BOM dropped) in chunks, replacing invalid bytes with U+FFFD.

    Adds the bytes read to ``stats.bytes`` and the U+FFFD we inserted (not those already in the text) to
    ``stats.invalid_utf8``.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    with open_binary(path) as f:
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
