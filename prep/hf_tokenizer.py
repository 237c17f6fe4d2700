"""Hugging Face `tokenizer.json` vocabularies: read as a `Vocab`, encoded with the `tokenizers` library.

Published ModernBERTs ship a byte-level BPE tokenizer.json; datasets made with one keep it as their vocabulary file.
Ids are exactly what `tokenizers` gives for the same text without the special tokens its post-processor would add:
rows get [CLS]/[SEP] (whatever the file calls them) from the packer, as with WordPiece. The vocabulary side (tokens,
special ids, which tokens continue a word) is read from the JSON alone, so training on such a dataset does not need
`tokenizers`; encoding does, and checks that the library reads the same tokens.

Special roles are found by name among the file's added tokens (first match in `SPECIAL_NAMES` order); unk may also
come from the model's own `unk_token`. A file without pad, cls, sep or mask tokens is refused; one without unk (a
byte-level BPE never needs one) has `special.unk` None.

A token continues a word (whole-word masking joins it to the token before) when it is not special and:
byte-level BPE: it does not start with "Ġ", the mark of a preceding space (so punctuation and newlines join the
word before, and a document's first word, which follows [CLS]/[SEP], starts a word because those are special);
Metaspace: it does not start with "▁"; a model with a `continuing_subword_prefix` (WordPiece "##"): it starts with
that prefix; any other tokenizer: never.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from prep.errors import BertError
from prep.wordpiece import SpecialIds, Vocab

TOKENIZER_FILE = "tokenizer.json"
KIND = "hf-tokenizer"
INSTALL_HINT = "pip install 'bertprep[hf-tokenizer]'"
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ"
METASPACE = "\u2581"  # "▁"
ROLES = ("pad", "unk", "cls", "sep", "mask")
SPECIAL_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>", "<PAD>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>", "<UNK>"),
    "cls": ("[CLS]", "<cls>", "<s>", "<|cls|>", "<CLS>"),
    "sep": ("[SEP]", "<sep>", "</s>", "<|sep|>", "<SEP>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>", "<MASK>"),
}


def is_tokenizer_json(path: Path) -> bool:
    """True for a path that names a tokenizer.json (any `.json` file) rather than a vocab.txt."""
    return Path(path).suffix == ".json"


def require_tokenizers():
    """The `tokenizers` module, or a BertError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise BertError(f"using a tokenizer.json needs the `tokenizers` library: {INSTALL_HINT}") from None
    return tokenizers


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's character for each byte: printable Latin-1 bytes stand for themselves, the other 68 are
    shifted to U+0100 and up in byte order (so the space 0x20 is "Ġ" U+0120 and the newline 0x0A is "Ċ")."""
    kept = [byte for byte in range(256) if 0x21 <= byte <= 0x7E or 0xA1 <= byte <= 0xAC or 0xAE <= byte <= 0xFF]
    shifted = [byte for byte in range(256) if byte not in kept]
    return {**{chr(byte): byte for byte in kept}, **{chr(0x100 + i): byte for i, byte in enumerate(shifted)}}


_BYTE_OF_CHAR = _byte_level_chars()


def _nodes(value) -> Iterable[dict]:
    """Every JSON object in a nested normalizer/pre-tokenizer/decoder description, itself included."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _nodes(item)


