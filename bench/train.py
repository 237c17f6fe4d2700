"""Training-step speed of our BERT or ModernBERT against Hugging Face's BertForMaskedLM / ModernBertForMaskedLM of
the same shape, and the share of the device's measured matmul peak each reaches (MFU).

All models take the same random batch, precision and AdamW settings; ours runs the MLM head at the masked
positions only and takes the trainer's loss (`train.loss`), HF's runs at every token with labels -100 outside them
(as the transformers route trains); HF's ModernBERT runs a second time with `sparse_prediction=True` (its head at
the labelled tokens only). The models take turns, `--rounds` times `--steps` steps each, so a neighbour's load on
a shared machine falls on all of them alike. Data loading is not part of it: the batch is on the device before
timing starts. All run with the process's default malloc; --keep-freed-memory gives them the settings
`berttrain run` applies on a CPU (`keep_freed_memory` in train/runtime.py).

With --shards, ours alone runs through `berttrain run` itself on real shards instead: the trainer's data path
(zero-copy memmap slices, pinned and copied non-blocking on CUDA, prepared on a background thread), optimizer and
loop, with its measured data wait.

    python bench/train.py --size small --batch-size 32 --steps 10
    python bench/train.py --arch modernbert --size mini --vocab-size 8000 --predictions 39 --rounds 5
    python bench/train.py --size base --batch-size 64 --steps 50 --shards data/wiki_128 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import modernbert  # noqa: E402
from train.arch import config_for_size, model_config_from_dict, new_model  # noqa: E402
from train.hf import bert as hf_bert  # noqa: E402
from train.hf import modernbert as hf_modernbert  # noqa: E402
from train.loss import masked_lm_loss_sum  # noqa: E402
from train.model import count_parameters, flops_per_token  # noqa: E402
from train.optim import fused_adamw_is_fast  # noqa: E402
from train.runtime import keep_freed_memory, resolve_precision  # noqa: E402

PAD_ID, FIRST_REAL_ID = 0, 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="bert", choices=("bert", "modernbert"))
    parser.add_argument("--size", default="small", help="named model size (tiny, mini, small, medium, base, large)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--predictions", type=int, default=20, help="masked positions per row")
    parser.add_argument("--vocab-size", type=int, default=30522, help="vocabulary entries (BERT uncased: 30522)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model, precision and round")
    parser.add_argument("--rounds", type=int, default=1, help="turns each model takes, the others between")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto",
                        help="bf16, fp32 or bf16,fp32; auto = bf16, plus fp32 where the device lacks fast bf16")
    parser.add_argument("--shards", type=Path, help="time ours through `berttrain run` on these shards (no HF row)")
    parser.add_argument("--compile", action="store_true", help="with --shards: train with --compile")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="time both models with the malloc settings `berttrain run` applies on a CPU "
                             "(with --shards they apply anyway)")
    return parser.parse_args()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether the trainer's `--precision auto` picks bf16 here: CUDA from Ampere on, CPUs with AVX512-BF16 or AMX."""
    return resolve_precision("auto", device) == "bf16"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def matmul_peak_flops(device: torch.device, precision: str, seconds: float = 3.0) -> float:
    """Best FLOP/s of a large square matmul in `precision`: the ceiling MFU is measured against.

    Tries both `a @ b` and `F.linear` (on CPUs without native bf16 they take different paths, ~10x apart).
    """
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    repeats = 20 if device.type == "cuda" else 1
    best = 0.0
    for matmul in (torch.matmul, F.linear):
        matmul(a, b)
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                matmul(a, b)
            synchronize(device)
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def random_batch(args, device: torch.device, seed: int = 0) -> dict:
    """Shard-like rows: uint16 ids, `predictions` distinct sorted positions per row, their original ids as labels."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST_REAL_ID, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    positions = torch.rand(args.batch_size, args.seq_len, generator=gen).argsort(1)[:, : args.predictions]
    positions = positions.sort(1).values
    labels = torch.gather(input_ids, 1, positions)
    input_ids = input_ids.scatter(1, positions, 4)  # 4 plays [MASK]
    return {"input_ids": input_ids.to(torch.uint16).to(device), "mlm_positions": positions.to(torch.uint16).to(device),
            "mlm_labels": labels.to(device)}


def ours_step(model, batch):
    out = model(batch["input_ids"], batch["mlm_positions"])
    return masked_lm_loss_sum(out.mlm_logits.flatten(0, 1), batch["mlm_labels"].flatten()) / batch["mlm_labels"].numel()


def hf_inputs(batch) -> dict:
    """What the transformers route feeds BertForMaskedLM: long ids, a mask, labels -100 outside masked slots."""
    input_ids = batch["input_ids"].long()
    labels = torch.full_like(input_ids, -100).scatter(1, batch["mlm_positions"].long(), batch["mlm_labels"])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def hf_step(model, inputs):
    return model(**inputs).loss


class Timer:
    """One model's training steps, timed in turns: forward + backward + AdamW with the kernel our trainer picks for
    the device (fused where it is the fast one); the first turn starts with args.warmup untimed steps."""

    def __init__(self, model, step, inputs, device, precision, args):
        self.model, self.step, self.inputs, self.device, self.precision = model, step, inputs, device, precision
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                           **({"fused": True} if fused_adamw_is_fast(device) else {"foreach": True}))
        self.seconds, self.steps = 0.0, 0
        self._run(args.warmup)

    def _run(self, steps: int) -> None:
        for _ in range(steps):
            with autocast(self.device, self.precision):
                loss = self.step(self.model, self.inputs)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def turn(self, steps: int) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self._run(steps)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.steps += steps


def trainer_row(args, device: torch.device, precision: str) -> dict:
    """Ours through `berttrain run` on args.shards: tokens/s and data wait of the steps after args.warmup, from
    the run's own metrics.jsonl, and the model FLOPs per token of what it computed."""
    from prep.shards import open_dataset
    from train.config import TrainConfig
    from train.loop import run
    from train.rundir import CONFIG_FILE, METRICS_FILE

    dataset = open_dataset(args.shards)
    predictions = int(dataset.manifest["options"]["max_predictions"])
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        config = TrainConfig(shards=str(args.shards), run_dir=f"{scratch}/run", arch=args.arch, size=args.size,
                             batch_size=args.batch_size, steps=args.warmup + args.steps, warmup=1,
                             precision=precision, device=device.type, compile=args.compile, log_every=1,
                             eval_every=0, save_every=0)
        run(config, progress=False)
        run_dir = Path(scratch) / "run"
        records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
        model_config = model_config_from_dict(json.loads((run_dir / CONFIG_FILE).read_text())["model"])
    if config.dynamic_mask_prob:  # re-masked on the device: as many slots as the rate asks for
        predictions = math.ceil(dataset.max_len * config.dynamic_mask_prob)
    tokens_per_step = args.batch_size * dataset.max_len
    timed = [r for r in records if "tokens_per_s" in r][args.warmup:]
    step_seconds = [tokens_per_step / r["tokens_per_s"] for r in timed]
    waits = [r["data_wait_frac"] for r in timed]
    seconds = sum(step_seconds)
    with torch.device("meta"):  # only its parameter count is needed
        params = count_parameters(new_model(model_config))
    flops = modernbert.flops_per_token if args.arch == "modernbert" else flops_per_token
    return {"tokens_per_s": len(step_seconds) * tokens_per_step / seconds,
            "data_wait_frac": sum(w * t for w, t in zip(waits, step_seconds)) / seconds,
            "flops": flops(model_config, dataset.max_len, predictions, sparse_last_layer=True), "params": params,
            "max_len": dataset.max_len}


