"""The metrics writer and its sinks: metrics.jsonl bytes, the progress bar's postfix, and TensorBoard event files
read back with TensorBoard's own EventAccumulator."""

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

from train.metrics import (TENSORBOARD_DIR, BarSink, JsonlSink, MetricsWriter, TensorBoardSink,
                           tensorboard_sink)

REPO = Path(__file__).resolve().parents[2]

TRAIN_10 = {"step": 10, "epoch": 0, "loss": 7.25, "mlm_loss": 6.5, "lr": 0.0005, "grad_norm": 1.75,
            "tokens_per_s": 12345.6, "data_wait_frac": 0.125, "skipped": 0, "nsp_loss": 0.75}
TRAIN_20 = {"step": 20, "epoch": 1, "loss": math.nan, "mlm_loss": math.nan, "lr": 0.001, "grad_norm": math.inf,
            "tokens_per_s": 23456.7, "data_wait_frac": 0.0625, "skipped": 1, "nsp_loss": 0.5}
VAL_20 = {"step": 20, "split": "val", "mlm_loss": 5.5, "mlm_acc": 0.25, "ppl": 244.69193226422038,
          "rows": 64, "masked": 128, "baseline_acc": 0.0625, "unigram_loss": 6.0, "mask_acc": 0.1875,
          "mask_baseline_acc": 0.05}
TRAIN_30 = {"step": 30, "epoch": 2, "loss": 5.0, "mlm_loss": 5.0, "lr": 0.00075, "grad_norm": 0.5,
            "tokens_per_s": 34567.8, "data_wait_frac": 0.03125, "skipped": 0}
VAL_30 = {"step": 30, "split": "val", "mlm_loss": 4.5, "mlm_acc": 0.375, "ppl": 90.01713130052181, "nsp_acc": 0.875,
          "rows": 64, "masked": 128, "baseline_acc": 0.0625, "unigram_loss": 6.0, "mask_acc": 0.25,
          "mask_baseline_acc": 0.05}
SAMPLES = ["  Input Tokens:     [CLS] return the [MASK] [SEP]\n  Target Tokens:    list\n"
           "  Predicted Tokens: list (0.50) value (0.10) ``` (0.05)",
           "  Input Tokens:     [CLS] a [MASK] [SEP]\n  Target Tokens:    b\n"
           "  Predicted Tokens: b (0.90) c (0.05) d (0.01)"]


def _events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _texts(events: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]