class TokenizerJsonVocab(Vocab):
    """A tokenizer.json read as a vocabulary: `tokens` (id -> the string `Tokenizer.id_to_token` gives), `special`
    ids, `is_special` (the five roles and every added token marked special), `is_continuation` (module docstring),
    `lowercase` (the normalizer lowercases), `added` (ids of added tokens: they are not byte-level encoded),
    `space_marker` ("Ġ", "▁" or None) and `continuation_rule` (the rule in words)."""

    def __init__(self, path: Path, data: bytes):
        spec = _parse(path, data)
        self.path, self.sha256 = Path(path), hashlib.sha256(data).hexdigest()
        model = spec["model"]
        self.model_type = str(model.get("type", "?"))
        by_id = _model_tokens(model, path)
        added = [entry for entry in spec.get("added_tokens") or [] if isinstance(entry, dict)]
        by_id.update({int(entry["id"]): str(entry["content"]) for entry in added})
        size = max(by_id) + 1 if by_id else 0
        if len(by_id) != size:
            missing = next(i for i in range(size) if i not in by_id)
            raise BertError(f"{path} has no token for id {missing} (ids must run 0..{size - 1} without gaps); "
                            f"pass a complete tokenizer.json")
        self.tokens = [by_id[i] for i in range(size)]
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        self.added = frozenset(int(entry["id"]) for entry in added)
        self.lowercase = any(node.get("type") == "Lowercase" or (node.get("type") == "BertNormalizer"
                                                                 and node.get("lowercase"))
                             for node in _nodes(spec.get("normalizer")))
        shapers = [*_nodes(spec.get("pre_tokenizer")), *_nodes(spec.get("decoder"))]
        self.byte_level = any(node.get("type") == "ByteLevel" for node in shapers)
        self.special_tokens = _special_tokens(path, model, {str(entry["content"]) for entry in added}, self._ids)
        self.special = SpecialIds(**{role: None if token is None else self._ids[token]
                                     for role, token in self.special_tokens.items()})
        self.is_special = np.zeros(size, dtype=bool)
        self.is_special[[int(entry["id"]) for entry in added if entry.get("special")]] = True
        self.is_special[[i for i in self.special.as_dict().values() if i is not None]] = True
        self.space_marker, self.continuation_rule, continues = _continuation(self.byte_level, shapers, model)
        self.is_continuation = np.fromiter(map(continues, self.tokens), dtype=bool, count=size) & ~self.is_special

    @classmethod
    def from_file(cls, path: Path, lowercase: bool | None = None) -> "TokenizerJsonVocab":
        """Read a tokenizer.json; `lowercase`, when given, must agree with its normalizer (it cannot be changed)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BertError(f"tokenizer file {path} does not exist; pass a tokenizer.json or the directory "
                            f"`bertprep vocab --import` wrote") from None
        except OSError as err:
            raise BertError(f"cannot read tokenizer file {path}: {err.strerror}; check its permissions") from None
        vocab = cls(path, data)
        if lowercase is not None and lowercase != vocab.lowercase:
            raise BertError(f"{path} is {'uncased' if vocab.lowercase else 'cased'}: its normalizer decides the "
                            f"casing, so leave out --{'cased' if vocab.lowercase else 'uncased'}")
        return vocab


def _parse(path: Path, data: bytes) -> dict:
    try:
        spec = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise BertError(f"{path} is not valid JSON ({err}); pass a Hugging Face tokenizer.json") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise BertError(f"{path} is not a Hugging Face tokenizer.json (it has no \"model\"); pass the "
                        f"tokenizer.json of a model, or a vocab.txt")
    return spec


def _model_tokens(model: dict, path: Path) -> dict[int, str]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        return {int(i): str(token) for token, i in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [piece, score] in id order
        return {i: str(entry[0]) for i, entry in enumerate(vocab)}
    raise BertError(f"{path} has a {model.get('type')!r} model without a vocabulary; pass a complete tokenizer.json")


def _special_tokens(path: Path, model: dict, added: set[str], ids: dict[str, int]) -> dict[str, str | None]:
    """Role -> token string; unk is None when there is none, any other missing role is an error."""
    found = {role: next((name for name in SPECIAL_NAMES[role] if name in added), None) for role in ROLES}
    model_unk = model.get("unk_token")
    if isinstance(model.get("unk_id"), int) and 0 <= model["unk_id"] < len(model.get("vocab") or ()):
        model_unk = model["vocab"][model["unk_id"]][0]  # Unigram names its unknown piece by id
    if isinstance(model_unk, str) and model_unk in ids:
        found["unk"] = model_unk
    missing = [role for role in ROLES if role != "unk" and found[role] is None]
    if missing:
        looked_for = "; ".join(f"{role}: {' '.join(SPECIAL_NAMES[role])}" for role in missing)
        raise BertError(f"{path} has no {' or '.join(missing)} token among its added tokens (looked for "
                        f"{looked_for}); a masked-LM needs them: add them with `tokenizer.add_special_tokens([...])` "
                        f"and save it again")
    return found


def _continuation(byte_level: bool, shapers: list[dict], model: dict):
    """(the space marker or None, the rule in words, token -> continues the word before) for the tokenizer's way
    of marking word starts."""
    if byte_level:
        return (BYTE_LEVEL_SPACE, f"not starting with {BYTE_LEVEL_SPACE!r}",
                lambda token: not token.startswith(BYTE_LEVEL_SPACE))
    metaspace = next((node for node in shapers if node.get("type") == "Metaspace"), None)
    if metaspace is not None:
        marker = str(metaspace.get("replacement") or METASPACE)
        return marker, f"not starting with {marker!r}", lambda token: not token.startswith(marker)
    prefix = model.get("continuing_subword_prefix")
    if isinstance(prefix, str) and prefix:
        return None, f"starting with {prefix!r}", lambda token: token.startswith(prefix) and len(token) > len(prefix)
    return None, "none: every token is a word of its own", lambda token: False


def readable_tokens(vocab: Vocab) -> list[str]:
    """The tokens as text, for `bertprep peek`: a byte-level token's bytes decoded as UTF-8 (so "Ġthe" is " the"
    and half a character is U+FFFD, as `Tokenizer.decode([id])` gives), "▁" as a space; other vocabularies as they
    are."""
    if not isinstance(vocab, TokenizerJsonVocab):
        return vocab.tokens
    marker = None if vocab.byte_level else vocab.space_marker
    texts = []
    for i, token in enumerate(vocab.tokens):
        if i in vocab.added:
            texts.append(token)
        elif vocab.byte_level and all(char in _BYTE_OF_CHAR for char in token):
            texts.append(bytes(_BYTE_OF_CHAR[char] for char in token).decode("utf-8", errors="replace"))
        else:
            texts.append(token.replace(marker, " ") if marker else token)
    return texts


class HfTokenizer:
    """Encodes with the `tokenizers` library: ids equal `Tokenizer.encode(text, add_special_tokens=False).ids`.

    Truncation and padding configured in the file are switched off: documents are packed into rows by us.
    """

    def __init__(self, vocab: TokenizerJsonVocab):
        tokenizers = require_tokenizers()
        data = vocab.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != vocab.sha256:
            raise BertError(f"{vocab.path} changed while it was being read; run the command again")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a plain Exception for files it cannot read
            raise BertError(f"the `tokenizers` library cannot read {vocab.path} ({err}); pass a tokenizer.json "
                            f"saved by `tokenizers` >= 0.15") from None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != len(vocab) or any(tokenizer.id_to_token(i) != token for i, token in enumerate(vocab.tokens)):
            raise BertError(f"the `tokenizers` library reads {size} tokens from {vocab.path} that differ from its "
                            f"JSON's vocabulary and added tokens; pass a tokenizer.json saved by `tokenizers`")
        self.vocab = vocab
        self._tokenizer = tokenizer
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets we never use; the ids are the same.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode_many(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts in one batch, without special tokens: (ids int32 [sum(lengths)], lengths int64 [len(texts)])."""
        encodings = self._encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(encoding.ids) for encoding in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(encoding.ids for encoding in encodings), dtype=np.int32,
                          count=int(lengths.sum()))
        return ids, lengths

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without special tokens."""
        return self.encode_many([text])[0].tolist()

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary strings of `ids`."""
        tokens = self.vocab.tokens
        return [tokens[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist()]

    def tokenize(self, text: str) -> list[str]:
        """The vocabulary strings `encode` gives."""
        return self.tokens(self.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """The tokenizer's own decoding, special tokens kept."""
        return self._tokenizer.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(), skip_special_tokens=False)
