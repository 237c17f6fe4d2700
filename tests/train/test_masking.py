"""Dynamic masking on the device, on real WikiText-2 shards masked at 15%: at the shards' rate it re-draws the
shards' masks, and at any --mask-prob it masks as the offline masker would at that rate, in wider slots."""

import numpy as np
import pytest
import torch

from prep import masking as offline
from prep.shards import open_dataset
from prep.wordpiece import Vocab
from tests.conftest import build_wiki_shards
from train.batches import as_tensors, to_device
from train.masking import DeviceMaskTables, mask_draws, remask, restore

CPU = torch.device("cpu")
ROWS = 2048


def _setup(shards, whole_word=False, mask_prob=None):
    """The first ROWS train rows as int64 tensors, the vocabulary and the device tables."""
    dataset = open_dataset(shards)
    vocab = Vocab.load(dataset.vocab_file)
    batch = to_device(as_tensors(dataset.split("train").slice(0, ROWS)), CPU)
    tables = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, vocab.special.mask, vocab.special.pad,
                                    whole_word, CPU, mask_prob=mask_prob)
    return dataset, vocab, batch, tables


def _remask(batch, tables, max_len, seed=0):
    return remask(batch, tables, mask_draws(len(batch["input_ids"]), max_len, tables,
                                            torch.Generator().manual_seed(seed)))


def _chosen(out, pad):
    """bool [B, L]: the positions of the used slots."""
    used = out["mlm_labels"] != pad
    return torch.zeros_like(out["input_ids"], dtype=torch.bool).scatter(1, out["mlm_positions"], used)


def _offline_counts(original, vocab, mask_prob, slots, whole_word=False):
    """Predictions per row that prep.masking gives the same original rows at `mask_prob` in `slots` slots."""
    tables = offline.VocabTables(vocab.is_special, vocab.is_continuation, vocab.special.mask, vocab.special.pad)
    keys = offline.derive_key(11, np.arange(len(original)))
    rows = offline.mask_rows(original.numpy(), keys, offline.MaskingConfig(mask_prob, slots, whole_word), tables)
    return (rows.mlm_labels != vocab.special.pad).sum(1)


@pytest.fixture(scope="module")
def whole_word_shards(tmp_path_factory, vocab_dir, wiki_valid):
    """WikiText-2 validation text in 64-token rows masked at 15% with --whole-word."""
    return build_wiki_shards(tmp_path_factory.mktemp("shards") / "wiki_64_wwm", vocab_dir, [wiki_valid],
                             whole_word=True)


def test_dynamic_masking_follows_the_shard_rules(wiki_shards):
    """Re-masking on the device: the originals come back from the labels, each row keeps its number of
    predictions, specials are never chosen, 80/10/10 holds, and the masks differ from the shard's."""
    dataset = open_dataset(wiki_shards)
    vocab = Vocab.load(dataset.vocab_file)
    split = dataset.split("train")
    batch = to_device(as_tensors(split.slice(0, 2048)), CPU)
    pad, mask = vocab.special.pad, vocab.special.mask
    tables = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, mask, pad, False, CPU)
    original = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], pad)
    out = remask(batch, tables, mask_draws(2048, dataset.max_len, tables, torch.Generator().manual_seed(0)))

    assert torch.equal(restore(out["input_ids"], out["mlm_positions"], out["mlm_labels"], pad), original)
    used = out["mlm_labels"] != pad
    assert torch.equal(used.sum(1), (batch["mlm_labels"] != pad).sum(1))
    chosen = torch.zeros_like(original, dtype=torch.bool).scatter(1, out["mlm_positions"], used)
    assert not tables.is_special[original[chosen]].any()
    unchanged = out["input_ids"] == original
    assert torch.equal(unchanged | chosen, torch.ones_like(chosen))  # only chosen positions change
    corrupted = out["input_ids"][chosen]
    share_mask = (corrupted == mask).float().mean().item()
    share_kept = (corrupted == original[chosen]).float().mean().item()
    assert 0.77 < share_mask < 0.83 and 0.08 < share_kept < 0.12  # kept includes random draws of the same id
    assert not tables.is_special[corrupted[corrupted != mask]].any()
    assert not torch.equal(out["mlm_positions"], batch["mlm_positions"])
    draws = mask_draws(2048, dataset.max_len, tables, torch.Generator().manual_seed(0))
    halves = [remask({k: v[rows] for k, v in batch.items()}, tables, {k: v[rows] for k, v in draws.items()})
              for rows in (slice(0, 1000), slice(1000, 2048))]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), out["input_ids"])  # split-invariant

    words = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, mask, pad, True, CPU)
    whole = remask(batch, words, draws)
    used = whole["mlm_labels"] != pad
    assert (used.sum(1) <= (batch["mlm_labels"] != pad).sum(1)).all() and used.sum() > 0.9 * chosen.sum()
    picked = torch.zeros_like(chosen).scatter(1, whole["mlm_positions"], used)
    # A chosen '##' piece always comes with the piece before it (unless the row starts mid-word): whole words.
    continues = words.is_continuation[original[:, 1:]] & ~words.is_special[original[:, :-1]]
    assert not (picked[:, 1:] & continues & ~picked[:, :-1]).any()
    assert (picked[:, 1:] & continues).any()


