"""Vocabulary training with SentencePiece, the vocab.json record, and loading a tokenizer from `--vocab`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from prep.errors import BertError
from prep.spm import SentencePieceTokenizer, normalize_for_sentencepiece
from prep.vocab import (VocabConfig, load_tokenizer, load_vocab_record, make_vocab, resolve_vocab_file,
                        train_vocab)
from prep.wordpiece import SPECIAL_TOKENS, Vocab, WordPieceTokenizer, is_isolated, pretokenize


def wiki_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def test_wordpiece_vocab_layout(vocab_dir, wiki_valid):
    """A trained vocab.txt has the specials at ids 0..4, exactly the requested size, every training character
    both as a word start and (unless BERT always isolates it) as a '##' piece, and no piece spanning punctuation:
    so greedy WordPiece never falls back to [UNK] on the text it was trained on."""
    vocab = Vocab.load(vocab_dir / "vocab.txt")
    assert tuple(vocab.tokens[:5]) == SPECIAL_TOKENS
    assert len(vocab) == 4000 and len(set(vocab.tokens)) == 4000
    chars = {char for line in wiki_lines(wiki_valid) for word in pretokenize(line, True) for char in word}
    tokens = set(vocab.tokens)
    assert all(char in tokens for char in chars)
    assert all("##" + char in tokens for char in chars if not is_isolated(char))
    pieces = [token.removeprefix("##") for token in vocab.tokens[5:]]
    assert all(len(piece) == 1 or not any(is_isolated(char) for char in piece) for piece in pieces)
    assert not any(char.isupper() or char.isspace() for token in vocab.tokens[5:] for char in token)
    ids, _ = WordPieceTokenizer(vocab).encode_many(wiki_lines(wiki_valid))
    assert vocab.special.unk not in ids


def test_vocab_record_describes_the_training(vocab_dir, wiki_valid):
    """vocab.json records format, version, sizes, casing, inputs, lines used, options and the vocab.txt hash, so a
    later step can tell how the vocabulary was made and whether vocab.txt was changed since."""
    record = load_vocab_record(vocab_dir)
    assert record == json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    assert record["format"] == "bertprep-vocab" and record["version"] == 1
    assert record["model_type"] == "wordpiece" and record["lowercase"] is True
    assert record["vocab_size"] == record["requested_vocab_size"] == 4000
    assert record["lines_used"] == len(wiki_lines(wiki_valid))
    assert record["options"] == asdict(VocabConfig(vocab_size=4000, threads=1))
    assert record["vocab_sha256"] == Vocab.load(vocab_dir / "vocab.txt").sha256
    assert record["special"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    [entry] = record["inputs"]
    assert entry["path"] == str(wiki_valid.resolve()) and entry["bytes"] == wiki_valid.stat().st_size
    assert sorted(path.name for path in vocab_dir.iterdir()) == ["vocab.json", "vocab.txt"]
    assert load_vocab_record(vocab_dir / "vocab.txt") == record


def test_training_is_deterministic(tmp_path, vocab_dir, wiki_valid):
    """The same lines and config give a byte-identical vocab.txt, and for WordPiece (SentencePiece BPE underneath)
    the thread count does not matter either: a vocabulary can be rebuilt anywhere."""
    config = VocabConfig(vocab_size=4000, threads=2)
    train_vocab(wiki_lines(wiki_valid), tmp_path / "a", config)
    train_vocab(wiki_lines(wiki_valid), tmp_path / "b", config)
    first = (tmp_path / "a" / "vocab.txt").read_bytes()
    assert first == (tmp_path / "b" / "vocab.txt").read_bytes()
    assert first == (vocab_dir / "vocab.txt").read_bytes()  # trained with threads=1


def test_sample_lines_caps_the_training_text(tmp_path, wiki_valid):
    """At most --sample-lines lines are read from the iterator, and the record says how many were used."""
    lines = iter(wiki_lines(wiki_valid))
    record = train_vocab(lines, tmp_path, VocabConfig(vocab_size=500, sample_lines=1000, threads=1))
    assert record["lines_used"] == 1000
    assert next(lines) == wiki_lines(wiki_valid)[1000]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_vocabularies_train_encode_and_decode(tmp_path, wiki_valid, model_type):
    """unigram/bpe vocabularies keep the SentencePiece model beside a vocab.txt of its pieces with the specials
    at 0..4, load as a SentencePieceTokenizer, and encode to ids that decode back to the normalised text."""
    config = VocabConfig(vocab_size=1000, model_type=model_type, threads=1)
    record = train_vocab(wiki_lines(wiki_valid), tmp_path, config)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spm.model", "vocab.json", "vocab.txt"]
    assert record["model_type"] == model_type and record["vocab_size"] == 1000
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    vocab = tokenizer.vocab
    assert tuple(vocab.tokens[:5]) == SPECIAL_TOKENS and len(vocab) == 1000
    assert vocab.special.as_dict() == record["special"]
    # Word starts carry '▁'; every other piece continues a word, which is what whole-word masking needs.
    assert vocab.is_continuation.tolist() == [not (t.startswith("\u2581") or i < 5) for i, t in enumerate(vocab.tokens)]

    line = "Homarus gammarus is a species of Clawed Lobster ."
    ids = tokenizer.encode(line)
    assert tokenizer.decode(ids) == "homarus gammarus is a species of clawed lobster ."
    assert tokenizer.tokens(ids) == tokenizer.tokenize(line) and "".join(tokenizer.tokenize(line))[0] == "\u2581"
    masked = tokenizer.encode("the [MASK] sat")
    assert masked.count(vocab.special.mask) == 1 and "[MASK]" in tokenizer.decode(masked)
    odd = ["", "x\x0by lobster", "Café\u00a0Ñandú 日本語", "a[SEP]b", "zero\u200bwidth"]
    odd_ids, odd_lengths = tokenizer.encode_many(odd)
    assert [row.tolist() for row in np.split(odd_ids, np.cumsum(odd_lengths)[:-1])] == \
        [SentencePieceTokenizer(tmp_path / "spm.model", vocab).encode(text) for text in odd]
    lines = [line for line in wiki_lines(wiki_valid) if line.strip()][:300]
    all_ids, lengths = tokenizer.encode_many(lines)
    assert all_ids.dtype == np.int32 and lengths.sum() == len(all_ids)
    rows = np.split(all_ids, np.cumsum(lengths)[:-1])
    known = [i for i, row in enumerate(rows) if vocab.special.unk not in row]  # rare characters can be [UNK]
    assert len(known) > 250
    assert [tokenizer.decode(rows[i]) for i in known] == \
        [" ".join(normalize_for_sentencepiece(lines[i], lowercase=True).split()) for i in known]


def test_small_corpus_gives_a_smaller_vocabulary(tmp_path):
    """A corpus too small for the requested size trains what it supports, and the record says both sizes."""
    lines = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 5
    record = train_vocab(lines, tmp_path, VocabConfig(vocab_size=30522, threads=1))
    vocab = Vocab.load(tmp_path / "vocab.txt")
    assert record["requested_vocab_size"] == 30522 and record["vocab_size"] == len(vocab) < 200
    assert WordPieceTokenizer(vocab).tokenize("the cat sat on a log") == ["the", "cat", "sat", "on", "a", "log"]


def test_bad_config_and_input_are_user_errors(tmp_path):
    """Invalid options name the flag to fix; text with nothing to train on says so."""
    with pytest.raises(BertError, match="--vocab-size must be at least 32, got 10"):
        VocabConfig(vocab_size=10)
    with pytest.raises(BertError, match="--model-type must be one of wordpiece, unigram, bpe, got 'char'"):
        VocabConfig(model_type="char")
    with pytest.raises(BertError, match="--sample-lines must be at least 1"):
        VocabConfig(sample_lines=0)
    with pytest.raises(BertError, match="--threads must be 0"):
        VocabConfig(threads=-1)
    with pytest.raises(BertError, match="no text to train a vocabulary on"):
        train_vocab(["", "  ", "\t"], tmp_path, VocabConfig())


def test_resolve_vocab_file(tmp_path, vocab_dir):
    """--vocab takes a directory or a vocab.txt; anything else is an error naming the path and how to make one."""
    assert resolve_vocab_file(vocab_dir) == vocab_dir / "vocab.txt"
    assert resolve_vocab_file(vocab_dir / "vocab.txt") == vocab_dir / "vocab.txt"
    with pytest.raises(BertError, match=r"no vocabulary at .*empty: .*`bertprep vocab -i FILE`"):
        resolve_vocab_file(tmp_path / "empty")
    with pytest.raises(BertError, match=r"no vocabulary at .*missing\.txt"):
        resolve_vocab_file(tmp_path / "missing.txt")


def test_unreadable_records_are_refused(tmp_path):
    """A vocab.json of another format or version is refused with a message, never half-read; none at all is None."""
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS) + "\n", encoding="utf-8")
    assert load_vocab_record(tmp_path) is None
    (tmp_path / "vocab.json").write_text(json.dumps({"format": "bertprep-vocab", "version": 2}), encoding="utf-8")
    with pytest.raises(BertError, match="record version 2, this bertprep reads version 1"):
        load_vocab_record(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"vocab": {}}), encoding="utf-8")
    with pytest.raises(BertError, match="is not a bertprep vocabulary record"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{", encoding="utf-8")
    with pytest.raises(BertError, match="is not valid JSON"):
        load_vocab_record(tmp_path / "vocab.txt")


def test_load_tokenizer_follows_the_record(tmp_path, wiki_valid):
    """Casing comes from vocab.json unless overridden, and a vocab.txt edited after training is refused."""
    train_vocab(wiki_lines(wiki_valid)[:500], tmp_path, VocabConfig(vocab_size=600, lowercase=False, threads=1))
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, WordPieceTokenizer) and tokenizer.vocab.lowercase is False
    assert load_tokenizer(tmp_path / "vocab.txt", lowercase=True).vocab.lowercase is True
    with open(tmp_path / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(BertError, match="changed after it was trained"):
        load_tokenizer(tmp_path)


def test_retraining_replaces_the_directory_atomically(tmp_path, wiki_valid):
    """Retraining a directory leaves only the new files: no temporary names, no stale spm.model from a bpe run."""
    lines = wiki_lines(wiki_valid)[:500]
    train_vocab(lines, tmp_path, VocabConfig(vocab_size=600, model_type="bpe", threads=1))
    train_vocab(lines, tmp_path, VocabConfig(vocab_size=600, threads=1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vocab.json", "vocab.txt"]
    assert isinstance(load_tokenizer(tmp_path), WordPieceTokenizer)


def test_make_vocab_reads_inputs_and_refuses_to_overwrite(tmp_path, wiki_valid):
    """`bertprep vocab` trains from files, records them, and replaces an existing vocabulary only with --force."""
    out_dir = tmp_path / "vocab"
    config = VocabConfig(vocab_size=800, sample_lines=500, threads=1)
    record = make_vocab([wiki_valid], out_dir, config)
    assert 0 < record["lines_used"] <= 500 and record["inputs"][0]["sha256"]
    with pytest.raises(BertError) as refused:
        make_vocab([wiki_valid], out_dir, config)
    assert str(refused.value) == \
        f"output {out_dir} already exists: pass --force to replace it, or -o to write elsewhere"
    assert make_vocab([wiki_valid], out_dir, config, force=True)["vocab_sha256"] == record["vocab_sha256"]


def test_a_vocabulary_replaces_its_directory_whole_but_never_deletes_an_input(tmp_path, wiki_valid):
    """A vocab directory is built aside and renamed into place whole, so one holding anything at all is replaced
    only with --force, and never when an input lies inside it: the rename would delete the text trained on."""
    out_dir = tmp_path / "vocab"
    out_dir.mkdir()
    corpus = out_dir / "corpus.txt"
    corpus.write_bytes(wiki_valid.read_bytes())
    config = VocabConfig(vocab_size=800, sample_lines=500, threads=1)
    with pytest.raises(BertError, match=f"^output {re.escape(str(out_dir))} already exists: pass --force"):
        make_vocab([wiki_valid], out_dir, config)
    with pytest.raises(BertError) as refused:
        make_vocab([corpus], out_dir, config, force=True)
    assert str(refused.value) == \
        f"input {corpus} is inside the output {out_dir}, which is replaced as a whole: pass -o another directory"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vocab"] and os.listdir(out_dir) == ["corpus.txt"]
    make_vocab([wiki_valid], out_dir, config, force=True)
    assert sorted(os.listdir(out_dir)) == ["vocab.json", "vocab.txt"]
