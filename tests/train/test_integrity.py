"""Checkpoints that prove themselves: the COMPLETE marker records every file's size and sha256; a damaged newest
checkpoint is skipped, with a line saying which and why, by every command that takes a run's newest; one named
explicitly is a one-line error; markers from before (no hashes) still load; `berttrain verify` reports them all."""

import json
import shutil

import pytest
from click.testing import CliRunner

from train import checkpoint as ckpt
from train.cli import main
from train.config import TrainConfig
from train.loop import run
from train.rundir import METRICS_FILE

from .conftest import one_thread

TINY_RUN = dict(size="tiny", layers=1, hidden=64, dropout=0.0, steps=4, batch_size=16, save_every=2, keep_last=5,
                eval_every=0, log_every=1, precision="fp32", device="cpu", seed=4)
DAMAGES = {  # how a file goes bad after its save -> the reason the verdict gives
    "truncated": "model.pt has {size:,} bytes, its COMPLETE marker says {saved:,} (truncated or overwritten)",
    "flipped": "model.pt does not match the sha256 in its COMPLETE marker (its bytes changed after the save)",
    "missing": "state.pt is missing",
}


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, wiki_shards):
    """A 4-step run with checkpoints at steps 2 and 4; tests damage copies of it."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    with one_thread():  # as the tests that resume it run: the thread count changes float sums
        run(TrainConfig(shards=str(wiki_shards), run_dir=str(run_dir), **TINY_RUN), progress=False)
    return run_dir


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A classification file small enough that one epoch of finetune takes a moment."""
    path = tmp_path_factory.mktemp("task") / "train.tsv"
    rows = [("the film was good .", "pos"), ("the film was bad .", "neg")] * 4
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _damage(checkpoint, how: str) -> str:
    """Damages `checkpoint` as `how` says; returns the reason its verdict should give."""
    weights = checkpoint / ckpt.MODEL_WEIGHTS_FILE
    saved = weights.stat().st_size
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: saved // 2])
    elif how == "flipped":
        data = bytearray(weights.read_bytes())
        data[saved // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    else:
        (checkpoint / ckpt.TRAINING_STATE_FILE).unlink()
    return DAMAGES[how].format(size=weights.stat().st_size, saved=saved)


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (run_dir / METRICS_FILE).open())
            if "split" not in r]


