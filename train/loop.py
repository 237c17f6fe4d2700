"""The training loop, top to bottom: setup (processes, device, precision) -> build (data, model, optimizer, run
directory, resume) -> fit (steps, logging, evaluation, checkpoints). `run` does all three; `eval_run` scores a
run's weights.

The loss of a step is the sum of the cross-entropies of every masked token of the global batch (all processes, all
accumulation micro-steps) divided by their global count, so the gradient is the same however the batch is split.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from prep.masking import derive_key
from prep.shards import FORMAT_VERSION, Dataset, Split, file_sha256, open_dataset
from prep.wordpiece import Vocab
from train import checkpoint as ckpt
from train.batches import BatchLayout, BatchOrder, BatchStream, eval_batches, eval_slices
from train.config import TrainConfig
from train.masking import DeviceMaskTables, mask_draws, remask
from train.model import BertForPretraining, ModelConfig, count_parameters

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RUNS_DIR = "runs"
IGNORE_INDEX = -100
OVERFIT_LOSS = 0.05  # --overfit-batch succeeds when the loss of the batch falls below this
COLLAPSE_TOP_SHARE = 0.5  # "collapsed": one token predicted at more than half of the masks ...
COLLAPSE_LOSS_SHARE = 0.99  # ... while the loss is that of a unigram model (or, at the [MASK] slots, ...
COLLAPSE_ACC_SHARE = 1.1  # ... the accuracy at most this share of always guessing the most frequent token) ...
COLLAPSE_EVALS = 2  # ... at this many evaluations in a row (every healthy run passes through it once)
UNIGRAM_ROWS = 65_536  # training rows whose targets estimate token frequencies
SAMPLE_ROWS = 2
_SALT_DROPOUT, _SALT_MASKING = 0xD50, 0xD3A

# Keys of the progress record inside the training state.
KEY_NONFINITE_TOTAL = "nonfinite_total"
KEY_NONFINITE_RUN = "nonfinite_run"
KEY_BEST_LOSS = "best_mlm_loss"
KEY_GLOBAL_ROWS = "global_rows"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, its place among the processes, its arithmetic."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    precision: str = "fp32"
    """Resolved: fp32, bf16 or fp16."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _cpu_has_bf16() -> bool:
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BertError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if name == "auto":
            return "bf16" if bf16 else "fp16"
        if name == "bf16" and not bf16:
            raise BertError("--precision bf16: this GPU has no bfloat16; use --precision fp16")
        return name
    if name == "fp16":
        raise BertError("--precision fp16 needs a CUDA device (its grad scaler is CUDA-only); use bf16 or fp32")
    if name == "auto":
        return "bf16" if _cpu_has_bf16() else "fp32"
    return name


def keep_freed_memory() -> bool:
    """Has glibc's malloc serve blocks of up to 1 GiB from its heap and keep what is freed there, rather than map
    each large block afresh and unmap it when it is freed. A CPU step allocates the same large buffers every time
    (the vocabulary matrix's bf16 copy and its gradients, tens of MB each), and fresh maps pay their page faults
    again at every step: 12-24% of a `small` step in docs/benchmarks.md. The heap then stays at the size of one
    step's peak. Returns whether it applied (False where malloc is not glibc's)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


def setup(config: TrainConfig) -> Runtime:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1) and picks device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Runtime(device, rank, local_rank, world_size, resolve_precision(config.precision, device))


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def _on_main(runtime: Runtime, fn):
    """Runs `fn` on rank 0 only and gives every rank its result, or raises its BertError on every rank."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = fn()
        except BertError as exc:
            error = str(exc)
    if runtime.distributed:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise BertError(error)
    return result


def _say(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)



@dataclass(frozen=True)
class Plan:
    """The derived numbers of a run, printed at start and saved in config.json."""

    steps: int
    warmup: int
    peak_lr: float
    final_lr: float
    schedule: str
    steps_per_epoch: int
    global_rows: int
    tokens_per_step: int
    train_rows: int

    def lr_at(self, step: int) -> float:
        """Learning rate of the step with 0-based index `step`: linear warm-up, then linear or cosine decay."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.final_lr + (self.peak_lr - self.final_lr) * shape


@dataclass
class Trainer:
    """Everything `fit` works on; built by `build`."""

    config: TrainConfig
    runtime: Runtime
    dataset: Dataset
    model: BertForPretraining
    """The bare model (not wrapped); its weights are what checkpoints hold."""
    forward_model: nn.Module
    """What training steps call: the model, DDP-wrapped and/or compiled."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    layout: BatchLayout
    order: BatchOrder
    plan: Plan
    run_dir: Path
    vocab: Vocab
    mask_tables: DeviceMaskTables | None = None
    step: int = 0
    """Optimizer steps completed."""
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    best_mlm_loss: float | None = None
    last_saved_step: int = -1
    last_eval_step: int = -1
    collapsed_evals: int = 0
    """Evaluations in a row that found the predictions collapsed to one token."""
    unigram: torch.Tensor | None = None
    """Log-frequencies of the training targets, for the baselines of evaluation (made at the first one)."""

    @property
    def val_split(self) -> Split | None:
        split = self.dataset.splits.get("val")
        return split if split is not None and split.rows > 0 else None


