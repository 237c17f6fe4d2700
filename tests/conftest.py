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


def build_wiki_shards(out_dir: Path, vocab_dir: Path, inputs, val_inputs=(), **options) -> Path:
    """Shards of real WikiText-2 text made by the real pipeline (one worker unless asked, no progress bar)."""
    from prep.masking import MaskingConfig
    from prep.pipeline import ShardConfig, build_shards

    max_len = options.pop("max_len", 64)
    mask_prob = options.pop("mask_prob", 0.15)
    masking = MaskingConfig(mask_prob, MaskingConfig.default_max_predictions(max_len, mask_prob),
                            options.pop("whole_word", False))
    config = ShardConfig(inputs=tuple(inputs), val_inputs=tuple(val_inputs), vocab=vocab_dir, out_dir=out_dir,
                         max_len=max_len, masking=masking, **{"workers": 1, "progress": False, "seed": 7, **options})
    build_shards(config)
    return out_dir


@pytest.fixture(scope="session")
def wiki_shards(tmp_path_factory, vocab_dir, wiki_valid, wiki_test) -> Path:
    """WikiText-2 shards, 64 tokens a row: train from wiki.test.tokens, val from wiki.valid.tokens (in order)."""
    return build_wiki_shards(tmp_path_factory.mktemp("shards") / "wiki_64", vocab_dir, [wiki_test], [wiki_valid])


@pytest.fixture(scope="session")
def wiki_shards_16(tmp_path_factory, vocab_dir, wiki_valid, wiki_test) -> Path:
    """The same WikiText-2 text in rows of 16 tokens, where a tiny model learns to read context within a test's
    budget (see tests/train/test_loop.py)."""
    return build_wiki_shards(tmp_path_factory.mktemp("shards") / "wiki_16", vocab_dir, [wiki_test], [wiki_valid],
                             max_len=16)
