"""Masking: exact restore, the BERT counts and proportions, whole words, and keys that make it order-independent."""

import numpy as np
import pytest

from prep.masking import MaskingConfig, VocabTables, derive_key, mask_rows, restore

VOCAB = 3000
PAD, UNK, CLS, SEP, MASK = range(5)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    is_special = np.zeros(VOCAB, dtype=bool)
    is_special[:5] = True
    is_continuation = rng.random(VOCAB) < 0.3
    is_continuation[:5] = False
    return VocabTables(is_special, is_continuation, mask_id=MASK, pad_id=PAD)


def random_rows(n=2000, width=128, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, width)).astype(np.uint16)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::7, 40] = UNK
    ids[-1, 50:] = PAD  # a short last row
    ids[-1, 49] = SEP
    return ids


@pytest.mark.parametrize("whole_word", [False, True])
def test_restore_gives_back_the_rows(tables, whole_word):
    """Putting mlm_labels back at mlm_positions reproduces the unmasked rows exactly; unused slots are (0, pad)."""
    ids = random_rows()
    out = mask_rows(ids, derive_key(5, np.arange(len(ids))), MaskingConfig(0.15, 20, whole_word), tables)
    assert np.array_equal(restore(out.input_ids, out.mlm_positions, out.mlm_labels, PAD), ids)
    unused = out.mlm_labels == PAD
    assert (out.mlm_positions[unused] == 0).all()
    assert out.input_ids.dtype == ids.dtype and out.mlm_labels.dtype == ids.dtype
    assert out.mlm_positions.dtype == np.uint16 and out.mlm_positions.shape == (len(ids), 20)


def test_counts_proportions_and_no_special_tokens(tables):
    """Each row gets min(max_predictions, max(1, round(ordinary × mask_prob))) predictions, never on a special
    token, ascending; of all chosen, 80% [MASK], 10% random ordinary token, 10% unchanged (within sampling noise)."""
    ids = random_rows(n=5000)
    out = mask_rows(ids, derive_key(9, np.arange(len(ids))), MaskingConfig(0.15, 20), tables)
    ordinary = (~tables.is_special[ids]).sum(1)
    expected = np.minimum(20, np.maximum(1, np.rint(ordinary * 0.15)))
    used = out.mlm_labels != PAD
    assert np.array_equal(used.sum(1), expected)
    rows, slots = np.nonzero(used)
    positions = out.mlm_positions[rows, slots].astype(np.int64)
    assert not tables.is_special[ids[rows, positions]].any()
    assert (np.diff(np.where(used, out.mlm_positions, 10_000).astype(np.int64), axis=1) > 0)[used[:, 1:]].all()
    now = out.input_ids[rows, positions]
    share_mask = (now == MASK).mean()
    share_kept = (now == out.mlm_labels[rows, slots]).mean()
    assert abs(share_mask - 0.8) < 0.01 and abs(share_kept - 0.1) < 0.01
    assert not tables.is_special[now[now != MASK]].any()  # random replacements are ordinary tokens
    assert out.masked == used.sum() and out.replaced_mask == (now == MASK).sum()


def test_a_row_masks_the_same_whatever_block_it_is_in(tables):
    """Masks are a function of the row and its key only, so splitting work into blocks (or workers) cannot change
    the output; different keys give different masks."""
    ids = random_rows(n=300)
    keys = derive_key(3, 0, np.arange(300))
    config = MaskingConfig(0.15, 20, whole_word=True)
    whole = mask_rows(ids, keys, config, tables)
    part = mask_rows(ids[100:150], keys[100:150], config, tables)
    assert np.array_equal(part.input_ids, whole.input_ids[100:150])
    assert np.array_equal(part.mlm_positions, whole.mlm_positions[100:150])
    other = mask_rows(ids, derive_key(4, 0, np.arange(300)), config, tables)
    assert (other.mlm_positions != whole.mlm_positions).any(axis=1).mean() > 0.99


def test_whole_word_masks_every_piece_of_a_chosen_word(tables):
    """With --whole-word a chosen word's start piece and all its '##' continuations are chosen together, and the
    count never exceeds max_predictions."""
    ids = random_rows(n=2000)
    out = mask_rows(ids, derive_key(11, np.arange(len(ids))), MaskingConfig(0.15, 20, True), tables)
    chosen = np.zeros(ids.shape, dtype=bool)
    rows, slots = np.nonzero(out.mlm_labels != PAD)
    chosen[rows, out.mlm_positions[rows, slots].astype(np.int64)] = True
    continuation = tables.is_continuation[ids] & ~tables.is_special[ids]
    after_ordinary = np.zeros_like(continuation)
    after_ordinary[:, 1:] = ~tables.is_special[ids[:, :-1]]
    inside_word = continuation & after_ordinary  # a piece that belongs to the token before it
    assert np.array_equal(chosen[:, 1:][inside_word[:, 1:]], chosen[:, :-1][inside_word[:, 1:]])
    assert chosen.sum(1).max() <= 20 and chosen.sum(1).mean() > 15


def test_config_errors_name_the_flag():
    """Bad masking options fail with a message naming the flag."""
    with pytest.raises(ValueError, match="--mask-prob"):
        MaskingConfig(mask_prob=1.5)
    with pytest.raises(ValueError, match="--max-predictions"):
        MaskingConfig(max_predictions=0)
    assert MaskingConfig.default_max_predictions(128, 0.15) == 20
    assert MaskingConfig.default_max_predictions(512, 0.15) == 77
    assert MaskingConfig.default_max_predictions(100, 0.15) == 15
