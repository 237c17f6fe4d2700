"""Input files for the reading tests: a sample of each format with the documents it holds, and a writer."""

import json
from pathlib import Path

import zstandard

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
