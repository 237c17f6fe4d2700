"""The shard job on real WikiText-2 text: round trips, determinism, splits, statistics, interruption."""

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, build_wiki_shards
from tests.jobs import processes_in_group
from prep.corpus import split_sentences
from prep.masking import restore
from prep.shards import open_dataset
from prep.vocab import load_tokenizer
from tests.prep.rows import documents_by_range, expected_rows, sorted_rows, stream_bodies


def sentence_encoder(vocab_dir: Path):
    """A document's ids computed independently of the pipeline: sentence by sentence with the plain `encode`."""
    tokenizer = load_tokenizer(vocab_dir)
    return lambda lines: [i for line in lines for s in split_sentences(line) for i in tokenizer.encode(s)]


def restored_rows(dataset_dir: Path, split: str) -> np.ndarray:
    data = open_dataset(dataset_dir).split(split)
    rows = data.slice(0, data.rows)
    return restore(rows["input_ids"], rows["mlm_positions"], rows["mlm_labels"], 0).astype(np.int64)


def test_restoring_labels_reproduces_the_tokenized_corpus(wiki_shards, vocab_dir, wiki_valid, wiki_test):
    """Validation rows (corpus order) with their labels put back are exactly the tokenized corpus: each range of
    input (1 MiB of text, two here) its documents joined by [SEP] and cut into rows; the shuffled training rows are,
    as a set, exactly the rows that packing the corpus gives."""
    encode = sentence_encoder(vocab_dir)
    val = restored_rows(wiki_shards, "val")
    expected_val = expected_rows(wiki_valid, encode, 64)
    assert len(documents_by_range(wiki_valid)) == 2 and np.array_equal(val, expected_val)

    train = restored_rows(wiki_shards, "train")
    assert np.array_equal(sorted_rows(train), sorted_rows(expected_rows(wiki_test, encode, 64)))
    assert not np.array_equal(train, expected_rows(wiki_test, encode, 64))  # shuffled


@pytest.mark.parametrize("layout", [dict(whole_word=True), dict(nsp=True, nsp_mode="random")])
def test_identical_bytes_for_one_two_and_three_workers(tmp_path, vocab_dir, wiki_valid, layout):
    """The same inputs and seed give byte-identical files (manifest included) with 1, 2 and 3 worker processes, on
    a dataset of many ranges and several training and validation shards: what a range holds, how its rows are
    masked and where the shuffle puts them never depend on which worker made them or in what order they finished."""
    options = dict(val_fraction=0.2, dupe_factor=2, rows_per_shard=300, range_bytes=1 << 16, max_len=128, **layout)
    outputs = [build_wiki_shards(tmp_path / f"w{workers}", vocab_dir, [wiki_valid], workers=workers, **options)
               for workers in (1, 2, 3)]
    splits = open_dataset(outputs[0]).manifest["splits"]
    assert len(splits["train"]["shards"]) > 5 and len(splits["val"]["shards"]) > 1
    files = sorted(p.relative_to(outputs[0]) for p in outputs[0].rglob("*") if p.is_file())
    for other in outputs[1:]:
        assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
        for name in files:
            assert (outputs[0] / name).read_bytes() == (other / name).read_bytes(), name


def test_memory_stays_bounded_on_a_corpus_larger_than_the_shards(tmp_path, vocab_dir, wiki_valid):
    """Peak memory is set by the range and shard sizes, not by the corpus: generated text that never repeats a
    paragraph, five times larger (some 50 shards of output), peaks within a few percent of the smaller corpus, and
    below the size of the rows it writes. Measured in one process by tracemalloc (one worker: every task runs
    here), after a first run has made the one-time allocations."""
    import tracemalloc

    counts = collections.Counter(wiki_valid.read_text(encoding="utf-8").split())
    words = np.array([word for word, _ in counts.most_common(3000)])
    rng = np.random.default_rng(0)

    def shard_corpus(paragraphs: int) -> tuple[int, int]:
        path = tmp_path / f"c{paragraphs}.txt"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(paragraphs):
                f.write(" ".join(words[rng.integers(0, len(words), rng.integers(20, 120))]) + "\n\n")
        tracemalloc.start()
        out = build_wiki_shards(tmp_path / f"d{paragraphs}", vocab_dir, [path], rows_per_shard=400,
                                range_bytes=1 << 16, max_len=64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        written = sum(p.stat().st_size for p in (out / "train").iterdir())
        shutil.rmtree(out)
        return peak, written

    shard_corpus(500)
    (small, _), (large, written) = shard_corpus(2000), shard_corpus(10_000)
    assert written > 2_000_000 and large < 1.05 * small and large < written


def test_invalid_utf8_is_replaced_and_counted(tmp_path, vocab_dir, wiki_valid):
    """A few undecodable byte sequences anywhere in the input (here in several ranges) become U+FFFD and are
    counted in the manifest; the job does not stop on them."""
    data = bytearray(wiki_valid.read_bytes())
    for offset in range(100_000, 1_000_000, 200_000):  # five places, mid-line
        position = data.index(b" the ", offset)
        data[position : position + 1] = b" \xff\xfe"
    path = tmp_path / "broken.tokens"
    path.write_bytes(bytes(data))
    out = build_wiki_shards(tmp_path / "d", vocab_dir, [path], range_bytes=1 << 17, workers=2)
    assert open_dataset(out).manifest["stats"]["read"]["invalid_utf8"] == 10


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
    assert stream_bodies(restored_rows(short, "val")) == stream_bodies(restored_rows(long, "val"))
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


@pytest.mark.parametrize("how, workers", [(signal.SIGINT, 1), (signal.SIGKILL, 1), (signal.SIGINT, 2),
                                          (signal.SIGTERM, 2)])
def test_interrupted_run_leaves_no_dataset_and_rerun_completes(tmp_path, vocab_dir, wiki_valid, wiki_test, how,
                                                               workers):
    """Ctrl-C or SIGTERM (exit 130 / 143, one line, no traceback) or kill -9 mid-run leaves no manifest and no output directory (and,
    with workers, no worker left running); the re-run completes and writes the same bytes as an uninterrupted
    run."""
    big = tmp_path / "big.tokens"
    big.write_bytes((wiki_valid.read_bytes() + wiki_test.read_bytes()) * 4)
    out = tmp_path / "out"
    def shard_command(out_dir):
        return [sys.executable, "-m", "prep", "shard", "-i", str(big), "--vocab", str(vocab_dir), "-o", str(out_dir),
                "--workers", str(workers), "--quiet", "--max-len", "64", "--dupe-factor", "3"]  # copies: uncached work

    command = shard_command(out)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: its workers can be found after
    def partials():  # the job's hidden staging directory beside the output
        return list(tmp_path.glob(".out.partial*"))

    deadline = time.monotonic() + 60
    while not any((p / "scratch").exists() for p in partials()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the pool has started (scratch is made after it) and the workers are reading; well before the end
    assert process.poll() is None, "the job ended before it could be interrupted: give it more input"
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert not out.exists()
    if how != signal.SIGKILL:
        assert process.returncode == 128 + how and "Traceback" not in stderr and not partials()
        assert not processes_in_group(process.pid)
        assert stderr.strip().count("\n") == 0
    else:
        assert partials()  # what kill -9 leaves; the next run clears it
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert (out / "manifest.msgpack").is_file() and not partials()
    clean = tmp_path / "clean"
    subprocess.run(shard_command(clean), env=env, check=True, capture_output=True)
    for file in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (out / file).read_bytes() == (clean / file).read_bytes(), file
