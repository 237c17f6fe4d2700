"""What the shard job must write, computed apart from it: each range's documents, packed by a plain reference."""

from pathlib import Path

import numpy as np

from prep.ranges import RANGE_BYTES, inspect_input, plan_runs, range_documents, read_run
from prep.textio import ReadStats


def documents_by_range(path: Path, range_bytes: int = RANGE_BYTES) -> list[list[tuple[str, ...]]]:
    """The documents (their lines) of each range of one input, in order."""
    return [range_documents(block, ReadStats()) for run in plan_runs([inspect_input(path)], range_bytes, 1)
            for _, block in read_run(run, range_bytes)]


def packed_rows(documents: list[list[int]], max_len: int, cls: int = 2, sep: int = 3, pad: int = 0) -> np.ndarray:
    """The stream layout, the obvious way: the non-empty documents joined by [SEP], cut into [CLS] body [SEP] rows,
    the last one padded after its [SEP]."""
    stream = []
    for ids in documents:
        if ids:
            stream += ([sep] if stream else []) + list(ids)
    content = max_len - 2
    rows = []
    for start in range(0, len(stream), content):
        row = [cls] + stream[start : start + content] + [sep]
        rows.append(row + [pad] * (max_len - len(row)))
    return np.array(rows, dtype=np.int64).reshape(-1, max_len)


def expected_rows(path: Path, encode, max_len: int, range_bytes: int = RANGE_BYTES, **ids) -> np.ndarray:
    """Every range of `path` packed on its own (the job cuts the stream per range), `encode(lines)` giving a
    document's ids."""
    return np.concatenate([packed_rows([encode(lines) for lines in docs], max_len, **ids)
                           for docs in documents_by_range(path, range_bytes)])


def stream_bodies(rows: np.ndarray, pad: int = 0) -> list[int]:
    """The tokens between each row's [CLS] and its last [SEP], all rows in order."""
    return [token for row in rows.tolist() for token in [t for t in row if t != pad][1:-1]]


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]
