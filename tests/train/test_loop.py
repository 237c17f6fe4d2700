"""The training loop on real WikiText-2 shards: it learns, resumes exactly, normalises the loss globally, survives
a non-finite loss, and refuses data it cannot read with a clear message."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
import torch.nn.functional as F

from prep.errors import BertError
from prep.shards import MANIFEST_NAME, open_dataset
from prep.wordpiece import Vocab
from train import checkpoint as ckpt
from train.batches import BatchOrder, as_tensors, to_device
from train.config import TrainConfig
from train.diagnose import collapse_warning, collapsed
from train.evaluate import evaluate, unigram_log_probs
from train.loop import build, fit, run
from train.rundir import METRICS_FILE
from train.runtime import Runtime, setup, teardown
from train.model import BertForPretraining, ModelConfig, PretrainingOutput

CPU = torch.device("cpu")
SMALL = dict(size="tiny", layers=1, hidden=64, dropout=0.0)  # quick where the size does not matter




def _config(shards, run_dir, **options) -> TrainConfig:
    base = dict(shards=str(shards), run_dir=str(run_dir), precision="fp32", device="cpu", eval_every=0,
                save_every=0, log_every=1, batch_size=16)
    return TrainConfig(**{**base, **options})


def _records(run_dir, split=None):
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def test_tiny_overfits_one_batch(wiki_shards, tmp_path):
    """The first check of any BERT debugging story: one batch again and again drives the loss to ~0."""
    summary = run(_config(wiki_shards, tmp_path / "run", size="tiny", overfit_batch=True, batch_size=8,
                          steps=60, lr=5e-3, log_every=10), progress=False)
    assert summary["overfit"]["reached_zero"], summary["overfit"]
    assert summary["overfit"]["first_loss"] > 7.0


def test_short_run_learns_to_read_context_and_beats_the_most_frequent_token_baseline(wiki_shards_16, tmp_path):
    """1,200 CPU steps of `tiny` (128 rows of 16 tokens a step, dynamic masks, about a minute and a half) on
    WikiText-2 predict the masked tokens of validation text it never trained on far better than always guessing
    the most frequent token, with a loss well below that of knowing token frequencies alone. The [MASK] slots, where
    only the context can tell the token, beat their baseline by as much: the model reads its neighbours, it does not
    just copy the slots left unchanged. (On 64-token rows the same budget stays at the baseline there: attention
    starts uniform, so a slot's neighbours carry a 63rd of it, and finding them takes many times longer.)"""
    summary = run(_config(wiki_shards_16, tmp_path / "run", size="tiny", dropout=0.0, lr=1e-3, warmup=100,
                          steps=1200, batch_size=128, masking="dynamic", eval_every=600, eval_rows=4096,
                          log_every=100), progress=False)
    result = summary["eval"]
    assert result["mask_acc"] > 2 * result["mask_baseline_acc"], result
    assert result["mlm_acc"] > 3 * result["baseline_acc"], result
    assert result["mlm_loss"] < result["unigram_loss"] - 0.5, result
    assert not collapsed(result)
    records = _records(tmp_path / "run")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "data_wait_frac"} <= set(records[0])
    assert 0 <= records[-1]["data_wait_frac"] < 0.5
    evals = _records(tmp_path / "run", "val")
    assert [e["step"] for e in evals] == [600, 1200] and {"mlm_loss", "mlm_acc", "ppl", "mask_acc"} <= set(evals[-1])
    assert evals[1]["mask_acc"] > evals[0]["mask_acc"], evals


