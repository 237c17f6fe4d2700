"""Dynamic masking on the device: restore the shard's original tokens, then mask them afresh every step.

The shards hold one masking per row (per `--dupe-factor` copy); `--masking dynamic` gives RoBERTa's fresh masks each
step instead, from the same rows and at no CPU cost. The rules are those of `prep.masking`: ordinary tokens only
(never a special token), and of the chosen positions 80% become [MASK], 10% a random ordinary token and 10% stay;
whole words when the shards were made with --whole-word. At the shards' own rate each row keeps the number of
predictions its shard masking had, in the shards' slot width; `--mask-prob P` instead gives each row the count
`prep.masking.mask_rows` gives at rate P, in ceil(max_len × P) slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prep.masking import REPLACE_WITH_MASK, REPLACE_WITH_RANDOM, MaskingConfig

MASKING_MODES = ("static", "dynamic")
_NEVER = 2.0  # a sort key above every uniform draw: the position is never chosen


@dataclass(frozen=True)
class DeviceMaskTables:
    """What re-masking needs to know about the vocabulary, as tensors on the training device."""

    is_special: torch.Tensor
    """bool [vocab]: never chosen, never a random replacement."""
    is_continuation: torch.Tensor
    """bool [vocab]: a '##' piece that belongs to the word before it."""
    ordinary_ids: torch.Tensor
    """int64 [n]: the ids a random replacement is drawn from."""
    mask_id: int
    """Id of [MASK]."""
    pad_id: int
    """Id of [PAD]; also the label of an unused prediction slot."""
    whole_word: bool = False
    """Choose whole words, as the shards' --whole-word did."""
    mask_prob: float | None = None
    """Share of a row's ordinary tokens to mask (--mask-prob); None keeps each row's count and slots of the shards."""

    @classmethod
    def build(cls, is_special: np.ndarray, is_continuation: np.ndarray, mask_id: int, pad_id: int,
              whole_word: bool, device: torch.device, mask_prob: float | None = None) -> "DeviceMaskTables":
        """Tables on `device` from the vocabulary's bool [vocab] lookups; `mask_prob` in (0, 1) or None."""
        if mask_prob is not None and not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be between 0 and 1 (exclusive) or None, got {mask_prob}")
        special = torch.as_tensor(np.asarray(is_special, dtype=bool), device=device)
        return cls(
            is_special=special,
            is_continuation=torch.as_tensor(np.asarray(is_continuation, dtype=bool), device=device),
            ordinary_ids=torch.nonzero(~special).flatten(),
            mask_id=int(mask_id),
            pad_id=int(pad_id),
            whole_word=whole_word,
            mask_prob=None if mask_prob is None else float(mask_prob),
        )

    def prediction_slots(self, max_len: int, shard_slots: int) -> int:
        """Width P' of the re-masked `mlm_positions`/`mlm_labels`: the shards' own `shard_slots` at their rate,
        else ceil(max_len × mask_prob), the offline masker's default --max-predictions at that rate."""
        if self.mask_prob is None:
            return shard_slots
        return MaskingConfig.default_max_predictions(max_len, self.mask_prob)


def restore(input_ids: torch.Tensor, mlm_positions: torch.Tensor, mlm_labels: torch.Tensor,
            pad_id: int) -> torch.Tensor:
    """The original rows [B, L]: each used slot's label put back at its position (unused slots hold the pad id)."""
    used = mlm_labels != pad_id
    # Unused slots point at position 0 ([CLS]) and would write the pad id there: write [CLS] back instead.
    labels = torch.where(used, mlm_labels, torch.gather(input_ids, 1, mlm_positions))
    return input_ids.scatter(1, mlm_positions, labels)