def dataset_summary(dataset: Dataset) -> dict:
    manifest = dataset.manifest
    return {
        "path": str(dataset.path),
        "format": manifest["format"],
        "version": manifest["version"],
        "max_len": dataset.max_len,
        "vocab": {k: v for k, v in dataset.vocab.items() if k != "file"},
        "options": manifest.get("options", {}),
        "seed": manifest.get("seed"),
        "splits": {name: {k: v for k, v in info.items() if k != "shards"}
                   for name, info in manifest["splits"].items()},
    }


def check_dataset(dataset: Dataset, model_config: ModelConfig, vocab_sha256: str | None, source: str) -> None:
    """Refuses shards that the model cannot read: another vocabulary, or rows longer than its position table.

    `source` names where the model's vocabulary comes from, for the message (e.g. "run runs/run3").
    """
    if dataset.manifest.get("version") != FORMAT_VERSION:  # open_dataset checks this too; kept for clarity
        raise BertError(f"{dataset.path}: shard format version {dataset.manifest.get('version')}, this berttrain "
                        f"reads version {FORMAT_VERSION}")
    if vocab_sha256 is not None and vocab_sha256 != dataset.vocab["sha256"]:
        raise BertError(
            f"the vocabulary of {dataset.path} (sha256 {dataset.vocab['sha256'][:12]}…) is not the one of {source} "
            f"(sha256 {vocab_sha256[:12]}…): token ids would mean other words; make the shards with the same "
            f"vocab.txt (`bertprep shard --vocab ...`)"
        )
    if dataset.vocab["size"] != model_config.vocab_size:
        raise BertError(f"{dataset.path} has a vocabulary of {dataset.vocab['size']} tokens but the model of "
                        f"{source} has {model_config.vocab_size}")
    if dataset.max_len > model_config.max_positions:
        raise BertError(
            f"{dataset.path} has rows of {dataset.max_len} tokens but the model of {source} has only "
            f"{model_config.max_positions} positions: make shards with --max-len {model_config.max_positions} or "
            f"less, or start a new run with --init-from (which grows the position table)"
        )