def test_resume_gives_exactly_the_losses_of_a_straight_run(wiki_shards, tmp_path):
    """10 steps, a save killed halfway at 15, resume from 10 to 20 == 20 steps straight, bit for bit (CPU, fp32):
    weights, optimizer, schedule, RNGs and data position all come back, and the broken save is ignored."""
    options = dict(SMALL, dropout=0.1, masking="dynamic", steps=20, save_every=5, keep_last=5, seed=3)
    run(_config(wiki_shards, tmp_path / "straight", **options), progress=False)
    run(_config(wiki_shards, tmp_path / "resumed", **options), progress=False, stop_at=15)
    broken = tmp_path / "resumed" / "checkpoints" / "step-00000015"
    (broken / ckpt.COMPLETE_MARKER).unlink()
    (broken / ckpt.MODEL_WEIGHTS_FILE).write_bytes(b"")
    summary = run(_config(wiki_shards, tmp_path / "resumed", resume=True, **options), progress=False)
    assert summary["step"] == 20
    straight = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in _records(tmp_path / "straight")]
    resumed = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in _records(tmp_path / "resumed")]
    assert resumed == straight
    assert [r[0] for r in resumed] == list(range(1, 21))


def test_the_loss_is_the_mean_over_every_masked_token_of_the_global_batch(wiki_shards, tmp_path):
    """Step 1's logged loss equals the cross-entropy averaged over all masked tokens of the 16 rows, computed
    independently, for 1 x 16 rows and for 2 accumulation micro-steps x 8 rows alike. (Averaging the two
    micro-batch means, the known gradient-accumulation bug, gives another number: their mask counts differ.)"""
    config = _config(wiki_shards, tmp_path / "a", steps=3, seed=5, **SMALL)
    run(config, progress=False)
    run(config.replace(run_dir=str(tmp_path / "b"), batch_size=8, grad_accum=2), progress=False)
    one, accum = _records(tmp_path / "a"), _records(tmp_path / "b")

    split = open_dataset(wiki_shards).split("train")
    start = BatchOrder(split.rows, 16, seed=5).block_start(0)
    batch = to_device(as_tensors(split.slice(start, start + 16)), CPU)
    model_config = ModelConfig.from_dict(ckpt.load_model_config(ckpt.latest_checkpoint(tmp_path / "a")))
    torch.manual_seed(5)
    model = BertForPretraining(model_config)  # the initial weights: same seed, same config
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["mlm_positions"]).mlm_logits
    used = batch["mlm_labels"] != model.config.pad_id
    expected = F.cross_entropy(logits[used], batch["mlm_labels"][used]).item()
    halves = [F.cross_entropy(logits[:8][used[:8]], batch["mlm_labels"][:8][used[:8]]).item(),
              F.cross_entropy(logits[8:][used[8:]], batch["mlm_labels"][8:][used[8:]]).item()]
    assert used[:8].sum() != used[8:].sum()
    assert one[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert accum[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert sum(halves) / 2 != pytest.approx(expected, rel=1e-6)
    for a, b in zip(one, accum):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_nonfinite_loss_is_skipped_and_counted(wiki_shards, tmp_path):
    """A NaN in the loss at one step leaves the weights untouched at that step, is counted, and training goes on."""
    config = _config(wiki_shards, tmp_path / "run", steps=6, **SMALL)
    runtime = setup(config.device, config.precision)
    trainer = build(config, runtime)
    poisoned_step, seen = 3, []

    def poison(module, inputs, output):
        seen.append(1)
        if len(seen) == poisoned_step:
            return PretrainingOutput(output.mlm_logits * float("nan"), output.nsp_logits)
        return output

    snapshots = {}

    def snapshot(module, inputs):
        snapshots[len(seen) + 1] = [p.detach().clone() for p in module.parameters()]

    trainer.model.register_forward_pre_hook(snapshot)
    trainer.model.register_forward_hook(poison)
    summary = fit(trainer, progress=False)
    teardown(runtime)
    assert summary["nonfinite_steps"] == 1
    assert summary["step"] == 6
    records = _records(tmp_path / "run")
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert records[2]["loss"] is None  # NaN is not JSON
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))


