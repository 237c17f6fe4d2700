"""Training a vocabulary with SentencePiece, the vocab directory's record, and loading a tokenizer from a `--vocab`.

A vocab directory holds vocab.txt (one token a line, id = line number), spm.model for `unigram`/`bpe` vocabularies,
and vocab.json, the record of how it was made, written last. A directory made by `bertprep vocab --import` holds a
Hugging Face tokenizer.json instead of vocab.txt, and a record of kind "hf-tokenizer" (prep/hf_tokenizer.py). Either
is built in a hidden staging directory beside it and renamed into place when complete (`prep.outputs`), so that a
killed job leaves no directory whose vocab.txt could pass for a finished vocabulary.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece

from prep.corpus import input_record, iter_lines, sample_lines
from prep.errors import BertError
from prep.hf_tokenizer import KIND as HF_KIND, TOKENIZER_FILE, HfTokenizer, TokenizerJsonVocab, is_tokenizer_json
from prep.outputs import refuse_existing, staged_dir
from prep.spm import SentencePieceTokenizer, normalize_for_sentencepiece
from prep.textio import ReadStats
from prep.wordpiece import (CONTINUATION_PREFIX, SENTENCEPIECE_MARKER, SPECIAL_TOKENS, Vocab, WordPieceTokenizer,
                            is_isolated, pretokenize, whitespace_chunks)

RECORD_FORMAT = "bertprep-vocab"
RECORD_VERSION = 1
VOCAB_FILE = "vocab.txt"
MODEL_FILE = "spm.model"
RECORD_FILE = "vocab.json"
MODEL_TYPES = ("wordpiece", "unigram", "bpe")
MIN_VOCAB_SIZE = 32
# Longer "words" are URLs, tables and the like: WordPiece turns them into [UNK] anyway, so they only slow training.
MAX_TRAINING_WORD_CHARS = 100
_LINES_PER_BLOCK = 1000  # lines normalised per call: one big `str.translate` beats many small ones


@dataclass(frozen=True)
class VocabConfig:
    """How `bertprep vocab` trains a vocabulary."""

    vocab_size: int = 30522
    """Entries in vocab.txt, the five special tokens included (--vocab-size)."""
    model_type: str = "wordpiece"
    """wordpiece: BERT '##' pieces for greedy WordPiece; unigram | bpe: a SentencePiece model (--model-type)."""
    lowercase: bool = True
    """Uncased: lowercase and strip accents before segmenting, in training and encoding (--lowercase/--cased)."""
    sample_lines: int = 2_000_000
    """At most this many input lines are used for training (--sample-lines)."""
    threads: int = 0
    """SentencePiece training threads, 0 for all cores; unigram pieces depend on it, wordpiece/bpe not (--threads)."""

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise BertError(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {self.vocab_size}")
        if self.model_type not in MODEL_TYPES:
            raise BertError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.sample_lines < 1:
            raise BertError(f"--sample-lines must be at least 1, got {self.sample_lines}")
        if self.threads < 0:
            raise BertError(f"--threads must be 0 (all cores) or more, got {self.threads}")


def make_vocab(inputs: Sequence[Path], out_dir: Path, config: VocabConfig, force: bool = False) -> dict:
    """`bertprep vocab`: train on at most `config.sample_lines` lines sampled evenly over `inputs`; the record."""
    out_dir = Path(out_dir)
    paths = [Path(path) for path in inputs]
    _check_replaceable(out_dir, force, paths)
    records = [input_record(path) for path in paths]
    lines = sample_lines(iter_lines(paths, ReadStats()), config.sample_lines)
    return train_vocab(lines, out_dir, config, records)


def train_vocab(lines: Iterable[str], out_dir: Path, config: VocabConfig, inputs: list[dict] | None = None) -> dict:
    """Train a vocabulary on raw text lines (at most `config.sample_lines`) and write it to `out_dir`.

    Writes vocab.txt (and spm.model for unigram/bpe), then vocab.json, into a staging directory that replaces
    `out_dir`, whatever it held, when complete. `inputs` ({"path", "bytes", "sha256", "format"} per input file) goes
    into the record, which is returned. The same lines and config give a byte-identical vocab.txt.
    """
    out_dir = Path(out_dir)
    word_counts, lines_used = count_words(lines, config)
    if not word_counts:
        raise BertError("no text to train a vocabulary on: the input lines are empty or whitespace; "
                        "pass a file with text")
    if config.model_type == "wordpiece":
        tokens, model = wordpiece_tokens(word_counts, config), None
    else:
        model = _train_sentencepiece(word_counts, config, model_type=config.model_type,
                                     vocab_size=config.vocab_size,
                                     character_coverage=_character_coverage(word_counts, config.vocab_size),
                                     pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=SPECIAL_TOKENS[0],
                                     unk_piece=SPECIAL_TOKENS[1], bos_piece=SPECIAL_TOKENS[2],
                                     eos_piece=SPECIAL_TOKENS[3], control_symbols=[SPECIAL_TOKENS[4]])
        tokens = _pieces(model)
    vocab_bytes = "".join(token + "\n" for token in tokens).encode("utf-8")
    with staged_dir(out_dir) as staging:
        (staging / VOCAB_FILE).write_bytes(vocab_bytes)
        if model is not None:
            (staging / MODEL_FILE).write_bytes(model)
        vocab = Vocab.load(staging / VOCAB_FILE, lowercase=config.lowercase)
        record = {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "model_type": config.model_type,
            "vocab_size": len(tokens),
            "requested_vocab_size": config.vocab_size,
            "lowercase": config.lowercase,
            "inputs": list(inputs or []),
            "lines_used": lines_used,
            "options": asdict(config),
            "vocab_sha256": vocab.sha256,
            "special": vocab.special.as_dict(),
        }
        _write_record(staging, record)
    return record


def import_tokenizer(source: Path, out_dir: Path, force: bool = False) -> dict:
    """`bertprep vocab --import`: copy a Hugging Face tokenizer.json (`source`, or the one in directory `source`)
    into `out_dir` as tokenizer.json, then write vocab.json recording what it is; returns the record.

    Refuses a file the `tokenizers` library cannot read or that lacks pad, cls, sep or mask tokens. The record holds
    kind "hf-tokenizer", the source, model type, size, casing, sha256, bytes, the special ids and token strings, and
    the continuation rule whole-word masking uses.
    """
    source, out_dir = Path(source), Path(out_dir)
    source_file = source / TOKENIZER_FILE if source.is_dir() else source
    if not source_file.is_file():
        raise BertError(f"no tokenizer.json at {source_file}: pass a Hugging Face tokenizer.json or the model "
                        f"directory holding one")
    _check_replaceable(out_dir, force, [source_file])
    data = source_file.read_bytes()
    vocab = TokenizerJsonVocab(source_file, data)
    HfTokenizer(vocab)  # the library must read the same tokens, or shard would fail later

    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "kind": HF_KIND,
        "file": TOKENIZER_FILE,
        "source": str(source_file.resolve()),
        "model_type": vocab.model_type,
        "byte_level": vocab.byte_level,
        "vocab_size": len(vocab),
        "lowercase": vocab.lowercase,
        "inputs": [],
        "vocab_sha256": vocab.sha256,
        "bytes": len(data),
        "special": vocab.special.as_dict(),
        "special_tokens": vocab.special_tokens,
        "continuation": vocab.continuation_rule,
    }
    with staged_dir(out_dir) as staging:
        (staging / TOKENIZER_FILE).write_bytes(data)
        _write_record(staging, record)
    return record


def _check_replaceable(out_dir: Path, force: bool, inputs: Sequence[Path]) -> None:
    """The output directory is replaced as a whole: anything in it needs --force, and an input in it is refused."""
    refuse_existing(out_dir, force, "pass --force to replace it, or -o to write elsewhere", noun="output")
    for path in inputs:
        if Path(path).resolve().is_relative_to(out_dir.resolve()):
            raise BertError(f"input {path} is inside the output {out_dir}, which is replaced as a whole: pass -o "
                            f"another directory")


def _write_record(directory: Path, record: dict) -> None:
    (directory / RECORD_FILE).write_bytes((json.dumps(record, indent=2) + "\n").encode("utf-8"))


def count_words(lines: Iterable[str], config: VocabConfig) -> tuple[collections.Counter, int]:
    """Word frequencies of the first `config.sample_lines` lines, and how many lines were read.

    Words are what the model segments: WordPiece's pre-tokenized words, or for SentencePiece models the normalised
    text's whitespace-separated chunks. Counting them lets SentencePiece train on unique words (TSV input) instead
    of holding every line in memory; it splits on whitespace anyway, so the pieces are the same.
    """
    # Raw chunks are counted first (C speed); only the distinct ones go through normalisation.
    chunk_counts: collections.Counter = collections.Counter()
    lines_used = 0
    lines = itertools.islice(lines, config.sample_lines)
    while block := list(itertools.islice(lines, _LINES_PER_BLOCK)):
        lines_used += len(block)
        chunk_counts.update(whitespace_chunks("\n".join(block)))
    counts: collections.Counter = collections.Counter()
    for chunk, count in chunk_counts.items():
        if config.model_type == "wordpiece":
            for word in pretokenize(chunk, config.lowercase):
                counts[word] += count
        elif word := normalize_for_sentencepiece(chunk, config.lowercase):
            counts[word] += count
    return counts, lines_used


def wordpiece_tokens(word_counts: collections.Counter, config: VocabConfig) -> list[str]:
    """A BERT vocab.txt's tokens: specials, every seen character, then BPE pieces converted to '##' style.

    Each character comes as a word start and, unless BERT always isolates it (punctuation, CJK), as a '##' piece
    too, so greedy WordPiece never fails on a seen character. BPE rather than unigram because its pieces are built
    bottom-up by merging, so a piece's prefixes tend to be pieces too: that suits greedy longest-match-first, which,
    unlike a unigram model's Viterbi search, cannot back out of a long first match. SentencePiece BPE is also
    deterministic for any thread count. The most frequent characters win when there are too many for the budget.
    """
    base = list(SPECIAL_TOKENS)
    chars = _chars_by_frequency(word_counts)
    for char in chars:
        entries = [char] if is_isolated(char) else [char, CONTINUATION_PREFIX + char]
        if len(base) + len(entries) > config.vocab_size:
            break
        base.extend(entries)
    # SentencePiece's own characters and its "▁x" pieces duplicate ours, hence the slack of two per character.
    sp_vocab_size = config.vocab_size - len(base) + 1 + 2 * len(chars)
    model = _train_sentencepiece(word_counts, config, model_type="bpe", vocab_size=sp_vocab_size,
                                 character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    pieces = []
    for i in range(processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        if processor.is_unknown(i) or processor.is_control(i) or len(piece.lstrip(SENTENCEPIECE_MARKER)) < 2:
            continue  # single characters are already in `base`
        if piece.startswith(SENTENCEPIECE_MARKER):
            pieces.append(piece[len(SENTENCEPIECE_MARKER):])
        else:
            pieces.append(CONTINUATION_PREFIX + piece)
    # Pieces are in merge order, so cutting the tail drops the latest merges.
    return list(dict.fromkeys(base + pieces))[: config.vocab_size]


def _chars_by_frequency(word_counts: collections.Counter) -> list[str]:
    """Distinct characters of the words, most frequent first (ties by code point)."""
    words = list(word_counts)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    frequencies = np.fromiter(word_counts.values(), dtype=np.int64, count=len(words))
    codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
    unique_codes, index = np.unique(codes, return_inverse=True)
    char_counts = np.bincount(index.reshape(-1), weights=np.repeat(frequencies, lengths), minlength=len(unique_codes))
    order = np.lexsort((unique_codes, -char_counts))
    return [chr(code) for code in unique_codes[order].tolist()]


def _character_coverage(word_counts: collections.Counter, vocab_size: int) -> float:
    """All characters when they take at most a quarter of the vocabulary; else SentencePiece's usual 99.95%."""
    return 1.0 if len(_chars_by_frequency(word_counts)) <= vocab_size // 4 else 0.9995


