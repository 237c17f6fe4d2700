"""`bertprep shard`: documents -> tokens -> rows -> masks -> shuffled shards and a manifest, made by workers.

The inputs are cut into ranges of `range_bytes` of text at document starts (`prep.ranges`). In a first pass each
worker takes whole ranges: it reads them itself, then decodes, tokenizes, packs and masks them and appends their rows
to spool files of its own (`prep.range_rows`). In a second pass workers write the shards: validation rows in range
order, training rows in a global shuffle defined by the seed and the row count alone (`prep.shuffle`). A range's rows
depend on its text, its id and the options, never on who made them, so the output is the same for any number of
workers. This process plans the tasks and adds up the counts they send back; it never holds a token. Memory is
bounded per process: a range of text and its rows in a worker, one shard's rows in a shard task.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prep.corpus import input_record
from prep.errors import BertError
from prep.masking import MaskingConfig
from prep.outputs import remove
from prep.packing import NSP_MODES, PackStats
from prep.pool import WorkerPool, cpu_count
from prep.range_rows import SPLITS, MaskStats, RangeJob, init_worker, make_run, use_tokenizer
from prep.ranges import RANGE_BYTES, InputText, inspect_input, plan_runs
from prep.shards import DatasetWriter, ids_dtype, row_dtype
from prep.shuffle import scatter_chunk, shard_count, write_scattered_shard, write_shard_task
from prep.spool import RowTable
from prep.textio import ReadStats, checked_inputs, empty_input_error, is_zstd
from prep.vocab import load_tokenizer, resolve_vocab_file

SHARD_BYTES = 64 << 20  # target size of one shard (all its arrays together)
WORKER_MIN_BYTES = 2 << 20  # input per default worker
MAX_LEN_RANGE = (8, 4096)


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
    range_bytes: int = RANGE_BYTES
    """Text per range, the unit the workers share out; each range's last row of each split is padded."""
    workers: int = 0
    """Worker processes; 0 = all cores (--workers). Never changes the output."""
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
        if self.range_bytes < 1:
            raise BertError(f"range_bytes must be positive, got {self.range_bytes}")
        if not self.inputs:
            raise BertError("no input: pass -i FILE, or train a vocabulary with `bertprep vocab -i FILE` first")

    def options(self) -> dict:
        """The options recorded in the manifest: those that decide the output's bytes."""
        return {
            "max_len": self.max_len, "seed": self.seed, **asdict(self.masking), "nsp": self.nsp,
            "nsp_mode": self.nsp_mode if self.nsp else None, "short_seq_prob": self.short_seq_prob if self.nsp else None,
            "dupe_factor": self.dupe_factor, "val_fraction": 0.0 if self.val_inputs else self.val_fraction,
            "rows_per_shard": self.rows_per_shard, "range_bytes": self.range_bytes, "lowercase": self.lowercase,
            "label": self.label,
        }


