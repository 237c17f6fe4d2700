"""Opening, decompressing and decoding inputs (prep/textio.py)."""

import re

import pytest

from prep import textio
from prep.corpus import input_record, iter_lines, read_documents
from prep.errors import BertError
from prep.textio import ReadStats
from tests.prep.inputs import TEXT_SAMPLE, write


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
    chunk = textio.CHUNK_BYTES
    data = bytearray(b"a" * (3 * chunk + 100))
    data[chunk - 1 : chunk + 2] = b"\xef\xbf\xbd"  # literal U+FFFD across the first boundary
    data[2 * chunk - 1 : 2 * chunk + 1] = "é".encode()  # valid 2-byte character across the second
    data[3 * chunk - 1] = 0xFF  # one invalid byte just before the third
    path = write(tmp_path / "straddle.txt", bytes(data))
    stats = ReadStats()
    text = "".join(iter_lines([path], stats))
    assert text == bytes(data).decode("utf-8", errors="replace")
    assert stats.invalid_utf8 == 1


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
