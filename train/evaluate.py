"""Evaluation: masked-LM loss, perplexity and accuracy of a model on rows of a split, with the frequency baselines
that say whether it reads context; all-reduced across processes in one place. `eval_run` is `berttrain eval`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from prep.shards import Split, open_dataset
from prep.wordpiece import Vocab
from train import checkpoint as ckpt
from train.batches import eval_batches, eval_slices
from train.arch import model_config_from_dict, new_model
from train.rundir import CONFIG_FILE, load_run_config
from train.runtime import Runtime, all_reduce, resolve_device, resolve_precision
from train.sources import check_dataset

UNIGRAM_ROWS = 65_536  # training rows whose targets estimate token frequencies
EVAL_KEYS = ("mlm_loss", "mlm_acc", "ppl", "nsp_acc", "rows", "masked", "baseline_acc", "unigram_loss", "mask_acc",
             "mask_baseline_acc")


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
def evaluate(model: nn.Module, split: Split, runtime: Runtime, batch_rows: int = 64,
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
        all_reduce(tensor, runtime)
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



def eval_run(run_dir: Path, shards: Path | None = None, split: str = "val", checkpoint: Path | None = None,
             batch_size: int = 64, max_rows: int | None = None, device: str = "auto", precision: str | None = None,
             samples: int = 0) -> dict:
    """`berttrain eval`: loss, perplexity and accuracy of a run's newest checkpoint that verifies (or the given
    one) on a split of its shards (or of `shards`), at the run's precision unless `precision` says otherwise."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        if not run_dir.is_dir():
            raise BertError(f"--run {run_dir}: no such run directory")
        checkpoint = ckpt.usable_checkpoint(run_dir, "--run", hashed=ckpt.WEIGHT_FILES)
    else:
        checkpoint = ckpt.resolve_checkpoint(Path(checkpoint), "--checkpoint")
    info = ckpt.read_info(checkpoint)
    if shards is None:
        shards = Path(info["shards"]) if "shards" in info else Path(load_run_config(run_dir).shards)
    dataset = open_dataset(Path(shards))
    model_config = model_config_from_dict(ckpt.load_model_config(checkpoint))
    check_dataset(dataset, model_config, info.get("vocab_sha256"), f"checkpoint {checkpoint}")
    target = dataset.split(split)
    if target.rows == 0:
        raise BertError(f"split {split!r} of {dataset.path} has no rows")
    dev = resolve_device(device)
    if precision is None:
        precision = load_run_config(run_dir).precision if (run_dir / CONFIG_FILE).is_file() else "auto"
    runtime = Runtime(dev, precision=resolve_precision(precision, dev))
    model = new_model(model_config)
    model.load_state_dict(ckpt.load_weights(checkpoint))
    model.to(dev)
    tokens = Vocab.load(dataset.vocab_file).tokens if samples else None
    train = dataset.splits.get("train")
    unigram = unigram_log_probs(train, model_config.vocab_size, model_config.pad_id) if train is not None else None
    result = evaluate(model, target, runtime, batch_size, max_rows, unigram=unigram, samples=samples, tokens=tokens,
                      mask_id=int(dataset.vocab["special"]["mask"]))
    return {"checkpoint": str(checkpoint), "step": info["step"], "split": split, "shards": str(dataset.path),
            **result}