@dataclass
class SplitTotals:
    """One split's counts over all ranges."""

    documents: int = 0
    pack: PackStats = field(default_factory=PackStats)
    mask: MaskStats = field(default_factory=MaskStats)


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
    # The inputs, and the --val inputs when given: every document of the latter is validation, of the former training.
    sources = [(checked_inputs(config.inputs), "train" if config.val_inputs else None)]
    if config.val_inputs:
        sources.append((checked_inputs(config.val_inputs), "val"))
    paths = [path for source, _ in sources for path in source]
    # Default: all cores, but no more workers than 2 MB pieces of input.
    workers = config.workers or max(1, min(cpu_count(), -(-_estimated_text_bytes(paths) // WORKER_MIN_BYTES)))

    use_tokenizer(tokenizer)  # forked workers share it
    spawn_args = (str(vocab.path), vocab.lowercase)
    with DatasetWriter(config.out_dir, force=config.force) as writer, \
            WorkerPool(workers, init_worker, (None, None), spawn_args) as pool:
        scratch = writer.scratch_dir()
        vocab_name = writer.copy_vocab(vocab_file)
        texts = pool.ordered((inspect_input, (path,)) for path in paths)
        hashed = [pool.later(input_record, path) for path in paths]  # hashed while the ranges are made
        with _Progress(sum(t.text_bytes for t in texts), config.progress) as progress:
            read_stats, totals, tables = _make_ranges(config, pool, sources, texts, record_dtype, scratch, progress)
        if totals["train"].mask.rows == 0:
            raise BertError("no training rows: every document was held out or dropped "
                            "(check --val-fraction and the input)")
        shards = _write_shards(pool, writer, tables, record_dtype, rows_per_shard, config.seed)
        records = [h.get() for h in hashed]

        splits = {}
        for name in SPLITS:
            mask = totals[name].mask
            splits[name] = {"rows": mask.rows, "tokens": mask.tokens, "masked": mask.masked,
                            "copies": config.dupe_factor if name == "train" else 1, "shards": shards[name]}
        manifest = {
            "max_len": config.max_len,
            "seed": config.seed,
            "options": config.options(),
            "vocab": {"file": vocab_name, "sha256": vocab.sha256, "size": len(vocab), "lowercase": vocab.lowercase,
                      "special": special.as_dict(), "dtype": ids_dtype(len(vocab)).str},
            "inputs": records[: len(config.inputs)],
            "val_inputs": records[len(config.inputs) :],
            "stats": _dataset_stats(totals, read_stats, config.max_len),
            "splits": splits,
        }
        writer.finish(manifest)
    seconds = time.monotonic() - started
    tokens = sum(t.mask.tokens for t in totals.values())
    return {**manifest, "summary": {"documents": sum(t.documents for t in totals.values()), "seconds": seconds,
                                    "tokens_per_s": tokens / max(seconds, 1e-9), "workers": workers}}


def _make_ranges(config: ShardConfig, pool: WorkerPool, sources: list, texts: list[InputText], record_dtype,
                 scratch: Path, progress: "_Progress") -> tuple[ReadStats, dict[str, SplitTotals], dict[str, RowTable]]:
    """The first pass: every range made into spooled rows by the workers; returns the counts and where the rows are."""
    calls, source_ranges, first_id, position = [], [], 0, 0
    for source, split in sources:
        job = RangeJob(str(scratch), config.range_bytes, record_dtype, config.max_len, config.seed, config.masking,
                       config.dupe_factor, config.val_fraction, split, config.nsp, config.nsp_mode,
                       config.short_seq_prob)
        source_texts = texts[position : position + len(source)]
        position += len(source)
        calls += [(make_run, (run, job)) for run in plan_runs(source_texts, config.range_bytes, pool.workers, first_id)]
        first_id += sum(t.ranges(config.range_bytes) for t in source_texts)
        source_ranges.append(first_id)
    read_stats = ReadStats(files=len(texts))
    totals = {name: SplitTotals() for name in SPLITS}
    tables = {name: RowTable(first_id) for name in SPLITS}
    source_documents = [0] * len(sources)
    # Longest first, so that the tasks left when the workers run out of work are the short ones at the inputs' ends.
    calls.sort(key=lambda call: -call[1][0].text_bytes)
    for results in pool.unordered(calls):
        for result in results:
            read_stats.add(result.read)
            for name, part in result.parts.items():
                total = totals[name]
                total.documents += part.documents
                total.pack.add(part.pack)
                total.mask.add(part.mask)
                if part.piece is not None:
                    tables[name].add(result.range_id, part.piece)
                source_documents[sum(result.range_id >= end for end in source_ranges)] += part.documents
            progress.update(result.read.bytes, sum(part.mask.tokens for part in result.parts.values()))
    for (source, _), documents in zip(sources, source_documents):
        if documents == 0:
            raise empty_input_error(source)
    return read_stats, totals, tables


def _write_shards(pool: WorkerPool, writer: DatasetWriter, tables: dict[str, RowTable], record_dtype,
                  rows_per_shard: int, seed: int) -> dict[str, list[dict]]:
    """The second pass: the validation shards in range order, the training shards shuffled (`prep.shuffle`)."""
    scratch = writer.scratch_dir()
    val, train = tables["val"], tables["train"]
    val_calls = [(write_shard_task, (scratch, writer.split_dir("val"), index, val.pieces(start, start + rows_per_shard),
                                     record_dtype, None))
                 for index, start in enumerate(range(0, val.rows, rows_per_shard))]
    shards = shard_count(train.rows, rows_per_shard)
    train_dir = writer.split_dir("train")
    if shards == 1:
        # Two tasks share the one shard, input_ids (most of its bytes) and the other arrays, so no worker idles.
        names = record_dtype.names
        pieces = train.pieces(0, train.rows)
        written = pool.ordered([(write_shard_task, (scratch, train_dir, 0, pieces, record_dtype, seed, part))
                                for part in (names[:1], names[1:])] + val_calls)
        shard = {"rows": written[0]["rows"], "arrays": {**written[0]["arrays"], **written[1]["arrays"]}}
        return {"train": [shard], "val": written[2:]}
    scatter_calls = [(scatter_chunk, (scratch, chunk, train.pieces(start, start + rows_per_shard), record_dtype, seed,
                                      rows_per_shard, shards))
                     for chunk, start in enumerate(range(0, train.rows, rows_per_shard))]
    val_shards = pool.ordered(scatter_calls + val_calls)[len(scatter_calls):]
    for name in train.files:  # every training row is in a chunk file now
        remove(scratch / name)
    train_shards = pool.ordered((write_scattered_shard, (scratch, train_dir, shard, shards, train.rows, rows_per_shard,
                                                         record_dtype, seed))
                                for shard in range(shards))
    return {"train": train_shards, "val": val_shards}


def _dataset_stats(totals: dict[str, SplitTotals], read_stats: ReadStats, max_len: int) -> dict:
    stats = {"read": read_stats.as_dict(), "documents": {name: t.documents for name, t in totals.items()},
             "splits": {}}
    for name, total in totals.items():
        m, pack = total.mask, total.pack.as_dict()
        slots = m.rows * max_len
        stats["splits"][name] = {
            **pack,
            "padding_share": (slots - m.tokens) / slots if slots else 0.0,
            "masked_per_row": m.masked / m.rows if m.rows else 0.0,
            "mask_actions": {"mask": m.replaced_mask, "random": m.replaced_random, "keep": m.kept},
            "unknown_token_rate": m.unknown / m.tokens if m.tokens else 0.0,
        }
    return stats


def _estimated_text_bytes(paths: list[Path]) -> int:
    """The inputs' text size for choosing the worker count, before they are inspected: text compresses about 4×."""
    return sum(path.stat().st_size * (4 if is_zstd(path) else 1) for path in paths)


class _Progress:
    """A tqdm bar over input bytes with tokens/s, on stderr; silent when disabled."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.tokens, self.started, self.bar = 0, time.monotonic(), None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="shard", dynamic_ncols=True,
                            mininterval=0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def update(self, text_bytes: int, tokens: int) -> None:
        """Counts one range made."""
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e3:,.0f}k tok/s", refresh=False)
            self.bar.update(text_bytes)
