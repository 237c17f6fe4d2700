"""The BERT tokenizer: parity with Hugging Face's BertTokenizer, vocab.txt loading, batch encoding, decoding."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest

from prep.errors import BertError
from prep.vocab import VocabConfig, train_vocab
from prep.wordpiece import SPECIAL_TOKENS, Vocab, WordPieceTokenizer, pretokenize

transformers = pytest.importorskip("transformers")
from tokenizers.normalizers import BertNormalizer  # noqa: E402  (installed with transformers)
from tokenizers.pre_tokenizers import BertPreTokenizer  # noqa: E402
from transformers.models.bert.tokenization_bert import load_vocab  # noqa: E402

EDGE_STRINGS = [
    "", "   ", "Café Ñandú", "naïve façade résumé", "e\u0301 combining \u0301 leading mark", "ΣΣ ὈΔΥΣΣΕΎΣ σς",
    "İstanbul straße ﬁ Ǆ", "日本語テキスト", "中文字符和English混合", "한국어 텍스트", "ไทย العربية עִבְרִית",
    "a\x00b", "a\ufffdb", "bell\x07char del\x7f", "x\x0by\x0cz\x1cw\x1dv\x1eu\x1ft\x85s", "tab\tsep\nnew\rline",
    "non\u00a0breaking\u2007figure\u202fnarrow\u3000ideographic\u2028line", "zero\u200dwidth\u200bjoiner\ufeffbom",
    "emoji 😀 👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷", "a" * 150, "b" * 100, "c" * 101, "[MASK]", "the [MASK] sat",
    "[mask] [Mask] [MASK", "x[SEP]y[CLS]z", "[PAD][UNK][MASK]", "[MA\x00SK] [MA\x0bSK]", "¿Qué?¡Sí! don't",
    "1,000.50$ 3/4 50% #tag @user a+b=c ~x^y|z `q`", "hello—world… ‘quotes’ «guillemets» „low“",
    "Ａｂｃ fullwidth ℌ𝔢𝔩𝔩𝔬", "private\ue000use \U000f0000 unassigned\u0378", "\U000e0041tag", "Ꭰ cherokee ꭰ",
    "lobster H. americanus , 60 cm ( 24 in ) @-@ 5 @.@ 3",
]


def hf_tokenizer(vocab_file: Path, lowercase: bool):
    """Hugging Face's BertTokenizer on the same vocab.txt, read by its own loader."""
    tokenizer = transformers.BertTokenizer(vocab=load_vocab(str(vocab_file)), do_lower_case=lowercase)
    return tokenizer


def hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def our_ids(tokenizer: WordPieceTokenizer, texts: list[str]) -> list[list[int]]:
    ids, lengths = tokenizer.encode_many(texts)
    return [row.tolist() for row in np.split(ids, np.cumsum(lengths)[:-1])] if texts else []


def wiki_lines(*paths: Path) -> list[str]:
    return [line for path in paths for line in path.read_text(encoding="utf-8").split("\n")]


@pytest.fixture(scope="module")
def cased_vocab_dir(tmp_path_factory, wiki_valid) -> Path:
    out_dir = tmp_path_factory.mktemp("cased_vocab")
    train_vocab(wiki_lines(wiki_valid), out_dir, VocabConfig(vocab_size=4000, lowercase=False, threads=1))
    return out_dir