def _next_run_dir(root: Path) -> Path:
    numbers = [int(m.group(1)) for p in root.glob("run*") if (m := re.fullmatch(r"run(\d+)", p.name))]
    return root / f"run{max(numbers, default=0) + 1}"


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run directory, checked against --resume/--force and created (rank 0 only)."""
    if config.run_dir is None:
        run_dir = _next_run_dir(Path(RUNS_DIR))
    else:
        run_dir = Path(config.run_dir)
    if config.resume:
        if not run_dir.is_dir():
            raise BertError(f"--resume: there is no run at {run_dir}")
        if ckpt.latest_checkpoint(run_dir) is None:
            raise BertError(f"--resume: {run_dir} has no complete checkpoint to continue from; "
                            f"start it again with --force")
        return run_dir
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not config.force:
            raise BertError(f"run directory {run_dir} already exists: pass --resume to continue it, --force to "
                            f"replace it, or another --run-dir")
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        else:
            run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise BertError(f"{run_dir} is not a berttrain run: it has no {CONFIG_FILE}")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"])


def _grow_positions(state: dict, model_config: ModelConfig, max_positions: int) -> tuple[dict, ModelConfig]:
    """Weights and config with a position table of `max_positions` rows: the trained rows kept, new rows drawn
    as at initialisation (phase 2 at 512 tokens after phase 1 at 128)."""
    key = "encoder.embeddings.position.weight"
    old = state[key]
    new = torch.empty((max_positions, old.shape[1]), dtype=old.dtype).normal_(0.0, 0.02)
    new[: old.shape[0]] = old
    return {**state, key: new}, ModelConfig.from_dict({**model_config.as_dict(), "max_positions": max_positions})


def _model_for(config: TrainConfig, dataset: Dataset) -> tuple[ModelConfig, dict | None, str, str | None]:
    """(model config, initial weights or None, where the model comes from, its vocabulary's sha256)."""
    vocab, nsp = dataset.vocab, dataset.has_nsp
    if config.init_from:
        from train.export import is_hf_dir, load_hf_dir  # here: export imports this module

        path = Path(config.init_from)
        if is_hf_dir(path):  # a published Hugging Face BERT: weights, config.json and vocab.txt
            saved, state, vocab_file = load_hf_dir(path)
            source, vocab_sha256 = path, file_sha256(vocab_file)
        else:
            source = ckpt.resolve_checkpoint(path)
            saved = ModelConfig.from_dict(ckpt.load_model_config(source))
            state = ckpt.load_weights(source)
            vocab_sha256 = ckpt.read_info(source).get("vocab_sha256")
        dropout = config.model_dropout
        fields = {**saved.as_dict(), "dropout": dropout, "attention_dropout": dropout, "nsp": nsp}
        model_config = ModelConfig.from_dict(fields)
        if not nsp:
            state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "nsp_head."))}
        if dataset.max_len > model_config.max_positions:
            state, model_config = _grow_positions(state, model_config, dataset.max_len)
        return model_config, state, f"--init-from {source}", vocab_sha256
    max_positions = config.max_positions or max(512, dataset.max_len)
    model_config = ModelConfig.from_size(config.size, int(vocab["size"]), pad_id=int(vocab["special"]["pad"]),
                                         nsp=nsp, max_positions=max_positions, **config.model_overrides())
    return model_config, None, f"--size {config.size}", None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (and embeddings), none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.peak_lr, betas=(0.9, 0.98), eps=1e-6)
    if fused_adamw_is_fast(next(model.parameters()).device):
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def fused_adamw_is_fast(device: torch.device) -> bool:
    """The fused AdamW kernel wins on CUDA and on AVX-512 CPUs (3x the foreach one); on an AVX2-only CPU (torch
    2.13) it is ~10x slower than foreach (docs/benchmarks.md)."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_seed(*parts: int) -> int:
    return int(derive_key(*parts))


def build(config: TrainConfig, runtime: Runtime) -> Trainer:
    """Opens and checks the shards, builds (or restores) model and optimizer, prepares the run directory."""
    dataset = open_dataset(Path(config.shards))
    train_split = dataset.split("train")
    resume_from = None
    if config.resume:
        run_dir = Path(_on_main(runtime, lambda: str(prepare_run_dir(config))))
        resume_from = ckpt.latest_checkpoint(run_dir)
        info = ckpt.read_info(resume_from)
        model_config = ModelConfig.from_dict(ckpt.load_model_config(resume_from))
        weights, source, vocab_sha = ckpt.load_weights(resume_from), f"run {run_dir}", info.get("vocab_sha256")
    else:
        model_config, weights, source, vocab_sha = _model_for(config, dataset)
    check_dataset(dataset, model_config, vocab_sha, source)
    if model_config.nsp != dataset.has_nsp:
        raise BertError(f"the model of {source} {'has' if model_config.nsp else 'lacks'} the NSP head but "
                        f"{dataset.path} {'lacks' if model_config.nsp else 'has'} NSP labels: use shards made "
                        f"{'with' if model_config.nsp else 'without'} --nsp")
    if not config.resume:  # created only once the data and the model are known to fit
        run_dir = Path(_on_main(runtime, lambda: str(prepare_run_dir(config))))

    torch.manual_seed(config.seed)
    model = BertForPretraining(model_config)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        fresh_heads = ("pooler.", "nsp_head.")  # an NSP head new to a model from --init-from starts untrained
        if unexpected or any(not k.startswith(fresh_heads) for k in missing):
            raise BertError(f"the weights of {source} do not fit its model config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.to(runtime.device)
    optimizer = _make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None

    layout = BatchLayout(config.batch_size, config.grad_accum, runtime.world_size, runtime.rank)
    order = BatchOrder(train_split.rows, layout.global_rows, config.seed)
    steps = config.planned_steps(order.steps_per_epoch)
    plan = Plan(steps=steps, warmup=config.warmup_steps(steps), peak_lr=config.peak_lr, final_lr=config.final_lr,
                schedule=config.schedule, steps_per_epoch=order.steps_per_epoch, global_rows=layout.global_rows,
                tokens_per_step=layout.global_rows * dataset.max_len, train_rows=train_split.rows)

    vocab = Vocab.load(dataset.vocab_file)
    mask_tables = None
    if config.masking == "dynamic":
        mask_tables = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, vocab.special.mask,
                                             vocab.special.pad, bool(dataset.manifest["options"].get("whole_word")),
                                             runtime.device)

    forward_model: nn.Module = model
    if runtime.distributed:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if config.compile:
        forward_model = torch.compile(forward_model)

    trainer = Trainer(config=config, runtime=runtime, dataset=dataset, model=model, forward_model=forward_model,
                      optimizer=optimizer, scaler=scaler, layout=layout, order=order, plan=plan, run_dir=run_dir,
                      vocab=vocab, mask_tables=mask_tables)
    if resume_from is not None:
        _restore(trainer, resume_from)
    _on_main(runtime, lambda: _write_run_files(trainer))
    _describe(trainer, source, resume_from)
    return trainer


def _restore(trainer: Trainer, checkpoint: Path) -> None:
    state = ckpt.load_training_state(checkpoint)  # RNG states must stay on the CPU; the optimizer moves its own
    progress = state[ckpt.KEY_PROGRESS]
    if progress[KEY_GLOBAL_ROWS] != trainer.layout.global_rows:
        raise BertError(
            f"--resume: the run was trained with {progress[KEY_GLOBAL_ROWS]} rows per step but now a step has "
            f"{trainer.layout.global_rows} (--batch-size x --grad-accum x processes); keep it at "
            f"{progress[KEY_GLOBAL_ROWS]} so the data order continues where it stopped"
        )
    trainer.optimizer.load_state_dict(state[ckpt.KEY_OPTIMIZER])
    if trainer.scaler is not None and state.get(ckpt.KEY_SCALER):
        trainer.scaler.load_state_dict(state[ckpt.KEY_SCALER])
    trainer.step = trainer.last_saved_step = int(state[ckpt.KEY_STEP])
    trainer.nonfinite_total = int(progress[KEY_NONFINITE_TOTAL])
    trainer.nonfinite_run = int(progress[KEY_NONFINITE_RUN])
    trainer.best_mlm_loss = progress.get(KEY_BEST_LOSS)
    rng = state[ckpt.KEY_RNG]
    if len(rng) == trainer.runtime.world_size:
        _set_rng_state(rng[trainer.runtime.rank])


def _write_run_files(trainer: Trainer) -> None:
    """config.json (every option, the model, the shards, the derived numbers); on resume, metrics.jsonl cut back
    to the checkpoint's step so that the records continue without duplicates."""
    config_path = trainer.run_dir / CONFIG_FILE
    data = {
        "train": trainer.config.as_dict(),
        "model": trainer.model.config.as_dict(),
        "dataset": dataset_summary(trainer.dataset),
        "world_size": trainer.runtime.world_size,
        "precision": trainer.runtime.precision,
        "plan": trainer.plan.__dict__,
    }
    tmp = config_path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
    metrics = trainer.run_dir / METRICS_FILE
    if trainer.step and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= trainer.step]
        tmp = metrics.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)


