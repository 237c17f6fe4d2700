"""One writer per output, for the outputs of `berttrain`: while a real `run`, `export` or `finetune` job writes its
output, a second job on it, even with --force, refuses at start with a line naming the first, and the first,
stopped meanwhile, goes on to an output that verifies."""

import os

from train import checkpoint as ckpt
from tests.jobs import busy_message, error_line, finish, run_job, start_job, stop_once_locked

from tests.train.conftest import TINY_RUN as RUN


def _flags(options: dict) -> list[str]:
    return [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def second_job_refuses(first, out, flag, args):
    """Stops `first` once it holds `out`, then checks that the same job with --force (the job most likely to harm
    it) refuses with the line naming it and changes nothing beside the output; lets `first` finish."""
    try:
        record = stop_once_locked(first, out)
        beside = sorted(os.listdir(out.parent))
        assert error_line(run_job("train", *args, "--force")) == busy_message(out, record, flag)
        assert sorted(os.listdir(out.parent)) == beside
    finally:
        status, _, stderr = finish(first)
    assert status == 0, stderr


def test_a_second_run_on_a_run_directory_refuses_naming_the_first(tmp_path, wiki_shards):
    """`berttrain run --run-dir R` twice at once: the second, --force included, refuses; the first's checkpoints
    verify."""
    run_dir = tmp_path / "runs" / "mini"
    args = ("run", "--shards", wiki_shards, "--run-dir", run_dir, "--steps", 6, "--save-every", 3, "--quiet",
            *_flags(RUN))
    second_job_refuses(start_job("train", *args), run_dir, "--run-dir", args)
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [3, 6]
    for _, path in ckpt.list_checkpoints(run_dir):
        ckpt.verify_checkpoint(path)
    assert os.listdir(run_dir.parent) == ["mini"]


def test_a_second_export_to_one_directory_refuses_naming_the_first(tmp_path, tiny_run):
    out = tmp_path / "exports" / "tiny"
    args = ("export", "--run", tiny_run, "--hf", out)
    second_job_refuses(start_job("train", *args), out, "--hf", args)
    assert (out / "config.json").is_file() and os.listdir(out.parent) == ["tiny"]


def test_a_second_finetune_to_one_directory_refuses_naming_the_first(tmp_path, tiny_run, wiki_valid):
    examples = tmp_path / "train.tsv"
    lines = [line.strip() for line in wiki_valid.read_text(encoding="utf-8").splitlines() if len(line) > 40][:64]
    examples.write_text("sentence\tlabel\n" + "".join(f"{line[:80]}\t{i % 2}\n" for i, line in enumerate(lines)),
                        encoding="utf-8")
    out = tmp_path / "finetuned" / "tiny"
    args = ("finetune", "--run", tiny_run, "--train", examples, "--out", out, "--epochs", 1, "--batch-size", 16,
            "--max-len", 32, "--device", "cpu", "--quiet")
    second_job_refuses(start_job("train", *args), out, "--out", args)
    assert os.listdir(out.parent) == ["tiny"]
