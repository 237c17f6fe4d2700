"""Shard format v1: the one definition of what `bertprep shard` writes and `berttrain` reads.

A dataset is a directory:

    manifest.msgpack          written last; its presence means the dataset is complete
    vocab.txt                 the vocabulary the ids refer to (tokenizer.json for a Hugging Face tokenizer)
    train/00000-input_ids.npy, train/00000-mlm_positions.npy, ...   one .npy per array per shard
    val/00000-input_ids.npy, ...

Every array is a plain `.npy` file that `np.load(path, mmap_mode="r")` maps without copying. docs/FORMAT.md is the
specification; this module depends on numpy and msgpack only, so anyone can read shards with those two.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np

from prep.errors import BertError
from prep.outputs import move_into_place, refuse_existing, remove, staging_dir, write_atomic

FORMAT_NAME = "bertprep-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
VOCAB_NAME = "vocab.txt"
TOKENIZER_NAME = "tokenizer.json"  # a Hugging Face tokenizer's file, kept under this name
SPLITS = ("train", "val")

# Arrays per row; the last two exist only in datasets made with --nsp.
ROW_ARRAYS = ("input_ids", "mlm_positions", "mlm_labels", "token_type_ids", "nsp_labels")
NSP_ARRAYS = ("token_type_ids", "nsp_labels")


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it (vocabularies up to 65,536 entries), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def row_dtype(max_len: int, max_predictions: int, vocab_size: int, nsp: bool) -> np.dtype:
    """The record of one row with every array as a field, as rows travel between pipeline stages."""
    ids = ids_dtype(vocab_size)
    fields = [
        ("input_ids", ids, (max_len,)),
        ("mlm_positions", np.uint16, (max_predictions,)),
        ("mlm_labels", ids, (max_predictions,)),
    ]
    if nsp:
        fields += [("token_type_ids", np.uint8, (max_len,)), ("nsp_labels", np.uint8)]
    return np.dtype(fields)


def shard_file_name(index: int, array: str) -> str:
    return f"{index:05d}-{array}.npy"


class _HashingFile:
    """A write-only file wrapper that hashes every byte on its way to disk, so writing costs one pass."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.raw.write(data)


def write_array(path: Path, array: np.ndarray) -> dict:
    """Writes `array` as a .npy file at `path`; returns its manifest entry {file, dtype, shape, sha256}."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as raw:
        out = _HashingFile(raw)
        np.lib.format.write_array(out, array, version=(1, 0), allow_pickle=False)
    return {
        "file": f"{path.parent.name}/{path.name}",
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "sha256": out.sha256.hexdigest(),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(directory: Path, index: int, rows: np.ndarray, order: np.ndarray | None = None,
                names: tuple[str, ...] | None = None) -> dict:
    """Writes `rows[order]` (row records of `row_dtype`; all of them in order when `order` is None) as shard `index`
    in `directory`, one .npy per array (of `names`, default all); returns its manifest entry {rows, arrays}. Each
    array is gathered by `order` straight from the records, which is several times faster than permuting the
    records."""
    arrays = {}
    for name in names or rows.dtype.names:
        array = rows[name] if order is None else rows[name][order]
        arrays[name] = write_array(Path(directory) / shard_file_name(index, name), array)
    return {"rows": len(rows), "arrays": arrays}


class DatasetWriter:
    """Builds a dataset in a hidden `.NAME.partial` directory beside `out_dir` and moves it into place in `finish()`.

    Nothing at `out_dir` changes until `finish()` has written every shard and then the manifest, so an interrupted
    run leaves no dataset behind (only the partial directory, which the next run clears).
    """

    def __init__(self, out_dir: Path, *, force: bool = False):
        self.out_dir = Path(out_dir)
        refuse_existing(self.out_dir, force, "pass --force to replace it, or -o to write elsewhere", noun="output",
                        empty_dir_ok=False)
        self.force = force

    def __enter__(self) -> "DatasetWriter":
        self.partial_dir = staging_dir(self.out_dir)  # clears one left by an interrupted run
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            remove(self.partial_dir, ignore_errors=True)

    def split_dir(self, split: str) -> Path:
        """The directory a split's shards are written to (by `write_shard`, in any process)."""
        path = self.partial_dir / split
        path.mkdir(exist_ok=True)
        return path

    def scratch_dir(self) -> Path:
        """A directory for temporary files that disappears with the partial directory."""
        path = self.partial_dir / "scratch"
        path.mkdir(exist_ok=True)
        return path

    def copy_vocab(self, vocab_file: Path) -> str:
        """Copies the vocabulary into the dataset: a `.json` file as tokenizer.json, any other as vocab.txt; returns
        the name."""
        name = TOKENIZER_NAME if Path(vocab_file).suffix == ".json" else VOCAB_NAME
        shutil.copyfile(vocab_file, self.partial_dir / name)
        return name

    def finish(self, manifest: dict) -> None:
        """Writes the manifest (last, atomically) and moves the finished dataset to `out_dir`."""
        shutil.rmtree(self.partial_dir / "scratch", ignore_errors=True)
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest}
        write_atomic(self.partial_dir / MANIFEST_NAME, msgpack.packb(manifest, use_bin_type=True), fsync=True)
        if self.out_dir.exists() and not self.force:
            raise BertError(f"output {self.out_dir} appeared while writing: pass --force to replace it")
        move_into_place(self.partial_dir, self.out_dir)


