"""What a short CPU run learns at 128 tokens, and how fast: our `bert` and `modernbert` against Hugging Face's
BertForMaskedLM and ModernBertForMaskedLM of the same shape, on the same rows of a corpus that does not repeat
(the Python, Perl and Git documentation in ../shared/corpora/docs/, 23 MB; 300 steps of 32 rows read under a fifth
of it).

Ours train through `train.loop.run` with their defaults for the arch (bert: the shards' static masks at 15%,
dropout 0.1; modernbert: dynamic masks at 30%, no dropout). Hugging Face's get the same training rows in the same
order, restored to the original text and masked by `DataCollatorForLanguageModeling` at its recipe's rate (0.15 for
BERT, 0.30 for ModernBERT), with our optimizer (AdamW, the same parameter groups), grad clipping at 1.0 and
transformers' linear warm-up (6%) and decay, at the peak lr our defaults give the same arch. All train under bf16
autocast. Every model is evaluated on the same validation rows with the shards' static masks, every
`--eval-every` steps: accuracy at the masked slots by what the input shows there ([MASK], the token kept, a random
token), against the best constant guess (the most frequent target at those slots).

Speed is each model's training tokens/s (forward, backward, clip, update; Hugging Face's collator excluded, our
on-device re-masking included), over the steps after the first `--timing-skip`. Hugging Face's ModernBERT runs a
second time, `--sparse-steps` steps with `sparse_prediction=True` (the MLM head at the masked tokens only), for
speed alone. Equal wall-clock: every model's accuracy at the training time the fastest took for all its steps,
interpolated linearly between evaluations (a slower model is then mid-schedule: its lr has not decayed yet).

    python bench/learning.py                          # ~20 min on 2 cores; prints the table of docs/benchmarks.md
    python bench/learning.py --out /tmp/learning.json --probe lr=7e-4 --probe mask_prob=0.15 --probe dropout=0.1
    python bench/learning.py --probes-only --probe warmup=6 --probe weight_decay=0.1     # the probes alone
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prep.masking import MaskingConfig  # noqa: E402
from prep.pipeline import ShardConfig, build_shards  # noqa: E402
from prep.shards import open_dataset  # noqa: E402
from prep.vocab import VocabConfig, make_vocab  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.arch import config_for_size, model_config_from_dict, new_model  # noqa: E402
from train.batches import BatchOrder  # noqa: E402
from train.config import WARMUP_SHARE, TrainConfig  # noqa: E402
from train.hf.modernbert import hf_config_dict  # noqa: E402
from train.loop import run  # noqa: E402
from train.masking import restore  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.runtime import keep_freed_memory  # noqa: E402

DOCS = Path(os.environ.get("BERT_SHARED_DIR", ROOT.parent / "shared")) / "corpora" / "docs"
KINDS = ("[MASK]", "kept", "random")
HF_MASK_PROB = {"bert": 0.15, "modernbert": 0.30}
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=DOCS, help="folder of *.txt.zst to train on")
    parser.add_argument("--size", default="mini")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--val-fraction", type=float, default=0.02, help="documents held out for validation")
    parser.add_argument("--eval-rows", type=int, default=1024)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--timing-skip", type=int, default=10, help="first steps left out of tokens/s")
    parser.add_argument("--sparse-steps", type=int, default=60, help="steps of HF ModernBERT with sparse_prediction")
    parser.add_argument("--probe", action="append", default=[], type=probe_setting, metavar="FIELD=VALUE",
                        help="an extra run of our modernbert with this TrainConfig field changed (repeatable; "
                             "FIELD=V1/V2 sets two fields: lr=1e-3/warmup=6 is one run)")
    parser.add_argument("--probes-only", action="store_true", help="run the probes and the constant guess only")
    parser.add_argument("--scratch", type=Path, help="keep vocab, shards and runs here (default a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args()


def probe_setting(text: str) -> dict:
    """'lr=7e-4' or 'lr=7e-4/warmup=6' -> {'lr': 0.0007, 'warmup': 6}, typed as TrainConfig's defaults are."""
    setting = {}
    for part in text.split("/"):
        name, _, value = part.partition("=")
        if name not in TrainConfig.__dataclass_fields__ or not value:
            raise argparse.ArgumentTypeError(f"{part!r} is not FIELD=VALUE for a TrainConfig field")
        setting[name] = int(value) if value.isdigit() else float(value)
    return setting