def _describe(trainer: Trainer, source: str, resumed: Path | None) -> None:
    plan, config, rt = trainer.plan, trainer.config, trainer.runtime
    mc = trainer.model.config
    copies = trainer.dataset.manifest["splits"]["train"].get("copies", 1)
    lines = [
        f"run        {trainer.run_dir}" + (f" (resumed at step {trainer.step} from {resumed.name})" if resumed else ""),
        f"model      {source}: {mc.layers} layers x {mc.hidden} hidden, {mc.heads} heads, ffn {mc.ffn}, "
        f"{mc.norm}-LN, {count_parameters(trainer.model) / 1e6:.2f}M parameters"
        + (", NSP head" if mc.nsp else ""),
        f"data       {trainer.dataset.path}: {plan.train_rows:,} train rows of {trainer.dataset.max_len} tokens"
        + (f" ({copies} masked copies)" if copies > 1 else "")
        + f", {trainer.val_split.rows if trainer.val_split else 0:,} val rows, masking {config.masking}",
        f"batch      {plan.global_rows} rows/step = {config.batch_size} x {config.grad_accum} accum x "
        f"{rt.world_size} process(es); {plan.tokens_per_step:,} tokens/step",
        f"steps      {plan.steps:,} ({plan.steps / plan.steps_per_epoch:.2f} epochs of {plan.steps_per_epoch:,} "
        f"steps)" + (", one batch repeated (--overfit-batch)" if config.overfit_batch else ""),
        f"schedule   lr {plan.peak_lr:g}, warm-up {plan.warmup:,} steps, {plan.schedule} decay to {plan.final_lr:g}",
        f"device     {rt.device} {rt.precision}" + (", compiled" if config.compile else ""),
    ]
    for line in lines:
        _say(rt, line)



@dataclass
class StepResult:
    loss: float
    mlm_loss: float
    nsp_loss: float | None
    grad_norm: float
    lr: float
    skipped: bool