def mask_draws(rows: int, width: int, tables: DeviceMaskTables, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random numbers that re-mask `rows` rows of `width` tokens: draw them once for a step's global batch and
    give each micro-batch its rows, so the masks of a row do not depend on how the batch is split.

    `width` is the row length L (not the slot count, so the draws are the same at any --mask-prob): float32 `keys`
    and `action` in [0, 1) and int64 `pick` (an index into `tables.ordinary_ids`), each [rows, L] on the tables'
    device, drawn in that order from `generator`."""
    device = tables.is_special.device
    return {
        "keys": torch.rand((rows, width), generator=generator, device=device),
        "action": torch.rand((rows, width), generator=generator, device=device),
        "pick": torch.randint(len(tables.ordinary_ids), (rows, width), generator=generator, device=device),
    }


def remask(batch: dict[str, torch.Tensor], tables: DeviceMaskTables, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `batch` with `input_ids`, `mlm_positions` and `mlm_labels` replaced by a fresh masking of the
    same rows; the other entries are passed through. `draws` holds this batch's rows of `mask_draws`.

    In: int64 tensors on the device, `input_ids` [B, L] and the shard's `mlm_positions`/`mlm_labels` [B, P].
    Out: int64 `input_ids` [B, L], `mlm_positions` and `mlm_labels` [B, P'] with P' = `tables.prediction_slots(L,
    P)`; used slots first, positions ascending, then unused slots (position 0, label the pad id) as in the format.
    A row gets as many predictions as its shard masking had when `tables.mask_prob` is None; else, with c ordinary
    tokens, min(P', max(1, round(c × mask_prob))), none when c = 0 (whole words take up to that many).
    """
    ids = restore(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"], tables.pad_id)
    slots = tables.prediction_slots(ids.shape[1], batch["mlm_positions"].shape[1])
    device = ids.device
    candidate = ~tables.is_special[ids]
    candidates = candidate.sum(1)
    if tables.mask_prob is None:
        count = torch.minimum((batch["mlm_labels"] != tables.pad_id).sum(1), candidates)
    else:
        # float64 and round-half-to-even, as prep.masking's np.rint: the same count as the offline masker.
        target = torch.round(candidates.double() * tables.mask_prob).long().clamp(min=1, max=slots)
        count = torch.where(candidates > 0, target, torch.zeros_like(target))

    if tables.whole_word:
        chosen = _choose_words(ids, draws["keys"], candidate, count, tables)
    else:
        chosen = _choose_tokens(draws["keys"], candidate, count, slots)

    action = draws["action"]
    to_mask = chosen & (action < REPLACE_WITH_MASK)
    to_random = chosen & (action >= REPLACE_WITH_MASK) & (action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    corrupted = torch.where(to_mask, torch.full_like(ids, tables.mask_id), ids)
    corrupted = torch.where(to_random, tables.ordinary_ids[draws["pick"]], corrupted)

    # Chosen positions ascending, then unused slots (position 0, label pad) as in the shards.
    positions = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
    used = torch.arange(slots, device=device)[None, :] < chosen.sum(1, keepdim=True)
    positions = torch.where(used, positions, torch.zeros_like(positions))
    labels = torch.where(used, torch.gather(ids, 1, positions), torch.full_like(positions, tables.pad_id))
    return {**batch, "input_ids": corrupted, "mlm_positions": positions, "mlm_labels": labels}


def _choose_tokens(keys: torch.Tensor, candidate: torch.Tensor, count: torch.Tensor, slots: int) -> torch.Tensor:
    """bool [B, L]: the count[r] candidate positions of row r with the smallest keys."""
    keys = torch.where(candidate, keys, torch.full_like(keys, _NEVER))
    smallest = torch.topk(keys, min(slots, keys.shape[1]), dim=1, largest=False).indices
    take = torch.arange(smallest.shape[1], device=keys.device)[None, :] < count[:, None]
    chosen = torch.zeros_like(candidate).scatter(1, smallest, take)
    return chosen & candidate


def _choose_words(ids: torch.Tensor, keys: torch.Tensor, candidate: torch.Tensor, count: torch.Tensor,
                  tables: DeviceMaskTables) -> torch.Tensor:
    """bool [B, L]: whole words in the order of their first piece's key, while they fit in count[r]."""
    rows, width = ids.shape
    after_candidate = torch.zeros_like(candidate)
    after_candidate[:, 1:] = candidate[:, :-1]
    starts = candidate & (~tables.is_continuation[ids] | ~after_candidate)
    cols = torch.arange(width, device=ids.device).expand(rows, width)
    word_start = torch.cummax(torch.where(starts, cols, torch.zeros_like(cols)), dim=1).values
    word_size = torch.zeros_like(ids).scatter_add(1, word_start, candidate.long())
    start_keys = torch.where(starts, keys, torch.full_like(keys, _NEVER))
    order = torch.argsort(start_keys, dim=1)
    sizes = torch.gather(word_size, 1, order)
    fits = (torch.cumsum(sizes, 1) <= count[:, None]) & (torch.gather(start_keys, 1, order) < _NEVER)
    chosen_start = torch.zeros_like(candidate).scatter(1, order, fits)
    return candidate & torch.gather(chosen_start, 1, word_start)
