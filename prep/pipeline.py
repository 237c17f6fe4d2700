"""`bertprep shard`: documents -> tokens (parallel workers) -> rows -> masks -> shuffled shards and a manifest.

This process only cuts the input into blocks of whole documents (raw bytes); workers decode, read and tokenize the
blocks, and mask blocks of rows. Results are consumed in input order, and every decision that sets bytes (document
numbers, splits, packing, masking, shuffling) follows that order, with every random choice keyed by (seed, split,
copy, document), so the output is the same for any number of workers. Memory is bounded: a few blocks of input in
flight, one block of rows being masked, one shuffle bucket at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from prep.blocks import TextBlock, block_documents, read_blocks
from prep.corpus import input_record, is_validation_text, split_sentences
from prep.errors import BertError
from prep.masking import MaskingConfig, VocabTables, derive_key, mask_rows
from prep.packing import DocumentPool, NSP_MODES, PackStats, PairBuilder, Rows, StreamPacker
from prep.shards import DatasetWriter, ids_dtype, row_dtype
from prep.shuffle import ExternalShuffle
from prep.textio import ReadStats, empty_input_error
from prep.vocab import load_tokenizer, resolve_vocab_file

SHARD_BYTES = 64 << 20  # target size of one shard (all its arrays together)
BLOCK_ROWS = 4096  # rows masked together
WORKER_MIN_BYTES = 2 << 20  # input per default worker
MAX_LEN_RANGE = (8, 4096)
SPLIT_TAGS = {"train": 0, "val": 1}  # part of every row key, so the two splits never share masks


@dataclass(frozen=True)
class ShardConfig:
    """What `bertprep shard` makes; every field but the last three decides the dataset's bytes."""

    inputs: tuple[Path, ...]
    """Training corpora (-i)."""
    vocab: Path
    """Vocabulary directory or vocab.txt (--vocab)."""
    out_dir: Path
    """Dataset directory to write (-o)."""
    max_len: int = 128
    """Tokens per row, [CLS] and [SEP] included (--max-len)."""
    seed: int = 12345
    """Seed every random choice derives from (--seed)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Masked-LM corruption (--mask-prob, --max-predictions, --whole-word)."""
    nsp: bool = False
    """Write sentence pairs with token types and NSP labels (--nsp)."""
    nsp_mode: str = "random"
    """random: B from another document half of the time; swap: A and B swapped half of the time (--nsp-mode)."""
    short_seq_prob: float = 0.1
    """Share of pair rows built to a random shorter length, as BERT does (--short-seq-prob)."""
    dupe_factor: int = 1
    """Differently masked copies of the training rows (--dupe-factor)."""
    val_fraction: float = 0.01
    """Share of documents held out for validation (--val-fraction)."""
    val_inputs: tuple[Path, ...] = ()
    """Explicit validation corpora instead of a held-out share (--val)."""
    rows_per_shard: int = 0
    """Rows per shard file; 0 sizes shards to about 64 MiB (--rows-per-shard)."""
    lowercase: bool | None = None
    """Lowercase and strip accents; None takes the vocabulary's setting (--uncased/--cased)."""
    label: str = ""
    """Dataset label recorded in the manifest (--label)."""
    workers: int = 0
    """Tokenizing processes; 0 = all cores (--workers). Never changes the output."""
    force: bool = False
    """Replace an existing output (--force)."""
    progress: bool = True
    """Show a progress bar on stderr (--quiet turns it off)."""

    def __post_init__(self):
        low, high = MAX_LEN_RANGE
        if not low <= self.max_len <= high:
            raise BertError(f"--max-len must be between {low} and {high}, got {self.max_len}")
        if self.seed < 0:
            raise BertError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.nsp_mode not in NSP_MODES:
            raise BertError(f"--nsp-mode must be one of {', '.join(NSP_MODES)}, got {self.nsp_mode!r}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise BertError(f"--short-seq-prob must be between 0 and 1, got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            raise BertError(f"--dupe-factor must be at least 1, got {self.dupe_factor}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BertError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.masking.max_predictions > self.max_len - 2:
            raise BertError(
                f"--max-predictions {self.masking.max_predictions} exceeds the {self.max_len - 2} maskable "
                f"positions of a {self.max_len}-token row"
            )
        if self.rows_per_shard < 0 or self.workers < 0:
            raise BertError("--rows-per-shard and --workers must not be negative")
        if not self.inputs:
            raise BertError("no input: pass -i FILE, or train a vocabulary with `bertprep vocab -i FILE` first")

    def options(self) -> dict:
        """The options recorded in the manifest: those that decide the output's bytes."""
        return {
            "max_len": self.max_len, "seed": self.seed, **asdict(self.masking), "nsp": self.nsp,
            "nsp_mode": self.nsp_mode if self.nsp else None, "short_seq_prob": self.short_seq_prob if self.nsp else None,
            "dupe_factor": self.dupe_factor, "val_fraction": 0.0 if self.val_inputs else self.val_fraction,
            "rows_per_shard": self.rows_per_shard, "lowercase": self.lowercase, "label": self.label,
        }


@dataclass
class EncodedDocument:
    index: int
    split: str
    tokens: np.ndarray  # the dataset's ids dtype (uint16 for most vocabularies): all sentences concatenated
    sentence_lengths: np.ndarray  # int64 [sentences]

    def sentences(self) -> list[np.ndarray]:
        return np.split(self.tokens, np.cumsum(self.sentence_lengths)[:-1]) if len(self.sentence_lengths) else []


# --- workers -------------------------------------------------------------------------------------------------

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


_worker_tokenizer = None
_worker_tables = None


def _use_tokenizer(tokenizer) -> None:
    """Sets what workers encode and mask with (forked workers inherit it; spawned ones load it in `_init_worker`)."""
    global _worker_tokenizer, _worker_tables
    vocab = tokenizer.vocab
    _worker_tokenizer = tokenizer
    _worker_tables = VocabTables(vocab.is_special, vocab.is_continuation, vocab.special.mask, vocab.special.pad)


def _init_worker(vocab_file: str | None, lowercase: bool | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it terminates workers
    # Workers are the parallelism: the `tokenizers` library's own threads in each would oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if vocab_file is not None:
        _use_tokenizer(load_tokenizer(Path(vocab_file), lowercase))


def _encode_block(block: TextBlock, split: str | None, seed: int, val_fraction: float,
                  sentences: bool) -> tuple[list[EncodedDocument], ReadStats]:
    """Reads the documents of one block of input and tokenizes them, by sentence when pairs need them, else each as
    one text (rows of the stream layout ignore sentence ends); decides each document's split unless `split` is
    given. Their indices are left for the main process to number in input order; returns what reading counted too."""
    stats = ReadStats()
    dtype = ids_dtype(len(_worker_tokenizer.vocab))  # half the bytes on their way back for most vocabularies
    documents = list(block_documents(block, stats))
    doc_texts = ["\n".join(lines) for lines in documents]  # the documents as the validation split hashes them
    texts = ([[s for line in lines for s in split_sentences(line)] for lines in documents] if sentences
             else [[text] for text in doc_texts])
    # One call for the whole block: the `tokenizers` library batches over many texts.
    tokens, lengths = _worker_tokenizer.encode_many([t for doc in texts for t in doc])
    text_ends = np.cumsum([len(doc) for doc in texts], dtype=np.int64).tolist()
    token_ends = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    encoded = []
    for text, doc, end in zip(doc_texts, texts, text_ends):
        start = end - len(doc)
        doc_lengths = lengths[start:end]
        doc_split = split or ("val" if val_fraction and is_validation_text(text, seed, val_fraction) else "train")
        encoded.append(EncodedDocument(-1, doc_split, tokens[token_ends[start]:token_ends[end]].astype(dtype),
                                       doc_lengths[doc_lengths > 0]))
    return encoded, stats


def _mask_block(rows: Rows, keys: np.ndarray, masking: MaskingConfig, record_dtype: np.dtype) -> tuple[np.ndarray, MaskStats]:
    """Masks one block of rows into row records, with what it counted. Runs in a worker: a pure function of its
    arguments and the vocabulary, so where it runs never changes the bytes."""
    vocab = _worker_tokenizer.vocab
    masked = mask_rows(rows.input_ids, keys, masking, _worker_tables)
    records = np.empty(len(rows), dtype=record_dtype)
    records["input_ids"] = masked.input_ids
    records["mlm_positions"] = masked.mlm_positions
    records["mlm_labels"] = masked.mlm_labels
    if rows.token_type_ids is not None:
        records["token_type_ids"] = rows.token_type_ids
        records["nsp_labels"] = rows.nsp_labels
    stats = MaskStats(rows=len(rows), tokens=int((rows.input_ids != vocab.special.pad).sum()), masked=masked.masked,
                      replaced_mask=masked.replaced_mask, replaced_random=masked.replaced_random, kept=masked.kept,
                      unknown=int((rows.input_ids == vocab.special.unk).sum()))
    return records, stats


class _Encoder:
    """Runs `_encode_batch` in worker processes (or here, for one worker), in order, with a bounded queue."""

    def __init__(self, workers: int, tokenizer):
        self.workers = workers
        self.tokenizer = tokenizer
        self.pool = None

    def __enter__(self):
        _use_tokenizer(self.tokenizer)
        if self.workers > 1:
            # fork starts workers in milliseconds, sharing the loaded tokenizer; no thread runs yet, which makes it
            # safe. Where there is no fork, each worker loads the vocabulary itself.
            if "fork" in multiprocessing.get_all_start_methods():
                context, init_args = multiprocessing.get_context("fork"), (None, None)
            else:
                vocab = self.tokenizer.vocab
                context, init_args = multiprocessing.get_context("spawn"), (str(vocab.path), vocab.lowercase)
            self.pool = context.Pool(self.workers, initializer=_init_worker, initargs=init_args)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def submit(self, fn, *args):
        """Runs fn(*args) in a worker (or here); returns an object whose get() gives the result."""
        if self.pool is None:
            return _Done(fn(*args))
        return self.pool.apply_async(fn, args)

    def encode(self, blocks: Iterable[TextBlock], *args) -> Iterator[tuple[list[EncodedDocument], ReadStats]]:
        """`_encode_block` of each block, in order."""
        if self.pool is None:
            for block in blocks:
                yield _encode_block(block, *args)
            return
        pending = deque()
        for block in blocks:
            pending.append(self.pool.apply_async(_encode_block, (block, *args)))
            if len(pending) >= 2 * self.workers:  # bounded: the reader never runs far ahead of the workers
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# --- rows ----------------------------------------------------------------------------------------------------

class SplitBuilder:
    """Packs one split's documents into rows, masks each copy, and hands row records to `sink`."""

    def __init__(self, name: str, config: ShardConfig, special, record_dtype: np.dtype,
                 sink: Callable[[np.ndarray], None], copies: int, submit, in_flight: int):
        self.name, self.config = name, config
        self.record_dtype, self.sink, self.copies = record_dtype, sink, copies
        self.mask_stats = MaskStats()
        self._submit, self._in_flight = submit, in_flight
        self._pending = deque()  # masking tasks, consumed in the order they were made
        ids = (config.max_len, special.cls, special.sep, special.pad)
        if config.nsp:
            self.pool = DocumentPool()
            self.packers = [PairBuilder(config.max_len, config.nsp_mode, config.short_seq_prob, config.seed, copy,
                                        *ids[1:], pool=self.pool) for copy in range(copies)]
        else:
            self.packers = [StreamPacker(*ids)]  # one packing serves every copy; only the masks differ
        self._blocks: list[list[Rows]] = [[] for _ in self.packers]
        self._block_rows = 0

    @property
    def pack_stats(self) -> PackStats:
        return self.packers[0].stats

    def add(self, doc: EncodedDocument) -> None:
        if self.config.nsp:
            sentences = doc.sentences()
            for packer in self.packers:
                packer.add(doc.index, sentences)
            self.pool.add(doc.index, sentences)
        else:
            self.packers[0].add(doc.index, doc.tokens)
            if self.packers[0].pending_rows < BLOCK_ROWS:
                return  # cutting the stream once per block, not per document, keeps numpy's per-call cost low
        self._collect(packer.take() for packer in self.packers)

    def finish(self) -> None:
        self._collect((packer.finish() for packer in self.packers), flush=True)
        self._drain(0)

    def _collect(self, taken: Iterable[Rows | None], flush: bool = False) -> None:
        for block, rows in zip(self._blocks, taken):
            if rows is not None:
                block.append(rows)
        self._block_rows = sum(len(r) for r in self._blocks[0])
        if self._block_rows >= BLOCK_ROWS or (flush and any(self._blocks)):
            for copy, block in enumerate(self._blocks):
                if block:
                    self._emit(_concat_rows(block), copy if self.config.nsp else None)
            self._blocks = [[] for _ in self.packers]

    def _emit(self, rows: Rows, pair_copy: int | None) -> None:
        """Has a block of rows masked (for every copy when the packing is shared) by the workers; their records reach
        the sink in the order the blocks were made."""
        copies = [pair_copy] if pair_copy is not None else range(self.copies)
        for copy in copies:
            keys = derive_key(self.config.seed, SPLIT_TAGS[self.name], copy, rows.doc_index, rows.doc_row)
            self._pending.append(self._submit(_mask_block, rows, keys, self.config.masking, self.record_dtype))
        self._drain(self._in_flight)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            records, stats = self._pending.popleft().get()
            self.sink(records)
            self.mask_stats.add(stats)


def _concat_rows(blocks: list[Rows]) -> Rows:
    if len(blocks) == 1:
        return blocks[0]
    pairs = blocks[0].token_type_ids is not None
    return Rows(
        np.concatenate([b.input_ids for b in blocks]),
        np.concatenate([b.doc_index for b in blocks]),
        np.concatenate([b.doc_row for b in blocks]),
        np.concatenate([b.token_type_ids for b in blocks]) if pairs else None,
        np.concatenate([b.nsp_labels for b in blocks]) if pairs else None,
    )


# --- the job -------------------------------------------------------------------------------------------------

def build_shards(config: ShardConfig) -> dict:
    """Writes the dataset described by `config`; returns the manifest (with a `summary` of the run added)."""
    started = time.monotonic()
    vocab_file = resolve_vocab_file(config.vocab)
    tokenizer = load_tokenizer(vocab_file, config.lowercase)
    vocab = tokenizer.vocab
    special = vocab.special
    if vocab.is_special.all():  # nothing a masked position could be replaced with
        raise BertError(f"vocabulary {vocab_file} has no ordinary tokens")
    record_dtype = row_dtype(config.max_len, config.masking.max_predictions, len(vocab), config.nsp)
    rows_per_shard = config.rows_per_shard or max(1, SHARD_BYTES // record_dtype.itemsize)
    inputs = [input_record(Path(p)) for p in config.inputs]
    val_inputs = [input_record(Path(p)) for p in config.val_inputs]
    total_bytes = sum(_text_bytes(Path(r["path"]), r["bytes"]) for r in inputs + val_inputs)
    # Default: all cores, but no more workers than 2 MB pieces of input: starting one costs about a second.
    workers = config.workers or max(1, min(_cpu_count(), -(-total_bytes // WORKER_MIN_BYTES)))

    read_stats = ReadStats()
    with DatasetWriter(config.out_dir, force=config.force) as writer, \
            _Encoder(workers, tokenizer) as encoder, \
            _Progress(total_bytes, read_stats, config.progress) as progress:
        vocab_name = writer.copy_vocab(vocab_file)
        shuffle = ExternalShuffle(writer.scratch_dir(), record_dtype, config.seed, rows_per_shard)
        val_writer = writer.split_writer("val", rows_per_shard)
        in_flight = 2 * workers
        builders = {
            "train": SplitBuilder("train", config, special, record_dtype, shuffle.append, config.dupe_factor,
                                  encoder.submit, in_flight),
            "val": SplitBuilder("val", config, special, record_dtype, val_writer.append, 1, encoder.submit, in_flight),
        }
        documents = {"train": 0, "val": 0}
        index = 0  # documents are numbered in input order, over all inputs
        sources = [(config.inputs, None)] + ([(config.val_inputs, "val")] if config.val_inputs else [])
        for paths, forced_split in sources:
            first_index = index
            blocks = read_blocks([Path(p) for p in paths], read_stats)
            for encoded, block_stats in encoder.encode(blocks, forced_split or ("train" if config.val_inputs else None),
                                                       config.seed, config.val_fraction, config.nsp):
                read_stats.add(block_stats)
                for doc in encoded:
                    doc.index, index = index, index + 1
                    builders[doc.split].add(doc)
                    documents[doc.split] += 1
                    progress.update(len(doc.tokens))
            if index == first_index:
                raise empty_input_error([Path(p) for p in paths])
        for builder in builders.values():
            builder.finish()
        progress.close()

        train_writer = writer.split_writer("train", rows_per_shard)
        shuffle.drain(train_writer.write_shard)
        val_writer.close()
        if builders["train"].mask_stats.rows == 0:
            raise BertError("no training rows: every document was held out or dropped (check --val-fraction and the input)")

        splits = {}
        for name, split_writer in (("train", train_writer), ("val", val_writer)):
            stats = builders[name].mask_stats
            splits[name] = {"rows": stats.rows, "tokens": stats.tokens, "masked": stats.masked,
                            "copies": config.dupe_factor if name == "train" else 1, "shards": split_writer.shards}
        manifest = {
            "max_len": config.max_len,
            "seed": config.seed,
            "options": config.options(),
            "vocab": {"file": vocab_name, "sha256": vocab.sha256, "size": len(vocab), "lowercase": vocab.lowercase,
                      "special": special.as_dict(), "dtype": ids_dtype(len(vocab)).str},
            "inputs": inputs,
            "val_inputs": val_inputs,
            "stats": _dataset_stats(builders, documents, read_stats, config.max_len),
            "splits": splits,
        }
        writer.finish(manifest)
    seconds = time.monotonic() - started
    tokens = sum(b.mask_stats.tokens for b in builders.values())
    return {**manifest, "summary": {"documents": sum(documents.values()), "seconds": seconds,
                                    "tokens_per_s": tokens / max(seconds, 1e-9), "workers": workers}}


def _dataset_stats(builders: dict[str, SplitBuilder], documents: dict, read_stats: ReadStats, max_len: int) -> dict:
    stats = {"read": read_stats.as_dict(), "documents": documents, "splits": {}}
    for name, builder in builders.items():
        m, pack = builder.mask_stats, builder.pack_stats.as_dict()
        slots = m.rows * max_len
        stats["splits"][name] = {
            **pack,
            "padding_share": (slots - m.tokens) / slots if slots else 0.0,
            "masked_per_row": m.masked / m.rows if m.rows else 0.0,
            "mask_actions": {"mask": m.replaced_mask, "random": m.replaced_random, "keep": m.kept},
            "unknown_token_rate": m.unknown / m.tokens if m.tokens else 0.0,
        }
    return stats


def _text_bytes(path: Path, file_bytes: int) -> int:
    """The decompressed size of an input, for the progress bar and the worker count: a .zst frame header tells it
    when the compressor recorded it; otherwise assume text compresses about 4×."""
    if path.suffix != ".zst":
        return file_bytes
    import zstandard

    with open(path, "rb") as f:
        header = f.read(18)
    try:
        size = zstandard.get_frame_parameters(header).content_size
    except zstandard.ZstdError:
        size = zstandard.CONTENTSIZE_UNKNOWN
    return 4 * file_bytes if size == zstandard.CONTENTSIZE_UNKNOWN else max(size, file_bytes)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Progress:
    """A tqdm bar over input bytes with tokens/s, on stderr; silent when disabled."""

    def __init__(self, total_bytes: int, read_stats: ReadStats, enabled: bool):
        self.read_stats, self.enabled = read_stats, enabled
        self.tokens, self.started, self.shown, self.bar = 0, time.monotonic(), 0.0, None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="shard", dynamic_ncols=True,
                            mininterval=0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        now = time.monotonic()
        done = min(self.read_stats.bytes, self.bar.total or self.read_stats.bytes)
        if done > self.bar.n or now - self.shown >= 0.5:
            self.shown = now
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.started, 1e-9) / 1e3:,.0f}k tok/s", refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