@pytest.fixture(scope="module")
def edge_vocab_file(tmp_path_factory, vocab_dir) -> Path:
    """The wiki vocabulary plus every character of EDGE_STRINGS (as written, lowercased, decomposed), both as a
    word start and as a '##' piece, so the edge strings exercise WordPiece rather than all becoming [UNK]."""
    chars = set()
    for text in EDGE_STRINGS:
        for char in text:
            chars.update((char, char.lower(), unicodedata.normalize("NFD", char),
                          unicodedata.normalize("NFD", char.lower())))
    extra = sorted({piece for text in chars for char in text if not char.isspace()
                    for piece in (char, "##" + char)} | {"caf", "##é", "naïve", "stra", "##ße", "日本"})
    tokens = Vocab.load(vocab_dir / "vocab.txt").tokens
    path = tmp_path_factory.mktemp("edge_vocab") / "vocab.txt"
    path.write_text("".join(token + "\n" for token in dict.fromkeys(tokens + extra)), encoding="utf-8")
    return path


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_matches_hugging_face_on_every_wiki_line(vocab_dir, cased_vocab_dir, wiki_valid, wiki_test, lowercase):
    """Every line of WikiText-2 valid (the training text) and test (unseen text) encodes to exactly the ids Hugging
    Face's BertTokenizer gives with the same vocab.txt: our shards must be what a HF-based pipeline would produce."""
    vocab_file = (vocab_dir if lowercase else cased_vocab_dir) / "vocab.txt"
    ours = WordPieceTokenizer(Vocab.load(vocab_file))
    assert ours.vocab.lowercase is lowercase
    hf = hf_tokenizer(vocab_file, lowercase)
    assert len(hf) == len(ours.vocab)
    lines = wiki_lines(wiki_valid, wiki_test)
    expected = hf_ids(hf, lines)
    got = our_ids(ours, lines)
    mismatched = [i for i in range(len(lines)) if got[i] != expected[i]]
    assert not mismatched, f"{len(mismatched)} lines differ, first: {lines[mismatched[0]]!r}"
    assert sum(map(len, got)) > 500_000


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_matches_hugging_face_on_edge_strings(edge_vocab_file, lowercase):
    """Accents, CJK, controls, U+FFFD, long words, emoji, literal special tokens, odd whitespace and zero-width
    characters tokenize exactly as in Hugging Face, one string at a time and all in one batch."""
    ours = WordPieceTokenizer(Vocab.load(edge_vocab_file, lowercase=lowercase))
    hf = hf_tokenizer(edge_vocab_file, lowercase)
    assert len(hf) == len(ours.vocab)
    expected = hf_ids(hf, EDGE_STRINGS)
    for text, ids in zip(EDGE_STRINGS, expected):
        assert ours.encode(text) == ids, f"{text!r}: {ours.tokenize(text)} != {hf.convert_ids_to_tokens(ids)}"
    assert our_ids(WordPieceTokenizer(ours.vocab), EDGE_STRINGS) == expected


def test_literal_special_tokens_are_recognised_case_sensitively(vocab_dir):
    """As in Hugging Face, "[MASK]" written in the text is the mask token even when glued to words, while
    "[mask]" (normalisation comes after the special-token match) is ordinary text."""
    tokenizer = WordPieceTokenizer(Vocab.load(vocab_dir / "vocab.txt"))
    assert tokenizer.tokenize("the [MASK] sat") == ["the", "[MASK]", "sat"]
    assert tokenizer.tokenize("the[SEP]sat") == ["the", "[SEP]", "sat"]
    assert tokenizer.tokenize("[mask]") == tokenizer.tokenize("[ mask ]")
    assert "[MASK]" not in tokenizer.tokenize("[mask] [Mask]")
    assert tokenizer.encode("[CLS] [PAD]") == [tokenizer.vocab.special.cls, tokenizer.vocab.special.pad]


def test_long_words_and_unknown_characters_become_one_unk(vocab_dir):
    """A word over 100 characters, or one with a character the vocabulary lacks, is a single [UNK], never pieces."""
    tokenizer = WordPieceTokenizer(Vocab.load(vocab_dir / "vocab.txt"))
    unk = tokenizer.vocab.special.unk
    assert tokenizer.encode("a" * 150) == [unk]
    assert unk not in tokenizer.encode("a" * 100)
    assert tokenizer.encode("lobster\u2603s lobster") == [unk] + tokenizer.encode("lobster")


def test_unicode_sweep_matches_hugging_face_normalizer_and_pre_tokenizer():
    """Every code point of planes 0, 1 and 14 and of the CJK blocks' edges, between two letters, is cleaned,
    case-folded, accent-stripped and split exactly as tokenizers' BertNormalizer and BertPreTokenizer do. The only
    tolerated difference: letters Python 3.11 does not know yet (Cn) that newer Rust lowercases."""
    if unicodedata.unidata_version != "14.0.0":
        pytest.skip(f"the compatibility table is for Unicode 14.0.0, this Python has {unicodedata.unidata_version}")
    cjk_edges = [c + d for lo, hi in ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
                                      (0x2A700, 0x2B81F), (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F)) for c in (lo, hi)
                 for d in (-1, 0, 1)]
    codes = [c for c in [*range(0x20000), *range(0xE0000, 0xE1000), *cjk_edges] if not 0xD800 <= c <= 0xDFFF]
    pre_tokenizer = BertPreTokenizer()
    for lowercase in (False, True):
        normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                    lowercase=lowercase)
        mismatched = []
        for start in range(0, len(codes), 2000):
            block = codes[start:start + 2000]
            text = " ".join(f"a{chr(c)}b" for c in block)
            expected = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
            if pretokenize(text, lowercase) != expected:
                mismatched += [c for c in block if pretokenize(f"a{chr(c)}b", lowercase) != [
                    word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(f"a{chr(c)}b"))]]
        assert all(lowercase and unicodedata.category(chr(c)) == "Cn" for c in mismatched), \
            [hex(c) for c in mismatched[:20]]
        assert len(mismatched) < 60


