"""Packing: stream rows give the corpus back; pair rows have BERT's structure and are keyed per document."""

import numpy as np

from prep.packing import DocumentPool, PairBuilder, _truncate_pair, pack_stream

PAD, CLS, SEP = 0, 2, 3


def documents(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(10, 500, size=rng.integers(1, 30)) for _ in range(rng.integers(0, 8))] for _ in range(n)]


def test_stream_rows_read_back_as_the_documents():
    """Rows are [CLS] + max_len-2 stream tokens + [SEP], only the last one padded, and their bodies concatenated
    are the non-empty documents joined by [SEP]; each row knows the document it starts in and its number there."""
    docs = documents()
    texts = [np.concatenate(sentences) if sentences else np.zeros(0, np.uint16) for sentences in docs]
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    doc_ids = np.arange(len(docs), dtype=np.int64) * 10 + 7  # any ids: they are carried, not counted
    rows, stats = pack_stream(np.concatenate(texts).astype(np.uint16), lengths, doc_ids, 16, CLS, SEP, PAD)
    ids = rows.input_ids
    assert ids.dtype == np.uint16
    assert (ids[:, 0] == CLS).all() and (ids[:-1, -1] == SEP).all() and (ids[:-1] != PAD).all()
    last = ids[-1][ids[-1] != PAD]
    body = np.concatenate([ids[:-1, 1:-1].ravel(), last[1:-1]])
    expected = []
    for sentences in docs:
        if sentences:
            expected += ([SEP] if expected else []) + list(np.concatenate(sentences))
    assert body.tolist() == expected
    assert stats.dropped == {"empty": sum(1 for d in docs if not d)} and stats.documents == len(docs)
    assert stats.rows == len(ids) and stats.tokens + stats.padding == ids.size and stats.padding == (ids == PAD).sum()
    keys = list(zip(rows.doc_index.tolist(), rows.doc_row.tolist()))
    assert len(set(keys)) == len(keys) and (np.diff(rows.doc_index) >= 0).all()
    assert set(rows.doc_index.tolist()) <= set(doc_ids.tolist())
    # A row starts in the document its first stream token belongs to (a joining [SEP] to the document after it).
    owner_of_token = []
    for doc_id, text in zip(doc_ids.tolist(), texts):
        if len(text):
            owner_of_token += [doc_id] * (len(text) + (1 if owner_of_token else 0))
    assert rows.doc_index.tolist() == owner_of_token[::14]


def test_stream_of_no_documents_has_no_rows():
    rows, stats = pack_stream(np.zeros(0, np.uint16), np.zeros(2, np.int64), np.arange(2), 16, CLS, SEP, PAD)
    assert len(rows) == 0 and rows.input_ids.shape == (0, 16) and stats.dropped == {"empty": 2}


def pair_rows(mode, docs, copy=0, seed=1):
    pool = DocumentPool()
    builder = PairBuilder(24, mode, 0.1, seed, copy, CLS, SEP, PAD, pool)
    for index, sentences in enumerate(docs):
        builder.add(index, sentences)
        pool.add(index, sentences)
    return builder.take(), builder.stats


def test_pairs_have_bert_structure_and_balanced_labels():
    """Every pair row is [CLS] A [SEP] B [SEP] + padding with token types 0 for A, 1 for B, A and B non-empty; the
    NSP labels are about half 1 in both modes."""
    docs = documents(n=400)
    for mode in ("random", "swap"):
        rows, stats = pair_rows(mode, docs)
        for ids, types in zip(rows.input_ids, rows.token_type_ids):
            real = ids[ids != PAD]
            seps = np.flatnonzero(real == SEP)
            assert real[0] == CLS and len(seps) == 2 and seps[-1] == len(real) - 1 and seps[0] > 1
            assert seps[1] - seps[0] > 1
            assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : len(real)] == 1).all()
            assert (types[len(real) :] == 0).all()
        assert 0.4 < rows.nsp_labels.mean() < 0.6, mode
        assert stats.rows == len(rows) and stats.dropped.get("empty") == sum(1 for d in docs if not d)


def test_pairs_depend_on_seed_copy_and_document_only():
    """A document's pairs are the same whether it is built alone or after others (in swap mode, which needs no
    other document), and another copy gives other pairs."""
    docs = documents(n=60)
    rows, _ = pair_rows("swap", docs)
    alone, _ = pair_rows("swap", [[]] * 30 + docs[30:])
    mine = rows.doc_index >= 30
    assert np.array_equal(rows.input_ids[mine], alone.input_ids[alone.doc_index >= 30])
    other, _ = pair_rows("swap", docs, copy=1)
    assert not np.array_equal(rows.input_ids, other.input_ids[: len(rows)]) or len(other) != len(rows)


def test_swap_mode_drops_and_counts_one_token_documents():
    """A document of a single token cannot make a pair in swap mode: it is counted under too_short_for_pair."""
    _, stats = pair_rows("swap", [[np.array([7])], [np.arange(10, 20)]])
    assert stats.dropped == {"too_short_for_pair": 1} and stats.rows == 1


def test_truncation_matches_bert_token_by_token_rule():
    """The closed-form truncation leaves the same lengths as BERT's loop (cut the longer side one token at a time,
    B on a tie) and only ever removes tokens from the ends."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b, limit = (int(x) for x in rng.integers(1, 60, size=3))
        la, lb = a, b
        while la + lb > limit:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        first, second = np.arange(a), np.arange(100, 100 + b)
        new_first, new_second, cut = _truncate_pair(first, second, limit, rng)
        assert (len(new_first), len(new_second)) == (la, lb) and cut == a + b - la - lb
        assert np.array_equal(new_first, np.arange(new_first[0], new_first[0] + la)) if la else True
        assert np.array_equal(new_second, np.arange(new_second[0], new_second[0] + lb)) if lb else True
