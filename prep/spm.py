"""The tokenizer for `--model-type unigram|bpe` vocabularies: a SentencePiece model behind our tokenizer interface.

The model holds [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4 and was trained on text that went through BERT's cleaning
(and, uncased, lowercasing and accent stripping); encoding applies the same normalisation before SentencePiece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece

from prep.errors import BertError
from prep.wordpiece import ChunkCachingTokenizer, Vocab, normalize, split_special


def normalize_for_sentencepiece(text: str, lowercase: bool) -> str:
    """BERT's cleaning and case folding without CJK padding: SentencePiece segments ideographs itself."""
    return normalize(text, lowercase, split_cjk=False)


class SentencePieceTokenizer(ChunkCachingTokenizer):
    """Encodes with a SentencePiece model whose pieces, in id order, are exactly `vocab.tokens`."""

    def __init__(self, model_path: Path, vocab: Vocab):
        super().__init__()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BertError(f"SentencePiece model {model_path} is missing beside {vocab.path}; retrain the "
                            f"vocabulary with `bertprep vocab`")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        if pieces != vocab.tokens:
            raise BertError(f"{vocab.path} does not list the pieces of {model_path} in id order; the two files come "
                            f"from different trainings, retrain the vocabulary with `bertprep vocab`")
        self.vocab = vocab
        self.model_path = model_path

    def _encode_texts(self, texts: list[str]) -> list[bytes]:
        parts = [split_special(text) for text in texts]
        segments = [normalize_for_sentencepiece(segment, self.vocab.lowercase)
                    for text_parts in parts for segment in text_parts[::2]]
        # One call for all segments: SentencePiece's batch encoding stays in C++.
        segment_ids = iter(self._sp.encode(segments, out_type=int, num_threads=1))
        encoded = []
        for text_parts in parts:
            ids: list[int] = []
            for i, part in enumerate(text_parts):
                ids.extend([self.vocab.id_of(part)] if i % 2 else next(segment_ids))
            encoded.append(np.array(ids, dtype=np.int32).tobytes())
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        """SentencePiece's detokenization, with special tokens kept as written and separated by spaces."""
        out: list[str] = []
        run: list[int] = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if self.vocab.is_special[i]:
                if run:
                    out.append(self._sp.decode(run).strip())
                    run = []
                out.append(self.vocab.tokens[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run).strip())
        return " ".join(part for part in out if part)
