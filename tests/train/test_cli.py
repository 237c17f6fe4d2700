"""`berttrain` through Click: run then eval, resume with saved options, one-line errors."""

import json

import pytest
from click.testing import CliRunner

from train.cli import main
from train.rundir import METRICS_FILE

TINY = ["--size", "tiny", "--layers", "1", "--hidden", "64", "--dropout", "0", "--device", "cpu",
        "--precision", "fp32", "--batch-size", "16", "--quiet"]


def test_run_then_eval_prints_the_numbers(wiki_shards, tmp_path):
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["run", "--shards", str(wiki_shards), "--run-dir", str(run_dir), "--steps", "4",
                                  "--eval-every", "4", "--eval-rows", "128", *TINY])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"run {run_dir}: 4 steps, loss ")
    assert "most-frequent-token baseline" in result.stdout
    assert "tokens/step" in result.stderr and "parameters" in result.stderr  # derived numbers at start
    assert "Predicted Tokens:" in result.stderr
    assert (run_dir / "checkpoints" / "step-00000004" / "COMPLETE").is_file()

    result = runner.invoke(main, ["eval", "--run", str(run_dir), "--json", "--rows", "128", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert {"mlm_loss", "mlm_acc", "ppl", "baseline_acc"} <= set(scores)
    assert scores["step"] == 4 and scores["split"] == "val" and scores["rows"] == 128
    last_eval = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()][-1]
    assert last_eval["split"] == "val" and scores["mlm_loss"] == pytest.approx(last_eval["mlm_loss"], rel=1e-6)

    result = runner.invoke(main, ["eval", "--run", str(run_dir), "--rows", "64", "--samples", "1",
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mlm_acc" in result.stdout and "Target Tokens:" in result.stdout


def test_resume_continues_with_the_saved_options(wiki_shards, tmp_path):
    """`--resume` takes the run's options from its config.json; options given again (here --steps) win."""
    run_dir = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(main, ["run", "--shards", str(wiki_shards), "--run-dir", str(run_dir), "--steps", "3",
                                 "--eval-every", "0", "--log-every", "1", *TINY])
    assert first.exit_code == 0, first.output
    result = runner.invoke(main, ["run", "--run-dir", str(run_dir), "--resume", "--steps", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    assert saved["steps"] == 5 and saved["batch_size"] == 16 and saved["hidden"] == 64
    steps = [json.loads(line)["step"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert "resumed at step 3" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "1"], "already exists: pass --resume to continue it, --force to replace it, or another --run-dir"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--norm", "pre", "--lr", "-1"], "--lr must be positive, got -1.0"),
])
def test_user_errors_are_one_line_on_stderr_and_exit_1(wiki_shards, tmp_path, args, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["run", "--shards", str(wiki_shards), "--run-dir", str(run_dir),
                                       *TINY, *args])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


def test_eval_of_a_run_without_checkpoints_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert "has no complete checkpoint yet" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "5", "--epochs", "1"], "--steps and --epochs both say how long to train"),
    (["--overfit-batch", "--masking", "dynamic"], "--overfit-batch needs the same masks every step"),
    (["--resume", "--force"], "--resume continues a run and --force replaces it"),
])
def test_conflicting_flags_are_one_line_errors_before_anything_is_read(tmp_path, args, message):
    """TrainConfig judges every combination of flags (the command line declares none of its own), before the
    shards or a run are opened: tmp_path is neither."""
    result = CliRunner().invoke(main, ["run", "--shards", str(tmp_path), "--run-dir", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_run_with_tensorboard_writes_events_tensorboard_reads(wiki_shards, tmp_path):
    """`--tensorboard` sends every metrics.jsonl record to RUN_DIR/tensorboard as well: what users of the
    projects we replace look at. Read back with TensorBoard's own reader, tags and counts as logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--shards", str(wiki_shards), "--run-dir", str(run_dir), "--steps", "6",
                                       "--log-every", "2", "--eval-every", "3", "--eval-rows", "64", "--tensorboard",
                                       *TINY])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    train_tags = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/data_wait_frac"}
    val_tags = {"val/mlm_loss", "val/mlm_acc", "val/mask_acc", "val/ppl"}
    assert set(tags["scalars"]) == train_tags | val_tags
    for tag in train_tags:
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6]
    for tag in val_tags:
        assert [e.step for e in events.Scalars(tag)] == [3, 6]
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    losses = [r["loss"] for r in records if "split" not in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert any("samples" in tag for tag in tags["tensors"])
