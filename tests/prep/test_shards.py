"""The format module: what is written is what is read, zero-copy, and anything else is refused by name."""

import msgpack
import numpy as np
import pytest

from prep.errors import BertError
from prep.shards import MANIFEST_NAME, open_dataset, read_manifest, verify_dataset


def test_arrays_map_zero_copy_and_match_the_manifest(wiki_shards):
    """Every array opens as a read-only memmap whose dtype and shape are the manifest's; a slice inside one shard
    is a view of the map (no copy), a slice across shards returns the same rows as row-by-row reads."""
    dataset = open_dataset(wiki_shards)
    assert dataset.manifest["format"] == "bertprep-shards" and dataset.manifest["version"] == 1
    train = dataset.split("train")
    first = train.shards[0]["input_ids"]
    assert isinstance(first, np.memmap) and not first.flags.writeable and first.dtype == np.uint16
    view = train.slice(10, 42)
    assert np.shares_memory(view["input_ids"], first) and view["input_ids"].shape == (32, 64)
    assert train.rows == dataset.manifest["splits"]["train"]["rows"] == sum(train.shard_rows)


def test_slices_across_shards(tmp_path, vocab_dir, wiki_valid):
    """With small shards, a range spanning a boundary equals the rows read one by one."""
    from tests.conftest import build_wiki_shards

    path = build_wiki_shards(tmp_path / "d", vocab_dir, [wiki_valid], val_fraction=0.1, rows_per_shard=100)
    train = open_dataset(path).split("train")
    assert len(train.shards) > 3
    joined = train.slice(90, 230)["mlm_labels"]
    single = np.concatenate([train.slice(i, i + 1)["mlm_labels"] for i in range(90, 230)])
    assert np.array_equal(joined, single)


def test_verify_names_a_flipped_byte(wiki_shards, tmp_path):
    """verify passes on a fresh dataset and, after one byte of one shard changes, fails naming that file."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(wiki_shards, copy)
    assert verify_dataset(copy)["rows"]["train"] > 0
    victim = sorted((copy / "train").glob("*-mlm_labels.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(BertError, match=victim.name):
        verify_dataset(copy)


def test_refuses_other_versions_missing_manifest_and_truncated_files(wiki_shards, tmp_path):
    """Readers check format and version before mapping anything, a directory without manifest is no dataset, and a
    truncated shard is caught when it is opened, each with a message that says what to do."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(wiki_shards, copy)
    manifest = read_manifest(copy)
    (copy / MANIFEST_NAME).write_bytes(msgpack.packb({**manifest, "version": 2}))
    with pytest.raises(BertError, match="version 2, this bertprep reads version 1"):
        open_dataset(copy)
    (copy / MANIFEST_NAME).write_bytes(msgpack.packb(manifest))
    victim = sorted((copy / "train").glob("*-input_ids.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(BertError, match=f"{victim.name}.*re-run `bertprep shard`"):
        open_dataset(copy)
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(BertError, match="no manifest.msgpack"):
        open_dataset(copy)
