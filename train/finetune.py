"""`berttrain finetune`: sequence classification on local TSV/CSV/JSON Lines files, from a pretrained run (or a
Hugging Face BERT directory), or from scratch as the baseline that shows what pretraining buys.

The classifier is BERT's: the [CLS] vector through the pooler (dense + tanh), dropout and one linear layer. AdamW
with weight decay on matrices only, linear warm-up over the first 10% of the steps then linear decay to zero,
evaluation on the validation file after every epoch, early stopping, and the best epoch's weights kept.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from prep.outputs import refuse_existing, staged_dir
from train.pretrained import Pretrained, load_pretrained
from train.arch import model_config_from_dict, new_model
from train.optim import make_optimizer
from train.options import check_choices, choice
from train.runtime import DEVICES, keep_freed_memory, resolve_device
from train.schedule import lr_at

MODEL_FILE = "model.pt"  # the classifier's state dict, best epoch
RECORD_FILE = "finetune.json"  # options, model config, labels, per-epoch metrics, test scores; written last
METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
VOCAB_FILE = "vocab.txt"
TSV_SUFFIXES = (".tsv", ".tab")
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
INIT_STD = 0.02


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning job; saved in the output directory's finetune.json."""

    source: str
    """Run, checkpoint or Hugging Face BERT directory: the weights, or with from_scratch only the shape and
    vocabulary (--run)."""
    train: str
    """Training examples: .tsv (GLUE style, header), .csv (header) or .jsonl."""
    out_dir: str
    """Where the best model, metrics.jsonl and finetune.json go (--out)."""
    val: str | None = None
    """Validation examples, scored every epoch for early stopping and model selection."""
    test: str | None = None
    """Test examples, scored once with the best model."""
    predict: str | None = None
    """Examples (labels not needed) to label with the best model, written to predictions.jsonl."""
    checkpoint: str | None = None
    """A checkpoint of the run instead of its latest."""
    vocab: str | None = None
    """The run's vocab.txt when its shards have moved."""
    from_scratch: bool = False
    """Random weights of the same shape and vocabulary: the no-pretraining baseline."""
    text_a: str = "sentence"
    """Column of the (first) text."""
    text_b: str | None = None
    """Column of the second text, for sentence pairs."""
    label: str = "label"
    """Column of the label."""
    epochs: int = 3
    """Passes over the training examples."""
    lr: float = 2e-5
    """Peak learning rate."""
    batch_size: int = 32
    """Examples per step."""
    max_len: int = 128
    """Tokens per example, [CLS] and [SEP]s included; longer ones are cut, the longer text of a pair first
."""
    warmup_share: float = 0.1
    """Share of the steps of linear warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay, never on biases and LayerNorm."""
    dropout: float = 0.1
    """Dropout in the encoder and before the classifier."""
    patience: int = 2
    """Stop after this many epochs without a better validation accuracy; 0 = never stop early."""
    seed: int = 0
    """Seed of the new weights, dropout and the example order."""
    device: str = choice("auto", DEVICES)
    """auto (CUDA when present), cpu or cuda."""
    force: bool = False
    """Replace an existing --out directory."""

    def __post_init__(self):
        check_choices(self)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise BertError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_len < 3 + (self.text_b is not None):
            raise BertError(f"--max-len must leave room for [CLS], [SEP] and a token, got {self.max_len}")
        if not self.lr > 0:
            raise BertError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_share < 1:
            raise BertError(f"--warmup-share must be in [0, 1), got {self.warmup_share}")
        if self.weight_decay < 0:
            raise BertError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise BertError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.patience < 0:
            raise BertError(f"--patience must be 0 or more, got {self.patience}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


# --- data -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Examples:
    """Texts and labels of one file, in file order; `labels` is None where the file has no label column."""

    path: Path
    text_a: list[str]
    text_b: list[str] | None
    labels: list[str] | None

    def __len__(self) -> int:
        return len(self.text_a)


def read_examples(path: Path, text_a: str = "sentence", text_b: str | None = None, label: str = "label",
                  need_labels: bool = True) -> Examples:
    """The examples of a .tsv/.tab (tab-separated, header, no quoting: GLUE), .csv (header) or .jsonl file.

    Labels are read as strings (JSON numbers too: 1 -> "1"). BertError names the missing column and the columns
    the file has.
    """
    path = Path(path)
    if not path.is_file():
        raise BertError(f"no such file {path}")
    suffix = path.suffix.lower()
    if suffix in TSV_SUFFIXES + CSV_SUFFIXES:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix in TSV_SUFFIXES:
                # GLUE's TSVs hold unescaped quotes, so quote characters are ordinary text.
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            records = list(reader)
            columns = list(reader.fieldnames or [])
    elif suffix in JSONL_SUFFIXES:
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise BertError(f"{path}:{number} is not a JSON object ({exc}); the file must hold one JSON "
                                    f"object a line") from None
                if not isinstance(record, dict):
                    raise BertError(f"{path}:{number} is not a JSON object; the file must hold one a line")
                records.append(record)
        columns = list(dict.fromkeys(k for record in records for k in record))
    else:
        raise BertError(f"{path}: unknown file type {suffix!r}; use .tsv (GLUE style), .csv or .jsonl")
    if not records:
        raise BertError(f"{path} holds no examples")
    wanted = [(text_a, "--text-a"), *([(text_b, "--text-b")] if text_b else [])]
    if need_labels or label in columns:
        wanted.append((label, "--label"))
    for column, flag in wanted:
        if column not in columns:
            raise BertError(f"{path} has no column {column!r} (it has: {', '.join(map(str, columns))}); name the "
                            f"right one with {flag}")

    def values(column: str) -> list[str]:
        out = []
        for number, record in enumerate(records, 1):
            value = record.get(column)
            if value is None:
                raise BertError(f"{path}: example {number} has no {column!r}")
            out.append(value if isinstance(value, str) else json.dumps(value))
        return out

    has_labels = label in columns
    return Examples(path, values(text_a), values(text_b) if text_b else None,
                    values(label) if has_labels else None)


def label_set(labels: list[str]) -> list[str]:
    """Distinct labels in a stable order: numerically when all are integers ("0" < "1" < "10"), else by string."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


@dataclass(frozen=True)
class Encoded:
    """Token ids of examples, ragged: example i is ids[offsets[i]:offsets[i + 1]], with its segment ids."""

    ids: np.ndarray
    token_types: np.ndarray
    offsets: np.ndarray
    label_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.offsets) - 1


def encode_examples(examples: Examples, tokenizer, max_len: int, labels: list[str] | None) -> Encoded:
    """[CLS] a [SEP] (b [SEP]) per example, cut to `max_len` tokens: a single text from its end, a pair from the
    end of the longer text first (Hugging Face's longest_first)."""
    special = tokenizer.vocab.special
    a_ids, a_lengths = tokenizer.encode_many(examples.text_a)
    a_offsets = np.concatenate([[0], np.cumsum(a_lengths)])
    if examples.text_b is not None:
        b_ids, b_lengths = tokenizer.encode_many(examples.text_b)
        b_offsets = np.concatenate([[0], np.cumsum(b_lengths)])
    ids, types, offsets = [], [], [0]
    for i in range(len(examples)):
        a = a_ids[a_offsets[i] : a_offsets[i + 1]]
        if examples.text_b is None:
            a = a[: max_len - 2]
            row = np.concatenate([[special.cls], a, [special.sep]])
            type_row = np.zeros(len(row), dtype=np.int64)
        else:
            b = b_ids[b_offsets[i] : b_offsets[i + 1]]
            keep_a, keep_b = _pair_lengths(len(a), len(b), max_len - 3)
            row = np.concatenate([[special.cls], a[:keep_a], [special.sep], b[:keep_b], [special.sep]])
            type_row = np.concatenate([np.zeros(keep_a + 2, dtype=np.int64), np.ones(keep_b + 1, dtype=np.int64)])
        ids.append(row.astype(np.int64))
        types.append(type_row)
        offsets.append(offsets[-1] + len(row))
    label_ids = None
    if labels is not None and examples.labels is not None:
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(examples.labels) - set(index))
        if unknown:
            raise BertError(f"{examples.path} has labels {unknown[:5]} that the training file does not have "
                            f"(it has: {', '.join(labels)})")
        label_ids = np.array([index[label] for label in examples.labels], dtype=np.int64)
    return Encoded(np.concatenate(ids), np.concatenate(types), np.array(offsets, dtype=np.int64), label_ids)


def _pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each text of a pair: the `tokenizers` library's longest_first truncation in closed form
    (the shorter text is kept whole if it fits in half the budget, else it gets the lower half)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    if 2 * min(len_a, len_b) <= budget:
        return (len_a, budget - len_a) if len_a <= len_b else (budget - len_b, len_b)
    half = budget // 2
    return (half, budget - half) if len_a <= len_b else (budget - half, half)


def _batch(encoded: Encoded, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Examples `index`, padded to the longest of them."""
    starts, stops = encoded.offsets[index], encoded.offsets[index + 1]
    width = int((stops - starts).max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    token_types = np.zeros((len(index), width), dtype=np.int64)
    attention = np.zeros((len(index), width), dtype=bool)
    for row, (start, stop) in enumerate(zip(starts, stops)):
        input_ids[row, : stop - start] = encoded.ids[start:stop]
        token_types[row, : stop - start] = encoded.token_types[start:stop]
        attention[row, : stop - start] = True
    batch = {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_types),
             "attention_mask": torch.from_numpy(attention)}
    if encoded.label_ids is not None:
        batch["labels"] = torch.from_numpy(encoded.label_ids[index])
    return {k: v.to(device) for k, v in batch.items()}


# --- model ----------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """BERT's sequence classifier, on the encoder of either architecture: encoder -> [CLS] -> pooler (dense +
    tanh) -> dropout -> linear."""

    def __init__(self, config, num_labels: int, encoder: nn.Module, dropout: float, pooler: nn.Linear | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.pooler = pooler if pooler is not None else _normal_linear(config.hidden, config.hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = _normal_linear(config.hidden, num_labels)

    @classmethod
    def for_record(cls, record: dict) -> Classifier:
        """An untrained classifier of the shape a finetune.json records, for loading its model.pt into."""
        config = model_config_from_dict(record["model"])
        return cls(config, record["num_labels"], new_model(config).encoder, dropout=0.0)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_labels]."""
        hidden = self.encoder(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(torch.tanh(self.pooler(hidden[:, 0]))))


def _normal_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.normal_(layer.weight, std=INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


def build_classifier(pretrained: Pretrained, num_labels: int, dropout: float, from_scratch: bool,
                     seed: int) -> Classifier:
    """The classifier on the pretrained encoder (and pooler, when the model has the NSP head), or on freshly
    initialised weights of the same shape with `from_scratch`. New layers are drawn from `seed`."""
    config = pretrained.config.with_dropout(dropout)
    torch.manual_seed(seed)
    base = new_model(config)  # the architecture's own initialisation: the from-scratch weights
    if not from_scratch:
        base.load_state_dict(pretrained.state)
    pooler = base.pooler if config.nsp and not from_scratch else None
    return Classifier(config, num_labels, base.encoder, dropout, pooler=pooler)


# --- fit ------------------------------------------------------------------------------------------------------

def scores(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """Mean cross-entropy, accuracy and macro-F1 (over the classes that occur as truth or prediction)."""
    guess = logits.argmax(-1)
    confusion = torch.bincount(labels * num_labels + guess, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels).double()
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return {"loss": F.cross_entropy(logits, labels).item(), "acc": (guess == labels).double().mean().item(),
            "macro_f1": f1.mean().item()}


@torch.no_grad()
def predict_logits(model: Classifier, encoded: Encoded, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits [N, num_labels] of every example, in order (eval mode, float32, on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = _batch(encoded, np.arange(start, min(start + batch_size, len(encoded))),
                       model.config.pad_id, device)
        out.append(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _better(record: dict, best: dict | None) -> bool:
    """Strictly better validation accuracy: a tie keeps the earlier (shorter-trained) model."""
    return best is None or record["val_acc"] > best["val_acc"]


def finetune(config: FinetuneConfig, progress: bool = True, log=None) -> dict:
    """Trains, selects and saves the classifier; scores --test and labels --predict with it. Returns a summary:
    labels, per-epoch records, the best epoch, test scores, the files written.

    `log` receives one line per epoch (default: stderr).
    """
    from tqdm import tqdm

    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    out_dir = Path(config.out_dir)
    refuse_existing(out_dir, config.force, "pass --force to replace it, or another --out")
    pretrained = load_pretrained(Path(config.source), Path(config.checkpoint) if config.checkpoint else None,
                                 Path(config.vocab) if config.vocab else None, require_mlm_head=False)
    tokenizer = pretrained.tokenizer()
    max_len = min(config.max_len, pretrained.config.max_positions)
    columns = dict(text_a=config.text_a, text_b=config.text_b, label=config.label)
    train_examples = read_examples(Path(config.train), **columns)
    labels = label_set(train_examples.labels)
    if len(labels) < 2:
        raise BertError(f"{config.train} has only the label {labels[0]!r}: a classifier needs at least two")
    train_data = encode_examples(train_examples, tokenizer, max_len, labels)
    val_data = encode_examples(read_examples(Path(config.val), **columns), tokenizer, max_len, labels) \
        if config.val else None
    test_data = encode_examples(read_examples(Path(config.test), **columns), tokenizer, max_len, labels) \
        if config.test else None
    predict_examples = read_examples(Path(config.predict), **columns, need_labels=False) if config.predict else None

    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()  # as pretraining does: the vocabulary matrix's gradient is no fresh map every step
    model = build_classifier(pretrained, len(labels), config.dropout, config.from_scratch, config.seed).to(device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_share * total)
    say(f"finetune   {'random weights shaped as' if config.from_scratch else 'from'} {pretrained.source}: "
        f"{len(labels)} labels ({', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''}), "
        f"{len(train_data):,} train / {len(val_data) if val_data else 0:,} val examples, max_len {max_len}, "
        f"{total:,} steps ({config.epochs} epochs of {steps_per_epoch:,}), warm-up {warmup}, lr {config.lr:g}")

    order_rng = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    best, best_state, stale_epochs, step = None, None, 0, 0
    bar = tqdm(total=total, desc="finetune", unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with staged_dir(out_dir) as partial, bar:  # on an error: the bar closed, then the staging directory deleted
        model.train()
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(len(train_data), generator=order_rng).numpy()
            loss_sum, seen = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = _batch(train_data, order[start : start + config.batch_size], model.config.pad_id, device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config.lr, 0.0, warmup, total)
                logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
                loss = F.cross_entropy(logits.float(), batch["labels"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item() * len(batch["labels"])
                seen += len(batch["labels"])
                step += 1
                bar.update(1)
            record = {"epoch": epoch, "step": step, "train_loss": loss_sum / seen}
            if val_data is not None:
                record.update({f"val_{k}": v for k, v in
                               scores(predict_logits(model, val_data, config.batch_size, device),
                                      torch.from_numpy(val_data.label_ids), len(labels)).items()})
            improved = val_data is None or _better(record, best)
            record["best"] = improved
            history.append(record)
            with open(partial / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            say(format_epoch(record))
            if improved:
                best, stale_epochs = record, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                stale_epochs += 1
                if config.patience and stale_epochs >= config.patience:
                    say(f"early stop: no better validation accuracy for {stale_epochs} epochs")
                    break
        bar.close()
        model.load_state_dict(best_state)
        torch.save(best_state, partial / MODEL_FILE)
        shutil.copyfile(pretrained.vocab_file, partial / VOCAB_FILE)
        summary = {"labels": labels, "epochs": history, "best_epoch": best["epoch"], "best": best, "steps": step,
                   "source": pretrained.source, "from_scratch": config.from_scratch, "max_len": max_len}
        if test_data is not None:
            summary["test"] = scores(predict_logits(model, test_data, config.batch_size, device),
                                     torch.from_numpy(test_data.label_ids), len(labels))
        if predict_examples is not None:
            data = encode_examples(predict_examples, tokenizer, max_len, None)
            probs = predict_logits(model, data, config.batch_size, device).softmax(-1)
            _write_predictions(partial / PREDICTIONS_FILE, predict_examples, probs, labels)
            summary["predictions"] = len(predict_examples)
        record = {"format": "berttrain-finetune", "options": config.as_dict(), "model": model.config.as_dict(),
                  "num_labels": len(labels), "lowercase": pretrained.lowercase, "pretrained_step": pretrained.step,
                  **summary}
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    summary["out_dir"] = str(out_dir)
    if "predictions" in summary:
        summary["predictions_file"] = str(out_dir / PREDICTIONS_FILE)
    return summary


def _write_predictions(path: Path, examples: Examples, probs: torch.Tensor, labels: list[str]) -> None:
    """One JSON object a line, in input order: the label, its probability, and every label's probability."""
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(probs.tolist()):
            best = int(np.argmax(row))
            record = {"label": labels[best], "prob": row[best], "probs": dict(zip(labels, row)),
                      "text_a": examples.text_a[i]}
            if examples.text_b is not None:
                record["text_b"] = examples.text_b[i]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def format_epoch(record: dict) -> str:
    line = f"epoch {record['epoch']} (step {record['step']}): train loss {record['train_loss']:.4f}"
    if "val_loss" in record:
        line += (f"  val loss {record['val_loss']:.4f}  acc {record['val_acc']:.4f}  "
                 f"macro-F1 {record['val_macro_f1']:.4f}" + ("  *best*" if record["best"] else ""))
    return line
