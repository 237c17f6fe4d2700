"""SIGKILL at any moment of `bertprep shard` and `bertprep vocab` (starting up, staging, in either pass of the
shard job, while the vocabulary's files are written), again and again: a plain re-run of the same command then
writes exactly the bytes of a job never killed, and nothing a killed job left (staging, a lock file, half a
vocabulary) remains beside the output."""

import pytest

from tests.jobs import Moment, check_kills_then_rerun, staging_of, started


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, wiki_valid, wiki_test):
    """Both WikiText-2 splits four times, 9.5 MB: a shard job of about two seconds on 2 cores, long enough to be
    caught in each of its phases."""
    path = tmp_path_factory.mktemp("corpus") / "long.txt"
    path.write_bytes((wiki_valid.read_bytes() + wiki_test.read_bytes()) * 4)
    return path


def shard_args(corpus, val_corpus, vocab_dir, out):
    # Explicit validation text and 5000 rows a shard: both splits, and the shuffled training shards' two steps.
    return ("shard", "-i", corpus, "--val", val_corpus, "--vocab", vocab_dir, "-o", out, "--max-len", 64,
            "--rows-per-shard", 5000, "--workers", 2, "--quiet")


def vocab_args(corpus, out):
    return ("vocab", "-i", corpus, "-o", out, "--vocab-size", 4000, "--threads", 1)


def shard_moments(out) -> list[Moment]:
    def staged(process):
        return staging_of(process, out) is not None

    def spooling(process):  # the first pass: workers append rows to their spool files in scratch/
        staging = staging_of(process, out)
        return staging is not None and any(staging.glob("scratch/train*"))

    def shuffling(process):  # the second pass: workers scatter the rows to chunks, then write the final shards
        staging = staging_of(process, out)
        return staging is not None and any(staging.glob("scratch/chunk-*"))

    return [Moment("start", started, 0.9), Moment("its staging appeared", staged, 0.05),
            Moment("its first rows were spooled", spooling, 0.3),
            Moment("its second pass began", shuffling, 0.04)]


def vocab_moments(out) -> list[Moment]:
    def writing(process):  # training is over and the files are being written, in its staging (or in place)
        return staging_of(process, out) is not None or out.exists()

    return [Moment("start", started, 1.0), Moment("it began writing its files", writing, 0.0005)]


def test_sigkill_of_shard_at_seeded_moments_then_a_plain_rerun_writes_the_clean_bytes(tmp_path, vocab_dir,
                                                                                       long_corpus, wiki_valid):
    """Four `bertprep shard` jobs with two workers, SIGKILLed at seeded moments: a seeded share of a clean job's
    time, and seeded delays after its staging appears, after its first rows are spooled and after its second pass
    begins; half of them killing the main process alone. Each leaves no dataset (or the whole one), and the same
    command run again, without --force, writes every file byte for byte as a job never killed does, leaving no
    staging directory, scratch file or lock file beside the dataset."""
    check_kills_then_rerun("prep", lambda out: shard_args(long_corpus, wiki_valid, vocab_dir, out), tmp_path,
                           shard_moments, rounds=1)


def test_sigkill_of_vocab_at_seeded_moments_never_leaves_a_vocabulary_that_passes_for_complete(tmp_path,
                                                                                              long_corpus):
    """Four `bertprep vocab` jobs SIGKILLed at seeded moments (while training, and just as its files are written):
    none leaves a vocab directory behind (a vocab.txt without its record would be taken for a finished vocabulary,
    and would make the re-run refuse), and the same command run again writes exactly the files of a job never
    killed, with nothing else beside them."""
    check_kills_then_rerun("prep", lambda out: vocab_args(long_corpus, out), tmp_path, vocab_moments, rounds=2)
