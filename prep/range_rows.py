"""What a worker makes of one range of input: documents -> tokens -> rows -> masked row records, in its own spool.

A range's rows are a function of its text, its id and the job's options alone, never of the worker that makes them:
documents are numbered within their range (id `range << DOCUMENT_BITS | number`), and that id with the seed, the
split and the copy keys every random choice (the pairs of --nsp, the masks). Only counts go back to the main process.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prep.blocks import TextBlock
from prep.corpus import is_validation_text, split_sentences
from prep.masking import MaskingConfig, VocabTables, derive_key, mask_rows
from prep.packing import DocumentPool, PackStats, PairBuilder, Rows, pack_stream
from prep.ranges import RangeRun, range_documents, read_run
from prep.shards import ids_dtype
from prep.spool import Piece, SpoolWriter
from prep.textio import ReadStats
from prep.vocab import load_tokenizer

SPLITS = ("train", "val")
SPLIT_TAGS = {"train": 0, "val": 1}  # part of every row key, so the two splits never share masks
MASK_BLOCK_ROWS = 4096  # rows masked together: numpy's per-call cost is paid per block, memory stays bounded
DOCUMENT_BITS = 32


@dataclass(frozen=True)
class RangeJob:
    """What every range of one source (the inputs, or the --val inputs) is made with; the tokenizer is the
    worker's."""

    scratch_dir: str
    range_bytes: int
    record_dtype: np.dtype
    max_len: int
    seed: int
    masking: MaskingConfig
    copies: int  # differently masked copies of the training rows (--dupe-factor)
    val_fraction: float
    split: str | None  # the split of every document, or None to draw it per document
    nsp: bool = False
    nsp_mode: str = "random"
    short_seq_prob: float = 0.1