def make_shards(scratch: Path, corpora: Path, args) -> Path:
    """An 8,000-token WordPiece vocabulary trained on the corpus, and its shards of `max_len` tokens at 15%."""
    inputs = sorted(corpora.glob("*.txt.zst"))
    make_vocab(inputs, scratch / "vocab", VocabConfig(vocab_size=args.vocab_size, threads=1), force=True)
    out = scratch / f"docs_{args.max_len}"
    masking = MaskingConfig(0.15, MaskingConfig.default_max_predictions(args.max_len, 0.15))
    build_shards(ShardConfig(inputs=tuple(inputs), vocab=scratch / "vocab", out_dir=out, max_len=args.max_len,
                             masking=masking, seed=123, val_fraction=args.val_fraction, workers=1, progress=False,
                             force=True))
    return out


def long_arrays(arrays: dict) -> dict:
    return {name: torch.from_numpy(np.asarray(a).astype(np.int64)) for name, a in arrays.items()}


def by_kind(guess: torch.Tensor, val: dict, special: dict) -> dict:
    """Accuracy over every masked slot and by what the input shows there; `guess` [rows, P]."""
    labels, shown = val["mlm_labels"], torch.gather(val["input_ids"], 1, val["mlm_positions"])
    used = labels != special["pad"]
    kinds = {"[MASK]": shown == special["mask"], "kept": shown == labels}
    kinds["random"] = ~kinds["[MASK]"] & ~kinds["kept"]
    result = {"all": (guess[used] == labels[used]).double().mean().item()}
    for kind, where in kinds.items():
        result[kind] = (guess[where & used] == labels[where & used]).double().mean().item()
    return result


def constant_guess(val: dict, special: dict) -> dict:
    """The best constant guess at the [MASK] slots (the most frequent target there), scored by kind."""
    shown = torch.gather(val["input_ids"], 1, val["mlm_positions"])
    at_mask = (shown == special["mask"]) & (val["mlm_labels"] != special["pad"])
    frequent = int(torch.bincount(val["mlm_labels"][at_mask]).argmax())
    return {**by_kind(torch.full_like(val["mlm_labels"], frequent), val, special), "token_id": frequent}


@torch.no_grad()
def predict(logits_at, val: dict, rows: int = 128) -> torch.Tensor:
    """argmax ids [R, P] at the val masked positions; `logits_at(ids, positions)` gives logits [r, P, V]."""
    parts = [logits_at(val["input_ids"][s:s + rows], val["mlm_positions"][s:s + rows]).argmax(-1)
             for s in range(0, len(val["input_ids"]), rows)]
    return torch.cat(parts)


def ours(arch: str, shards: Path, scratch: Path, val: dict, special: dict, args, changes: dict | None = None,
         curve: bool = True) -> dict:
    """Our trainer with the arch's defaults, but for `changes` (TrainConfig fields); accuracy at every
    `eval_every`-th checkpoint against training time (at the end only, without `curve`)."""
    changes = changes or {}
    name = f"ours-{arch}" + "".join(f"-{k}{v:g}" for k, v in changes.items())
    config = TrainConfig(shards=str(shards), run_dir=str(scratch / name), arch=arch, size=args.size,
                         batch_size=args.batch_size, steps=args.steps, precision="bf16", device="cpu",
                         eval_every=0, save_every=args.eval_every if curve else 0, keep_last=10_000, log_every=5,
                         seed=SEED, force=True, **changes)
    run(config, progress=False)
    records = [json.loads(line) for line in (scratch / name / "metrics.jsonl").read_text().splitlines()]
    step_s = {}  # seconds of each logged window, by its last step
    previous = 0
    for record in (r for r in records if "tokens_per_s" in r):
        step_s[record["step"]] = args.batch_size * args.max_len * (record["step"] - previous) / record["tokens_per_s"]
        previous = record["step"]
    points = []
    for step, checkpoint in ckpt.list_checkpoints(scratch / name):
        model = new_model(model_config_from_dict(ckpt.load_model_config(checkpoint)))
        model.load_state_dict(ckpt.load_weights(checkpoint))
        model.eval()
        guess = predict(lambda ids, positions: model.logits(ids, positions), val)
        points.append({"step": step, "seconds": sum(s for k, s in step_s.items() if k <= step),
                       **by_kind(guess, val, special)})
    timed = [s for k, s in step_s.items() if k > args.timing_skip]
    tokens = args.batch_size * args.max_len * (args.steps - args.timing_skip)
    return {"model": name, "arch": arch, "changes": changes, "lr": config.peak_lr,
            "warmup": config.warmup_steps(args.steps), "weight_decay": config.weight_decay, "mask_prob": config.dynamic_mask_prob or 0.15,
            "dropout": config.model_dropout, "masking": config.masking_mode, "steps": args.steps,
            "tokens_per_s": tokens / sum(timed), "curve": points, **points[-1]}


