"""`TrainConfig`: every option of `berttrain run`, validated once, saved as the run's config.json and read back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from prep.errors import BertError
from train.arch import ARCHS
from train.masking import MASKING_MODES
from train.model import NORMS, SIZES
from train.options import check_choices, choice
from train.runtime import DEVICES, PRECISIONS
from train.schedule import SCHEDULES


# Peak learning rates that train each size untuned at a few hundred rows per step; pre-LN takes about twice the
# post-LN rate (Xiong et al., 2020), and ModernBERT (pre-norm) is measured in docs/benchmarks.md. Larger models need
# smaller steps.
DEFAULT_LR = {
    "post": {"tiny": 1e-3, "mini": 7e-4, "small": 5e-4, "medium": 3e-4, "base": 1e-4, "large": 5e-5},
    "pre": {"tiny": 2e-3, "mini": 1.4e-3, "small": 1e-3, "medium": 6e-4, "base": 2e-4, "large": 1e-4},
    "modernbert": {"tiny": 2e-3, "mini": 1.4e-3, "small": 1e-3, "medium": 6e-4, "base": 2e-4, "large": 1e-4},
}
# The modern recipe (MosaicBERT, ModernBERT): no dropout, 30% of the tokens masked, drawn afresh every step.
MODERN_DROPOUT = 0.0
MODERN_MASK_PROB = 0.3
WARMUP_SHARE = 0.06  # of the planned steps, as RoBERTa; capped so that long runs are not mostly warm-up
WARMUP_CAP = 10_000
MIN_LR_SHARE = 0.1  # the default --min-lr, as a share of --lr
OVERFIT_STEPS = 300  # the default --steps of --overfit-batch


@dataclass(frozen=True)
class TrainConfig:
    """A training run; None means "the default derived from the data, the model size or the other options"."""

    shards: str
    """Dataset directory made by `bertprep shard`."""
    run_dir: str | None = None
    """Where config, metrics and checkpoints go; default a new runs/run<N>."""
    arch: str = choice("bert", ARCHS)
    """Model architecture: bert (BERT, learned positions) or modernbert (RoPE, GeGLU, pre-norm, no biases)."""
    size: str = choice("small", SIZES)
    """Named model size: its layers and width."""
    layers: int | None = None
    """Encoder layers, overriding the size."""
    hidden: int | None = None
    """Hidden width, overriding the size."""
    heads: int | None = None
    """Attention heads, overriding the size."""
    ffn: int | None = None
    """Feed-forward width, overriding the size."""
    dropout: float | None = None
    """Dropout on embeddings, residual branches and attention; default 0.1 for bert, 0 for modernbert and with
    --overfit-batch."""
    norm: str = choice("post", NORMS)
    """LayerNorm placement of --arch bert: post (BERT) or pre."""
    max_positions: int | None = None
    """Size of the position table; default 512, or the shards' max_len when longer."""
    masking: str | None = choice(None, MASKING_MODES)
    """static: the shards' masks; dynamic: fresh masks on the device every step; default static for bert, dynamic
    for modernbert."""
    mask_prob: float | None = None
    """With dynamic masking: share of the tokens to mask; default the shards' own rate for bert, 0.3 for
    modernbert."""
    batch_size: int = 32
    """Rows per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated into one optimizer step."""
    steps: int | None = None
    """Optimizer steps to train; default one epoch."""
    epochs: float | None = None
    """Passes over the training rows, instead of --steps."""
    lr: float | None = None
    """Peak learning rate; default by --size and --norm."""
    min_lr: float | None = None
    """Learning rate at the end of the decay; default a tenth of --lr."""
    warmup: int | None = None
    """Linear warm-up steps; default 6% of the planned steps, at most 10,000."""
    schedule: str = choice("linear", SCHEDULES)
    """Decay after warm-up: linear or cosine."""
    weight_decay: float = 0.01
    """AdamW weight decay; never on biases and LayerNorm."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    precision: str = choice("auto", PRECISIONS)
    """auto, bf16, fp16 or fp32; auto is bf16 where the device has it, else fp32."""
    compile: bool = False
    """Run the model through torch.compile."""
    seed: int = 0
    """Seed of the initial weights, the batch order, dropout and dynamic masks."""
    device: str = choice("auto", DEVICES)
    """auto (CUDA when present), cpu or cuda."""
    eval_every: int = 500
    """Evaluate on the validation split every N steps and at the end; 0 = never."""
    eval_rows: int = 4096
    """Validation rows per evaluation (all when fewer)."""
    log_every: int = 10
    """Write a metrics record every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (needs the tensorboard package)."""
    save_every: int = 1000
    """Save a checkpoint every N steps and at the end; 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept besides the best."""
    overfit_batch: bool = False
    """Train on the first batch only, to check that the loss can reach ~0."""
    max_nonfinite: int = 5
    """Stop after this many steps in a row with a non-finite loss."""
    resume: bool = False
    """Continue the run in --run-dir from its latest checkpoint."""
    force: bool = False
    """Replace an existing --run-dir."""
    init_from: str | None = None
    """Start from the weights of a run or checkpoint directory, nothing else."""

    def __post_init__(self):
        check_choices(self)
        for name in ("batch_size", "grad_accum", "log_every", "max_nonfinite", "eval_rows", "keep_last"):
            _require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        for name in ("layers", "hidden", "heads", "ffn", "steps", "max_positions"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "at least 1", value)
        for name in ("eval_every", "save_every", "seed", "warmup"):
            value = getattr(self, name)
            _require(value is None or value >= 0, name, "0 or more", value)
        _require(self.epochs is None or self.epochs > 0, "epochs", "positive", self.epochs)
        _require(self.lr is None or self.lr > 0, "lr", "positive", self.lr)
        _require(self.min_lr is None or self.min_lr >= 0, "min_lr", "0 or more", self.min_lr)
        _require(self.dropout is None or 0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _require(self.mask_prob is None or 0 < self.mask_prob < 1, "mask_prob", "in (0, 1)", self.mask_prob)
        _require(self.weight_decay >= 0, "weight_decay", "0 or more", self.weight_decay)
        _require(self.grad_clip >= 0, "grad_clip", "0 or more", self.grad_clip)
        if self.steps is not None and self.epochs is not None:
            raise BertError("--steps and --epochs both say how long to train: pass one of them")
        if self.resume and self.force:
            raise BertError("--resume continues a run and --force replaces it: pass one of them")
        if self.resume and self.init_from:
            raise BertError("--resume restores everything from the run itself: drop --init-from")
        if self.resume and not self.run_dir:
            raise BertError("--resume needs the run to continue: pass --run-dir DIR")
        if self.mask_prob is not None and self.masking_mode != "dynamic":
            raise BertError("--mask-prob re-masks the shards at another rate: it needs --masking dynamic")
        if self.overfit_batch and self.masking == "dynamic":
            raise BertError("--overfit-batch needs the same masks every step: use --masking static")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise BertError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")

    @property
    def modern(self) -> bool:
        return self.arch == "modernbert"

    @property
    def masking_mode(self) -> str:
        if self.masking is not None:
            return self.masking
        return "dynamic" if self.modern and not self.overfit_batch else "static"

    @property
    def dynamic_mask_prob(self) -> float | None:
        """The rate of dynamic masks; None keeps the shards' own."""
        if self.mask_prob is not None or self.masking_mode != "dynamic":
            return self.mask_prob
        return MODERN_MASK_PROB if self.modern else None

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR["modernbert" if self.modern else self.norm][self.size]

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else MIN_LR_SHARE * self.peak_lr

    @property
    def model_dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return 0.0 if self.overfit_batch else MODERN_DROPOUT if self.modern else 0.1

    def model_overrides(self) -> dict:
        """The ModelConfig fields this config sets (the size gives the rest)."""
        fields = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn}
        overrides = {k: v for k, v in fields.items() if v is not None}
        dropout = self.model_dropout
        if self.modern:
            return {**overrides, "dropout": dropout, "attention_dropout": dropout}
        return {**overrides, "norm": self.norm, "dropout": dropout, "attention_dropout": dropout}

    def planned_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, round(self.epochs * steps_per_epoch))
        return OVERFIT_STEPS if self.overfit_batch else steps_per_epoch

    def warmup_steps(self, planned_steps: int) -> int:
        if self.warmup is not None:
            return self.warmup
        return min(WARMUP_CAP, round(WARMUP_SHARE * planned_steps))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "TrainConfig":
        """Reads back `as_dict()`, as saved in a run's config.json."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BertError(f"run config has unknown options {unknown}: was it written by a newer berttrain?")
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _require(ok: bool, field: str, what: str, value) -> None:
    if not ok:
        raise BertError(f"--{field.replace('_', '-')} must be {what}, got {value}")