@dataclass
class MaskStats:
    rows: int = 0
    tokens: int = 0
    masked: int = 0
    replaced_mask: int = 0
    replaced_random: int = 0
    kept: int = 0
    unknown: int = 0

    def add(self, other: "MaskStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SplitPart:
    """What one range gave one split: counts, and where its row records are (all copies, copy after copy)."""

    documents: int = 0
    pack: PackStats = field(default_factory=PackStats)
    mask: MaskStats = field(default_factory=MaskStats)
    piece: Piece | None = None


@dataclass
class RangeResult:
    range_id: int
    read: ReadStats
    parts: dict[str, SplitPart]


_tokenizer = None
_tables = None


def use_tokenizer(tokenizer) -> None:
    """Sets what this process encodes and masks with (forked workers inherit it; spawned ones load it in
    `init_worker`)."""
    global _tokenizer, _tables
    vocab = tokenizer.vocab
    _tokenizer = tokenizer
    _tables = VocabTables(vocab.is_special, vocab.is_continuation, vocab.special.mask, vocab.special.pad)


def init_worker(vocab_file: str | None, lowercase: bool | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it terminates workers
    # Workers are the parallelism: the `tokenizers` library's own threads in each would oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if vocab_file is not None:
        use_tokenizer(load_tokenizer(Path(vocab_file), lowercase))


def make_run(run: RangeRun, job: RangeJob) -> list[RangeResult]:
    """Makes the rows of every range of `run` into this process's spools; returns what each range counted."""
    with SpoolWriter(Path(job.scratch_dir), "train", job.record_dtype) as train, \
            SpoolWriter(Path(job.scratch_dir), "val", job.record_dtype) as val:
        spools = {"train": train, "val": val}
        return [make_range(range_id, block, job, spools) for range_id, block in read_run(run, job.range_bytes)]


def make_range(range_id: int, block: TextBlock, job: RangeJob, spools: dict[str, SpoolWriter]) -> RangeResult:
    """Reads, encodes, packs and masks one range; its rows go to `spools`."""
    read = ReadStats(bytes=len(block.data))
    documents = range_documents(block, read)
    texts = ["\n".join(lines) for lines in documents]  # the documents as the validation split hashes them
    if job.split is not None:
        is_val = np.full(len(texts), job.split == "val")
    else:
        is_val = np.fromiter((bool(job.val_fraction) and is_validation_text(text, job.seed, job.val_fraction)
                              for text in texts), dtype=bool, count=len(texts))
    doc_ids = (range_id << DOCUMENT_BITS) + np.arange(len(texts), dtype=np.int64)
    dtype = ids_dtype(len(_tokenizer.vocab))
    if job.nsp:
        sentences = [[s for line in lines for s in split_sentences(line)] for lines in documents]
        # One call for the whole range: the `tokenizers` library batches over many texts.
        tokens, lengths = _tokenizer.encode_many([s for doc in sentences for s in doc])
        sentence_counts = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    else:
        tokens, lengths = _tokenizer.encode_many(texts)
        sentence_counts = np.ones(len(texts), dtype=np.int64)
    tokens = tokens.astype(dtype)
    parts = {}
    for split in SPLITS:
        chosen = is_val if split == "val" else ~is_val
        copies = job.copies if split == "train" else 1
        if job.nsp:
            by_copy, pack = _pair_rows(job, copies, tokens, lengths, sentence_counts, chosen, doc_ids)
        else:
            rows, pack = pack_stream(tokens[np.repeat(chosen, lengths)], lengths[chosen], doc_ids[chosen],
                                     job.max_len, *_special_ids())
            by_copy = [rows] * copies  # one packing serves every copy; only the masks differ
        spool, first_row, mask = spools[split], spools[split].rows, MaskStats()
        for copy, rows in enumerate(by_copy):
            mask.add(_mask_into(spool, rows, split, copy, job))
        piece = Piece(spool.name, first_row, spool.rows - first_row) if spool.rows > first_row else None
        parts[split] = SplitPart(int(chosen.sum()), pack, mask, piece)
    return RangeResult(range_id, read, parts)


def _special_ids() -> tuple[int, int, int]:
    special = _tokenizer.vocab.special
    return special.cls, special.sep, special.pad


def _pair_rows(job: RangeJob, copies: int, tokens: np.ndarray, lengths: np.ndarray, sentence_counts: np.ndarray,
               chosen: np.ndarray, doc_ids: np.ndarray) -> tuple[list[Rows], PackStats]:
    """BERT's sentence pairs of the chosen documents, one set of rows per copy (each copy pairs differently); a B
    from another document comes from an earlier document of the same range and split."""
    sentence_ends = np.cumsum(sentence_counts)
    token_ends = np.concatenate([[0], np.cumsum(lengths)])
    pool = DocumentPool()
    builders = [PairBuilder(job.max_len, job.nsp_mode, job.short_seq_prob, job.seed, copy, *_special_ids(), pool=pool)
                for copy in range(copies)]
    for doc in np.flatnonzero(chosen).tolist():
        first, last = int(sentence_ends[doc] - sentence_counts[doc]), int(sentence_ends[doc])
        doc_tokens = tokens[token_ends[first] : token_ends[last]]
        doc_lengths = lengths[first:last]
        sentences = np.split(doc_tokens, np.cumsum(doc_lengths)[:-1]) if last > first else []
        for builder in builders:
            builder.add(int(doc_ids[doc]), sentences)
        pool.add(int(doc_ids[doc]), sentences)
    taken = [builder.take() for builder in builders]
    return [rows if rows is not None else _no_rows(job.max_len) for rows in taken], builders[0].stats


def _no_rows(max_len: int) -> Rows:
    return Rows(np.zeros((0, max_len), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                np.zeros((0, max_len), np.uint8), np.zeros(0, np.uint8))


def _mask_into(spool: SpoolWriter, rows: Rows, split: str, copy: int, job: RangeJob) -> MaskStats:
    """Masks copy `copy` of `rows` block by block into row records appended to `spool`; returns what it counted."""
    stats = MaskStats()
    special = _tokenizer.vocab.special
    for start in range(0, len(rows), MASK_BLOCK_ROWS):
        block = slice(start, start + MASK_BLOCK_ROWS)
        ids = rows.input_ids[block]
        keys = derive_key(job.seed, SPLIT_TAGS[split], copy, rows.doc_index[block], rows.doc_row[block])
        masked = mask_rows(ids, keys, job.masking, _tables)
        records = np.empty(len(ids), dtype=job.record_dtype)
        records["input_ids"] = masked.input_ids
        records["mlm_positions"] = masked.mlm_positions
        records["mlm_labels"] = masked.mlm_labels
        if rows.token_type_ids is not None:
            records["token_type_ids"] = rows.token_type_ids[block]
            records["nsp_labels"] = rows.nsp_labels[block]
        spool.write(records)
        stats.add(MaskStats(rows=len(ids), tokens=int((ids != special.pad).sum()), masked=masked.masked,
                            replaced_mask=masked.replaced_mask, replaced_random=masked.replaced_random,
                            kept=masked.kept, unknown=int((ids == special.unk).sum())))
    return stats
