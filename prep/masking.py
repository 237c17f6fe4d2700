"""BERT's masked-LM corruption, vectorised over blocks of rows and keyed by hashing.

Every random choice is a hash of a row key and a position, not a draw from a shared generator. The pipeline derives
a row's key from (seed, split, copy, document, row within the document), so the masks of a row never depend on
which worker made it, in what order, or how many rows were masked together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)
REPLACE_WITH_MASK = 0.8  # of the chosen positions: 80% become [MASK],
REPLACE_WITH_RANDOM = 0.1  # 10% a random ordinary token, the rest keep their token

# Salts keep the hashes for different decisions independent of each other.
_SALT_CHOOSE, _SALT_ACTION, _SALT_TOKEN = 0x5EED0001, 0x5EED0002, 0x5EED0003


def mix64(x) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of uint64 values (arrays wrap around silently)."""
    with np.errstate(over="ignore"):  # wrapping is the point; numpy warns only for 0-d values
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # a new array, then in place
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return x


def derive_key(*parts) -> np.ndarray:
    """A 64-bit key from a sequence of integers or equal-shaped integer arrays, e.g. (seed, split, copy, doc, row)."""
    key = np.zeros(np.broadcast(*[np.asarray(p) for p in parts]).shape, dtype=np.uint64)
    for part in parts:
        key = mix64(key ^ np.asarray(part).astype(np.uint64))
    return key


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    """Maps uint64 hashes to floats uniform in [0, 1), using the top 53 bits."""
    return (hashes >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingConfig:
    """How rows are corrupted for the masked-LM objective."""

    mask_prob: float = 0.15
    """Share of the ordinary tokens of a row chosen for prediction (--mask-prob)."""
    max_predictions: int = 20
    """Most predictions per row; the width of mlm_positions and mlm_labels (--max-predictions)."""
    whole_word: bool = False
    """Choose whole words: all pieces of a chosen word are masked together (--whole-word)."""

    def __post_init__(self):
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be between 0 and 1, got {self.mask_prob}")
        if self.max_predictions < 1:
            raise ValueError(f"--max-predictions must be at least 1, got {self.max_predictions}")

    @staticmethod
    def default_max_predictions(max_len: int, mask_prob: float) -> int:
        """ceil(max_len × mask_prob), e.g. 20 for 128 tokens and 77 for 512 at 15%."""
        return max(1, math.ceil(round(max_len * mask_prob, 6)))


@dataclass(frozen=True)
class VocabTables:
    """What masking needs to know about the vocabulary, as lookup arrays indexed by token id."""

    is_special: np.ndarray  # bool [vocab]: never chosen, never a random replacement
    is_continuation: np.ndarray  # bool [vocab]: a '##' piece, part of the word before it
    mask_id: int
    pad_id: int

    @property
    def ordinary_ids(self) -> np.ndarray:
        return np.flatnonzero(~self.is_special)


@dataclass
class MaskedRows:
    """The result of masking a block of n rows of width L with P prediction slots."""

    input_ids: np.ndarray  # [n, L] the corrupted rows
    mlm_positions: np.ndarray  # uint16 [n, P]: chosen positions ascending; unused slots 0
    mlm_labels: np.ndarray  # [n, P]: the original token at each position; unused slots the pad id
    masked: int  # chosen positions in all
    replaced_mask: int  # of those, set to [MASK]
    replaced_random: int  # set to a random ordinary token
    kept: int  # left unchanged


def mask_rows(ids: np.ndarray, row_keys: np.ndarray, config: MaskingConfig, vocab: VocabTables,
              ordinary_ids: np.ndarray | None = None) -> MaskedRows:
    """Chooses and corrupts positions of `ids` [n, L] (original tokens, padded) as BERT does.

    A row with c ordinary tokens gets min(max_predictions, max(1, round(c × mask_prob))) predictions (none if c = 0).
    With whole-word masking, words are taken whole in key order while they fit in that count.
    """
    n, width = ids.shape
    slots = config.max_predictions
    ids = np.asarray(ids)
    candidate = ~vocab.is_special[ids]
    count_target = np.minimum(slots, np.maximum(1, np.rint(candidate.sum(1) * config.mask_prob))).astype(np.int64)
    count_target[~candidate.any(1)] = 0

    keys = mix64(row_keys[:, None] ^ mix64(np.arange(width, dtype=np.uint64) + np.uint64(_SALT_CHOOSE)))
    if config.whole_word:
        chosen = _choose_words(ids, keys, candidate, count_target, vocab)
    else:
        chosen = _choose_tokens(keys, candidate, count_target, slots)

    rows, cols = np.nonzero(chosen)  # row-major: each row's positions come out ascending
    action = mix64(keys[rows, cols] ^ np.uint64(_SALT_ACTION))  # hashed only where a decision is needed
    draw = unit_interval(action)
    to_mask = draw < REPLACE_WITH_MASK
    to_random = (draw >= REPLACE_WITH_MASK) & (draw < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    ordinary = vocab.ordinary_ids if ordinary_ids is None else ordinary_ids

    corrupted = ids.copy()
    corrupted[rows[to_mask], cols[to_mask]] = vocab.mask_id
    random_ids = ordinary[mix64(action[to_random] ^ np.uint64(_SALT_TOKEN)) % np.uint64(len(ordinary))]
    corrupted[rows[to_random], cols[to_random]] = random_ids

    count = np.bincount(rows, minlength=n)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
    positions = np.zeros((n, slots), dtype=np.uint16)
    labels = np.full((n, slots), vocab.pad_id, dtype=ids.dtype)
    positions[rows, slot] = cols
    labels[rows, slot] = ids[rows, cols]

    masked = len(rows)
    n_mask, n_random = int(to_mask.sum()), int(to_random.sum())
    return MaskedRows(
        input_ids=corrupted,
        mlm_positions=positions,
        mlm_labels=labels,
        masked=masked,
        replaced_mask=n_mask,
        replaced_random=n_random,
        kept=masked - n_mask - n_random,
    )


def _choose_tokens(keys: np.ndarray, candidate: np.ndarray, count: np.ndarray, slots: int) -> np.ndarray:
    """The `count[r]` candidate positions of row r with the smallest keys."""
    keys = np.where(candidate, keys, MAX_KEY)
    width = keys.shape[1]
    if slots < width:  # only the smallest `slots` keys can be chosen: partition, then sort just those
        smallest = np.argpartition(keys, slots - 1, axis=1)[:, :slots]
        order = np.take_along_axis(smallest, np.argsort(np.take_along_axis(keys, smallest, 1), axis=1), 1)
    else:
        order = np.argsort(keys, axis=1)
    take = np.arange(order.shape[1])[None, :] < count[:, None]
    chosen = np.zeros(keys.shape, dtype=bool)
    np.put_along_axis(chosen, order, take, axis=1)
    return chosen & candidate


def _choose_words(ids: np.ndarray, keys: np.ndarray, candidate: np.ndarray, count: np.ndarray,
                  vocab: VocabTables) -> np.ndarray:
    """Whole words (a start piece and its '##' continuations) in order of their start's key, while they fit."""
    n, width = ids.shape
    after_candidate = np.zeros_like(candidate)
    after_candidate[:, 1:] = candidate[:, :-1]
    # A continuation piece with no word before it in this row (the row was cut mid-word) starts a word of its own.
    starts = candidate & (~vocab.is_continuation[ids] | ~after_candidate)
    cols = np.arange(width)
    word_start = np.maximum.accumulate(np.where(starts, cols[None, :], 0), axis=1)
    flat_start = (np.arange(n)[:, None] * width + word_start)[candidate]
    word_size = np.bincount(flat_start, minlength=n * width).reshape(n, width)

    start_keys = np.where(starts, keys, MAX_KEY)
    order = np.argsort(start_keys, axis=1)
    sizes = np.take_along_axis(word_size, order, axis=1)
    fits = (np.cumsum(sizes, axis=1) <= count[:, None]) & (np.take_along_axis(start_keys, order, 1) != MAX_KEY)
    chosen_start = np.zeros((n, width), dtype=bool)
    np.put_along_axis(chosen_start, order, fits, axis=1)
    return candidate & np.take_along_axis(chosen_start, word_start, axis=1)


def restore(input_ids: np.ndarray, mlm_positions: np.ndarray, mlm_labels: np.ndarray, pad_id: int) -> np.ndarray:
    """Puts the labels back: the original rows, from masked rows [n, L] and their positions and labels [n, P]."""
    restored = np.array(input_ids, copy=True)
    rows, slots = np.nonzero(mlm_labels != pad_id)
    restored[rows, mlm_positions[rows, slots].astype(np.int64)] = mlm_labels[rows, slots]
    return restored
