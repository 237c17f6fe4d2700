"""What a short CPU run learns, by kind of masked slot: our trainer and Hugging Face's BertForMaskedLM of the same
shape on the same WikiText-2 shards, in rows of 64 and of 16 tokens, beside two baselines that use no network (the
most frequent token, and the counts of the two neighbouring tokens).

A masked slot shows [MASK] (80%: only the context can tell the token), the token itself (10%: copying it is right)
or a random token (10%). Splitting the accuracy by that tells a model that reads context from one that copies.

    python bench/learning.py                 # ~15 min on 2 cores; prints the table of docs/benchmarks.md
    python bench/learning.py --steps 450 --hf-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prep.corpus import input_record  # noqa: E402
from prep.masking import MaskingConfig  # noqa: E402
from prep.pipeline import ShardConfig, build_shards  # noqa: E402
from prep.shards import open_dataset  # noqa: E402
from prep.vocab import VocabConfig, train_vocab  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import run  # noqa: E402
from train.model import BertForPretraining, ModelConfig  # noqa: E402

# WikiText-2 where the tests find it: $BERT_SHARED_DIR, else the shared/ folder beside the checkout.
WIKITEXT = Path(os.environ.get("BERT_SHARED_DIR", ROOT.parent / "shared")) / "corpora" / "wikitext-2"
KINDS = ("[MASK]", "kept", "random")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=WIKITEXT, help="folder with wiki.valid.tokens, wiki.test.tokens")
    parser.add_argument("--steps", type=int, default=1800, help="steps of our runs on 64-token rows")
    parser.add_argument("--short-steps", type=int, default=1500, help="steps of our runs on 16-token rows")
    parser.add_argument("--hf-steps", type=int, default=1500, help="steps of the Hugging Face runs")
    parser.add_argument("--eval-rows", type=int, default=1024)
    return parser.parse_args()


def make_shards(scratch: Path, corpora: Path, max_len: int) -> Path:
    """The shards of tests/train: train wiki.test, validation wiki.valid, a 4,000-token vocabulary."""
    valid, test = corpora / "wiki.valid.tokens", corpora / "wiki.test.tokens"
    vocab_dir = scratch / "vocab"
    if not vocab_dir.exists():
        lines = valid.read_text(encoding="utf-8").split("\n")
        train_vocab(lines, vocab_dir, VocabConfig(vocab_size=4000, threads=1), inputs=[input_record(valid)])
    out = scratch / f"wiki_{max_len}"
    masking = MaskingConfig(0.15, MaskingConfig.default_max_predictions(max_len, 0.15))
    build_shards(ShardConfig(inputs=(test,), val_inputs=(valid,), vocab=vocab_dir, out_dir=out, max_len=max_len,
                             masking=masking, seed=7, workers=1, progress=False))
    return out


def val_arrays(shards: Path, rows: int) -> dict:
    split = open_dataset(shards).split("val")
    return {name: torch.from_numpy(np.asarray(a).astype(np.int64)) for name, a in split.slice(0, rows).items()}


def by_kind(guess: torch.Tensor, val: dict, special: dict) -> dict:
    """Accuracy over every masked slot and by what the input shows there; `guess` [rows, P]."""
    labels, shown = val["mlm_labels"], torch.gather(val["input_ids"], 1, val["mlm_positions"])
    used = labels != special["pad"]
    kinds = {"[MASK]": shown == special["mask"], "kept": shown == labels}
    kinds["random"] = ~kinds["[MASK]"] & ~kinds["kept"]
    result = {"all": (guess[used] == labels[used]).double().mean().item()}
    for kind, where in kinds.items():
        where = where & used
        result[kind] = (guess[where] == labels[where]).double().mean().item()
    return result


def ours(shards: Path, scratch: Path, name: str, val: dict, special: dict, **options) -> dict:
    config = dict(shards=str(shards), run_dir=str(scratch / name), precision="fp32", device="cpu", eval_every=0,
                  save_every=0, log_every=100, batch_size=16, size="tiny", dropout=0.0, lr=1e-3, warmup=100)
    started = time.perf_counter()
    run(TrainConfig(**{**config, **options}), progress=False)
    checkpoint = ckpt.latest_checkpoint(scratch / name)
    model = BertForPretraining(ModelConfig.from_dict(ckpt.load_model_config(checkpoint)))
    model.load_state_dict(ckpt.load_weights(checkpoint))
    model.eval()
    with torch.no_grad():
        guess = model(val["input_ids"], val["mlm_positions"]).mlm_logits.argmax(-1)
    return {**by_kind(guess, val, special), "seconds": time.perf_counter() - started}


def hugging_face(shards: Path, val: dict, special: dict, steps: int, lr: float, vocab_size: int,
                 batch_size: int) -> dict:
    """transformers' BertForMaskedLM (2 layers x 128, 2 heads) in a plain loop: AdamW, warm-up then linear decay,
    clipping at 1.0, labels -100 outside the masked slots (the static masks of the shards)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    train = open_dataset(shards).split("train")
    arrays = {n: torch.from_numpy(np.asarray(a).astype(np.int64)) for n, a in train.slice(0, train.rows).items()}
    ids, positions, labels = arrays["input_ids"], arrays["mlm_positions"], arrays["mlm_labels"]
    targets = torch.full_like(ids, -100)
    used = labels != special["pad"]
    rows = torch.arange(len(ids))[:, None].expand_as(positions)
    targets[rows[used], positions[used]] = labels[used]
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=512, max_position_embeddings=ids.shape[1],
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / steps))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (batch_size,), generator=generator)
        loss = model(input_ids=ids[pick], attention_mask=(ids[pick] != special["pad"]).long(),
                     labels=targets[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=val["input_ids"], attention_mask=(val["input_ids"] != special["pad"]).long()).logits
    guess = torch.gather(logits.argmax(-1), 1, val["mlm_positions"])
    return {**by_kind(guess, val, special), "train_loss": loss.item(), "seconds": time.perf_counter() - started}


def counting(shards: Path, val: dict, special: dict, vocab_size: int) -> dict:
    """No network: each masked slot gets the token that best fits its two neighbours by the counts of neighbouring
    pairs in the training rows (restored): p(x | left) p(x | right) / p(x), add-0.1 smoothed."""
    train = open_dataset(shards).split("train")
    arrays = train.slice(0, train.rows)
    ids = np.asarray(arrays["input_ids"]).astype(np.int64)
    positions, labels = np.asarray(arrays["mlm_positions"]).astype(np.int64), np.asarray(arrays["mlm_labels"])
    used = labels != special["pad"]
    ids[np.broadcast_to(np.arange(len(ids))[:, None], positions.shape)[used], positions[used]] = labels[used]
    pairs = np.zeros((vocab_size, vocab_size), np.float32)  # [left token, right token]
    np.add.at(pairs, (ids[:, :-1].ravel(), ids[:, 1:].ravel()), 1)
    unigram = np.bincount(ids.ravel(), minlength=vocab_size).astype(np.float32) + 1
    unigram /= unigram.sum()
    shown, slots = val["input_ids"].numpy(), val["mlm_positions"].numpy()
    rows = np.broadcast_to(np.arange(len(shown))[:, None], slots.shape)
    left, right = shown[rows, slots - 1], shown[rows, np.minimum(slots + 1, shown.shape[1] - 1)]
    given_left = pairs[left] + 0.1 * unigram
    given_right = pairs.T[right] + 0.1 * unigram
    score = (given_left / given_left.sum(-1, keepdims=True)) * (given_right / given_right.sum(-1, keepdims=True))
    return by_kind(torch.from_numpy(np.argmax(score / unigram, -1)), val, special)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as scratch:
        scratch = Path(scratch)
        # The same validation text at both lengths: 1,024 rows of 64 tokens, 4,096 of 16.
        for max_len, batch_size, eval_rows in ((64, 16, args.eval_rows), (16, 128, 4 * args.eval_rows)):
            shards = make_shards(scratch, args.corpora, max_len)
            vocab = open_dataset(shards).vocab
            special, vocab_size = vocab["special"], int(vocab["size"])
            val = val_arrays(shards, eval_rows)
            labels = val["mlm_labels"][val["mlm_labels"] != special["pad"]]
            frequent = int(torch.bincount(labels).argmax())
            rows.append((f"{max_len} tokens: most-frequent-token baseline", "",
                         by_kind(torch.full_like(val["mlm_labels"], frequent), val, special)))
            steps = args.steps if max_len == 64 else args.short_steps
            runs = [(f"`tiny`, static masks, batch {batch_size}", steps, dict(steps=steps)),
                    (f"`tiny`, `--masking dynamic`, batch {batch_size}", steps, dict(steps=steps, masking="dynamic"))]
            for label, run_steps, options in runs:
                result = ours(shards, scratch, f"run{len(rows)}", val, special, batch_size=batch_size, **options)
                rows.append((f"{max_len} tokens: {label}", run_steps, result))
                print(json.dumps({"run": rows[-1][0], **result}), file=sys.stderr)
            result = hugging_face(shards, val, special, args.hf_steps, 1e-3, vocab_size, batch_size)
            rows.append((f"{max_len} tokens: Hugging Face `BertForMaskedLM` (2 × 128), batch {batch_size}, static; "
                         f"training loss {result['train_loss']:.1f}", args.hf_steps, result))
            print(json.dumps({"run": rows[-1][0], **result}), file=sys.stderr)
            rows.append((f"{max_len} tokens: counting neighbours on the training rows, no network", "",
                         counting(shards, val, special, vocab_size)))
    print("| run | steps | mlm_acc | at `[MASK]` | at kept slots | at random slots |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, steps, r in rows:
        cells = [f"{r[k]:.1%}" for k in ("all", *KINDS)]
        print(f"| {label} | {steps if steps == '' else f'{steps:,}'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