def test_nonfinite_losses_in_a_row_stop_the_run_with_a_clear_message(wiki_shards, tmp_path):
    config = _config(wiki_shards, tmp_path / "run", steps=10, max_nonfinite=3, **SMALL)
    runtime = setup(config.device, config.precision)
    trainer = build(config, runtime)
    trainer.model.register_forward_hook(lambda m, i, out: PretrainingOutput(out.mlm_logits * float("inf"), None))
    with pytest.raises(BertError, match=r"not finite for 3 steps in a row .* lower --lr"):
        fit(trainer, progress=False)
    teardown(runtime)


def _copy(shards, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(shards, target)
    return target


def _edit_manifest(dataset, **changes):
    path = dataset / MANIFEST_NAME
    manifest = msgpack.unpackb(path.read_bytes(), raw=False)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            manifest[section][field] = value
        else:
            manifest[section] = value
    path.write_bytes(msgpack.packb(manifest, use_bin_type=True))


def test_data_the_model_cannot_read_is_refused_with_a_clear_message(wiki_shards, tmp_path):
    """Another format version, rows longer than the position table, another vocabulary than the initial weights',
    a truncated shard file: each is one clear error before any training."""
    newer = _copy(wiki_shards, tmp_path, "newer")
    _edit_manifest(newer, version=2)
    with pytest.raises(BertError, match="shard format version 2, this bertprep reads version 1"):
        run(_config(newer, tmp_path / "r1", steps=1, **SMALL), progress=False)

    max_len = open_dataset(wiki_shards).max_len
    with pytest.raises(BertError, match=f"rows of {max_len} tokens but the model .* has only 32 positions"):
        run(_config(wiki_shards, tmp_path / "r2", steps=1, max_positions=32, **SMALL), progress=False)

    run(_config(wiki_shards, tmp_path / "phase1", steps=1, **SMALL), progress=False)
    other_vocab = _copy(wiki_shards, tmp_path, "other_vocab")
    _edit_manifest(other_vocab, vocab__sha256="0" * 64)
    with pytest.raises(BertError, match="vocabulary of .* is not the one of --init-from"):
        run(_config(other_vocab, tmp_path / "r3", steps=1, init_from=str(tmp_path / "phase1"), **SMALL),
            progress=False)

    truncated = _copy(wiki_shards, tmp_path, "truncated")
    victim = sorted((truncated / "train").glob("*-input_ids.npy"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(BertError, match=f"shard file .*{victim.name}.*(unreadable|holds).*re-run `bertprep shard`"):
        run(_config(truncated, tmp_path / "r4", steps=1, **SMALL), progress=False)


def test_an_existing_run_dir_is_never_overwritten_silently(wiki_shards, tmp_path):
    config = _config(wiki_shards, tmp_path / "run", steps=1, **SMALL)
    run(config, progress=False)
    with pytest.raises(BertError, match="already exists: pass --resume to continue it, --force to replace it"):
        run(config, progress=False)
    assert run(config.replace(force=True), progress=False)["step"] == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 1 and saved["model"]["hidden"] == 64
    assert saved["dataset"]["vocab"]["sha256"] == open_dataset(wiki_shards).vocab["sha256"]


def test_init_from_starts_from_the_weights_and_grows_the_position_table(wiki_shards, vocab_dir, wiki_valid,
                                                                        tmp_path):
    """Phase 2 at longer rows after phase 1: the trained position rows are kept, the table grows to the rows."""
    from prep.masking import MaskingConfig
    from prep.pipeline import ShardConfig, build_shards

    run(_config(wiki_shards, tmp_path / "phase1", steps=2, max_positions=64, **SMALL), progress=False)
    long_rows = tmp_path / "wiki_128"
    build_shards(ShardConfig(inputs=(wiki_valid,), vocab=vocab_dir, out_dir=long_rows, max_len=128, workers=1,
                             progress=False, masking=MaskingConfig(0.15, 20)))
    phase1 = ckpt.latest_checkpoint(tmp_path / "phase1")
    summary = run(_config(long_rows, tmp_path / "phase2", steps=1, lr=1e-9, init_from=str(tmp_path / "phase1"),
                          size="base"), progress=False)  # --size is ignored: the weights decide the shape
    phase2 = ckpt.latest_checkpoint(tmp_path / "phase2")
    assert summary["step"] == 1
    assert ckpt.load_model_config(phase2)["max_positions"] == 128
    assert ckpt.load_model_config(phase2)["hidden"] == 64
    old = ckpt.load_weights(phase1)["encoder.embeddings.position.weight"]
    new = ckpt.load_weights(phase2)["encoder.embeddings.position.weight"]
    assert new.shape == (128, 64)
    assert torch.allclose(new[:64], old, atol=1e-6)


def test_evaluation_reports_baselines_samples_and_collapse(wiki_shards):
    """Evaluation prints two rows as Input / Target / Predicted Tokens with top-3 probabilities, and flags a model
    that predicts one token at every mask with the loss of token frequencies: the classic collapse."""
    dataset = open_dataset(wiki_shards)
    vocab = Vocab.load(dataset.vocab_file)
    torch.manual_seed(0)
    config = ModelConfig.from_size("tiny", len(vocab), layers=1, hidden=64, pad_id=vocab.special.pad)
    model = BertForPretraining(config)
    unigram = unigram_log_probs(dataset.split("train"), len(vocab), vocab.special.pad)
    val = dataset.split("val")
    fresh = evaluate(model, val, Runtime(CPU), 64, 256, unigram=unigram, samples=2, tokens=vocab.tokens,
                     mask_id=vocab.special.mask)
    assert fresh["mlm_loss"] > fresh["unigram_loss"] > 0
    assert 0 < fresh["baseline_acc"] < 0.2 and fresh["masked"] > 256
    assert 0 < fresh["mask_baseline_acc"] < 0.2 and fresh["mask_top_prediction_share"] < 0.5
    assert not collapsed(fresh)
    assert len(fresh["samples"]) == 2
    lines = fresh["samples"][0].splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["Input Tokens", "Target Tokens", "Predicted Tokens"]
    assert "[MASK]" in lines[0] and lines[2].count("(0.") >= 3

    with torch.no_grad():  # a head that learned only the frequencies: the unigram log-probabilities as bias
        model.mlm_head.dense.weight.zero_()
        model.mlm_head.dense.bias.zero_()
        model.mlm_head.norm.weight.zero_()
        model.mlm_head.bias[: len(vocab)] = unigram.float()
    frozen = evaluate(model, val, Runtime(CPU), 64, 256, unigram=unigram)
    assert frozen["top_prediction_share"] == 1.0
    assert frozen["mlm_acc"] == pytest.approx(frozen["baseline_acc"])
    assert collapsed(frozen) and "mask_acc" not in frozen


def test_copying_the_unchanged_slots_does_not_hide_a_collapse(wiki_shards):
    """A model that copies its input token and otherwise predicts the most frequent one scores well above the
    baseline over all masked slots (a tenth of them are left unchanged) and has a loss below the unigram loss, yet
    uses no context: the [MASK] slots, where only the context can tell, show it and count as collapsed."""
    dataset = open_dataset(wiki_shards)
    vocab = Vocab.load(dataset.vocab_file)
    unigram = unigram_log_probs(dataset.split("train"), len(vocab), vocab.special.pad)
    val = dataset.split("val")
    torch.manual_seed(0)
    config = ModelConfig.from_size("tiny", len(vocab), layers=1, hidden=64, pad_id=vocab.special.pad)
    model = BertForPretraining(config)
    frequent = int(unigram.argmax())

    def copy_or_frequent(input_ids, mlm_positions, **_):
        shown = torch.gather(input_ids.long(), 1, mlm_positions.long())
        logits = unigram.float().expand(*shown.shape, -1).clone()
        copied = shown != vocab.special.mask
        logits[copied] = -20.0
        logits[copied, shown[copied]] = 0.0  # all the probability on the input token
        logits[~copied, frequent] = 0.0
        return PretrainingOutput(mlm_logits=logits, nsp_logits=None)

    model.forward = copy_or_frequent
    result = evaluate(model, val, Runtime(CPU), 64, 512, unigram=unigram, mask_id=vocab.special.mask)
    assert result["mlm_acc"] > 1.5 * result["baseline_acc"], result
    assert result["mask_acc"] == pytest.approx(result["mask_baseline_acc"])
    assert result["mask_top_prediction"] == frequent and result["mask_top_prediction_share"] == 1.0
    assert collapsed(result)
    warning = collapse_warning(result, vocab.tokens, 1e-3)
    assert f"predicts {vocab.tokens[frequent]!r} 100% of the time" in warning
    assert "--max-len 16" in warning and warning.endswith("lower --lr (now 0.001).")


def test_nsp_shards_train_the_nsp_head_too(vocab_dir, wiki_valid, tmp_path):
    """Shards with NSP labels give the model its NSP head; the loss adds the NSP term, evaluation its accuracy."""
    from prep.masking import MaskingConfig
    from prep.pipeline import ShardConfig, build_shards

    shards = tmp_path / "nsp"
    build_shards(ShardConfig(inputs=(wiki_valid,), vocab=vocab_dir, out_dir=shards, max_len=64, nsp=True,
                             val_fraction=0.1, workers=1, progress=False, masking=MaskingConfig(0.15, 10)))
    summary = run(_config(shards, tmp_path / "run", steps=2, eval_every=2, eval_rows=128, **SMALL),
                  progress=False)
    assert 0.0 <= summary["eval"]["nsp_acc"] <= 1.0
    record = _records(tmp_path / "run")[-1]
    assert record["loss"] == pytest.approx(record["mlm_loss"] + record["nsp_loss"])
    assert ckpt.load_model_config(ckpt.latest_checkpoint(tmp_path / "run"))["nsp"] is True


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_schedule_warms_up_then_decays_to_the_minimum(schedule):
    from train.schedule import Plan

    plan = Plan(steps=100, warmup=10, peak_lr=1e-3, final_lr=1e-4, schedule=schedule, steps_per_epoch=50,
                global_rows=32, tokens_per_step=4096, train_rows=1600)
    lrs = [plan.lr_at(step) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert plan.lr_at(100) == pytest.approx(1e-4)
    assert plan.lr_at(55) == pytest.approx(5.5e-4)  # half-way down in both shapes
    config = TrainConfig(shards="x", epochs=2.5)
    assert config.planned_steps(40) == 100 and config.warmup_steps(100) == 6


_HEAP_SCRIPT = """
import torch
from train.runtime import keep_freed_memory

def from_heap():
    buffer = torch.ones(16 << 20)  # 64 MiB, written once and freed, as a step's gradient buffer is
    start = buffer.data_ptr()
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= start < high:
                return 1
    return 0

default = from_heap()
applied = keep_freed_memory()
print(default, from_heap() + from_heap() if applied else -1)
"""


def test_cpu_runs_reuse_freed_memory_instead_of_mapping_it_afresh():
    """`setup` on a CPU has glibc keep freed memory: a large buffer allocated every step (as the vocabulary matrix's
    casts and gradients are) then comes from malloc's heap, which keeps what is freed, where by default each is a
    fresh map, unmapped when freed, whose 16,384 pages (64 MiB) fault in again at the next step. Checked by where
    the buffer lies, not by counting page faults: this machine's kernel may reclaim idle heap pages (DAMON), which
    makes fault counts vary from run to run. In a process of its own, since the setting is for the process."""
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    default, kept = map(int, out.stdout.split())
    if kept < 0:
        pytest.skip("malloc is not glibc's")
    assert default == 0 and kept == 2