def train_step(trainer: Trainer, micro: list[dict[str, torch.Tensor]], step: int) -> StepResult:
    """One optimizer step over this process's micro-batches of global step `step` (0-based)."""
    config, rt, model = trainer.config, trainer.runtime, trainer.model
    pad_id = model.config.pad_id
    if trainer.mask_tables is not None:
        # Drawn for the whole global batch and sliced, so a row's masks do not depend on processes or micro-steps.
        generator = torch.Generator(device=rt.device).manual_seed(_step_seed(config.seed, _SALT_MASKING, step))
        draws = mask_draws(trainer.layout.global_rows, micro[0]["input_ids"].shape[1], trainer.mask_tables,
                           generator)
        rows = trainer.layout.batch_rows
        micro = [remask(batch, trainer.mask_tables, {k: v[start : start + rows] for k, v in draws.items()})
                 for batch, start in zip(micro, trainer.layout.micro_starts())]
    valid = [batch["mlm_labels"] != pad_id for batch in micro]
    counts = torch.stack([sum(v.sum() for v in valid), torch.tensor(sum(len(b["input_ids"]) for b in micro),
                                                                    device=rt.device)]).double()
    global_masked, global_rows = _all_reduce(counts, rt).clamp(min=1).unbind()
    torch.manual_seed(_step_seed(config.seed, _SALT_DROPOUT, step, rt.rank))

    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)
    no_sync = getattr(trainer.forward_model, "no_sync", None)
    if no_sync is None and isinstance(getattr(trainer.forward_model, "_orig_mod", None),
                                      nn.parallel.DistributedDataParallel):
        no_sync = trainer.forward_model._orig_mod.no_sync
    model.train()
    for a, (batch, used) in enumerate(zip(micro, valid)):
        sync = no_sync is None or a == len(micro) - 1
        with (contextlib.nullcontext() if sync else no_sync()):
            with rt.autocast():
                out = trainer.forward_model(batch["input_ids"], batch["mlm_positions"],
                                            token_type_ids=batch.get("token_type_ids"))
            labels = torch.where(used, batch["mlm_labels"], IGNORE_INDEX)
            mlm_sum = F.cross_entropy(out.mlm_logits.float().flatten(0, 1), labels.flatten(),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
            loss = mlm_sum / global_masked
            nsp_sum = torch.zeros((), device=rt.device)
            if out.nsp_logits is not None:
                nsp_sum = F.cross_entropy(out.nsp_logits.float(), batch["nsp_labels"], reduction="sum")
                loss = loss + nsp_sum / global_rows
            # DDP averages gradients over processes; the global normalisation already divides by every process.
            loss = loss * rt.world_size
            (trainer.scaler.scale(loss) if trainer.scaler is not None else loss).backward()
        sums += torch.stack([mlm_sum.detach().double(), nsp_sum.detach().double()])

    _all_reduce(sums, rt)
    mlm_loss, nsp_total = (sums[0] / global_masked).item(), (sums[1] / global_rows).item()
    nsp_loss = nsp_total if model.config.nsp else None
    total = mlm_loss + (nsp_total if nsp_loss is not None else 0.0)

    lr = trainer.plan.lr_at(step)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    if trainer.scaler is not None:
        trainer.scaler.unscale_(trainer.optimizer)
    clip = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    finite = math.isfinite(total) and (trainer.scaler is not None or math.isfinite(grad_norm))
    if trainer.scaler is not None:
        if finite:
            trainer.scaler.step(trainer.optimizer)  # skips by itself when fp16 gradients overflowed
        trainer.scaler.update()
    elif finite:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(total, mlm_loss, nsp_loss, grad_norm, lr, skipped=not finite)


class _Metrics:
    """metrics.jsonl on rank 0: one JSON object a line, flushed as written."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path is not None else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            # A non-finite loss is written as null: NaN is not JSON, and other readers choke on it.
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def save(trainer: Trainer) -> Path | None:
    """Checkpoint of the current step (rank 0 writes; every rank takes part in gathering RNG states)."""
    rt = trainer.runtime
    rng = _rng_state()
    rngs = [None] * rt.world_size
    if rt.distributed:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    path = None
    if rt.is_main:
        state = {
            ckpt.KEY_OPTIMIZER: trainer.optimizer.state_dict(),
            ckpt.KEY_SCALER: trainer.scaler.state_dict() if trainer.scaler is not None else {},
            ckpt.KEY_RNG: rngs,
            ckpt.KEY_DATA: dict(zip(("epoch", "index"), trainer.order.position(trainer.step)),
                                seed=trainer.config.seed, global_rows=trainer.layout.global_rows),
            ckpt.KEY_PROGRESS: {KEY_NONFINITE_TOTAL: trainer.nonfinite_total,
                                KEY_NONFINITE_RUN: trainer.nonfinite_run,
                                KEY_BEST_LOSS: trainer.best_mlm_loss,
                                KEY_GLOBAL_ROWS: trainer.layout.global_rows},
        }
        info = {"vocab_sha256": trainer.dataset.vocab["sha256"], "vocab_size": trainer.dataset.vocab["size"],
                "max_len": trainer.dataset.max_len, "shards": str(trainer.dataset.path)}
        path = ckpt.save_checkpoint(trainer.run_dir, trainer.step, trainer.model.state_dict(),
                                    trainer.model.config.as_dict(), state, info)
        ckpt.prune(trainer.run_dir, trainer.config.keep_last)
    trainer.last_saved_step = trainer.step
    if rt.distributed:
        dist.barrier()
    return path


def fit(trainer: Trainer, stop_at: int | None = None, progress: bool = True) -> dict:
    """Trains from `trainer.step` to the planned steps (or `stop_at`), logging, evaluating and saving on the way.

    Returns a summary: steps done, last loss, non-finite steps skipped, last evaluation, overfit verdict.
    """
    from tqdm import tqdm

    config, rt, plan = trainer.config, trainer.runtime, trainer.plan
    end = plan.steps if stop_at is None else min(plan.steps, stop_at)
    metrics = _Metrics(trainer.run_dir / METRICS_FILE if rt.is_main else None)
    bar = tqdm(total=plan.steps, initial=trainer.step, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and rt.is_main), mininterval=0.5)
    stream = BatchStream(trainer.dataset.split("train"), trainer.order, trainer.layout, rt.device,
                         start_step=trainer.step, repeat_step=0 if config.overfit_batch else None)
    first_loss = last = None
    last_eval = None
    window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
    try:
        while trainer.step < end:
            began = time.perf_counter()
            batch = stream.next()
            result = train_step(trainer, batch.micro, trainer.step)
            trainer.step += 1
            window["time"] += time.perf_counter() - began
            window["wait"] += batch.wait_s
            window["steps"] += 1
            last = result
            if result.skipped:
                trainer.nonfinite_total += 1
                trainer.nonfinite_run += 1
                window["skipped"] += 1
                _say(rt, f"step {trainer.step}: loss is {result.loss}, step skipped "
                         f"({trainer.nonfinite_run} in a row, {trainer.nonfinite_total} in all)")
                if trainer.nonfinite_run >= config.max_nonfinite:
                    raise BertError(
                        f"the loss was not finite for {trainer.nonfinite_run} steps in a row (up to step "
                        f"{trainer.step}): training diverged; lower --lr (now {plan.peak_lr:g}), keep --grad-clip "
                        f"on, or use --precision fp32"
                    )
            else:
                trainer.nonfinite_run = 0
                if first_loss is None:
                    first_loss = result.loss
            if trainer.step % config.log_every == 0 or trainer.step == end:
                record = {"step": trainer.step, "epoch": batch.epoch, "loss": result.loss,
                          "mlm_loss": result.mlm_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                          "tokens_per_s": plan.tokens_per_step * window["steps"] / max(window["time"], 1e-9),
                          "data_wait_frac": window["wait"] / max(window["time"], 1e-9),
                          "skipped": window["skipped"]}
                if result.nsp_loss is not None:
                    record["nsp_loss"] = result.nsp_loss
                metrics.write(record)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
            bar.update(1)
            at_end = trainer.step == plan.steps
            if config.eval_every and trainer.val_split is not None and \
                    (trainer.step % config.eval_every == 0 or at_end):
                last_eval = _evaluate_during_fit(trainer, metrics)
            if config.save_every and trainer.step % config.save_every == 0 and trainer.last_saved_step != trainer.step:
                save(trainer)
    finally:
        stream.close()
        bar.close()
    if trainer.last_saved_step != trainer.step:
        save(trainer)
    metrics.close()
    summary = {"run_dir": str(trainer.run_dir), "step": trainer.step, "steps": plan.steps,
               "loss": last.loss if last else None, "nonfinite_steps": trainer.nonfinite_total,
               "eval": last_eval}
    if config.overfit_batch and last is not None:
        summary["overfit"] = {"first_loss": first_loss, "final_loss": last.loss,
                              "reached_zero": last.loss < OVERFIT_LOSS}
    return summary


def _evaluate_during_fit(trainer: Trainer, metrics: _Metrics) -> dict:
    rt, config = trainer.runtime, trainer.config
    if trainer.unigram is None:
        trainer.unigram = unigram_log_probs(trainer.dataset.split("train"), trainer.model.config.vocab_size,
                                            trainer.model.config.pad_id)
    result = evaluate(trainer.model, trainer.val_split, rt, config.batch_size, config.eval_rows,
                      unigram=trainer.unigram, samples=SAMPLE_ROWS if rt.is_main else 0, tokens=trainer.vocab.tokens,
                      mask_id=trainer.vocab.special.mask)
    trainer.last_eval_step = trainer.step
    record = {"step": trainer.step, "split": "val", **{k: result[k] for k in EVAL_KEYS if k in result}}
    metrics.write(record)
    _say(rt, format_eval(result, prefix=f"step {trainer.step} val"))
    for sample in result.get("samples", []):
        _say(rt, sample)
    trainer.collapsed_evals = trainer.collapsed_evals + 1 if collapsed(result) else 0
    if trainer.step > trainer.plan.warmup and trainer.collapsed_evals >= COLLAPSE_EVALS:
        _say(rt, collapse_warning(result, trainer.vocab.tokens, trainer.plan.peak_lr))
    if trainer.best_mlm_loss is None or result["mlm_loss"] < trainer.best_mlm_loss:
        trainer.best_mlm_loss = result["mlm_loss"]
        if config.save_every:
            save(trainer)
            if rt.is_main:
                ckpt.write_best(trainer.run_dir, trainer.step, result["mlm_loss"])
                ckpt.prune(trainer.run_dir, config.keep_last)
    return result



EVAL_KEYS = ("mlm_loss", "mlm_acc", "ppl", "nsp_acc", "rows", "masked", "baseline_acc", "unigram_loss", "mask_acc",
             "mask_baseline_acc")


def collapsed(result: dict) -> bool:
    """True when predictions sit on one token and beat no frequency baseline: judged at the [MASK] slots when
    `evaluate` counted them (copying the unchanged slots lowers the loss of a model that ignores the context),
    else by the loss over every masked slot."""
    if "mask_acc" in result:
        return (result["mask_top_prediction_share"] > COLLAPSE_TOP_SHARE
                and result["mask_acc"] <= COLLAPSE_ACC_SHARE * result["mask_baseline_acc"])
    return (result["top_prediction_share"] > COLLAPSE_TOP_SHARE
            and result["mlm_loss"] > COLLAPSE_LOSS_SHARE * result["unigram_loss"])


def collapse_warning(result: dict, tokens: list[str], peak_lr: float) -> str:
    """The warning for a run whose evaluations keep finding `collapsed` predictions."""
    if "mask_acc" in result:
        return (f"warning: at the [MASK] slots the model predicts {tokens[result['mask_top_prediction']]!r} "
                f"{result['mask_top_prediction_share']:.0%} of the time and is right no more often than always "
                f"guessing the most frequent token ({result['mask_acc']:.1%} against "
                f"{result['mask_baseline_acc']:.1%}): it does not use the context yet. Every run starts so, and "
                f"the longer its rows the longer it takes (shards of --max-len 16 show within minutes on a CPU "
                f"whether a small model learns); if it persists, train on more text or for longer, or lower --lr "
                f"(now {peak_lr:g}).")
    return (f"warning: the model predicts the same token ({tokens[result['top_prediction']]!r}) at "
            f"{result['top_prediction_share']:.0%} of the masks and its loss {result['mlm_loss']:.3f} is that of "
            f"token frequencies alone ({result['unigram_loss']:.3f}): it has collapsed to predicting frequent "
            f"tokens. If this persists, lower --lr (now {peak_lr:g}).")


def unigram_log_probs(split: Split, vocab_size: int, pad_id: int, max_rows: int = UNIGRAM_ROWS) -> torch.Tensor:
    """float64 [vocab_size]: log-frequencies of the masked tokens in the first `max_rows` rows of `split` (rows
    are shuffled at write time, so these are a fair sample), add-one smoothed. What a model that has learned only
    token frequencies predicts at every mask."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for start in range(0, min(split.rows, max_rows), 8192):
        labels = np.asarray(split.slice(start, min(start + 8192, split.rows, max_rows))["mlm_labels"])
        counts += np.bincount(labels[labels != pad_id].astype(np.int64), minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(np.log(counts / counts.sum()))


@torch.no_grad()
def evaluate(model: BertForPretraining, split: Split, runtime: Runtime, batch_rows: int = 64,
             max_rows: int | None = None, unigram: torch.Tensor | None = None, samples: int = 0,
             tokens: list[str] | None = None, mask_id: int | None = None) -> dict:
    """Masked-LM loss (nats per masked token), perplexity and accuracy on the first `max_rows` rows of `split`,
    shared among the processes; printed `samples` rows for reading.

    With `unigram` (log-frequencies from the training split, see `unigram_log_probs`) also the two references
    of a model that learned nothing but token frequencies: `baseline_acc`, the accuracy of always predicting the
    most frequent token, and `unigram_loss`, the loss of predicting the frequencies. Without it both come from
    this split's own targets. `top_prediction_share` says how often the model's most common guess is made.

    With `mask_id`, the same three figures for the slots whose input shows [MASK] (`mask_acc`, `mask_baseline_acc`,
    `mask_top_prediction_share`): there only the context can tell the token, whereas at the slots left unchanged
    copying the input is right, which lifts `mlm_acc` long before a model uses any context.
    """
    was_training = model.training
    model.eval()
    vocab_size, pad_id, device = model.config.vocab_size, model.config.pad_id, runtime.device
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, masked, nsp correct, rows
    predicted = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    targets = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    # The same counts at the slots showing [MASK]: correct, slots, then predictions and targets by token.
    at_mask = torch.zeros(2 + 2 * vocab_size, dtype=torch.float64, device=device)
    texts: list[str] = []
    for batch in eval_batches(split, eval_slices(split.rows, batch_rows, runtime.world_size, runtime.rank,
                                                 max_rows), device):
        with runtime.autocast():
            out = model(batch["input_ids"], batch["mlm_positions"], token_type_ids=batch.get("token_type_ids"))
        logits = out.mlm_logits.float()
        used = batch["mlm_labels"] != pad_id
        labels = batch["mlm_labels"][used]
        chosen = logits[used]
        guess = chosen.argmax(-1)
        totals[0] += F.cross_entropy(chosen, labels, reduction="sum").double()
        totals[1] += (guess == labels).sum()
        totals[2] += used.sum()
        totals[4] += len(used)
        if out.nsp_logits is not None:
            totals[3] += (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()
        predicted += torch.bincount(guess, minlength=vocab_size).double()
        targets += torch.bincount(labels, minlength=vocab_size).double()
        if mask_id is not None:
            shown = torch.gather(batch["input_ids"], 1, batch["mlm_positions"].long())[used] == mask_id
            at_mask[0] += (guess[shown] == labels[shown]).sum()
            at_mask[1] += shown.sum()
            at_mask[2:2 + vocab_size] += torch.bincount(guess[shown], minlength=vocab_size).double()
            at_mask[2 + vocab_size:] += torch.bincount(labels[shown], minlength=vocab_size).double()
        if len(texts) < samples and tokens is not None:
            texts += _samples(batch, logits, used, tokens, samples - len(texts), pad_id)
    for tensor in (totals, predicted, targets, at_mask):
        _all_reduce(tensor, runtime)
    model.train(was_training)
    loss, correct, masked, nsp_correct, rows = totals.tolist()
    masked_n = max(masked, 1.0)
    mlm_loss = loss / masked_n
    if unigram is None:
        share = targets / masked_n
        unigram = torch.where(share > 0, share, 1.0).log()
    unigram = unigram.to(device=device, dtype=torch.float64)
    result = {
        "mlm_loss": mlm_loss,
        "ppl": math.exp(min(mlm_loss, 700.0)),
        "mlm_acc": correct / masked_n,
        "rows": int(rows),
        "masked": int(masked),
        "baseline_acc": targets[int(unigram.argmax())].item() / masked_n,
        "unigram_loss": -(targets * unigram).sum().item() / masked_n,
        "top_prediction": int(predicted.argmax().item()),
        "top_prediction_share": predicted.max().item() / masked_n,
    }
    if mask_id is not None:
        shown_n = max(at_mask[1].item(), 1.0)
        result["mask_acc"] = at_mask[0].item() / shown_n
        result["mask_baseline_acc"] = at_mask[2 + vocab_size + int(unigram.argmax())].item() / shown_n
        result["mask_top_prediction"] = int(at_mask[2:2 + vocab_size].argmax().item())
        result["mask_top_prediction_share"] = at_mask[2:2 + vocab_size].max().item() / shown_n
    if model.config.nsp:
        result["nsp_acc"] = nsp_correct / max(rows, 1.0)
    if texts:
        result["samples"] = texts
    return result


def _samples(batch: dict, logits: torch.Tensor, used: torch.Tensor, tokens: list[str], count: int,
             pad_id: int) -> list[str]:
    """Rows printed as Input Tokens / Target Tokens / Predicted Tokens (top 3 with probabilities)."""
    texts = []
    probs = logits.softmax(-1)
    for row in range(min(count, len(used))):
        ids = batch["input_ids"][row]
        ids = ids[ids != pad_id].tolist()
        slots = used[row].nonzero().flatten().tolist()
        top_p, top_i = probs[row, slots].topk(3, dim=-1)
        targets = [tokens[t] for t in batch["mlm_labels"][row, slots].tolist()]
        guesses = [" ".join(f"{tokens[i]} ({p:.2f})" for p, i in zip(ps, is_))
                   for ps, is_ in zip(top_p.tolist(), top_i.tolist())]
        texts.append("\n".join([
            f"  Input Tokens:     {' '.join(tokens[i] for i in ids)}",
            f"  Target Tokens:    {' | '.join(targets)}",
            f"  Predicted Tokens: {' | '.join(guesses)}",
        ]))
    return texts


def format_eval(result: dict, prefix: str = "") -> str:
    text = (f"{prefix + ': ' if prefix else ''}mlm_loss {result['mlm_loss']:.4f}  ppl {result['ppl']:.2f}  "
            f"mlm_acc {result['mlm_acc']:.4f} (most-frequent-token baseline {result['baseline_acc']:.4f})")
    if "mask_acc" in result:
        text += f"  at [MASK] {result['mask_acc']:.4f} (baseline {result['mask_baseline_acc']:.4f})"
    if "nsp_acc" in result:
        text += f"  nsp_acc {result['nsp_acc']:.4f}"
    return text + f"  [{result['rows']:,} rows, {result['masked']:,} masked tokens]"



def run(config: TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict:
    """`berttrain run`: setup -> build -> fit. Returns fit's summary."""
    runtime = setup(config)
    try:
        trainer = build(config, runtime)
        summary = fit(trainer, stop_at=stop_at, progress=progress)
        if config.overfit_batch and "overfit" in summary:
            o = summary["overfit"]
            verdict = ("reached ~0: model, loss and optimizer can learn" if o["reached_zero"] else
                       f"did NOT reach ~0 (below {OVERFIT_LOSS}): something keeps the model from learning; "
                       f"try more --steps or another --lr")
            _say(runtime, f"overfit-batch: loss {o['first_loss']:.4f} -> {o['final_loss']:.4f} after "
                          f"{summary['step']} steps: {verdict}")
        return summary if runtime.is_main else None
    finally:
        teardown(runtime)


def eval_run(run_dir: Path, shards: Path | None = None, split: str = "val", checkpoint: Path | None = None,
             batch_size: int = 64, max_rows: int | None = None, device: str = "auto", precision: str | None = None,
             samples: int = 0) -> dict:
    """`berttrain eval`: loss, perplexity and accuracy of a run's latest (or the given) checkpoint on a split of
    its shards (or of `shards`), at the run's precision unless `precision` says otherwise."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        if not run_dir.is_dir():
            raise BertError(f"--run {run_dir}: no such run directory")
        checkpoint = ckpt.latest_checkpoint(run_dir)
        if checkpoint is None:
            raise BertError(f"--run {run_dir}: the run has no complete checkpoint yet")
    else:
        checkpoint = ckpt.resolve_checkpoint(Path(checkpoint), "--checkpoint")
    info = ckpt.read_info(checkpoint)
    if shards is None:
        shards = Path(info["shards"]) if "shards" in info else Path(load_run_config(run_dir).shards)
    dataset = open_dataset(Path(shards))
    model_config = ModelConfig.from_dict(ckpt.load_model_config(checkpoint))
    check_dataset(dataset, model_config, info.get("vocab_sha256"), f"checkpoint {checkpoint}")
    target = dataset.split(split)
    if target.rows == 0:
        raise BertError(f"split {split!r} of {dataset.path} has no rows")
    dev = resolve_device(device)
    if precision is None:
        precision = load_run_config(run_dir).precision if (run_dir / CONFIG_FILE).is_file() else "auto"
    runtime = Runtime(dev, precision=resolve_precision(precision, dev))
    model = BertForPretraining(model_config)
    model.load_state_dict(ckpt.load_weights(checkpoint))
    model.to(dev)
    tokens = Vocab.load(dataset.vocab_file).tokens if samples else None
    train = dataset.splits.get("train")
    unigram = unigram_log_probs(train, model_config.vocab_size, model_config.pad_id) if train is not None else None
    result = evaluate(model, target, runtime, batch_size, max_rows, unigram=unigram, samples=samples, tokens=tokens,
                      mask_id=int(dataset.vocab["special"]["mask"]))
    return {"checkpoint": str(checkpoint), "step": info["step"], "split": split, "shards": str(dataset.path),
            **result}
