"""Shared fixtures: the real WikiText-2 corpora beside the checkout, real vocabularies and shards made from them,
and a small real disk to fill up."""

import os
import subprocess
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


class SmallDisk:
    """A tmpfs of its own at `path`: a real file system that a test fills up, or turns read-only."""

    FILLER = "filler.bin"

    def __init__(self, path: Path):
        self.path = path

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave_bytes: int = 0) -> None:
        """Writes a filler file until only `leave_bytes` are free."""
        with open(self.path / self.FILLER, "ab") as f:
            while (missing := self.free_bytes() - leave_bytes) > 0:
                f.write(bytes(min(missing, 1 << 20)))
                f.flush()

    def free(self) -> None:
        """Deletes the filler: the space comes back."""
        (self.path / self.FILLER).unlink(missing_ok=True)

    def read_only(self, on: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    """A 32 MiB tmpfs mounted at tmp_path/disk for the test, unmounted after; skipped where mounting is not allowed
    (the tests run as root on CI)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs needs root: the disk-full and read-only tests run where that is allowed")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)
