"""The BERT vocabulary and tokenizer: BERT normalisation, punctuation pre-tokenization, greedy WordPiece.

Token-for-token identical to Hugging Face's `BertTokenizer` (the Rust `tokenizers` BertNormalizer,
BertPreTokenizer and WordPiece model) loaded from the same vocab.txt; tests/prep/test_wordpiece.py holds the proof.
"""

from __future__ import annotations

import array
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from prep.errors import BertError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"
SENTENCEPIECE_MARKER = "\u2581"

# Like Hugging Face, literal special tokens are found in the raw text, before any normalisation, case-sensitively.
SPECIAL_RE = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")
_UNUSED_RE = re.compile(r"\[unused\d+\]")

# Characters that `str.split()` splits on but BERT's cleaning deletes (so "a\x0bb" is one word "ab"):
# a line holding one cannot take the split-first fast path.
_SPLIT_HAZARDS = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"
_SPLIT_HAZARD_RE = re.compile(f"[{_SPLIT_HAZARDS}]")
_DELETE_SPLIT_HAZARDS = dict.fromkeys(map(ord, _SPLIT_HAZARDS))

_ASCII_PUNCTUATION = frozenset('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')
# Rust's char::is_whitespace; Python's str.isspace() adds \x1c-\x1f, which BERT deletes as controls first.
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# The ideograph blocks BertNormalizer pads with spaces (its ranges, which differ slightly from the Python BERT's).
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B81F),
               (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F))

# Hugging Face's tokenizers classifies characters with Unicode 8 era tables; Python 3.11 has Unicode 14. These code
# points (nearly all assigned or re-categorised since) are ordinary letters to tokenizers: kept, not decomposed, not
# stripped as accents, not split off as punctuation. Found by sweeping every code point through both.
_HF_PLAIN_RANGES = (
    (0x61D, 0x61D), (0x7FD, 0x7FD), (0x890, 0x891), (0x898, 0x89F), (0x8CA, 0x8E2), (0x9FD, 0x9FE), (0xA76, 0xA76),
    (0xAFA, 0xAFF), (0xB55, 0xB55), (0xC04, 0xC04), (0xC3C, 0xC3C), (0xC77, 0xC77), (0xC84, 0xC84), (0xD00, 0xD00),
    (0xD3B, 0xD3C), (0xD81, 0xD81), (0xEBA, 0xEBA), (0x180F, 0x180F), (0x1885, 0x1886), (0x1ABF, 0x1ACE),
    (0x1B7D, 0x1B7E), (0x1DF6, 0x1DFB), (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), (0xA82C, 0xA82C), (0xA8C5, 0xA8C5),
    (0xA8FF, 0xA8FF), (0xA9BD, 0xA9BD), (0x10D24, 0x10D27), (0x10EAB, 0x10EAD), (0x10F46, 0x10F50),
    (0x10F55, 0x10F59), (0x10F82, 0x10F89), (0x11070, 0x11070), (0x11073, 0x11074), (0x110C2, 0x110C2),
    (0x110CD, 0x110CD), (0x111C9, 0x111C9), (0x111CF, 0x111CF), (0x1123E, 0x1123E), (0x1133B, 0x1133B),
    (0x11438, 0x1143F),
    (0x11442, 0x11444), (0x11446, 0x11446), (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145E),
    (0x11660, 0x1166C), (0x116B9, 0x116B9), (0x1182F, 0x11837), (0x11839, 0x1183B), (0x11938, 0x11938),
    (0x1193B, 0x1193C), (0x1193E, 0x1193E), (0x11943, 0x11946), (0x119D4, 0x119D7), (0x119DA, 0x119DB),
    (0x119E0, 0x119E0), (0x119E2, 0x119E2), (0x11A01, 0x11A0A), (0x11A33, 0x11A38), (0x11A3B, 0x11A47),
    (0x11A51, 0x11A56), (0x11A59, 0x11A5B), (0x11A8A, 0x11A96), (0x11A98, 0x11A9C), (0x11A9E, 0x11AA2),
    (0x11C30, 0x11C36), (0x11C38, 0x11C3D), (0x11C3F, 0x11C3F), (0x11C41, 0x11C45), (0x11C70, 0x11C71),
    (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3), (0x11CB5, 0x11CB6), (0x11D31, 0x11D36),
    (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D), (0x11D3F, 0x11D45), (0x11D47, 0x11D47), (0x11D90, 0x11D91),
    (0x11D95, 0x11D95), (0x11D97, 0x11D97), (0x11EF3, 0x11EF4), (0x11EF7, 0x11EF8), (0x11FFF, 0x11FFF),
    (0x12FF1, 0x12FF2), (0x13430, 0x13438), (0x16E97, 0x16E9A), (0x16F4F, 0x16F4F), (0x16FE2, 0x16FE2),
    (0x16FE4, 0x16FE4), (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46), (0x1E000, 0x1E006), (0x1E008, 0x1E018),
    (0x1E01B, 0x1E021), (0x1E023, 0x1E024), (0x1E026, 0x1E02A), (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE),
    (0x1E2EC, 0x1E2EF), (0x1E944, 0x1E94A), (0x1E95E, 0x1E95F),
)
# ... and the other way round: punctuation (Po) and a nonspacing mark (Mn) in those older tables only.
_HF_EXTRA_PUNCTUATION = frozenset((0x166D, 0x111C9))
_HF_EXTRA_MARKS = frozenset((0x1734,))


