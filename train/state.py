"""What a checkpoint of a training run holds besides the weights (optimizer, scaler, every process's RNG states,
the data position, progress counters), and putting it back: what makes --resume exact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from prep.errors import BertError
from train import checkpoint as ckpt
from train.runtime import on_main

if TYPE_CHECKING:
    from train.loop import Trainer

# Keys of the progress record inside the training state.
KEY_NONFINITE_TOTAL = "nonfinite_total"
KEY_NONFINITE_RUN = "nonfinite_run"
KEY_BEST_LOSS = "best_mlm_loss"
KEY_GLOBAL_ROWS = "global_rows"


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(trainer: Trainer) -> Path:
    """Checkpoint of the current step (rank 0 writes; every rank takes part in gathering RNG states). A failed
    write (a full disk) raises on every rank, with the checkpoints saved before intact."""
    rt = trainer.runtime
    rng = rng_state()
    rngs = [None] * rt.world_size
    if rt.distributed:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]

    def write() -> Path:
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
        return path

    path = on_main(rt, write)  # also the barrier after the save: no rank runs ahead, none waits for a failed one
    trainer.last_saved_step = trainer.step
    return path


def restore(trainer: Trainer, checkpoint: Path) -> None:
    """Puts the trainer where `checkpoint` left it (the weights are loaded with the model)."""
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
        set_rng_state(rng[trainer.runtime.rank])
