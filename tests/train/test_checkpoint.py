"""Checkpoints: atomic saves that count only once complete, found by step, pruned to the last K and the best."""

import hashlib
import json
import os
import subprocess

import pytest
import torch

from prep.errors import BertError
from train import checkpoint as ckpt
from train.model import BertForPretraining, ModelConfig


def _save(run_dir, step, model=None):
    model = model or BertForPretraining(ModelConfig.from_size("tiny", 100, layers=1, hidden=32))
    return ckpt.save_checkpoint(run_dir, step, model.state_dict(), model.config.as_dict(),
                                {ckpt.KEY_OPTIMIZER: {"state": {}}}, {"vocab_sha256": "abc"})


def test_a_checkpoint_holds_weights_config_state_and_a_marker(tmp_path):
    model = BertForPretraining(ModelConfig.from_size("tiny", 100, layers=1, hidden=32))
    path = _save(tmp_path, 1000, model)
    assert path == tmp_path / "checkpoints" / "step-00001000"
    assert ckpt.is_complete(path)
    marker = json.loads((path / ckpt.COMPLETE_MARKER).read_text())
    assert marker["step"] == 1000 and sorted(marker["files"]) == sorted(ckpt.ALL_FILES)
    assert marker["files"][ckpt.MODEL_WEIGHTS_FILE] == {
        "bytes": (path / ckpt.MODEL_WEIGHTS_FILE).stat().st_size,
        "sha256": hashlib.sha256((path / ckpt.MODEL_WEIGHTS_FILE).read_bytes()).hexdigest()}
    weights = ckpt.load_weights(path)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert ModelConfig.from_dict(ckpt.load_model_config(path)) == model.config
    assert ckpt.load_training_state(path)[ckpt.KEY_STEP] == 1000
    assert ckpt.read_info(path) == {"step": 1000, "vocab_sha256": "abc"}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no partial directory left behind


def test_a_save_killed_halfway_is_never_resumed_from(tmp_path):
    """A checkpoint directory without its completion marker (the process died while writing) does not count,
    and neither does a partial directory; the latest complete one is used."""
    _save(tmp_path, 10)
    broken = _save(tmp_path, 20)
    (broken / ckpt.COMPLETE_MARKER).unlink()
    (broken / ckpt.MODEL_WEIGHTS_FILE).write_bytes(b"truncated")
    (tmp_path / "checkpoints" / ".step-00000030.partial").mkdir()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000010"
    with pytest.raises(BertError, match="incomplete"):
        ckpt.resolve_checkpoint(broken)
    _save(tmp_path, 20)  # saving the same step again replaces the broken one
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000020"


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    """Prune keeps the last k and the best, and deletes the saves older than the newest that were interrupted:
    staging of jobs no longer running (or of older versions, without a pid) and step directories without their
    marker; never a running job's staging, nor a save newer than the latest checkpoint."""
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step)
    ckpt.write_best(tmp_path, 20, 3.5)
    ended = subprocess.Popen(["true"])
    ended.wait()
    root = tmp_path / "checkpoints"
    live = f".step-00000035.partial-{os.getpid()}-0a1b2c"
    newer = f".step-00000060.partial-{ended.pid}-0a1b2c"
    for name in (".step-00000015.partial", f".step-00000025.old-{ended.pid}-0a1b2c", live, newer, "step-00000045"):
        (root / name).mkdir()
    deleted = ckpt.prune(tmp_path, keep_last=2)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [20, 40, 50]
    assert sorted(p.name for p in root.iterdir()) == sorted([
        "best.json", "step-00000020", "step-00000040", "step-00000050", live, newer])
    assert sorted(p.name for p in deleted) == sorted([
        "step-00000010", "step-00000030", ".step-00000015.partial", f".step-00000025.old-{ended.pid}-0a1b2c",
        "step-00000045"])
    assert ckpt.read_best(tmp_path)["checkpoint"] == "step-00000020"


def test_pruning_after_every_save_keeps_the_last_k(tmp_path):
    """As the loop prunes, after each save: with fewer checkpoints than keep_last so far, none goes (there was a
    slice that dropped all but the newest while there were keep_last - 1), and so a damaged newest always has an
    older one to fall back to."""
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
        ckpt.prune(tmp_path, keep_last=3)
        assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20, 30, 40][max(0, step // 10 - 3):step // 10]


def test_resolving_what_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(BertError, match="no such run or checkpoint directory"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(BertError, match="has no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