@pytest.mark.parametrize("mask_prob, slots", [(0.3, 20), (0.5, 32), (0.1, 7)])
def test_mask_prob_gives_each_row_the_offline_count_in_ceil_slots(wiki_shards, mask_prob, slots):
    """At --mask-prob P the slots are ceil(64 × P) wide and every row gets exactly the predictions prep.masking
    would give its original tokens at P: the modern 30% recipe from 15% shards without re-making them."""
    dataset, vocab, batch, tables = _setup(wiki_shards, mask_prob=mask_prob)
    pad = vocab.special.pad
    original = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], pad)
    out = _remask(batch, tables, dataset.max_len)

    assert batch["mlm_positions"].shape == (ROWS, 10)  # the shards' 15% slots
    assert out["mlm_positions"].shape == out["mlm_labels"].shape == (ROWS, slots)
    assert tables.prediction_slots(dataset.max_len, 10) == slots
    assert {out[k].dtype for k in ("input_ids", "mlm_positions", "mlm_labels")} == {torch.int64}
    used = (out["mlm_labels"] != pad).sum(1).numpy()
    assert np.array_equal(used, _offline_counts(original, vocab, mask_prob, slots))
    ordinary = (~vocab.is_special[original.numpy()]).sum(1)
    assert np.array_equal(used, np.minimum(slots, np.maximum(1, np.rint(ordinary * mask_prob))) * (ordinary > 0))
    assert abs(used.sum() / ordinary.sum() - mask_prob) < 0.01


def test_mask_prob_keeps_80_10_10_and_never_picks_a_special_token(wiki_shards):
    """Of ~38,000 slots at 30%: 80% show [MASK], 10% a random ordinary token, 10% their own token (binomial
    standard deviation 0.2 points), and neither a chosen position nor a replacement is ever a special token."""
    dataset, vocab, batch, tables = _setup(wiki_shards, mask_prob=0.3)
    pad, mask = vocab.special.pad, vocab.special.mask
    original = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], pad)
    out = _remask(batch, tables, dataset.max_len, seed=1)
    chosen = _chosen(out, pad)

    assert chosen.sum() > 35_000
    assert not tables.is_special[original[chosen]].any()
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])  # only chosen positions change
    shown, truth = out["input_ids"][chosen], original[chosen]
    share_mask = (shown == mask).double().mean().item()
    share_random = ((shown != mask) & (shown != truth)).double().mean().item()
    share_kept = (shown == truth).double().mean().item()  # includes the 1-in-4,000 random draw of the same id
    assert abs(share_mask - 0.8) < 0.01 and abs(share_random - 0.1) < 0.01 and abs(share_kept - 0.1) < 0.01
    assert not tables.is_special[shown[shown != mask]].any()


def test_mask_prob_slots_follow_the_format_and_restore_round_trips(wiki_shards):
    """Used slots come first with their positions strictly ascending and the original token as label; unused
    slots hold position 0 and the pad id (docs/FORMAT.md); putting the labels back gives the original rows."""
    dataset, vocab, batch, tables = _setup(wiki_shards, mask_prob=0.3)
    pad = vocab.special.pad
    original = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], pad)
    out = _remask(batch, tables, dataset.max_len)
    positions, labels = out["mlm_positions"], out["mlm_labels"]
    used = labels != pad
    count = used.sum(1, keepdim=True)

    # [CLS] and [SEP] leave at most 62 ordinary tokens, round(62 × 0.3) = 19: every row has an unused slot.
    assert count.max() == 19 and (count < 19).any()
    assert torch.equal(used, torch.arange(20)[None, :] < count)
    assert torch.equal(positions[~used], torch.zeros_like(positions[~used]))
    assert ((positions[:, 1:] > positions[:, :-1]) | ~used[:, 1:]).all()
    assert torch.equal(labels[used], torch.gather(original, 1, positions)[used])
    assert torch.equal(restore(out["input_ids"], positions, labels, pad), original)
    assert torch.equal(torch.from_numpy(offline.restore(out["input_ids"].numpy(), positions.numpy(),
                                                        labels.numpy(), pad)), original)
    assert all(out[key] is batch[key] for key in batch.keys() - {"input_ids", "mlm_positions", "mlm_labels"})


