"""The shard job on real WikiText-2 text: round trips, determinism, splits, statistics, interruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, build_wiki_shards
from prep.corpus import read_documents, split_sentences
from prep.masking import restore
from prep.shards import open_dataset
from prep.textio import ReadStats
from prep.vocab import load_tokenizer


def tokenized_documents(path: Path, vocab_dir: Path) -> list[list[int]]:
    """The corpus tokenized independently of the pipeline: sentence by sentence with the plain `encode`."""
    tokenizer = load_tokenizer(vocab_dir)
    docs = []
    for doc in read_documents([path], ReadStats()):
        ids = [i for line in doc.lines for s in split_sentences(line) for i in tokenizer.encode(s)]
        if ids:
            docs.append(ids)
    return docs


def restored_rows(dataset_dir: Path, split: str) -> np.ndarray:
    data = open_dataset(dataset_dir).split(split)
    rows = data.slice(0, data.rows)
    return restore(rows["input_ids"], rows["mlm_positions"], rows["mlm_labels"], 0).astype(np.int64)


def stream_body(rows: np.ndarray, pad: int = 0) -> list[int]:
    last = rows[-1][rows[-1] != pad]
    return rows[:-1, 1:-1].ravel().tolist() + last[1:-1].tolist()


def test_restoring_labels_reproduces_the_tokenized_corpus(wiki_shards, vocab_dir, wiki_valid, wiki_test):
    """Validation rows (corpus order) with their labels put back are exactly the tokenized corpus, documents joined
    by [SEP]; the shuffled training rows are, as a set, exactly the rows that packing the corpus gives."""
    sep = 3
    val = restored_rows(wiki_shards, "val")
    expected = []
    for doc in tokenized_documents(wiki_valid, vocab_dir):
        expected += ([sep] if expected else []) + doc
    assert stream_body(val) == expected

    train = restored_rows(wiki_shards, "train")
    stream = []
    for doc in tokenized_documents(wiki_test, vocab_dir):
        stream += ([sep] if stream else []) + doc
    body = len(train[0]) - 2
    full = len(stream) // body
    packed = np.asarray(stream[: full * body]).reshape(full, body)
    order = np.lexsort(train[:, 1:-1].T[::-1])
    train_full = train[order][: full] if len(stream) % body == 0 else None
    bodies = {tuple(r) for r in train[:, 1:-1].tolist()}
    assert len(train) == full + (1 if len(stream) % body else 0)
    assert all(tuple(r) in bodies for r in packed.tolist())
    assert train_full is None or np.array_equal(np.sort(train_full, axis=0), np.sort(packed, axis=0))


def test_identical_bytes_for_one_and_two_workers(tmp_path, vocab_dir, wiki_valid):
    """The same inputs and seed give byte-identical files (manifest included) with 1 and 2 worker processes."""
    options = dict(val_fraction=0.05, dupe_factor=2, rows_per_shard=700, whole_word=True, max_len=128)
    one = build_wiki_shards(tmp_path / "one", vocab_dir, [wiki_valid], workers=1, **options)
    two = build_wiki_shards(tmp_path / "two", vocab_dir, [wiki_valid], workers=2, **options)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) > 8 and files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_statistics_and_copies(tmp_path, vocab_dir, wiki_valid):
    """Masking statistics are BERT's within tolerance; --dupe-factor 2 writes two differently masked copies of
    every training row (the same rows once restored) and validation once; no [UNK] is ever a target."""
    path = build_wiki_shards(tmp_path / "d", vocab_dir, [wiki_valid], val_fraction=0.1, dupe_factor=2, max_len=128)
    manifest = open_dataset(path).manifest
    stats = manifest["stats"]["splits"]["train"]
    actions = stats["mask_actions"]
    total = sum(actions.values())
    assert abs(actions["mask"] / total - 0.8) < 0.02 and abs(actions["random"] / total - 0.1) < 0.02
    assert 17 <= stats["masked_per_row"] <= 20
    assert manifest["splits"]["train"]["copies"] == 2 and manifest["splits"]["val"]["copies"] == 1
    assert 0 < stats["unknown_token_rate"] < 0.1  # WikiText's <unk> arrives as [UNK]
    train = restored_rows(path, "train")
    rows = {tuple(r) for r in train.tolist()}
    assert len(train) == 2 * len(rows) + (len(train) % 2)  # every row twice (identical rows aside)
    data = open_dataset(path).split("train").slice(0, len(train))
    assert not (data["mlm_labels"] == 1).any()  # [UNK] id 1 never a label
    assert manifest["stats"]["documents"]["val"] > 0


def test_validation_documents_do_not_depend_on_max_len(tmp_path, vocab_dir, wiki_valid):
    """The 128- and 512-token datasets of one corpus hold out the same documents (the split is decided from the
    seed and the document alone)."""
    short = build_wiki_shards(tmp_path / "s", vocab_dir, [wiki_valid], val_fraction=0.2, max_len=128)
    long = build_wiki_shards(tmp_path / "l", vocab_dir, [wiki_valid], val_fraction=0.2, max_len=512)
    assert stream_body(restored_rows(short, "val")) == stream_body(restored_rows(long, "val"))
    assert open_dataset(long).manifest["stats"]["documents"] == open_dataset(short).manifest["stats"]["documents"]


def test_nsp_pairs_from_real_text(tmp_path, vocab_dir, wiki_valid):
    """--nsp writes token_type_ids and nsp_labels, about half the pairs random, every row [CLS] A [SEP] B [SEP]."""
    path = build_wiki_shards(tmp_path / "n", vocab_dir, [wiki_valid], val_fraction=0.1, nsp=True, max_len=128)
    train = open_dataset(path).split("train")
    rows = train.slice(0, train.rows)
    assert set(rows) == {"input_ids", "mlm_positions", "mlm_labels", "token_type_ids", "nsp_labels"}
    assert 0.45 < rows["nsp_labels"].mean() < 0.55
    seps = (rows["input_ids"] == 3).sum(1)
    assert (seps == 2).all()
    assert (rows["token_type_ids"].sum(1) > 0).all()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_dataset_and_rerun_completes(tmp_path, vocab_dir, wiki_valid, wiki_test, how):
    """Ctrl-C (exit 130, one line, no traceback) or kill -9 mid-run leaves no manifest and no output directory; the
    re-run completes and writes the same bytes as an uninterrupted run."""
    big = tmp_path / "big.tokens"
    big.write_bytes((wiki_valid.read_bytes() + wiki_test.read_bytes()) * 4)
    out = tmp_path / "out"
    def shard_command(out_dir):
        return [sys.executable, "-m", "prep", "shard", "-i", str(big), "--vocab", str(vocab_dir), "-o", str(out_dir),
                "--workers", "1", "--quiet", "--max-len", "64"]

    command = shard_command(out)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    partial = tmp_path / ".out.partial"
    deadline = time.monotonic() + 60
    while not (partial / "scratch").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert not out.exists()
    if how == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr and not partial.exists()
        assert stderr.strip().count("\n") == 0
    else:
        assert partial.exists()  # what kill -9 leaves; the next run clears it
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert (out / "manifest.msgpack").is_file() and not partial.exists()
    clean = tmp_path / "clean"
    subprocess.run(shard_command(clean), env=env, check=True, capture_output=True)
    for file in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (out / file).read_bytes() == (clean / file).read_bytes(), file