def main_shards(args, device: torch.device) -> None:
    precisions = args.precision.split(",") if args.precision != "auto" else [resolve_precision("auto", device)]
    print(f"device: {_device_name(device)}; torch {torch.__version__}")
    print(f"ours through `berttrain run` on {args.shards}: --size {args.size}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}{', --compile' if args.compile else ''}\n")
    print("| model | precision | params | tokens/row | ms/step | tokens/s | data wait | model GFLOP/s "
          "| matmul peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision in precisions:
        row = trainer_row(args, device, precision)
        peak = matmul_peak_flops(device, precision)
        achieved = row["tokens_per_s"] * row["flops"]
        print(f"| ours, `berttrain run` | {precision} | {row['params'] / 1e6:.1f} M | {row['max_len']} | "
              f"{args.batch_size * row['max_len'] / row['tokens_per_s'] * 1e3:.0f} | {row['tokens_per_s']:,.0f} | "
              f"{row['data_wait_frac']:.2%} | {achieved / 1e9:,.1f} | {peak / 1e9:,.1f} | {achieved / peak:.0%} |")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}")


def contenders(args, device: torch.device, batch: dict) -> list[tuple]:
    """(name, model, step, inputs, training FLOPs per token) for ours and the Hugging Face peers of args.arch."""
    import transformers

    shape = config_for_size(args.arch, args.size, args.vocab_size, max_positions=max(512, args.seq_len))
    torch.manual_seed(0)
    ours = new_model(shape).to(device).train()
    if args.arch == "bert":
        hf = transformers.BertForMaskedLM._from_config(transformers.BertConfig(**hf_bert.hf_config_dict(shape)),
                                                       attn_implementation="sdpa")
        return [("ours", ours, ours_step, batch,
                 flops_per_token(shape, args.seq_len, args.predictions, sparse_last_layer=True)),
                ("HF BertForMaskedLM (sdpa)", hf.to(device).train(), hf_step, hf_inputs(batch),
                 flops_per_token(shape, args.seq_len))]
    special = {"pad": PAD_ID, "cls": 2, "sep": 3, "mask": 4}
    fields = hf_modernbert.hf_config_dict(shape, special)
    peers = []
    for sparse in (False, True):
        config = transformers.ModernBertConfig(**fields, sparse_prediction=sparse)
        hf = transformers.ModernBertForMaskedLM._from_config(config, attn_implementation="sdpa")
        peers.append((f"HF ModernBertForMaskedLM (sdpa, sparse_prediction {'on' if sparse else 'off'})",
                      hf.to(device).train(), hf_step, hf_inputs(batch),
                      modernbert.flops_per_token(shape, args.seq_len, args.predictions if sparse else None)))
    return [("ours", ours, ours_step, batch,
             modernbert.flops_per_token(shape, args.seq_len, args.predictions, sparse_last_layer=True)),
            *peers]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.shards is not None:
        main_shards(args, device)
        return
    import transformers

    if args.precision == "auto":
        precisions = ["bf16"] if bf16_is_fast(device) else ["bf16", "fp32"]
    else:
        precisions = args.precision.split(",")
    shape = config_for_size(args.arch, args.size, args.vocab_size)
    tokens_per_step = args.batch_size * args.seq_len

    print(f"device: {_device_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}")
    if device.type == "cpu":
        print(f"load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(other processes share the cores)")
    print(f"native bf16: {'yes' if bf16_is_fast(device) else 'no (bf16 is emulated; fp32 shown too)'}")
    if args.keep_freed_memory:
        print(f"malloc keeps freed memory (as `berttrain run` on a CPU): {keep_freed_memory()}")
    print(f"model: {shape.summary()}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.predictions} masked per row, {args.rounds} x {args.steps} timed steps each after {args.warmup} "
          f"warm-up\n")

    rows = []
    batch = random_batch(args, device)
    for precision in precisions:
        peak = matmul_peak_flops(device, precision)
        models = contenders(args, device, batch)
        timers = [Timer(model, step, inputs, device, precision, args) for _, model, step, inputs, _ in models]
        for _ in range(args.rounds):
            for timer in timers:
                timer.turn(args.steps)
        for (name, model, _, _, flops), timer in zip(models, timers):
            tokens_per_s = tokens_per_step * timer.steps / timer.seconds
            rows.append((name, precision, count_parameters(model), timer.seconds / timer.steps * 1e3, tokens_per_s,
                         tokens_per_s * flops, peak))
        del models, timers

    print("| model | precision | params | ms/step | tokens/s | model GFLOP/s | matmul peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, precision, params, ms, tokens_per_s, achieved, peak in rows:
        print(f"| {name} | {precision} | {params / 1e6:.1f} M | {ms:.0f} | {tokens_per_s:,.0f} | "
              f"{achieved / 1e9:,.1f} | {peak / 1e9:,.1f} | {achieved / peak:.0%} |")
    for precision in precisions:
        ours_row, *peer_rows = (r for r in rows if r[1] == precision)
        for peer in peer_rows:
            print(f"\n{precision}: ours is {ours_row[4] / peer[4]:.2f}x the tokens/s of {peer[0]}")


if __name__ == "__main__":
    main()