def test_bert_vocab_txt_is_used_as_written(tmp_path):
    """An existing BERT vocab.txt is used as is: ids are line numbers wherever the specials sit ([PAD] not at 0,
    [unusedN] slots), [unusedN] count as special, '##' pieces as continuations, casing is inferred, and encoding
    still matches Hugging Face."""
    tokens = ["[unused0]", "[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on",
              "mat", "##s", "##ting", "un", "##believ", "##able", ".", ",", "!", "c", "##a", "##t"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    vocab = Vocab.load(path)
    assert vocab.tokens == tokens and len(vocab) == len(tokens)
    assert vocab.special.as_dict() == {"pad": 1, "unk": 3, "cls": 4, "sep": 5, "mask": 6}
    assert vocab.lowercase is True
    assert vocab.is_special.tolist() == [t.startswith("[") for t in tokens]
    assert vocab.is_continuation.tolist() == [t.startswith("##") for t in tokens]
    assert vocab.id_of("cat") == 8
    with pytest.raises(KeyError):
        vocab.id_of("dog")
    tokenizer = WordPieceTokenizer(vocab)
    text = "The cats sat on the mat, unbelievable! Cat dog [MASK] catting"
    assert tokenizer.tokenize(text) == ["the", "cat", "##s", "sat", "on", "the", "mat", ",", "un", "##believ",
                                        "##able", "!", "cat", "[UNK]", "[MASK]", "cat", "##ting"]
    assert tokenizer.encode(text) == hf_ids(hf_tokenizer(path, True), [text])[0]
    assert Vocab.load(path, lowercase=False).lowercase is False

    cased = tmp_path / "cased" / "vocab.txt"
    cased.parent.mkdir()
    cased.write_text("\n".join(SPECIAL_TOKENS + ("The", "the")) + "\n", encoding="utf-8")
    assert Vocab.load(cased).lowercase is False


def test_vocab_load_errors_say_what_to_do(tmp_path):
    """A missing, empty or incomplete vocab.txt is a BertError naming the file and the fix, not a traceback."""
    with pytest.raises(BertError, match=r"vocabulary file .*nope\.txt does not exist"):
        Vocab.load(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(BertError, match=r"empty\.txt is empty"):
        Vocab.load(empty)
    no_mask = tmp_path / "no_mask.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(BertError, match=r"lacks the special token\(s\) \[MASK\]"):
        Vocab.load(no_mask)
    with pytest.raises(BertError, match="is a directory"):
        Vocab.load(tmp_path)


def test_encode_many_concatenates_and_counts(vocab_dir):
    """encode_many returns int32 ids of all texts back to back and int64 per-text lengths, equal to encoding each
    text alone, for empty texts and lines with split-hazard control characters too."""
    tokenizer = WordPieceTokenizer(Vocab.load(vocab_dir / "vocab.txt"))
    texts = ["The lobster is blue .", "", "x\x0by lobster", "   ", "Homarus gammarus [MASK]"]
    ids, lengths = tokenizer.encode_many(texts)
    assert ids.dtype == np.int32 and lengths.dtype == np.int64 and lengths.shape == (len(texts),)
    assert lengths.sum() == len(ids)
    assert our_ids(tokenizer, texts) == [WordPieceTokenizer(tokenizer.vocab).encode(t) for t in texts]
    assert lengths[1] == lengths[3] == 0
    empty_ids, empty_lengths = tokenizer.encode_many([])
    assert empty_ids.shape == (0,) and empty_lengths.shape == (0,)


def test_cache_is_bounded_and_transparent(vocab_dir, wiki_valid):
    """Clearing the chunk cache when it passes its limit keeps memory bounded and does not change any id."""
    vocab = Vocab.load(vocab_dir / "vocab.txt")
    lines = wiki_lines(wiki_valid)[:400]
    small = WordPieceTokenizer(vocab)
    small.cache_limit = 100
    batches = [small.encode_many(lines[i:i + 50])[0] for i in range(0, len(lines), 50)]
    assert len(small._chunk_cache) < 100 + 50 * 200
    assert np.array_equal(np.concatenate(batches), WordPieceTokenizer(vocab).encode_many(lines)[0])


def test_decode_gives_the_normalised_words(vocab_dir, wiki_valid):
    """decode(encode(line)) is the line as BERT sees it: normalised words joined by single spaces, '##' glued."""
    tokenizer = WordPieceTokenizer(Vocab.load(vocab_dir / "vocab.txt"))
    lines = [line for line in wiki_lines(wiki_valid) if line.strip()]
    for line in lines:
        assert tokenizer.decode(tokenizer.encode(line)) == " ".join(pretokenize(line, lowercase=True))
    special = tokenizer.vocab.special
    assert tokenizer.decode([special.cls, *tokenizer.encode("Lobsters"), special.sep]) == "[CLS] lobsters [SEP]"
    assert tokenizer.tokens(np.array([0, 4])) == ["[PAD]", "[MASK]"]
