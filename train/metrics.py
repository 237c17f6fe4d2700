"""Where every training and evaluation record goes: one `MetricsWriter` fanning out to sinks (metrics.jsonl, the
progress bar, TensorBoard).

A record is a flat dict. A training record has no "split" key (step, epoch, loss, mlm_loss, lr, grad_norm,
tokens_per_s, data_wait_frac, skipped, and nsp_loss with NSP); an evaluation record has "split": "val" (step,
mlm_loss, mlm_acc, ppl, mask_acc, nsp_acc, baselines, rows, masked). Rank 0 builds the sinks; other ranks pass none.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
from typing import Sequence

from prep.errors import BertError

TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard/: the event files of a run, resumed runs included
SAMPLES_TAG = "val/samples"
# Record key -> TensorBoard scalar tag, per split; keys absent from a record are not logged.
SCALAR_TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s", "data_wait_frac": "train/data_wait_frac",
              "nsp_loss": "train/nsp_loss"},
    "val": {"mlm_loss": "val/mlm_loss", "mlm_acc": "val/mlm_acc", "mask_acc": "val/mask_acc", "ppl": "val/ppl",
            "nsp_acc": "val/nsp_acc"},
}
MISSING_TENSORBOARD = "--tensorboard needs the tensorboard package: pip install 'bertprep[tensorboard]'"


def split_of(record: dict) -> str:
    """"train" for a training record, else its "split" ("val")."""
    return record.get("split", "train")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Sink:
    """One destination of records. Every method is optional: the defaults ignore what a sink does not show."""

    def write(self, record: dict) -> None:
        pass

    def samples(self, step: int, texts: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """metrics.jsonl: `json.dumps(record) + "\\n"` a record, non-finite floats as null, appended (a resumed run
    continues the file) and flushed per record, so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        # NaN is not JSON, and other readers choke on it.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class BarSink(Sink):
    """A tqdm bar's postfix: loss and tok_s of each training record, shown at the bar's next refresh. The bar's
    owner updates and closes it."""

    def __init__(self, bar):
        self.bar = bar

    def write(self, record: dict) -> None:
        if split_of(record) == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                 refresh=False)


def _code_block(text: str) -> str:
    """`text` as a fenced Markdown code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


class TensorBoardSink(Sink):
    """Event files under `log_dir` through torch's SummaryWriter: the scalars of SCALAR_TAGS at the record's step
    (non-finite values skipped), each evaluation's samples as one Markdown text summary (tag
    "val/samples/text_summary" in the file), flushed per record.

    `start_step`: the step this run starts from, 0 for a new run, the checkpoint's step on resume. Events of an
    earlier run in `log_dir` at steps after it are dropped by TensorBoard (purge_step = start_step + 1: records
    at start_step itself were written before that checkpoint and are not written again). Raises BertError,
    before creating anything, when tensorboard is not installed.
    """

    def __init__(self, log_dir: Path, start_step: int = 0):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # A new run writes its session start too: TensorBoard's server purges on every start but the first it reads.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        for key, tag in SCALAR_TAGS.get(split_of(record), {}).items():
            if _finite_number(record.get(key)):
                self.writer.add_scalar(tag, record[key], global_step=record["step"])
        self.writer.flush()

    def samples(self, step: int, texts: list[str]) -> None:
        if texts:
            self.writer.add_text(SAMPLES_TAG, _code_block("\n\n".join(texts)), global_step=step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require_tensorboard() -> None:
    """Raises the one-line BertError that says how to install tensorboard, when torch cannot import it (missing,
    or too old for torch). Creates nothing."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # imports tensorboard and checks its version
    except ImportError as error:
        raise BertError(MISSING_TENSORBOARD) from error


def tensorboard_sink(log_dir: Path, start_step: int = 0) -> TensorBoardSink:
    """The TensorBoard sink of a run (`log_dir` = RUN_DIR / TENSORBOARD_DIR); see TensorBoardSink."""
    return TensorBoardSink(log_dir, start_step)


class MetricsWriter:
    """Every record of a run, handed to each sink in order. A context manager: leaving it closes the sinks."""

    def __init__(self, sinks: Sequence[Sink]):
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        """One training or evaluation record (see the module docstring)."""
        for sink in self.sinks:
            sink.write(record)

    def samples(self, step: int, texts: list[str]) -> None:
        """The sample predictions printed by the evaluation at `step`, one text per row."""
        for sink in self.sinks:
            sink.samples(step, texts)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