def _train_sentencepiece(word_counts: collections.Counter, config: VocabConfig, **options) -> bytes:
    """Train SentencePiece on word frequencies (TSV rows "word<TAB>count"); returns the serialised model."""
    rows = (f"{word}\t{count}" for word, count in sorted(word_counts.items(), key=lambda item: (-item[1], item[0]))
            if len(word) <= MAX_TRAINING_WORD_CHARS)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=rows, model_writer=model, input_format="tsv",
            # Our normalisation already ran; SentencePiece's NFKC would make pieces that encoding never produces.
            normalization_rule_name="identity",
            # A small corpus yields a smaller vocabulary instead of an error.
            hard_vocab_limit=False,
            num_threads=config.threads or os.cpu_count() or 1,
            minloglevel=2, **options)
    except RuntimeError as err:
        raise BertError(f"SentencePiece could not train a {config.model_type} vocabulary of {config.vocab_size}: "
                        f"{err}; try a smaller --vocab-size or more input text") from None
    return model.getvalue()


def _pieces(model: bytes) -> list[str]:
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def load_vocab_record(path: Path) -> dict | None:
    """The vocab.json of a vocabulary directory or of the vocab.txt or tokenizer.json it describes, or None when
    there is none (or it describes the other file)."""
    path = Path(path)
    if path.is_dir():
        directory = path
    elif path.name in (VOCAB_FILE, TOKENIZER_FILE):
        directory = path.parent
    else:
        return None  # a record describes the file beside it, not other files
    record_path = directory / RECORD_FILE
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise BertError(f"{record_path} is not valid JSON ({err}); retrain the vocabulary with `bertprep vocab` "
                        f"or delete the file") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        beside_tokenizer = path.name == TOKENIZER_FILE or (path.is_dir() and not (path / VOCAB_FILE).is_file()
                                                           and (path / TOKENIZER_FILE).is_file())
        if beside_tokenizer:
            return None  # a Hugging Face model directory's vocab.json is its BPE vocabulary, not a record
        raise BertError(f"{record_path} is not a bertprep vocabulary record (format {RECORD_FORMAT!r}); "
                        f"delete it or point --vocab at the vocab.txt file")
    if record.get("version") != RECORD_VERSION:
        raise BertError(f"{record_path} has vocabulary record version {record.get('version')!r}, this bertprep "
                        f"reads version {RECORD_VERSION}; retrain the vocabulary with `bertprep vocab`")
    if path.is_file() and _record_file(record) != path.name:
        return None
    return record