def _in_ranges(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


_HF_PLAIN = frozenset(code for lo, hi in _HF_PLAIN_RANGES for code in range(lo, hi + 1))


def _hf_plain(code: int) -> bool:
    return code in _HF_PLAIN


def is_punctuation(char: str) -> bool:
    """BertPreTokenizer's punctuation: ASCII punctuation (so `$+<=>^`|~` too) or a Unicode P* category."""
    code = ord(char)
    if char in _ASCII_PUNCTUATION or code in _HF_EXTRA_PUNCTUATION:
        return True
    return unicodedata.category(char).startswith("P") and not _hf_plain(code)


def is_isolated(char: str) -> bool:
    """True for characters BERT always makes a word of their own (punctuation, CJK ideographs): never a '##' piece."""
    return is_punctuation(char) or _in_ranges(ord(char), _CJK_RANGES)


def _clean_char(char: str, split_cjk: bool) -> str:
    """BertNormalizer's clean_text and CJK padding for one character ('' deletes it)."""
    code = ord(char)
    if char in _WHITESPACE:
        # \x0b, \x0c and \x85 are controls as well, and cleaning removes controls before it maps whitespace.
        return "" if char not in "\t\n\r" and unicodedata.category(char) == "Cc" else " "
    if code == 0 or code == 0xFFFD:
        return ""
    # Cn (unassigned) is kept: tokenizers' "other" test only knows Cc, Cf, Co and Cs.
    if unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs") and not _hf_plain(code):
        return ""
    if split_cjk and _in_ranges(code, _CJK_RANGES):
        return f" {char} "
    return char


def _is_stripped_mark(char: str) -> bool:
    code = ord(char)
    return code in _HF_EXTRA_MARKS or (unicodedata.category(char) == "Mn" and not _hf_plain(code))


def _strip_lower_char(char: str) -> str:
    """Uncased normalisation of one cleaned character: NFD, drop nonspacing marks, then lowercase each character.

    Per character, so like tokenizers there is no Greek final-sigma rule; canonical reordering across characters only
    matters among marks that survive stripping (a few musical symbols), which we accept.
    """
    decomposed = char if _hf_plain(ord(char)) else unicodedata.normalize("NFD", char)
    return "".join(c.lower() for c in decomposed if not _is_stripped_mark(c))


def _isolate_punctuation_char(char: str) -> str:
    return f" {char} " if is_punctuation(char) else char


class _LazyTable(dict):
    """A `str.translate` table filled on first sight of each character, so translation stays a C loop."""

    def __init__(self, rule: Callable[[str], str]):
        super().__init__()
        self._rule = rule

    def __missing__(self, code: int) -> str:
        value = self[code] = self._rule(chr(code))
        return value


_CLEAN_CJK = _LazyTable(lambda c: _clean_char(c, split_cjk=True))
_CLEAN = _LazyTable(lambda c: _clean_char(c, split_cjk=False))
_STRIP_LOWER = _LazyTable(_strip_lower_char)
_ISOLATE_PUNCTUATION = _LazyTable(_isolate_punctuation_char)


def normalize(text: str, lowercase: bool, split_cjk: bool = True) -> str:
    """BertNormalizer: drop NUL, U+FFFD and control/format characters, map whitespace to ' ', pad CJK ideographs
    with spaces (when `split_cjk`), and if `lowercase` strip accents and lowercase."""
    text = text.translate(_CLEAN_CJK if split_cjk else _CLEAN)
    return text.translate(_STRIP_LOWER) if lowercase else text


def whitespace_chunks(text: str) -> list[str]:
    """`text` split on whitespace as BERT splits it, into chunks that normalise and pre-tokenize independently.

    The control characters `str.split()` would split on but BERT deletes are deleted first (no special-token
    handling here: "[MA\\x0bSK]" is [MASK] for this function but not for BERT, which matches specials first).
    """
    if any(char in text for char in _SPLIT_HAZARDS):
        text = text.translate(_DELETE_SPLIT_HAZARDS)
    return text.split()


def pretokenize(text: str, lowercase: bool) -> list[str]:
    """The words WordPiece sees: normalised text split on whitespace, each punctuation character its own word."""
    return normalize(text, lowercase).translate(_ISOLATE_PUNCTUATION).split()


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the five special tokens in one vocabulary (`unk` is None for a tokenizer.json without one)."""

    pad: int
    unk: int | None
    cls: int
    sep: int
    mask: int

    def as_dict(self) -> dict[str, int]:
        return {"pad": self.pad, "unk": self.unk, "cls": self.cls, "sep": self.sep, "mask": self.mask}


class Vocab:
    """A vocab.txt: one token a line, the line number is the id (Hugging Face's reading, duplicates: last wins)."""

    def __init__(self, tokens: list[str], path: Path, sha256: str, lowercase: bool):
        self.tokens = tokens
        self.path = path
        self.sha256 = sha256
        self.lowercase = lowercase
        self._ids = {token: i for i, token in enumerate(tokens)}
        missing = [token for token in SPECIAL_TOKENS if token not in self._ids]
        if missing:
            raise BertError(f"vocabulary {path} lacks the special token(s) {', '.join(missing)}; a BERT vocab.txt "
                            f"needs all of {' '.join(SPECIAL_TOKENS)} (train one with `bertprep vocab`)")
        self.special = SpecialIds(*(self._ids[token] for token in SPECIAL_TOKENS))
        self.is_special = np.zeros(len(tokens), dtype=bool)
        self.is_special[[self._ids[token] for token in SPECIAL_TOKENS]] = True
        self.is_special[[i for i, token in enumerate(tokens) if _UNUSED_RE.fullmatch(token)]] = True
        marker_style = self.sentencepiece_style(tokens)
        self.is_continuation = np.array([_continues_word(token, marker_style) for token in tokens],
                                        dtype=bool) & ~self.is_special

    @staticmethod
    def sentencepiece_style(tokens: Iterable[str]) -> bool:
        """True for a SentencePiece vocab (word starts carry '▁', the rest continue words) rather than '##' pieces."""
        has_marker = has_prefix = False
        for token in tokens:
            has_marker = has_marker or token.startswith(SENTENCEPIECE_MARKER)
            has_prefix = has_prefix or token.startswith(CONTINUATION_PREFIX)
        return has_marker and not has_prefix

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        """The id of `token`; KeyError if it is not in the vocabulary."""
        return self._ids[token]

    def get(self, token: str) -> int | None:
        return self._ids.get(token)

    @classmethod
    def load(cls, path: Path, lowercase: bool | None = None) -> "Vocab":
        """Read a vocab.txt. `lowercase=None` infers it: uncased when no token has an uppercase letter.

        A `.json` path is a Hugging Face tokenizer.json, read by `prep.hf_tokenizer.TokenizerJsonVocab`.
        """
        path = Path(path)
        if path.suffix == ".json":
            from prep.hf_tokenizer import TokenizerJsonVocab  # it imports this module

            return TokenizerJsonVocab.from_file(path, lowercase)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BertError(f"vocabulary file {path} does not exist; pass a vocab.txt or the directory "
                            f"`bertprep vocab` wrote") from None
        except IsADirectoryError:
            raise BertError(f"vocabulary {path} is a directory; pass the vocab.txt inside it") from None
        except OSError as err:
            raise BertError(f"cannot read vocabulary file {path}: {err.strerror}; check its permissions") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BertError(f"vocabulary file {path} is not UTF-8 text ({err}); pass a vocab.txt") from None
        # Hugging Face reads vocab.txt in text mode: \r\n and \r end lines too.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        tokens = text.split("\n")
        if text.endswith("\n"):
            tokens.pop()
        if not any(tokens):
            raise BertError(f"vocabulary file {path} is empty; pass a vocab.txt with one token per line")
        if lowercase is None:
            lowercase = not any(char.isupper() for token in tokens
                                if not (token.startswith("[") and token.endswith("]")) for char in token)
        return cls(tokens, path, hashlib.sha256(data).hexdigest(), lowercase)


def _continues_word(token: str, sentencepiece_style: bool) -> bool:
    if sentencepiece_style:
        return not token.startswith(SENTENCEPIECE_MARKER)
    return token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX)


class ChunkCachingTokenizer:
    """Fast batch encoding shared by our tokenizers: text is split on whitespace and each raw chunk's ids are cached.

    A corpus then costs one dict lookup per word once its words have been seen; only new chunks run the full
    pipeline (`_encode_texts`). Valid because every tokenizer here treats whitespace as a hard word boundary.
    Subclasses set `vocab` and implement `_encode_texts` and `decode`.
    """

    vocab: Vocab
    cache_limit = 1_000_000  # cached chunks; cleared past this so memory stays bounded on huge corpora

    def __init__(self) -> None:
        self._chunk_cache: dict[str, bytes] = {}  # raw chunk -> its ids as int32 bytes

    def _encode_texts(self, texts: list[str]) -> list[bytes]:
        """The full pipeline for any texts (special tokens, normalisation, segmentation): int32 ids as bytes."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts without [CLS]/[SEP]: (ids int32 [sum(lengths)], lengths int64 [len(texts)])."""
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        cache = self._chunk_cache
        if len(cache) > self.cache_limit:
            cache.clear()
        lookup = cache.__getitem__
        joined = "".join(texts)
        hazards = any(char in joined for char in _SPLIT_HAZARDS)
        encoded = []
        for text in texts:
            if hazards and _SPLIT_HAZARD_RE.search(text):
                encoded.extend(self._encode_texts([text]))
                continue
            chunks = text.split()
            try:
                encoded.append(b"".join(map(lookup, chunks)))
            except KeyError:
                missing = list(set(chunks).difference(cache))
                cache.update(zip(missing, self._encode_texts(missing)))
                encoded.append(b"".join(map(lookup, chunks)))
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) // 4
        return np.frombuffer(b"".join(encoded), dtype=np.int32), lengths

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without [CLS]/[SEP]."""
        return self.encode_many([text])[0].tolist()

    def tokenize(self, text: str) -> list[str]:
        """The vocabulary strings `encode` gives."""
        return self.tokens(self.encode(text))

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary strings of `ids`."""
        tokens = self.vocab.tokens
        return [tokens[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist()]


def split_special(text: str) -> list[str]:
    """`text` cut around literal special tokens: odd positions hold the special tokens, even ones the text between."""
    return SPECIAL_RE.split(text) if "[" in text else [text]


class WordPieceTokenizer(ChunkCachingTokenizer):
    """BERT's tokenizer over a `Vocab`; ids match Hugging Face `BertTokenizer` on the same vocab.txt."""

    def __init__(self, vocab: Vocab, max_chars_per_word: int = 100):
        super().__init__()
        self.vocab = vocab
        self.max_chars_per_word = max_chars_per_word
        self._unk = vocab.special.unk
        # Greedy matching looks up "##" + rest in the vocabulary; keying '##' pieces by their rest saves the concat.
        self._word_start_ids = {token: i for i, token in enumerate(vocab.tokens)}
        self._continuation_ids = {token[len(CONTINUATION_PREFIX):]: i for i, token in enumerate(vocab.tokens)
                                  if token.startswith(CONTINUATION_PREFIX)}
        self._max_start_chars = max(map(len, self._word_start_ids))
        self._max_continuation_chars = max(map(len, self._continuation_ids), default=0)
        self._word_cache: dict[str, bytes] = {}  # pre-tokenized word -> its ids as int32 bytes

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces with '##' pieces glued to the one before; special tokens are kept as written."""
        return " ".join(self.tokens(ids)).replace(" " + CONTINUATION_PREFIX, "")

    def _encode_texts(self, texts: list[str]) -> list[bytes]:
        if len(self._word_cache) > self.cache_limit:
            self._word_cache.clear()
        lowercase = self.vocab.lowercase
        encoded = []
        for text in texts:
            if text.isascii() and text.isalnum():
                # Letters and digits only: normalisation is at most lowercasing and the text is one word.
                encoded.append(self._word_bytes(text.lower() if lowercase else text))
            else:
                encoded.append(b"".join(self._text_bytes(text)))
        return encoded

    def _text_bytes(self, text: str) -> Iterable[bytes]:
        for i, part in enumerate(split_special(text)):
            if i % 2:
                yield array.array("i", [self.vocab.id_of(part)]).tobytes()
            else:
                yield from map(self._word_bytes, pretokenize(part, self.vocab.lowercase))

    def _word_bytes(self, word: str) -> bytes:
        """A pre-tokenized word's ids as int32 bytes, cached."""
        ids = self._word_cache.get(word)
        if ids is None:
            ids = self._word_cache[word] = array.array("i", self._wordpiece(word)).tobytes()
        return ids

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first; a word that is too long or has an unmatched rest is one [UNK]."""
        if len(word) > self.max_chars_per_word:
            return (self._unk,)
        piece_id = self._word_start_ids.get(word)
        if piece_id is not None:
            return (piece_id,)
        pieces = []
        start = 0
        lookup, max_chars = self._word_start_ids.get, self._max_start_chars
        while start < len(word):
            end = min(len(word), start + max_chars)
            while end > start:
                piece_id = lookup(word[start:end])
                if piece_id is not None:
                    break
                end -= 1
            else:
                return (self._unk,)
            pieces.append(piece_id)
            start = end
            lookup, max_chars = self._continuation_ids.get, self._max_continuation_chars
        return tuple(pieces)
