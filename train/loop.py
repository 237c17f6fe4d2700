"""The training loop, top to bottom: setup (processes, device, precision) -> build (data, model, optimizer, run
directory, resume) -> fit (steps, logging, evaluation, checkpoints). `run` does all three.

The loss of a step is the sum of the cross-entropies of every masked token of the global batch (all processes, all
accumulation micro-steps) divided by their global count, so the gradient is the same however the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from prep.masking import derive_key
from prep.shards import Dataset, Split, open_dataset
from prep.wordpiece import Vocab
from train import checkpoint as ckpt
from train.arch import new_model
from train.banner import banner, run_record
from train.batches import BatchLayout, BatchOrder, BatchStream
from train.config import TrainConfig
from train.diagnose import COLLAPSE_EVALS, OVERFIT_LOSS, collapse_warning, collapsed
from train.evaluate import EVAL_KEYS, evaluate, format_eval, unigram_log_probs
from train.loss import IGNORE_INDEX, masked_lm_loss_sum
from train.masking import DeviceMaskTables, mask_draws, remask
from train.metrics import (TENSORBOARD_DIR, BarSink, JsonlSink, MetricsWriter, Sink,
                           require_tensorboard, tensorboard_sink)
from train.optim import make_optimizer
from train.preempt import Preempted, StopRequests, agreed_stop, resume_command
from train.rundir import METRICS_FILE, claimed_run_dir, prepare_resume, prepare_run_dir, write_run_files
from train.runtime import Runtime, all_reduce, log, on_main, setup, teardown
from train.schedule import Plan
from train.sources import check_dataset, initial_model, resumed_model
from train.state import restore, save

SAMPLE_ROWS = 2
_SALT_DROPOUT, _SALT_MASKING = 0xD50, 0xD3A


@dataclass
class Trainer:
    """Everything `fit` works on; built by `build`."""

    config: TrainConfig
    runtime: Runtime
    dataset: Dataset
    model: nn.Module
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


def _step_seed(*parts: int) -> int:
    return int(derive_key(*parts))


def build(config: TrainConfig, runtime: Runtime) -> Trainer:
    """Opens and checks the shards, builds (or restores) model and optimizer, prepares the run directory."""
    # The data and where the model comes from.
    if config.tensorboard:
        require_tensorboard()
    dataset = open_dataset(Path(config.shards))
    train_split = dataset.split("train")
    resume_from = None
    if config.resume:  # rank 0 picks the checkpoint (hashing it), every rank reads it
        run_dir, resume_from = map(Path, on_main(runtime, lambda: [str(p) for p in prepare_resume(config)]))
        source = resumed_model(run_dir, resume_from)
    else:
        source = initial_model(config, dataset)
    model_config = source.config
    check_dataset(dataset, model_config, source.vocab_sha256, source.name)
    if model_config.nsp != dataset.has_nsp:
        raise BertError(f"the model of {source.name} {'has' if model_config.nsp else 'lacks'} the NSP head but "
                        f"{dataset.path} {'lacks' if model_config.nsp else 'has'} NSP labels: use shards made "
                        f"{'with' if model_config.nsp else 'without'} --nsp")
    if not config.resume:  # created only once the data and the model are known to fit
        run_dir = Path(on_main(runtime, lambda: str(prepare_run_dir(config))))

    # The model, its optimizer and the learning-rate plan.
    torch.manual_seed(config.seed)
    model = new_model(model_config)
    if source.weights is not None:
        missing, unexpected = model.load_state_dict(source.weights, strict=False)
        fresh_heads = ("pooler.", "nsp_head.")  # an NSP head new to a model from --init-from starts untrained
        if unexpected or any(not k.startswith(fresh_heads) for k in missing):
            raise BertError(f"the weights of {source.name} do not fit its model config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.to(runtime.device)
    optimizer = make_optimizer(model, config.peak_lr, config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    layout = BatchLayout(config.batch_size, config.grad_accum, runtime.world_size, runtime.rank)
    order = BatchOrder(train_split.rows, layout.global_rows, config.seed)
    steps = config.planned_steps(order.steps_per_epoch)
    plan = Plan(steps=steps, warmup=config.warmup_steps(steps), peak_lr=config.peak_lr, final_lr=config.final_lr,
                schedule=config.schedule, steps_per_epoch=order.steps_per_epoch, global_rows=layout.global_rows,
                tokens_per_step=layout.global_rows * dataset.max_len, train_rows=train_split.rows)

    # Masks drawn on the device, when dynamic.
    vocab = Vocab.load(dataset.vocab_file)
    mask_tables = None
    if config.masking_mode == "dynamic":
        mask_tables = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, vocab.special.mask,
                                             vocab.special.pad, bool(dataset.manifest["options"].get("whole_word")),
                                             runtime.device, mask_prob=config.dynamic_mask_prob)

    # How the model runs: wrapped for several processes, compiled on request.
    forward_model: nn.Module = model
    if runtime.distributed:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if config.compile:
        forward_model = torch.compile(forward_model)

    # The run directory's files, and where a resumed run stopped.
    trainer = Trainer(config=config, runtime=runtime, dataset=dataset, model=model, forward_model=forward_model,
                      optimizer=optimizer, scaler=scaler, layout=layout, order=order, plan=plan, run_dir=run_dir,
                      vocab=vocab, mask_tables=mask_tables)
    if resume_from is not None:
        restore(trainer, resume_from)
    on_main(runtime, lambda: write_run_files(run_dir, run_record(trainer), trainer.step))
    for line in banner(trainer, source.name, resume_from):
        log(runtime, line)
    return trainer


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
    config, runtime, model = trainer.config, trainer.runtime, trainer.model
    pad_id = model.config.pad_id
    if trainer.mask_tables is not None:
        # Drawn for the whole global batch and sliced, so a row's masks do not depend on processes or micro-steps.
        generator = torch.Generator(device=runtime.device).manual_seed(_step_seed(config.seed, _SALT_MASKING, step))
        draws = mask_draws(trainer.layout.global_rows, micro[0]["input_ids"].shape[1], trainer.mask_tables,
                           generator)
        rows = trainer.layout.batch_rows
        micro = [remask(batch, trainer.mask_tables, {k: v[start : start + rows] for k, v in draws.items()})
                 for batch, start in zip(micro, trainer.layout.micro_starts())]
    valid = [batch["mlm_labels"] != pad_id for batch in micro]
    counts = torch.stack([sum(v.sum() for v in valid), torch.tensor(sum(len(b["input_ids"]) for b in micro),
                                                                    device=runtime.device)]).double()
    global_masked, global_rows = all_reduce(counts, runtime).clamp(min=1).unbind()
    torch.manual_seed(_step_seed(config.seed, _SALT_DROPOUT, step, runtime.rank))

    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    no_sync = getattr(trainer.forward_model, "no_sync", None)
    if no_sync is None and isinstance(getattr(trainer.forward_model, "_orig_mod", None),
                                      nn.parallel.DistributedDataParallel):
        no_sync = trainer.forward_model._orig_mod.no_sync
    model.train()
    for a, (batch, used) in enumerate(zip(micro, valid)):
        sync = no_sync is None or a == len(micro) - 1
        with (contextlib.nullcontext() if sync else no_sync()):
            with runtime.autocast():
                out = trainer.forward_model(batch["input_ids"], batch["mlm_positions"],
                                            token_type_ids=batch.get("token_type_ids"))
            labels = torch.where(used, batch["mlm_labels"], IGNORE_INDEX)
            mlm_sum = masked_lm_loss_sum(out.mlm_logits.flatten(0, 1), labels.flatten())
            loss = mlm_sum / global_masked
            nsp_sum = torch.zeros((), device=runtime.device)
            if out.nsp_logits is not None:
                nsp_sum = F.cross_entropy(out.nsp_logits.float(), batch["nsp_labels"], reduction="sum")
                loss = loss + nsp_sum / global_rows
            # DDP averages gradients over processes; the global normalisation already divides by every process.
            loss = loss * runtime.world_size
            (trainer.scaler.scale(loss) if trainer.scaler is not None else loss).backward()
        sums += torch.stack([mlm_sum.detach().double(), nsp_sum.detach().double()])

    all_reduce(sums, runtime)
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


def fit(trainer: Trainer, stop_at: int | None = None, progress: bool = True) -> dict:
    """Trains from `trainer.step` to the planned steps (or `stop_at`), logging, evaluating and saving on the way.

    Returns a summary: steps done, last loss, non-finite steps skipped, last evaluation, overfit verdict. On
    SIGTERM or SIGINT every process stops after the same step, rank 0 saves it, and `Preempted` is raised.
    """
    with StopRequests(announce=trainer.runtime.is_main) as requests:
        return _fit(trainer, requests, stop_at, progress)


def _fit(trainer: Trainer, requests: StopRequests, stop_at: int | None, progress: bool) -> dict:
    from tqdm import tqdm

    config, runtime, plan = trainer.config, trainer.runtime, trainer.plan
    end = plan.steps if stop_at is None else min(plan.steps, stop_at)
    bar = tqdm(total=plan.steps, initial=trainer.step, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and runtime.is_main), mininterval=0.5)
    metrics = MetricsWriter(_sinks(trainer, bar) if runtime.is_main else [])
    stream = BatchStream(trainer.dataset.split("train"), trainer.order, trainer.layout, runtime.device,
                         start_step=trainer.step, repeat_step=0 if config.overfit_batch else None)
    first_loss = last = None
    last_eval = None
    window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
    stopped_by = 0
    try:
        while trainer.step < end:
            # Forward, backward, update.
            began = time.perf_counter()
            batch = stream.next()
            result = train_step(trainer, batch.micro, trainer.step)
            trainer.step += 1
            window["time"] += time.perf_counter() - began
            window["wait"] += batch.wait_s
            window["steps"] += 1
            last = result

            # Non-finite losses: skipped, and stopped when they persist.
            if result.skipped:
                trainer.nonfinite_total += 1
                trainer.nonfinite_run += 1
                window["skipped"] += 1
                log(runtime, f"step {trainer.step}: loss is {result.loss}, step skipped "
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

            # Timing and logging.
            if trainer.step % config.log_every == 0 or trainer.step == end:
                record = {"step": trainer.step, "epoch": batch.epoch, "loss": result.loss,
                          "mlm_loss": result.mlm_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                          "tokens_per_s": plan.tokens_per_step * window["steps"] / max(window["time"], 1e-9),
                          "data_wait_frac": window["wait"] / max(window["time"], 1e-9),
                          "skipped": window["skipped"]}
                if result.nsp_loss is not None:
                    record["nsp_loss"] = result.nsp_loss
                metrics.write(record)
                window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
            bar.update(1)

            # Evaluate and checkpoint.
            at_end = trainer.step == plan.steps
            if config.eval_every and trainer.val_split is not None and \
                    (trainer.step % config.eval_every == 0 or at_end):
                last_eval = _evaluate_during_fit(trainer, metrics)
            if config.save_every and trainer.step % config.save_every == 0 and trainer.last_saved_step != trainer.step:
                save(trainer)

            # Preemption: after the step's records and evaluation, so that a resumed run repeats none of them.
            if trainer.step < end and (stopped_by := agreed_stop(requests, runtime)):
                break
    finally:
        stream.close()
        bar.close()
        metrics.close()

    # Termination: the last step is always saved.
    if trainer.last_saved_step != trainer.step:
        save(trainer)
    if stopped_by:
        log(runtime, f"stopped by {signal.Signals(stopped_by).name} after step {trainer.step} of {plan.steps}, "
                     f"saved as {ckpt.checkpoints_dir(trainer.run_dir) / ckpt.checkpoint_name(trainer.step)}; "
                     f"resume with: {resume_command(trainer.run_dir)}")
        if runtime.distributed:
            dist.barrier()  # the line is out before any process exits and torchrun stops the others
        raise Preempted(stopped_by, trainer.step)
    summary = {"run_dir": str(trainer.run_dir), "step": trainer.step, "steps": plan.steps,
               "loss": last.loss if last else None, "nonfinite_steps": trainer.nonfinite_total,
               "eval": last_eval}
    if config.overfit_batch and last is not None:
        summary["overfit"] = {"first_loss": first_loss, "final_loss": last.loss,
                              "reached_zero": last.loss < OVERFIT_LOSS}
    return summary


def _sinks(trainer: Trainer, bar) -> list[Sink]:
    """Where rank 0's records go: metrics.jsonl, the bar, and TensorBoard with --tensorboard."""
    sinks = [JsonlSink(trainer.run_dir / METRICS_FILE), BarSink(bar)]
    if trainer.config.tensorboard:
        sinks.append(tensorboard_sink(trainer.run_dir / TENSORBOARD_DIR, start_step=trainer.step))
    return sinks


