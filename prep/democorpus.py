"""The offline demo corpus: English prose taken from the docstrings of the Python standard library.

Every machine that runs this project has a Python, so this text is there without a download. The sources are
parsed with ``ast`` and never imported (importing runs module code: GUI windows, network, side effects).
Output is the ``text`` input format: one document per module, one docstring paragraph per line, documents
separated by a blank line.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from prep.outputs import open_atomic

# Test suites and IDLE are code-heavy and their docstrings describe tests; site-packages is not the stdlib;
# encodings/ holds ~100 generated codecs that repeat one boilerplate docstring; turtledemo is demo scripts.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
     "turtledemo", "encodings"}
)
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# A whitespace-delimited token that is a plain word, maybe quoted, bracketed or followed by punctuation.
_WORD = re.compile(r"(?<!\S)[(\"']?[A-Za-z][a-z]*(?:'[a-z]+)?[)\"']?[,.;:!?]?[)\"']?(?!\S)")
_RULE_LINE = re.compile(r"[\W_]+")  # reST underlines and table borders: "-----", "=====", "+---+"
# Lines only code starts with: definitions, imports, decorators, comments, assignments, block headers.
_CODE_LINE = re.compile(
    r"(?:async )?def \w+\(|class \w+[(:]|import \w|from [\w.]+ import |@\w|#|\w+(?:\[.*\])? = "
    r"|(?:if|for|while|with|try|else|elif|except|finally)\b.*:$"
)
_BAD_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # controls from "\0"-style escapes, lone surrogates
_MIN_WORDS = 3
_MIN_WORD_SHARE = 0.6


def write_demo_corpus(out: Path) -> dict:
    """Write the demo corpus to ``out`` and return {"documents", "lines", "bytes"} of what was written.

    Deterministic for a given Python installation (files in sorted order); written to a temporary name in the
    same directory and renamed, so ``out`` is either the old file or the complete new one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    documents = 0
    lines = 0
    with open_atomic(out, text=True) as f:
        for source in stdlib_sources():
            paragraphs = module_paragraphs(source)
            if not paragraphs:
                continue
            if documents:
                f.write("\n")
            f.write("\n".join(paragraphs) + "\n")
            documents += 1
            lines += len(paragraphs)
    return {"documents": documents, "lines": lines, "bytes": out.stat().st_size}


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The .py files under ``root`` (default: this Python's stdlib) outside the skipped dirs, sorted by path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def module_paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of one source file, each on one line: module docstring first, then class and
    function docstrings in source order. A paragraph repeated within the module is kept once. A file that does
    not parse gives []."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules warn at parse time
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    seen = set()
    paragraphs = []
    for node in _documented_nodes(tree):
        docstring = ast.get_docstring(node, clean=True)
        for paragraph in docstring_paragraphs(docstring or ""):
            if paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return paragraphs


def _documented_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The module, classes and functions under ``node`` in source order.

    Walks statement lists only (bodies, else/except/finally branches, match cases), not expressions: a docstring
    can only sit at the top of a statement list, and skipping the expression nodes makes this much faster than
    ast.walk.
    """
    if isinstance(node, _DOCUMENTED):
        yield node
    for field in ("body", "orelse", "handlers", "finalbody", "cases"):
        for child in getattr(node, field, ()):
            if hasattr(child, "body"):  # simple statements (assignments, calls, ...) hold no docstring
                yield from _documented_nodes(child)


def docstring_paragraphs(docstring: str) -> list[str]:
    """Split a docstring at blank lines into paragraphs reflowed onto one line, keeping only prose.

    Doctest examples (from a ">>>" line to the end of its paragraph) and reST rule lines are dropped. A paragraph
    is dropped when it is indented (a literal block) or has a line only code starts with (``def f(``,
    ``import x``, ``x = ``, ``if ...:``); it is kept when it has at least 3 words and at least 60% of its tokens
    are plain words, which leaves out the remaining code samples, signatures and tables.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring.strip("\n")):
        if block[:1].isspace():
            continue  # indented beyond the docstring's margin: a reST literal block, nearly always code
        kept_lines = []
        for line in block.split("\n"):
            stripped = line.strip()
            if stripped.startswith(">>>"):
                break  # the rest of the paragraph is the example's input and expected output
            if _CODE_LINE.match(stripped):
                kept_lines = []
                break
            if stripped and not _RULE_LINE.fullmatch(stripped):
                kept_lines.append(stripped)
        tokens = " ".join(kept_lines).split()
        paragraph = " ".join(tokens)
        if _BAD_CHARS.search(paragraph):
            continue
        words = len(_WORD.findall(paragraph))
        if words >= _MIN_WORDS and words >= _MIN_WORD_SHARE * len(tokens):
            paragraphs.append(paragraph)
    return paragraphs