@pytest.mark.parametrize("how", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(pristine_run, task_file, wiki_shards, tmp_path,
                                                                 how):
    """Weights truncated, one byte flipped, or a file missing after the save: eval, predict, export, finetune,
    report and --init-from use step 2 instead of step 4 and say on stderr which checkpoint they skipped and why;
    verify names it and exits 1; --resume continues from step 2 with exactly the losses the run had, sets the
    damaged one aside and leaves a run that verifies. (Before, these commands died on the damaged files with a
    traceback.)"""
    run_dir = _copy(pristine_run, tmp_path)
    newest = ckpt.checkpoints_dir(run_dir) / "step-00000004"
    reason = _damage(newest, how)
    skipped = f"skipping checkpoint {newest} is damaged: {reason}; using step-00000002"
    runner = CliRunner()

    result = runner.invoke(main, ["verify", "--run", str(run_dir)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [f"ok         {newest.parent / 'step-00000002'}",
                                          f"damaged    {newest}: {reason}"]
    assert result.stderr == (f"Error: 1 of 2 checkpoints of {run_dir} are damaged; --resume and the other commands "
                             f"skip them\n")

    result = runner.invoke(main, ["eval", "--run", str(run_dir), "--json", "--rows", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 2 and skipped in result.stderr

    result = runner.invoke(main, ["predict", "--run", str(run_dir), "--device", "cpu", "the film was [MASK] ."])
    assert result.exit_code == 0, result.output
    assert "[MASK] 1:" in result.stdout and skipped in result.stderr

    result = runner.invoke(main, ["export", "--run", str(run_dir), "--hf", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "from checkpoint " + str(newest.parent / "step-00000002") in result.stdout and skipped in result.stderr

    result = runner.invoke(main, ["finetune", "--run", str(run_dir), "--train", str(task_file), "--out",
                                  str(tmp_path / "ft"), "--epochs", "1", "--max-len", "16", "--device", "cpu",
                                  "--quiet"])
    assert result.exit_code == 0, result.output
    assert skipped in result.stderr
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["pretrained_step"] == 2

    result = runner.invoke(main, ["report", "--run", str(run_dir), "--samples", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert skipped in result.stderr and "step-00000002" in (run_dir / "report.html").read_text()

    result = runner.invoke(main, ["run", "--shards", str(wiki_shards), "--init-from", str(run_dir), "--run-dir",
                                  str(tmp_path / "next"), "--steps", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert skipped in result.stderr and f"--init-from {newest.parent / 'step-00000002'}" in result.stderr

    result = runner.invoke(main, ["run", "--run-dir", str(run_dir), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{skipped}, set aside as step-00000004.damaged" in result.stderr
    assert "resumed at step 2" in result.stderr
    assert _losses(run_dir) == _losses(pristine_run)
    assert (newest.parent / "step-00000004.damaged").is_dir()
    result = runner.invoke(main, ["verify", "--run", str(run_dir)])
    assert result.exit_code == 0 and result.stdout.count("ok ") == 2


@pytest.mark.parametrize("command", [
    ["eval", "--run", "{run}", "--checkpoint", "{checkpoint}"],
    ["predict", "--run", "{checkpoint}", "the [MASK] ."],
    ["export", "--run", "{run}", "--checkpoint", "{checkpoint}", "--hf", "{tmp}/hf"],
    ["finetune", "--run", "{checkpoint}", "--train", "{task}", "--out", "{tmp}/ft"],
    ["run", "--shards", "{shards}", "--init-from", "{checkpoint}", "--run-dir", "{tmp}/next", "--steps", "1"],
])
def test_a_damaged_checkpoint_named_explicitly_is_a_one_line_error(pristine_run, task_file, wiki_shards, tmp_path,
                                                                    command):
    """Whoever names a checkpoint wants that one: no fallback, one line saying what is wrong and how to find a
    good one, exit status 1."""
    run_dir = _copy(pristine_run, tmp_path)
    newest = ckpt.checkpoints_dir(run_dir) / "step-00000004"
    reason = _damage(newest, "flipped")
    names = dict(run=run_dir, checkpoint=newest, tmp=tmp_path, task=task_file, shards=wiki_shards)
    result = CliRunner().invoke(main, [word.format(**names) for word in command])
    assert result.exit_code == 1, result.output
    flag = "--checkpoint" if "--checkpoint" in command else "--init-from" if command[0] == "run" else "--run"
    assert result.stderr == (f"Error: {flag} {newest}: damaged: {reason}; use an earlier checkpoint "
                             f"(`berttrain verify --run {run_dir}` lists the good ones)\n")


def test_checkpoints_of_markers_without_hashes_still_load(pristine_run, tmp_path):
    """Markers written before they listed files (`{"step": N}`) still count: eval uses such a checkpoint, resume
    continues from it, verify passes it. Their damage is still found where it can be without hashes: a truncated
    torch file is no zip, a flipped byte fails torch's CRC, a JSON file that does not parse."""
    run_dir = _copy(pristine_run, tmp_path)
    root = ckpt.checkpoints_dir(run_dir)
    for step in (2, 4):
        (root / ckpt.checkpoint_name(step) / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    runner = CliRunner()
    result = runner.invoke(main, ["verify", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("an older marker without sizes and hashes") == 2
    result = runner.invoke(main, ["eval", "--run", str(run_dir), "--json", "--rows", "64", "--device", "cpu"])
    assert result.exit_code == 0 and json.loads(result.stdout)["step"] == 4

    newest = root / "step-00000004"
    original = (newest / ckpt.MODEL_WEIGHTS_FILE).read_bytes()
    for damage, reason in [(original[: len(original) // 2], "model.pt is not a readable torch file"),
                           (original[:100] + bytes([original[100] ^ 1]) + original[101:], "model.pt fails its CRC")]:
        (newest / ckpt.MODEL_WEIGHTS_FILE).write_bytes(damage)
        with pytest.raises(ckpt.DamagedCheckpoint, match=reason):
            ckpt.verify_checkpoint(newest)
        assert ckpt.resolve_checkpoint(run_dir, "--run") == root / "step-00000002"
    (newest / ckpt.MODEL_WEIGHTS_FILE).write_bytes(original)
    (newest / ckpt.INFO_FILE).write_text('{"step": 4,')
    with pytest.raises(ckpt.DamagedCheckpoint, match="info.json is not valid JSON"):
        ckpt.verify_checkpoint(newest, hashed=())
    (newest / ckpt.INFO_FILE).unlink()
    (root / "step-00000002" / ckpt.COMPLETE_MARKER).write_text("{not json")
    with pytest.raises(ckpt.BertError, match=r"every checkpoint is damaged \(step-00000004: info.json is missing; "
                                             r"step-00000002: its COMPLETE marker is unreadable"):
        ckpt.resolve_checkpoint(run_dir, "--run")

    result = runner.invoke(main, ["run", "--run-dir", str(run_dir), "--resume", "--quiet"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "every checkpoint is damaged" in result.stderr


def test_verify_counts_an_interrupted_save_as_incomplete_not_damaged(pristine_run, tmp_path):
    """A save killed before its marker is debris that nothing reads, not damage: verify lists it and exits 0."""
    run_dir = _copy(pristine_run, tmp_path)
    (ckpt.checkpoints_dir(run_dir) / "step-00000004" / ckpt.COMPLETE_MARKER).unlink()
    result = CliRunner().invoke(main, ["verify", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("incomplete")
    assert "a save that was interrupted" in result.stdout
    single = CliRunner().invoke(main, ["verify", "--run", str(ckpt.checkpoints_dir(run_dir) / "step-00000002")])
    assert single.exit_code == 0 and single.stdout.startswith("ok ")
