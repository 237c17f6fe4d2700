"""A full disk while `berttrain run` saves a checkpoint or `berttrain export` writes: one line naming the output,
the cause and what to do, exit 1, the earlier checkpoints or export intact, no staging left; the run continues with
--resume once there is space. Real faults: a filled tmpfs. A missing parent directory is no fault: it is made."""

import os
import re

from click.testing import CliRunner

from train import checkpoint as ckpt
from train.cli import main
from tests.jobs import tree_bytes
from tests.train.conftest import TINY_RUN

FULL = "No space left on device"
CHECKPOINT_BYTES = 4 << 20  # what a checkpoint of this model takes, about: weights, then twice their size of Adam


def _flags(options: dict) -> list[str]:
    return [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def last_error_line(result) -> str:
    """A run prints its banner first: the error is the last line on stderr, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.stderr
    return line.removeprefix("Error: ")


def test_disk_full_at_a_checkpoint_keeps_the_earlier_ones_and_resume_finishes(small_disk, wiki_shards):
    """The disk fills up before step 6's save: the run stops with a line that names the run, the cause, and the
    command that continues it; step 3's checkpoint still verifies and no partial save is left. Once the space is
    back, that command finishes the run."""
    run_dir = small_disk.path / "run"
    started = invoke("run", "--shards", wiki_shards, "--run-dir", run_dir, "--steps", 3, "--save-every", 3, "--quiet",
                     *_flags(TINY_RUN))
    assert started.exit_code == 0, started.output
    small_disk.fill(leave_bytes=CHECKPOINT_BYTES // 8)

    stopped = invoke("run", "--run-dir", run_dir, "--resume", "--steps", 6, "--quiet")
    partial = rf"{re.escape(str(run_dir))}/checkpoints/\.step-00000006\.partial-{os.getpid()}-[0-9a-f]+/\w+\.pt"
    assert re.fullmatch(
        rf"cannot write {re.escape(str(run_dir))}: {FULL} \({partial}\): the file system is full: free space on it, "
        rf"or write elsewhere with --run-dir; the checkpoints saved so far are intact: continue with `berttrain run "
        rf"--run-dir {re.escape(str(run_dir))} --resume` once fixed", last_error_line(stopped))
    assert sorted(os.listdir(ckpt.checkpoints_dir(run_dir))) == ["step-00000003"]
    ckpt.verify_checkpoint(ckpt.checkpoints_dir(run_dir) / "step-00000003")
    assert sorted(os.listdir(small_disk.path)) == ["filler.bin", "run"]

    small_disk.free()
    resumed = invoke("run", "--run-dir", run_dir, "--resume", "--steps", 6, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [3, 6]
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run_dir))


def test_disk_full_while_exporting_keeps_the_earlier_export(small_disk, tiny_run):
    """`berttrain export --force` over an export on a disk with 256 kB free: one line, the old export byte for
    byte as it was, nothing else beside it."""
    out = small_disk.path / "hf"
    assert invoke("export", "--run", tiny_run, "--hf", out).exit_code == 0
    before = tree_bytes(out)
    small_disk.fill(leave_bytes=256 << 10)
    result = invoke("export", "--run", tiny_run, "--hf", out, "--force")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert re.fullmatch(rf"Error: cannot write {re.escape(str(out))}: {FULL}( \(.+\))?: the file system is full: "
                        rf"free space on it, or write elsewhere with --hf\n", result.stderr)
    assert tree_bytes(out) == before and sorted(os.listdir(small_disk.path)) == ["filler.bin", "hf"]


def test_a_missing_parent_directory_is_made(tmp_path, tiny_run):
    """`--out` in directories that do not exist yet: they are made, as for every output (no ENOENT to report)."""
    out = tmp_path / "missing" / "deeper" / "report.html"
    result = invoke("report", "--run", tiny_run, "--out", out, "--samples", 0)
    assert result.exit_code == 0 and out.is_file(), result.output