def hf_model(arch: str, vocab_size: int, special: dict, size: str, max_len: int, sparse: bool = False):
    """transformers' masked-LM model of our `size` for `arch`: BERT with its default dropout 0.1, ModernBERT with
    our config's intermediate width, window, global pattern and RoPE bases (transformers' defaults: no dropout)."""
    torch.manual_seed(SEED)
    shape = config_for_size(arch, size, vocab_size)
    if arch == "bert":
        from transformers import BertConfig, BertForMaskedLM

        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=shape.hidden,
                                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                          intermediate_size=shape.ffn, max_position_embeddings=max(512, max_len),
                                          pad_token_id=special["pad"]))
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    fields = hf_config_dict(shape, special)
    return ModernBertForMaskedLM(ModernBertConfig(**fields, sparse_prediction=sparse))


def hugging_face(arch: str, shards: Path, val: dict, special: dict, args, sparse: bool = False) -> dict:
    """The HF model on our rows in our order, masked by its own collator; a plain loop as HF's Trainer runs it."""
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

    dataset = open_dataset(shards)
    train_split, vocab_size = dataset.split("train"), int(dataset.vocab["size"])
    # from_pretrained: transformers 5 builds `BertTokenizerFast(vocab_file=...)` with the special tokens alone, and the
    # collator draws its random replacements from range(len(tokenizer)).
    tokenizer = BertTokenizerFast.from_pretrained(str(dataset.vocab_file.parent), do_lower_case=True)
    assert len(tokenizer) == vocab_size, f"the tokenizer holds {len(tokenizer)} tokens, the vocabulary {vocab_size}"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=HF_MASK_PROB[arch], seed=SEED)
    model = hf_model(arch, vocab_size, special, args.size, args.max_len, sparse)
    lr = TrainConfig(shards=str(shards), arch=arch, size=args.size).peak_lr
    optimizer = make_optimizer(model, lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, round(WARMUP_SHARE * args.steps), args.steps)
    order = BatchOrder(train_split.rows, args.batch_size, SEED)
    steps = args.sparse_steps if sparse else args.steps
    step_s, points = [], []
    for step in range(steps):
        start = order.block_start(step)
        rows = long_arrays(train_split.slice(start, start + args.batch_size))
        original = restore(rows["input_ids"], rows["mlm_positions"], rows["mlm_labels"], special["pad"])
        batch = collator([{"input_ids": row} for row in original.tolist()])
        began = time.perf_counter()
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - began)
        if not sparse and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            model.eval()
            guess = predict(lambda ids, positions: torch.gather(
                model(input_ids=ids, attention_mask=(ids != special["pad"]).long()).logits, 1,
                positions[..., None].expand(-1, -1, vocab_size)), val)
            points.append({"step": step + 1, "seconds": sum(step_s), **by_kind(guess, val, special)})
    tokens = args.batch_size * args.max_len * (steps - args.timing_skip)
    name = f"hf-{arch}" + ("-sparse" if sparse else "")
    result = {"model": name, "arch": arch, "lr": lr, "mask_prob": HF_MASK_PROB[arch], "steps": steps,
              "dropout": 0.1 if arch == "bert" else 0.0, "masking": "collator", "train_loss": loss.item(),
              "tokens_per_s": tokens / sum(step_s[args.timing_skip:]), "curve": points}
    return {**result, **(points[-1] if points else {})}