def test_mask_prob_is_deterministic_for_a_seed_and_independent_of_the_batch_split(wiki_shards):
    """The same generator seed gives the same masks, another seed others, and micro-batches of the step's draws
    give the rows the masks they get in one batch: a run resumes and scales out to the same masks."""
    dataset, vocab, batch, tables = _setup(wiki_shards, mask_prob=0.3)
    first, again, other = (_remask(batch, tables, dataset.max_len, seed) for seed in (5, 5, 6))
    draws = mask_draws(ROWS, dataset.max_len, tables, torch.Generator().manual_seed(5))
    halves = [remask({k: v[rows] for k, v in batch.items()}, tables, {k: v[rows] for k, v in draws.items()})
              for rows in (slice(0, 700), slice(700, ROWS))]

    for key in ("input_ids", "mlm_positions", "mlm_labels"):
        assert torch.equal(first[key], again[key])
        assert torch.equal(torch.cat([h[key] for h in halves]), first[key])
    assert not torch.equal(first["mlm_positions"], other["mlm_positions"])


def test_mask_prob_at_the_shard_rate_is_todays_remasking(wiki_shards):
    """--mask-prob 0.15 on 15% shards (default 10 slots for 64 tokens) gives bit for bit what re-masking at the
    shards' own rate gives from the same draws: the explicit rate changes nothing where it changes nothing."""
    dataset, vocab, batch, shard_rate = _setup(wiki_shards)
    explicit = DeviceMaskTables.build(vocab.is_special, vocab.is_continuation, vocab.special.mask,
                                      vocab.special.pad, False, CPU, mask_prob=0.15)
    assert dataset.manifest["options"]["mask_prob"] == 0.15
    today, now = _remask(batch, shard_rate, dataset.max_len, 3), _remask(batch, explicit, dataset.max_len, 3)
    for key in ("input_ids", "mlm_positions", "mlm_labels"):
        assert torch.equal(today[key], now[key])


def test_mask_prob_masks_whole_words_on_whole_word_shards(whole_word_shards):
    """On --whole-word shards, 30% re-masking takes every piece of a chosen word and none of a word it skips,
    never exceeds the rule's count, and reaches the share the offline whole-word masker reaches at 30%."""
    dataset, vocab, batch, tables = _setup(whole_word_shards, whole_word=True, mask_prob=0.3)
    pad = vocab.special.pad
    original = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], pad)
    out = _remask(batch, tables, dataset.max_len)
    picked = _chosen(out, pad)
    used = (out["mlm_labels"] != pad).sum(1).numpy()

    assert out["mlm_positions"].shape == (ROWS, 20)
    # A '##' piece after an ordinary piece is the same word: both chosen or neither.
    continues = tables.is_continuation[original[:, 1:]] & ~tables.is_special[original[:, :-1]]
    assert (picked[:, 1:] & continues).any()
    assert torch.equal((picked[:, 1:] & continues), (picked[:, :-1] & continues))
    assert not tables.is_special[original[picked]].any()
    ordinary = (~vocab.is_special[original.numpy()]).sum(1)
    target = np.minimum(20, np.maximum(1, np.rint(ordinary * 0.3))) * (ordinary > 0)
    assert (used <= target).all() and (used < target).any()  # a word that does not fit is not cut
    offline_used = _offline_counts(original, vocab, 0.3, 20, whole_word=True)
    assert abs(used.sum() / ordinary.sum() - offline_used.sum() / ordinary.sum()) < 0.01
    assert torch.equal(restore(out["input_ids"], out["mlm_positions"], out["mlm_labels"], pad), original)


def test_mask_prob_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"^mask_prob must be between 0 and 1 \(exclusive\) or None, got 1.0$"):
        DeviceMaskTables.build(np.zeros(8, bool), np.zeros(8, bool), 4, 0, False, CPU, mask_prob=1.0)