def read_manifest(dataset_dir: Path) -> dict:
    """The manifest of a complete dataset; BertError if missing, unreadable, or of another format or version."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_NAME
    if not dataset_dir.is_dir():
        raise BertError(f"no dataset at {dataset_dir}: run `bertprep shard` to make one")
    if not path.is_file():
        raise BertError(
            f"{dataset_dir} has no {MANIFEST_NAME}: it is not a dataset or its writing was interrupted; "
            "re-run `bertprep shard`"
        )
    try:
        with open(path, "rb") as f:
            manifest = msgpack.unpackb(f.read(), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BertError(f"{path} is not a readable manifest ({exc}): re-run `bertprep shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BertError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise BertError(
            f"{dataset_dir} uses shard format version {manifest.get('version')}, this bertprep reads version "
            f"{FORMAT_VERSION}: re-run `bertprep shard` with this version"
        )
    return manifest


@dataclass
class Split:
    """One split of an opened dataset: its shards' arrays mapped read-only, never copied."""

    name: str
    shards: list[dict[str, np.ndarray]]
    shard_rows: np.ndarray  # int64 [shards]
    row_offsets: np.ndarray  # int64 [shards + 1]: first global row of each shard, then the total

    @property
    def rows(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(self.shards[0]) if self.shards else ()

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within the shard) of a global row index."""
        shard = int(np.searchsorted(self.row_offsets, row, side="right")) - 1
        return shard, row - int(self.row_offsets[shard])

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the split. A view of the map (no copy) when the range lies in one shard."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside split {self.name!r} of {self.rows} rows")
        shard, offset = self.locate(start)
        if stop - start <= int(self.shard_rows[shard]) - offset:
            return {name: array[offset : offset + stop - start] for name, array in self.shards[shard].items()}
        parts = []
        while start < stop:
            shard, offset = self.locate(start)
            take = min(stop - start, int(self.shard_rows[shard]) - offset)
            parts.append({name: array[offset : offset + take] for name, array in self.shards[shard].items()})
            start += take
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.shards)


@dataclass
class Dataset:
    """An opened dataset: its manifest and its splits."""

    path: Path
    manifest: dict
    splits: dict[str, Split]

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def vocab(self) -> dict:
        return self.manifest["vocab"]

    @property
    def vocab_file(self) -> Path:
        return self.path / self.manifest["vocab"]["file"]

    @property
    def has_nsp(self) -> bool:
        return bool(self.manifest["options"].get("nsp"))

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise BertError(f"dataset {self.path} has no split {name!r} (it has: {', '.join(self.splits)})")
        return self.splits[name]


def _map_array(dataset_dir: Path, entry: dict) -> np.ndarray:
    path = dataset_dir / entry["file"]
    if not path.is_file():
        raise BertError(f"shard file {path} is missing: the dataset is damaged, re-run `bertprep shard`")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BertError(f"shard file {path} is unreadable ({exc}): re-run `bertprep shard`") from None
    if list(array.shape) != list(entry["shape"]) or array.dtype.str != entry["dtype"]:
        raise BertError(
            f"shard file {path} holds {array.dtype.str}{list(array.shape)} but the manifest says "
            f"{entry['dtype']}{entry['shape']}: the dataset is damaged, re-run `bertprep shard`"
        )
    return array


def open_dataset(dataset_dir: Path) -> Dataset:
    """Checks the manifest and maps every shard array read-only (`np.load(mmap_mode="r")`)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    splits = {}
    for name, info in manifest["splits"].items():
        shards = [{a: _map_array(dataset_dir, e) for a, e in shard["arrays"].items()} for shard in info["shards"]]
        shard_rows = np.array([shard["rows"] for shard in info["shards"]], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        splits[name] = Split(name, shards, shard_rows, offsets)
    return Dataset(dataset_dir, manifest, splits)


def verify_dataset(dataset_dir: Path) -> dict:
    """Re-hashes every file against the manifest and checks shapes and value ranges.

    Returns {"files": n, "rows": {split: n}} when everything holds; raises BertError naming the first bad file.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    vocab = manifest["vocab"]
    vocab_path = dataset_dir / vocab["file"]
    if not vocab_path.is_file() or file_sha256(vocab_path) != vocab["sha256"]:
        raise BertError(f"{vocab_path} is missing or does not match the manifest's sha256")
    max_len, size = int(manifest["max_len"]), int(vocab["size"])
    files, rows = 1, {}
    for name, info in manifest["splits"].items():
        for shard in info["shards"]:
            for array_name, entry in shard["arrays"].items():
                path = dataset_dir / entry["file"]
                if not path.is_file():
                    raise BertError(f"{path}: missing")
                if file_sha256(path) != entry["sha256"]:
                    raise BertError(f"{path}: sha256 does not match the manifest (the file was changed or damaged)")
                array = _map_array(dataset_dir, entry)
                if array.shape[0] != shard["rows"]:
                    raise BertError(f"{path}: {array.shape[0]} rows, the manifest says {shard['rows']}")
                _check_range(path, array_name, array, max_len, size)
                files += 1
        rows[name] = sum(shard["rows"] for shard in info["shards"])
        if rows[name] != info["rows"]:
            raise BertError(f"split {name}: shards hold {rows[name]} rows, the manifest says {info['rows']}")
    return {"files": files, "rows": rows}


def _check_range(path: Path, name: str, array: np.ndarray, max_len: int, vocab_size: int) -> None:
    if array.size == 0:
        return
    high = {"input_ids": vocab_size, "mlm_labels": vocab_size, "mlm_positions": max_len,
            "token_type_ids": 2, "nsp_labels": 2}.get(name)
    if high is not None and int(array.max()) >= high:
        raise BertError(f"{path}: values up to {int(array.max())}, expected below {high}")
    if name == "input_ids" and array.ndim == 2 and array.shape[1] != max_len:
        raise BertError(f"{path}: rows of {array.shape[1]} tokens, the manifest's max_len is {max_len}")