def at_time(curve: list[dict], seconds: float) -> dict:
    """Accuracies at `seconds` of training, interpolated linearly between the evaluations around it."""
    before = [p for p in curve if p["seconds"] <= seconds] or [curve[0]]
    after = [p for p in curve if p["seconds"] >= seconds] or [curve[-1]]
    a, b = before[-1], after[0]
    share = 0.0 if b["seconds"] == a["seconds"] else (seconds - a["seconds"]) / (b["seconds"] - a["seconds"])
    result = {k: a[k] + share * (b[k] - a[k]) for k in ("step", "all", *KINDS)}
    return {**result, "extrapolated": seconds > curve[-1]["seconds"] or seconds < curve[0]["seconds"]}


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    return f"{model or platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(results: list[dict], baseline: dict, equal_s: float) -> list[str]:
    lines = ["| model | lr | masking | steps | mlm_acc | at `[MASK]` | × constant | at kept | at random | "
             "tokens/s (bf16) | at equal time: steps | at `[MASK]` |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| best constant guess at `[MASK]` (token {baseline['token_id']}) | | | | {baseline['all']:.1%} | "
             f"{baseline['[MASK]']:.1%} | 1.00× | {baseline['kept']:.1%} | {baseline['random']:.1%} | | | |"]
    for r in results:
        masking = f"{r['masking']} {r['mask_prob']:.0%}, dropout {r['dropout']:g}"
        if not r["curve"]:
            lines.append(f"| {r['model']} | {r['lr']:g} | {masking} | {r['steps']} | | | | | | "
                         f"{r['tokens_per_s']:,.0f} | | |")
            continue
        same = r["equal_time"]
        lines.append(f"| {r['model']} | {r['lr']:g} | {masking} | {r['steps']} | {r['all']:.1%} | "
                     f"{r['[MASK]']:.1%} | {r['[MASK]'] / baseline['[MASK]']:.2f}× | {r['kept']:.1%} | "
                     f"{r['random']:.1%} | {r['tokens_per_s']:,.0f} | {same['step']:.0f} | {same['[MASK]']:.1%} |")
    lines.append(f"\nEqual time: {equal_s:.0f} s of training, the fastest model's {results[0]['steps']} steps.")
    return lines


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # what `berttrain run` applies on a CPU; process-wide, so every model here gets it
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        scratch = args.scratch or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        shards = make_shards(scratch, args.corpora, args)
        dataset = open_dataset(shards)
        special = dataset.vocab["special"]
        val = long_arrays(dataset.split("val").slice(0, min(args.eval_rows, dataset.split("val").rows)))
        baseline = constant_guess(val, special)
        results, equal_s = [], None
        if not args.probes_only:
            for arch in ("modernbert", "bert"):
                for result in (lambda: ours(arch, shards, scratch, val, special, args),
                               lambda: hugging_face(arch, shards, val, special, args)):
                    results.append(result())
                    print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), file=sys.stderr)
            results.append(hugging_face("modernbert", shards, val, special, args, sparse=True))
            equal_s = min(r["curve"][-1]["seconds"] for r in results if r["curve"])
            for r in results:
                if r["curve"]:
                    r["equal_time"] = at_time(r["curve"], equal_s)
        probe = []
        for changes in args.probe:
            probe.append(ours("modernbert", shards, scratch, val, special, args, changes, curve=False))
            print(json.dumps({k: v for k, v in probe[-1].items() if k != "curve"}), file=sys.stderr)
        info = {"machine": machine(), "date": datetime.date.today().isoformat(),
                "load_average": os.getloadavg(), "minutes": (time.time() - started) / 60,
                "train_rows": dataset.split("train").rows, "val_rows": len(val["input_ids"]),
                "val_masked": int((val["mlm_labels"] != special["pad"]).sum()),
                "val_at_mask": int(((torch.gather(val["input_ids"], 1, val["mlm_positions"]) == special["mask"])
                                    & (val["mlm_labels"] != special["pad"])).sum())}
    print(f"{info['machine']}, {info['date']}; {info['train_rows']:,} train rows of {args.max_len} tokens, "
          f"{info['val_rows']} val rows ({info['val_masked']:,} masked slots, {info['val_at_mask']:,} showing "
          f"[MASK]); {args.size} x {args.batch_size} x {args.max_len}; {info['minutes']:.1f} min\n")
    if results:
        print("\n".join(table(results, baseline, equal_s)))
    print(f"best constant guess at [MASK]: {baseline['[MASK]']:.1%}")
    for r in probe:
        changed = ", ".join(f"{k}={v:g}" for k, v in r["changes"].items())
        print(f"probe, our modernbert with {changed} (lr {r['lr']:g}, warm-up {r['warmup']} steps, weight decay "
              f"{r['weight_decay']:g}, mask {r['mask_prob']:g}, dropout {r['dropout']:g}): at [MASK] "
              f"{r['[MASK]']:.1%}, all masked slots {r['all']:.1%}, {r['tokens_per_s']:,.0f} tokens/s")
    if args.out:
        args.out.write_text(json.dumps({**info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "baseline": baseline, "equal_time_s": equal_s, "results": results,
                                        "probes": probe}, indent=1))


if __name__ == "__main__":
    main()