def _assert_scalars(actual: dict, expected: dict) -> None:
    """Same tags, steps and counts; values equal to float32 precision (event files store float32)."""
    assert sorted(actual) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in actual[tag]] == [step for step, _ in points], tag
        assert [value for _, value in actual[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_every_sink_receives_train_and_val_records_and_samples(tmp_path):
    """One writer feeds all sinks: metrics.jsonl keeps today's exact bytes (non-finite -> null), the bar shows the
    last training loss and throughput, TensorBoard gets exactly the listed scalars at their steps (non-finite ones
    left out, absent keys not invented) and the samples as one code-block text per evaluation."""
    bar = tqdm(total=100, file=io.StringIO())
    log_dir = tmp_path / TENSORBOARD_DIR
    jsonl = JsonlSink(tmp_path / "metrics.jsonl")
    with MetricsWriter([jsonl, BarSink(bar), tensorboard_sink(log_dir)]) as metrics:
        metrics.write(TRAIN_10)
        assert bar.postfix == "loss=7.2500, tok_s=12,346"
        metrics.write(TRAIN_20)
        metrics.write(VAL_20)
        metrics.samples(20, SAMPLES)
        assert bar.postfix == "loss=nan, tok_s=23,457"
        metrics.write(TRAIN_30)
        metrics.write(VAL_30)
    bar.close()
    assert jsonl.file.closed

    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 10, "epoch": 0, "loss": 7.25, "mlm_loss": 6.5, "lr": 0.0005, "grad_norm": 1.75, '
        '"tokens_per_s": 12345.6, "data_wait_frac": 0.125, "skipped": 0, "nsp_loss": 0.75}',
        '{"step": 20, "epoch": 1, "loss": null, "mlm_loss": null, "lr": 0.001, "grad_norm": null, '
        '"tokens_per_s": 23456.7, "data_wait_frac": 0.0625, "skipped": 1, "nsp_loss": 0.5}',
        '{"step": 20, "split": "val", "mlm_loss": 5.5, "mlm_acc": 0.25, "ppl": 244.69193226422038, "rows": 64, '
        '"masked": 128, "baseline_acc": 0.0625, "unigram_loss": 6.0, "mask_acc": 0.1875, "mask_baseline_acc": 0.05}',
        '{"step": 30, "epoch": 2, "loss": 5.0, "mlm_loss": 5.0, "lr": 0.00075, "grad_norm": 0.5, '
        '"tokens_per_s": 34567.8, "data_wait_frac": 0.03125, "skipped": 0}',
        '{"step": 30, "split": "val", "mlm_loss": 4.5, "mlm_acc": 0.375, "ppl": 90.01713130052181, "nsp_acc": 0.875, '
        '"rows": 64, "masked": 128, "baseline_acc": 0.0625, "unigram_loss": 6.0, "mask_acc": 0.25, '
        '"mask_baseline_acc": 0.05}',
    ]

    events = _events(log_dir)
    _assert_scalars(_scalars(events), {
        "train/loss": [(10, 7.25), (30, 5.0)],
        "train/lr": [(10, 0.0005), (20, 0.001), (30, 0.00075)],
        "train/grad_norm": [(10, 1.75), (30, 0.5)],
        "train/tokens_per_s": [(10, 12345.6), (20, 23456.7), (30, 34567.8)],
        "train/data_wait_frac": [(10, 0.125), (20, 0.0625), (30, 0.03125)],
        "train/nsp_loss": [(10, 0.75), (20, 0.5)],
        "val/mlm_loss": [(20, 5.5), (30, 4.5)],
        "val/mlm_acc": [(20, 0.25), (30, 0.375)],
        "val/mask_acc": [(20, 0.1875), (30, 0.25)],
        "val/ppl": [(20, 244.69193226422038), (30, 90.01713130052181)],
        "val/nsp_acc": [(30, 0.875)],
    })
    assert events.Tags()["tensors"] == ["val/samples/text_summary"]
    # The first sample holds a ``` token: the fence must be longer, or Markdown would end the block there.
    assert _texts(events, "val/samples/text_summary") == [(20, "````\n" + SAMPLES[0] + "\n\n" + SAMPLES[1] + "\n````")]


def test_resume_drops_events_after_the_resumed_step(tmp_path):
    """A run that logged up to step 30, crashed, and resumed from its step-20 checkpoint must show one curve:
    the earlier run's events after step 20 are purged (step 30 is logged again, differently), those at step 20
    stay (the resumed run does not log step 20 again), and the event files share RUN_DIR/tensorboard/. Checked
    with both of TensorBoard's readers: they purge differently (the server's skips the first session start)."""
    log_dir = tmp_path / TENSORBOARD_DIR
    with MetricsWriter([tensorboard_sink(log_dir)]) as metrics:
        for record in (TRAIN_10, {**TRAIN_20, "loss": 6.0}, VAL_20, TRAIN_30, VAL_30):
            metrics.write(record)
        metrics.samples(20, SAMPLES[1:])
        metrics.samples(30, SAMPLES[:1])
    with MetricsWriter([TensorBoardSink(log_dir, start_step=20)]) as metrics:
        metrics.write({**TRAIN_30, "loss": 4.75})
        metrics.write({**TRAIN_30, "step": 40, "loss": 4.5})
        metrics.write({**TRAIN_30, "step": 50, "loss": 4.0})
    # A second resume, from the step-40 checkpoint, purges again.
    with MetricsWriter([TensorBoardSink(log_dir, start_step=40)]) as metrics:
        metrics.write({**TRAIN_30, "step": 50, "loss": 4.25})
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 3

    events = _events(log_dir)
    scalars = _scalars(events)
    _assert_scalars({"train/loss": scalars["train/loss"]},
                    {"train/loss": [(10, 7.25), (20, 6.0), (30, 4.75), (40, 4.5), (50, 4.25)]})
    assert {tag: [step for step, _ in points] for tag, points in scalars.items() if tag.startswith("val/")} == {
        "val/mlm_loss": [20], "val/mlm_acc": [20], "val/mask_acc": [20], "val/ppl": [20], "val/nsp_acc": []}
    # This accumulator purges scalars only; the TensorBoard server reads text (as tensors) through the plugin one.
    served = plugin_event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    served.Reload()
    assert _texts(served, "val/samples/text_summary") == [(20, "```\n" + SAMPLES[1] + "\n```")]
    assert [e.step for e in served.Tensors("train/loss")] == [10, 20, 30, 40, 50]


def test_missing_tensorboard_is_a_user_error_before_any_directory(tmp_path):
    """Without the tensorboard package (refused by an import hook in a fresh interpreter, as if not installed),
    both the early check and the sink say how to install it, and leave no empty directory behind; the module
    itself still imports, so runs without --tensorboard are unaffected."""
    log_dir = tmp_path / "run" / TENSORBOARD_DIR
    script = f"""
import sys
class RefuseTensorBoard:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, RefuseTensorBoard())
from prep.errors import BertError
from train.metrics import require_tensorboard, tensorboard_sink
for check in (require_tensorboard, lambda: tensorboard_sink({str(log_dir)!r})):
    try:
        check()
    except BertError as error:
        print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "--tensorboard needs the tensorboard package: pip install 'bertprep[tensorboard]'\n" * 2
    assert not (tmp_path / "run").exists()


def test_bar_sink_ignores_evaluations():
    """The bar shows training progress only: an evaluation record (no loss, no throughput) leaves it as it was."""
    bar = tqdm(total=10, file=io.StringIO())
    metrics = MetricsWriter([BarSink(bar)])
    metrics.write(TRAIN_30)
    metrics.write(VAL_30)
    metrics.samples(30, SAMPLES)
    metrics.close()
    assert bar.postfix == "loss=5.0000, tok_s=34,568"
    bar.close()

