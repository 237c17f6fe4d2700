"""The training paths a GPU takes (batches pinned and copied non-blocking, bf16 and fp16 autocast, fp16's grad scaler,
fused AdamW, CUDA attention kernels), run on every device present: the CPU always, CUDA where there is one. On a
CPU-only machine they check the tests themselves; a session with a GPU runs them there (scripts/gpu_check.sh)."""

import json

import pytest
import torch

from prep.shards import open_dataset
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.loop import run
from train.rundir import METRICS_FILE
from train.model import BertForPretraining, ModelConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (device, precision) pairs each device trains in: the CPU's fp32; on CUDA bf16 (where the GPU has it) and fp16.
RUNS = [("cpu", "fp32"), pytest.param("cuda", "bf16", marks=CUDA), pytest.param("cuda", "fp16", marks=CUDA)]
SMALL = dict(size="tiny", layers=1, hidden=64, dropout=0.0, batch_size=16, eval_every=0, save_every=0, log_every=1)


def _config(shards, run_dir, device, precision, **options) -> TrainConfig:
    return TrainConfig(shards=str(shards), run_dir=str(run_dir), device=device, precision=precision,
                       **{**SMALL, **options})


def _losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("split") is None]


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_on_the_device_gives_the_cpu_logits(wiki_shards, device):
    """The same weights give the same masked-LM logits on the device as on the CPU (fp32): the device's attention
    kernels and the uint16 ids widened there change nothing that matters."""
    dataset = open_dataset(wiki_shards)
    rows = {name: torch.from_numpy(a.copy()) for name, a in dataset.split("val").slice(0, 8).items()}
    torch.manual_seed(0)
    model = BertForPretraining(ModelConfig.from_size("tiny", int(dataset.vocab["size"]), max_positions=64)).eval()
    expected = model.logits(rows["input_ids"], rows["mlm_positions"])
    on_device = model.to(device).logits(rows["input_ids"].to(device), rows["mlm_positions"].to(device))
    assert on_device.device.type == device
    torch.testing.assert_close(on_device.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,precision", RUNS)
def test_a_short_run_on_the_device_learns_and_resumes(wiki_shards, tmp_path, device, precision):
    """40 steps at the device's precision: every step finite (fp16's scaler may skip a few at its first scale, and
    counts them), the loss falls, the data never keeps the step waiting for long, and 20 steps plus a resume to 40
    give the straight run's losses (bit for bit on the CPU; to float rounding on CUDA, whose kernels may add in any
    order)."""
    options = dict(steps=40, save_every=20, keep_last=2, seed=1, masking="dynamic", lr=3e-3)
    summary = run(_config(wiki_shards, tmp_path / "straight", device, precision, **options), progress=False)
    assert summary["step"] == 40
    assert summary["nonfinite_steps"] <= (5 if precision == "fp16" else 0), summary
    straight = _losses(tmp_path / "straight")
    assert [s for s, _ in straight] == list(range(1, 41))
    assert sum(loss for _, loss in straight[-5:]) < sum(loss for _, loss in straight[:5]) - 1.0, straight
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["precision"] == precision
    records = [json.loads(line) for line in (tmp_path / "straight" / METRICS_FILE).read_text().splitlines()]
    assert max(r["data_wait_frac"] for r in records[5:] if "data_wait_frac" in r) < 0.5

    run(_config(wiki_shards, tmp_path / "resumed", device, precision, **options), progress=False, stop_at=20)
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-00000020"
    run(_config(wiki_shards, tmp_path / "resumed", device, precision, resume=True, **options), progress=False)
    resumed = _losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == [s for s, _ in straight]
    if device == "cpu":
        assert resumed == straight
    else:
        assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight], rel=1e-3)
