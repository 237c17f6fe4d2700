"""Shared fixtures: the real WikiText-2 corpora beside the checkout."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """`../shared` beside the checkout, or $BERT_SHARED_DIR."""
    return Path(os.environ.get("BERT_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    path = shared_dir() / "corpora" / "wikitext-2" / "wiki.valid.tokens"
    assert path.is_file(), f"WikiText-2 validation split not found at {path}"
    return path


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    path = shared_dir() / "corpora" / "wikitext-2" / "wiki.test.tokens"
    assert path.is_file(), f"WikiText-2 test split not found at {path}"
    return path


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory, wiki_valid) -> Path:
    """A real uncased WordPiece vocabulary (4000 tokens) trained on wiki.valid.tokens: vocab.txt + vocab.json."""
    from prep.corpus import input_record
    from prep.vocab import VocabConfig, train_vocab

    out_dir = tmp_path_factory.mktemp("vocab")
    lines = wiki_valid.read_text(encoding="utf-8").split("\n")
    train_vocab(lines, out_dir, VocabConfig(vocab_size=4000, threads=1), inputs=[input_record(wiki_valid)])
    return out_dir