def _record_file(record: dict) -> str:
    return TOKENIZER_FILE if record.get("kind") == HF_KIND else VOCAB_FILE


def resolve_vocab_file(path: Path) -> Path:
    """The vocabulary file a `--vocab` argument means: for a directory the file its vocab.json names, else its
    vocab.txt, else its tokenizer.json; otherwise the path itself (a vocab.txt or a tokenizer.json)."""
    path = Path(path)
    vocab_file = path
    if path.is_dir():
        record = load_vocab_record(path)
        if record is not None:
            vocab_file = path / _record_file(record)
        else:
            vocab_file = path / (TOKENIZER_FILE if not (path / VOCAB_FILE).is_file()
                                 and (path / TOKENIZER_FILE).is_file() else VOCAB_FILE)
    if not vocab_file.is_file():
        raise BertError(f"no vocabulary at {vocab_file}: pass a vocab.txt, a tokenizer.json or a directory holding "
                        f"one; train one with `bertprep vocab -i FILE`")
    return vocab_file


def load_tokenizer(path: Path,
                   lowercase: bool | None = None) -> WordPieceTokenizer | SentencePieceTokenizer | HfTokenizer:
    """The tokenizer for a `--vocab` (directory, vocab.txt or tokenizer.json).

    `lowercase=None` takes it from vocab.json when there is one, else infers it from the tokens. A directory whose
    record says unigram/bpe (or whose vocab.txt has '▁' pieces) gets its spm.model; a tokenizer.json is encoded by
    the `tokenizers` library (its casing is its own: `lowercase` must agree); anything else is WordPiece.
    """
    vocab_file = resolve_vocab_file(path)
    record = load_vocab_record(vocab_file)
    if is_tokenizer_json(vocab_file):
        vocab = TokenizerJsonVocab.from_file(vocab_file, lowercase)
        if record is not None and record.get("vocab_sha256") != vocab.sha256:
            raise BertError(f"{vocab_file} changed after it was imported (its sha256 differs from {RECORD_FILE}'s); "
                            f"import it again with `bertprep vocab --import FILE --force`, or delete {RECORD_FILE} "
                            f"to use the file as it is")
        return HfTokenizer(vocab)
    if record is not None and lowercase is None:
        lowercase = bool(record["lowercase"])
    vocab = Vocab.load(vocab_file, lowercase=lowercase)
    if record is not None and record.get("vocab_sha256") != vocab.sha256:
        raise BertError(f"{vocab_file} changed after it was trained (its sha256 differs from {RECORD_FILE}'s); "
                        f"retrain with `bertprep vocab`, or delete {RECORD_FILE} to use the file as it is")
    if record is not None:
        sentencepiece_model = record["model_type"] in ("unigram", "bpe")
    else:
        sentencepiece_model = Vocab.sentencepiece_style(vocab.tokens)
    if sentencepiece_model:
        return SentencePieceTokenizer(vocab_file.parent / MODEL_FILE, vocab)
    return WordPieceTokenizer(vocab)
