"""What is inside a dataset: rows decoded with their masks and targets, and statistics measured from the shards."""

from __future__ import annotations

import numpy as np

from prep.masking import restore
from prep.shards import Dataset

STATS_MAX_ROWS = 200_000  # statistics are measured on at most this many rows, spread over the split


def row_view(dataset: Dataset, tokens: list[str], split: str, index: int) -> dict:
    """One row as lists of token strings: what the model sees, what it must predict, and where."""
    row = dataset.split(split).slice(index, index + 1)
    pad = dataset.vocab["special"]["pad"]
    input_ids = row["input_ids"][0].astype(np.int64)
    labels = row["mlm_labels"][0].astype(np.int64)
    used = labels != pad
    positions = row["mlm_positions"][0][used].astype(np.int64)
    target_ids = input_ids.copy()
    target_ids[positions] = labels[used]
    length = int(np.flatnonzero(input_ids != pad).max()) + 1 if (input_ids != pad).any() else 0
    view = {
        "split": split,
        "row": index,
        "length": length,
        "input_tokens": [tokens[i] for i in input_ids[:length]],
        "target_tokens": [tokens[i] for i in target_ids[:length]],
        "masked_positions": positions.tolist(),
    }
    if "token_type_ids" in row:
        view["token_type_ids"] = row["token_type_ids"][0][:length].tolist()
        view["nsp_label"] = int(row["nsp_labels"][0])
    return view


def format_row(view: dict, color: bool) -> str:
    """`Input Tokens: [CLS]|the|[MASK]|…` over `Target Tokens: …`, masked positions highlighted when `color`."""
    masked = set(view["masked_positions"])

    def line(tokens: list[str], style: str) -> str:
        shown = [_highlight(t, style) if color and i in masked else t for i, t in enumerate(tokens)]
        return "|".join(shown)

    header = f"{view['split']} row {view['row']}: {view['length']} tokens, {len(masked)} masked"
    if "nsp_label" in view:
        header += f", nsp_label {view['nsp_label']} ({'B random or swapped' if view['nsp_label'] else 'B follows A'})"
    return "\n".join([
        header,
        "Input Tokens:  " + line(view["input_tokens"], "input"),
        "Target Tokens: " + line(view["target_tokens"], "target"),
        "Masked Positions: " + " ".join(map(str, view["masked_positions"])),
    ])


def _highlight(token: str, style: str) -> str:
    code = "\x1b[1;37;41m" if style == "input" else "\x1b[1;30;42m"
    return f"{code}{token}\x1b[0m"


def split_stats(dataset: Dataset, tokens: list[str], split: str, top: int = 20) -> dict:
    """Statistics measured from the arrays themselves (not copied from the manifest): rows, tokens, padding,
    masked share, the realised [MASK]/random/keep split, the most frequent tokens and the NSP balance."""
    data = dataset.split(split)
    special = dataset.vocab["special"]
    pad, mask_id = special["pad"], special["mask"]
    rows = data.rows
    sample = _sample_ranges(rows, STATS_MAX_ROWS)
    real = slots = masked = to_mask = kept = nsp_random = 0
    frequencies = np.zeros(len(tokens), dtype=np.int64)
    for start, stop in sample:
        part = data.slice(start, stop)
        ids, positions, labels = part["input_ids"], part["mlm_positions"], part["mlm_labels"]
        real_mask = ids != pad
        real += int(real_mask.sum())
        slots += ids.size
        used = labels != pad
        at_positions = np.take_along_axis(ids, positions.astype(np.int64), axis=1)[used]
        masked += int(used.sum())
        to_mask += int((at_positions == mask_id).sum())
        kept += int((at_positions == labels[used]).sum())
        original = restore(ids, positions, labels, pad)
        frequencies += np.bincount(original[real_mask].astype(np.int64), minlength=len(tokens))
        if "nsp_labels" in part:
            nsp_random += int(part["nsp_labels"].sum())
    sampled_rows = sum(stop - start for start, stop in sample)
    special_ids = set(special.values())
    ranked = [i for i in np.argsort(-frequencies, kind="stable") if i not in special_ids][:top]
    stats = {
        "split": split,
        "rows": rows,
        "rows_measured": sampled_rows,
        "tokens": real,
        "padding_share": 1 - real / slots if slots else 0.0,
        "masked_per_row": masked / sampled_rows if sampled_rows else 0.0,
        "masked_share": masked / real if real else 0.0,
        "replaced_by_mask": to_mask / masked if masked else 0.0,
        "replaced_by_random": (masked - to_mask - kept) / masked if masked else 0.0,
        "kept": kept / masked if masked else 0.0,
        "top_tokens": [[tokens[i], int(frequencies[i])] for i in ranked],
    }
    if dataset.has_nsp:
        stats["nsp_random_share"] = nsp_random / sampled_rows if sampled_rows else 0.0
    return stats


def _sample_ranges(rows: int, limit: int, pieces: int = 64) -> list[tuple[int, int]]:
    """Contiguous ranges covering all rows, or `pieces` evenly spread ranges of `limit` rows in all."""
    if rows <= limit:
        return [(start, min(start + 65536, rows)) for start in range(0, rows, 65536)]
    width = limit // pieces
    starts = np.linspace(0, rows - width, pieces).astype(np.int64)
    return [(int(s), int(s) + width) for s in starts]


def format_stats(stats: dict) -> str:
    lines = [
        f"split {stats['split']}: {stats['rows']:,} rows"
        + (f" ({stats['rows_measured']:,} measured)" if stats["rows_measured"] < stats["rows"] else ""),
        f"  tokens          {stats['tokens']:,} (padding {stats['padding_share']:.2%})",
        f"  masked          {stats['masked_per_row']:.2f} per row, {stats['masked_share']:.2%} of tokens",
        f"  masked as       [MASK] {stats['replaced_by_mask']:.1%}, random {stats['replaced_by_random']:.1%}, "
        f"kept {stats['kept']:.1%}",
    ]
    if "nsp_random_share" in stats:
        lines.append(f"  nsp             {stats['nsp_random_share']:.1%} random/swapped B")
    lines.append("  top tokens      " + ", ".join(f"{t} {c:,}" for t, c in stats["top_tokens"][:10]))
    return "\n".join(lines)
