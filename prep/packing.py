"""Turning tokenized documents into fixed-length rows (before masking).

Two layouts:
- `pack_stream` (the default, as RoBERTa's FULL-SENTENCES): documents follow each other, joined by [SEP], and the
  stream is cut into rows of exactly `max_len`: `[CLS] <max_len - 2 tokens> [SEP]`. No token is lost, only the
  final row of a run of documents (one split of one range of input) is padded, and reading the rows back in order
  gives the stream again.
- `PairBuilder` (--nsp): BERT's sentence pairs `[CLS] A [SEP] B [SEP]` built per document as Google's original data
  generator does, with B from another document half of the time (`random`), or A and B swapped half of the time
  (`swap`, ALBERT's sentence-order task).

Each row carries the key parts (document, row within that document) its random choices derive from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from prep.masking import derive_key

NSP_MODES = ("random", "swap")
_TAG_PAIRS = 0x7041


@dataclass
class Rows:
    """A block of unmasked rows and where each comes from."""

    input_ids: np.ndarray  # [n, max_len] of the tokens' dtype, padded with the pad id
    doc_index: np.ndarray  # int64 [n]: the document the row starts in
    doc_row: np.ndarray  # int64 [n]: the row's number among the rows starting in that document
    token_type_ids: np.ndarray | None = None  # uint8 [n, max_len] (pairs only)
    nsp_labels: np.ndarray | None = None  # uint8 [n]: 0 = B follows A, 1 = B random or swapped

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackStats:
    """What packing did to the documents, by reason; reported in the manifest."""

    documents: int = 0
    rows: int = 0
    tokens: int = 0  # real tokens in rows, [CLS]/[SEP] included, padding not
    padding: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> documents
    truncated_tokens: int = 0  # tokens cut to make a pair fit
    truncated_documents: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def add(self, other: "PackStats") -> None:
        for name in ("documents", "rows", "tokens", "padding", "truncated_tokens", "truncated_documents"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def as_dict(self) -> dict:
        return {
            "documents": self.documents, "rows": self.rows, "tokens": self.tokens, "padding": self.padding,
            "dropped": dict(sorted(self.dropped.items())), "truncated_tokens": self.truncated_tokens,
            "truncated_documents": self.truncated_documents,
        }


def pack_stream(tokens: np.ndarray, lengths: np.ndarray, doc_index: np.ndarray, max_len: int, cls_id: int,
                sep_id: int, pad_id: int) -> tuple[Rows, PackStats]:
    """The stream layout of a run of documents: their tokens (concatenated, `lengths` per document, in order) joined
    by one [SEP] and cut into rows `[CLS] <max_len - 2 tokens> [SEP]`, the last row padded (its [SEP] follows its
    last token). Each row carries the document its first stream token belongs to (a joining [SEP] belongs to the
    document after it) and its number among the rows starting there. Empty documents are dropped and counted."""
    stats = PackStats(documents=len(lengths))
    kept = lengths > 0
    if not kept.all():
        stats.dropped["empty"] = int((~kept).sum())
    lengths, doc_index = lengths[kept], doc_index[kept]
    content = max_len - 2
    if not len(lengths):
        return Rows(np.zeros((0, max_len), tokens.dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)), stats
    # Document d's piece of the stream is its [SEP] (none before the first) and its tokens.
    piece_lengths = lengths + 1
    piece_lengths[0] -= 1
    piece_starts = np.concatenate([[0], np.cumsum(piece_lengths)[:-1]])
    used = int(piece_lengths.sum())
    rows = -(-used // content)
    body = np.full(rows * content, pad_id, dtype=tokens.dtype)
    is_token = np.ones(used, dtype=bool)
    is_token[piece_starts[1:]] = False  # where the joining [SEP]s go
    body[:used][is_token] = tokens
    body[piece_starts[1:]] = sep_id
    ids = np.empty((rows, max_len), dtype=tokens.dtype)
    ids[:, 0] = cls_id
    ids[:, 1:-1] = body.reshape(rows, content)
    ids[:, -1] = sep_id
    padded = rows * content - used
    if padded:
        real = content - padded
        ids[-1, 1 + real] = sep_id
        ids[-1, 2 + real :] = pad_id
    row_piece = np.searchsorted(piece_starts, np.arange(rows) * content, side="right") - 1
    first_of_doc = np.ones(rows, dtype=bool)
    first_of_doc[1:] = row_piece[1:] != row_piece[:-1]
    run_start = np.maximum.accumulate(np.where(first_of_doc, np.arange(rows), 0))
    stats.rows, stats.tokens, stats.padding = rows, rows * max_len - padded, padded
    return Rows(ids, doc_index[row_piece].astype(np.int64), np.arange(rows) - run_start), stats


class PairBuilder:
    """BERT's sentence-pair rows for one (split, copy): `[CLS] A [SEP] B [SEP]`, padded to max_len.

    Documents whose B would come from another document draw it from `pool`, a bounded window of recent documents
    of the same split that all copies share, so memory stays bounded and every choice is a function of
    (seed, copy, document).
    """

    def __init__(self, max_len: int, mode: str, short_seq_prob: float, seed: int, copy: int,
                 cls_id: int, sep_id: int, pad_id: int, pool: "DocumentPool"):
        if mode not in NSP_MODES:
            raise ValueError(f"--nsp-mode must be one of {', '.join(NSP_MODES)}, got {mode!r}")
        self.max_len, self.mode, self.short_seq_prob = max_len, mode, short_seq_prob
        self.seed, self.copy = seed, copy
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.pool = pool
        self.stats = PackStats()
        self._rows: list[tuple[np.ndarray, np.ndarray, int, int, int]] = []

    def add(self, doc_index: int, sentences: list[np.ndarray]) -> None:
        """Builds the pairs of one document (its sentences as token arrays)."""
        self.stats.documents += 1
        sentences = [s for s in sentences if len(s)]
        if not sentences:
            self.stats.drop("empty")
            return
        rng = np.random.default_rng(derive_key(self.seed, _TAG_PAIRS, self.copy, doc_index).tolist())
        max_tokens = self.max_len - 3
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        made, truncated = 0, 0
        chunk: list[np.ndarray] = []
        chunk_len = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            chunk_len += len(sentences[i])
            if i == len(sentences) - 1 or chunk_len >= target:
                pair = self._pair(chunk, target, rng)
                if pair is not None:
                    first, second, label, unused = pair
                    i -= unused  # sentences not used because B came from elsewhere start the next chunk
                    first, second, cut = _truncate_pair(first, second, max_tokens, rng)
                    truncated += cut
                    self._rows.append((first, second, label, doc_index, made))
                    made += 1
                chunk, chunk_len = [], 0
            i += 1
        if made == 0:
            self.stats.drop("too_short_for_pair")
        if truncated:
            self.stats.truncated_tokens += truncated
            self.stats.truncated_documents += 1

    def _pair(self, chunk: list[np.ndarray], target: int, rng):
        """(A, B, nsp label, sentences of the chunk left unused) or None if the chunk cannot make a pair.

        Unlike Google's generator, which always draws a random B for a one-sentence chunk (so more than half of its
        labels say "random"), a one-sentence chunk here is cut in two for the in-order case: labels stay 50/50.
        """
        split = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        first, unused = np.concatenate(chunk[:split]), len(chunk) - split
        if self.mode == "random" and rng.random() < 0.5:
            other = self.pool.pick(rng)
            if other is not None:
                start = int(rng.integers(0, len(other)))
                second = np.concatenate(other[start:])[: max(1, target - len(first))]
                return first, second, 1, unused  # the unused sentences start the next chunk
        if unused:
            second = np.concatenate(chunk[split:])
        elif len(first) >= 2:
            cut = int(rng.integers(1, len(first)))
            first, second = first[:cut], first[cut:]
        else:
            return None
        if self.mode == "swap" and rng.random() < 0.5:
            return second, first, 1, 0
        return first, second, 0, 0

    def take(self) -> Rows | None:
        if not self._rows:
            return None
        n = len(self._rows)
        ids = np.full((n, self.max_len), self.pad_id, dtype=np.int32)
        types = np.zeros((n, self.max_len), dtype=np.uint8)
        labels = np.empty(n, dtype=np.uint8)
        doc_index = np.empty(n, dtype=np.int64)
        doc_row = np.empty(n, dtype=np.int64)
        for r, (first, second, label, doc, number) in enumerate(self._rows):
            a, b = len(first), len(second)
            row = ids[r]
            row[0] = self.cls_id
            row[1 : 1 + a] = first
            row[1 + a] = self.sep_id
            row[2 + a : 2 + a + b] = second
            row[2 + a + b] = self.sep_id
            types[r, 2 + a : 3 + a + b] = 1
            labels[r], doc_index[r], doc_row[r] = label, doc, number
            self.stats.tokens += a + b + 3
            self.stats.padding += self.max_len - (a + b + 3)
        self.stats.rows += n
        self._rows = []
        return Rows(ids, doc_index, doc_row, types, labels)

    finish = take


def _truncate_pair(first: np.ndarray, second: np.ndarray, max_tokens: int, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """Shortens A and B to fit in max_tokens as BERT does, token by token from the longer side (B on a tie), each
    token from the front or the back at random; computed in closed form rather than one token at a time."""
    a, b = len(first), len(second)
    if a + b <= max_tokens:
        return first, second, 0
    shorter = min(a, b)
    if 2 * shorter <= max_tokens:  # only the longer side is cut
        keep_a, keep_b = (max_tokens - b, b) if a > b else (a, max_tokens - a)
    else:  # both are cut down to halves
        keep_a, keep_b = (max_tokens + 1) // 2, max_tokens // 2
    return _cut_ends(first, keep_a, rng), _cut_ends(second, keep_b, rng), a + b - keep_a - keep_b


def _cut_ends(tokens: np.ndarray, keep: int, rng) -> np.ndarray:
    cut = len(tokens) - keep
    front = int(rng.binomial(cut, 0.5)) if cut else 0
    return tokens[front : front + keep]


class DocumentPool:
    """A bounded window of recent documents' sentences, from which a random B is drawn."""

    def __init__(self, max_tokens: int = 2_000_000):
        self.max_tokens = max_tokens
        self._docs: deque[tuple[int, list[np.ndarray], int]] = deque()
        self._tokens = 0

    def add(self, doc_index: int, sentences: list[np.ndarray]) -> None:
        sentences = [s for s in sentences if len(s)]
        if not sentences:
            return
        size = sum(len(s) for s in sentences)
        self._docs.append((doc_index, sentences, size))
        self._tokens += size
        while self._tokens > self.max_tokens and len(self._docs) > 1:
            self._tokens -= self._docs.popleft()[2]

    def pick(self, rng) -> list[np.ndarray] | None:
        """The sentences of a random document in the window, or None while it is empty. The caller adds a document
        only after building its own pairs, so the pick is always another document."""
        if not self._docs:
            return None
        return self._docs[int(rng.integers(0, len(self._docs)))][1]