def _evaluate_during_fit(trainer: Trainer, metrics: MetricsWriter) -> dict:
    runtime, config = trainer.runtime, trainer.config
    if trainer.unigram is None:
        trainer.unigram = unigram_log_probs(trainer.dataset.split("train"), trainer.model.config.vocab_size,
                                            trainer.model.config.pad_id)
    result = evaluate(trainer.model, trainer.val_split, runtime, config.batch_size, config.eval_rows,
                      unigram=trainer.unigram, samples=SAMPLE_ROWS if runtime.is_main else 0,
                      tokens=trainer.vocab.tokens, mask_id=trainer.vocab.special.mask)
    trainer.last_eval_step = trainer.step
    record = {"step": trainer.step, "split": "val", **{k: result[k] for k in EVAL_KEYS if k in result}}
    metrics.write(record)
    metrics.samples(trainer.step, result.get("samples", []))
    log(runtime, format_eval(result, prefix=f"step {trainer.step} val"))
    for sample in result.get("samples", []):
        log(runtime, sample)
    trainer.collapsed_evals = trainer.collapsed_evals + 1 if collapsed(result) else 0
    if trainer.step > trainer.plan.warmup and trainer.collapsed_evals >= COLLAPSE_EVALS:
        log(runtime, collapse_warning(result, trainer.vocab.tokens, trainer.plan.peak_lr))
    if trainer.best_mlm_loss is None or result["mlm_loss"] < trainer.best_mlm_loss:
        trainer.best_mlm_loss = result["mlm_loss"]
        if config.save_every:
            save(trainer)
            if runtime.is_main:
                ckpt.write_best(trainer.run_dir, trainer.step, result["mlm_loss"])
                ckpt.prune(trainer.run_dir, config.keep_last)
    return result


def run(config: TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict | None:
    """`berttrain run`: setup -> build -> fit. Returns fit's summary on rank 0, None on the other ranks."""
    runtime = setup(config.device, config.precision)
    try:
        with claimed_run_dir(config, runtime) as config:
            trainer = build(config, runtime)
            summary = fit(trainer, stop_at=stop_at, progress=progress)
        return summary if runtime.is_main else None
    finally:
        teardown(runtime)
