"""Hugging Face tokenizer.json vocabularies: import, sharding with `tokenizers`' own ids, verify, peek, refusals."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import build_wiki_shards
from tests.prep.rows import expected_rows
from prep.cli import main
from prep.errors import BertError
from prep.hf_tokenizer import HfTokenizer, TokenizerJsonVocab, readable_tokens
from prep.masking import restore
from prep.shards import open_dataset, verify_dataset
from prep.vocab import import_tokenizer, load_tokenizer, resolve_vocab_file
from prep.wordpiece import Vocab

tokenizers = pytest.importorskip("tokenizers")

# ModernBERT-like: a special token before the BERT five, so no id is where WordPiece would put it.
SPECIALS = ("<|endoftext|>", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")


def train_byte_level_bpe(lines: list[str], path: Path, specials=SPECIALS, vocab_size: int = 4000,
                         added: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE tokenizer.json trained by the `tokenizers` library, with a BERT post-processor as
    published ModernBERTs have (which encoding for shards must not apply) and `added` as ordinary added tokens."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.add_tokens(list(added))
    if "[CLS]" in specials and "[SEP]" in specials:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def wiki_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


@pytest.fixture(scope="module")
def source_json(tmp_path_factory, wiki_valid) -> Path:
    return train_byte_level_bpe(wiki_lines(wiki_valid), tmp_path_factory.mktemp("hf") / "tokenizer.json",
                                added=("<|extra|>",))


@pytest.fixture(scope="module")
def library(source_json):
    """The tokenizer as the `tokenizers` library reads it: the independent reference."""
    return tokenizers.Tokenizer.from_file(str(source_json))


@pytest.fixture(scope="module")
def hf_vocab_dir(tmp_path_factory, source_json) -> Path:
    out_dir = tmp_path_factory.mktemp("hf_vocab")
    import_tokenizer(source_json, out_dir, force=True)
    return out_dir


@pytest.fixture(scope="module")
def small_train(tmp_path_factory, wiki_test) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.tokens"
    path.write_text("\n".join(wiki_lines(wiki_test)[:1500]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_shards(tmp_path_factory, hf_vocab_dir, small_train, wiki_valid) -> Path:
    """Train rows from the first 1,500 lines of wiki.test, val rows from wiki.valid in corpus order."""
    return build_wiki_shards(tmp_path_factory.mktemp("hf_shards") / "wiki_64", hf_vocab_dir, [small_train],
                             [wiki_valid], whole_word=True)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_import_copies_and_records_the_tokenizer(hf_vocab_dir, source_json, library):
    """Importing copies the file byte for byte and records kind, sha256, size and the special tokens the library
    knows by those names, so shard and train find the same ids the published model uses."""
    assert sorted(p.name for p in hf_vocab_dir.iterdir()) == ["tokenizer.json", "vocab.json"]
    data = source_json.read_bytes()
    assert (hf_vocab_dir / "tokenizer.json").read_bytes() == data
    record = json.loads((hf_vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    expected_special = {role: library.token_to_id(token) for role, token in
                        (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"))}
    assert expected_special == {"pad": 4, "unk": 1, "cls": 2, "sep": 3, "mask": 5}
    assert record == {
        "format": "bertprep-vocab", "version": 1, "kind": "hf-tokenizer", "file": "tokenizer.json",
        "source": str(source_json.resolve()), "model_type": "BPE", "byte_level": True,
        "vocab_size": library.get_vocab_size(), "lowercase": False, "inputs": [],
        "vocab_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "special": expected_special,
        "special_tokens": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
        "continuation": "not starting with 'Ġ'",
    }
    assert resolve_vocab_file(hf_vocab_dir) == hf_vocab_dir / "tokenizer.json"


def test_vocab_gives_train_tokens_specials_and_word_starts(hf_vocab_dir, library):
    """`Vocab.load` on a tokenizer.json (what train calls) gives the library's token strings for every id, every
    added special token as special, and marks as continuing a word exactly the tokens after which no space came."""
    vocab = Vocab.load(hf_vocab_dir / "tokenizer.json")
    assert isinstance(vocab, TokenizerJsonVocab) and len(vocab) == library.get_vocab_size()
    assert vocab.tokens == [library.id_to_token(i) for i in range(len(vocab))]
    assert np.flatnonzero(vocab.is_special).tolist() == [0, 1, 2, 3, 4, 5]  # not the ordinary added <|extra|>
    assert vocab.tokens[-1] == "<|extra|>" and vocab.added == {0, 1, 2, 3, 4, 5, len(vocab) - 1}
    text = "The gunners' barrage, unrelenting."
    encoding = library.encode(text, add_special_tokens=False)
    after_space = [start > 0 and text[start] == " " for start, _ in encoding.offsets]  # byte-level keeps the space
    assert len(encoding.ids) > 6 and 0 < sum(after_space) < len(after_space) - 1
    assert vocab.is_continuation[encoding.ids].tolist() == [not starts for starts in after_space]
    assert not vocab.is_continuation[vocab.is_special].any()


def test_readable_tokens_are_the_librarys_decoding(hf_vocab_dir, library):
    """peek shows each token as `Tokenizer.decode([id])` gives it: bytes as text, "Ġ" as a space."""
    vocab = Vocab.load(hf_vocab_dir / "tokenizer.json")
    texts = readable_tokens(vocab)
    assert texts == [library.decode([i], skip_special_tokens=False) for i in range(len(vocab))]
    assert texts[library.token_to_id("Ġthe")] == " the"


def test_shard_ids_are_the_librarys_encoding(hf_shards, hf_vocab_dir, source_json, library, wiki_valid):
    """Validation rows with their labels put back are exactly `tokenizers`' own encoding of each document (no
    special tokens added by its post-processor), documents joined by [SEP] in each range of input; the manifest
    names the copied tokenizer.json and its sha256, and verify passes."""
    manifest = open_dataset(hf_shards).manifest
    vocab = manifest["vocab"]
    assert vocab["file"] == "tokenizer.json" and vocab["size"] == library.get_vocab_size()
    assert vocab["sha256"] == hashlib.sha256(source_json.read_bytes()).hexdigest()
    assert (hf_shards / "tokenizer.json").read_bytes() == source_json.read_bytes()
    assert vocab["special"] == {"pad": 4, "unk": 1, "cls": 2, "sep": 3, "mask": 5}
    pad, sep = vocab["special"]["pad"], vocab["special"]["sep"]

    data = open_dataset(hf_shards).split("val")
    rows = data.slice(0, data.rows)
    restored = restore(rows["input_ids"], rows["mlm_positions"], rows["mlm_labels"], pad).astype(np.int64)
    expected = expected_rows(wiki_valid, lambda lines: library.encode("\n".join(lines), add_special_tokens=False).ids,
                             64, cls=2, sep=sep, pad=pad)
    assert np.array_equal(restored, expected)
    assert restored[:, 0].tolist() == [2] * len(restored)
    assert verify_dataset(hf_shards)["rows"]["val"] == len(restored)


def test_batch_encoding_matches_one_by_one(hf_vocab_dir, library, wiki_valid):
    """HfTokenizer.encode_many over many texts gives each text's own `encode` ids, lengths in order."""
    tokenizer = load_tokenizer(hf_vocab_dir)
    assert isinstance(tokenizer, HfTokenizer)
    texts = [line for line in wiki_lines(wiki_valid)[:400]]
    ids, lengths = tokenizer.encode_many(texts)
    assert ids.dtype == np.int32 and lengths.tolist() == [len(library.encode(t, add_special_tokens=False).ids)
                                                          for t in texts]
    assert ids.tolist() == [i for t in texts for i in library.encode(t, add_special_tokens=False).ids]
    assert tokenizer.decode(tokenizer.encode(texts[3])) == texts[3]


def test_peek_and_verify_on_the_cli(hf_shards, library):
    """`bertprep peek` decodes rows through the tokenizer's own per-token decoding and `bertprep verify` passes."""
    result = run("peek", hf_shards, "--split", "val", "-n", "2", "--no-color")
    assert result.exit_code == 0 and result.output.count("Input Tokens:  [CLS]|") == 2, result.output
    [view] = json.loads(run("peek", hf_shards, "--split", "val", "--row", "3", "-n", "1", "--json").output)
    row = open_dataset(hf_shards).split("val").slice(3, 4)
    restored = restore(row["input_ids"], row["mlm_positions"], row["mlm_labels"], 4)[0].tolist()
    assert view["target_tokens"] == [library.decode([i], skip_special_tokens=False) for i in restored]
    assert "".join(view["target_tokens"][1:-1]) == library.decode(restored[1:-1], skip_special_tokens=False)
    assert run("verify", hf_shards).output.startswith(f"ok: {hf_shards}: ")
    assert run("peek", hf_shards, "--stats").exit_code == 0


def test_one_and_two_workers_write_identical_bytes(tmp_path, hf_vocab_dir, wiki_valid):
    """With a tokenizer.json, as with WordPiece, 1 and 2 worker processes write byte-identical datasets."""
    options = dict(val_fraction=0.05, dupe_factor=2, rows_per_shard=700, whole_word=True, max_len=128)
    one = build_wiki_shards(tmp_path / "one", hf_vocab_dir, [wiki_valid], workers=1, **options)
    two = build_wiki_shards(tmp_path / "two", hf_vocab_dir, [wiki_valid], workers=2, **options)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) > 8 and files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_tokenizer_without_mask_token_is_refused(tmp_path, wiki_valid):
    """A tokenizer.json without a mask token cannot pre-mask rows: import says so in one line and writes nothing."""
    source = train_byte_level_bpe(wiki_lines(wiki_valid)[:300], tmp_path / "src" / "tokenizer.json",
                                  specials=("[UNK]", "[CLS]", "[SEP]", "[PAD]"), vocab_size=400)
    message = (f"{source} has no mask token among its added tokens (looked for mask: [MASK] <mask> <|mask|> <MASK>); "
               f"a masked-LM needs them: add them with `tokenizer.add_special_tokens([...])` and save it again")
    with pytest.raises(BertError) as error:
        import_tokenizer(source, tmp_path / "vocab")
    assert str(error.value) == message and not (tmp_path / "vocab").exists()
    assert one_line_error(run("vocab", "--import", source, "-o", tmp_path / "vocab")) == f"Error: {message}"
    with pytest.raises(BertError, match="has no mask token"):
        load_tokenizer(source)


def test_a_tokenizer_without_unk_shards(tmp_path, wiki_valid, small_train):
    """Byte-level BPE needs no unknown token: one without it imports (unk None), shards and verifies."""
    source = train_byte_level_bpe(wiki_lines(wiki_valid), tmp_path / "src" / "tokenizer.json",
                                  specials=("<pad>", "<s>", "</s>", "<mask>"), vocab_size=1000)
    record = import_tokenizer(source, tmp_path / "vocab")
    assert record["special"] == {"pad": 0, "unk": None, "cls": 1, "sep": 2, "mask": 3}
    out = build_wiki_shards(tmp_path / "shards", source, [small_train], val_fraction=0.0)
    manifest = open_dataset(out).manifest
    assert manifest["vocab"]["special"]["unk"] is None
    assert manifest["stats"]["splits"]["train"]["unknown_token_rate"] == 0
    verify_dataset(out)


def test_a_changed_tokenizer_is_refused(tmp_path, hf_vocab_dir, hf_shards, small_train):
    """A tokenizer.json edited after import is refused by shard, and one edited inside a dataset by verify, as our
    vocab.txt files are: token ids would otherwise mean other strings."""
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    for name in ("tokenizer.json", "vocab.json"):
        (vocab_dir / name).write_bytes((hf_vocab_dir / name).read_bytes())
    changed = tokenizers.Tokenizer.from_file(str(vocab_dir / "tokenizer.json"))
    changed.add_tokens(["zzyzx"])
    changed.save(str(vocab_dir / "tokenizer.json"))
    expected = (f"Error: {vocab_dir / 'tokenizer.json'} changed after it was imported (its sha256 differs from "
                f"vocab.json's); import it again with `bertprep vocab --import FILE --force`, or delete vocab.json "
                f"to use the file as it is")
    result = run("shard", "-i", small_train, "--vocab", vocab_dir, "-o", tmp_path / "out", "--quiet", "--workers", "1")
    assert one_line_error(result) == expected and not (tmp_path / "out").exists()

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for path in hf_shards.rglob("*"):
        if path.is_file():
            (dataset / path.relative_to(hf_shards)).parent.mkdir(parents=True, exist_ok=True)
            (dataset / path.relative_to(hf_shards)).write_bytes(path.read_bytes())
    changed.save(str(dataset / "tokenizer.json"))
    assert one_line_error(run("verify", dataset)) == (f"Error: {dataset / 'tokenizer.json'} is missing or does not "
                                                      f"match the manifest's sha256")


def test_cli_import_then_shard_the_file_directly(tmp_path, source_json, small_train, library):
    """`bertprep vocab --import` prints what it recorded; `bertprep shard --vocab FILE.json` takes the file itself."""
    result = run("vocab", "--import", source_json.parent, "-o", tmp_path / "vocab")
    assert result.exit_code == 0, result.output
    size = library.get_vocab_size()
    assert result.output == (f"wrote {tmp_path / 'vocab'}/tokenizer.json: {size:,} tokens (Hugging Face BPE, "
                             f"byte-level, cased); special tokens: pad [PAD]=4 unk [UNK]=1 cls [CLS]=2 sep [SEP]=3 "
                             f"mask [MASK]=5\n")
    result = run("shard", "-i", small_train, "--vocab", tmp_path / "vocab" / "tokenizer.json", "-o", tmp_path / "out",
                 "--quiet", "--workers", "1", "--max-len", "32")
    assert result.exit_code == 0, result.output
    assert open_dataset(tmp_path / "out").manifest["vocab"]["file"] == "tokenizer.json"


def test_cli_usage_errors(tmp_path, source_json, small_train, hf_vocab_dir):
    """Training flags with --import, -i with --import, neither, or a casing flag against the file's own casing:
    each is one line naming the flag."""
    out = tmp_path / "vocab"
    assert "--vocab-size applies to training a vocabulary with -i, not to --import" in run(
        "vocab", "--import", source_json, "--vocab-size", "100", "-o", out).stderr
    assert "pass one of them" in run("vocab", "--import", source_json, "-i", small_train, "-o", out).stderr
    assert "pass -i FILE to train a vocabulary, or --import tokenizer.json" in run("vocab", "-o", out).stderr
    assert not out.exists()
    result = run("shard", "-i", small_train, "--vocab", hf_vocab_dir, "--uncased", "-o", tmp_path / "o", "--quiet")
    assert one_line_error(result) == (f"Error: {hf_vocab_dir / 'tokenizer.json'} is cased: its normalizer decides "
                                      f"the casing, so leave out --uncased")


def test_missing_library_is_one_line_with_the_install_command(tmp_path, source_json, monkeypatch):
    """Without `tokenizers` installed, importing a tokenizer.json says how to install it, in one line."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    result = run("vocab", "--import", source_json, "-o", tmp_path / "vocab")
    assert one_line_error(result) == ("Error: using a tokenizer.json needs the `tokenizers` library: "
                                      "pip install 'bertprep[hf-tokenizer]'")
    assert not (tmp_path / "vocab").exists()


def test_a_model_directory_with_truncation_is_used_as_it_is(tmp_path, source_json, library, wiki_valid):
    """A Hugging Face model directory (tokenizer.json beside its BPE vocab.json) works as --vocab, and truncation
    or padding saved in the file never cut or pad a document: rows are packed from whole documents."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    truncating = tokenizers.Tokenizer.from_file(str(source_json))
    truncating.enable_truncation(max_length=8)
    truncating.enable_padding(length=8, pad_id=4, pad_token="[PAD]")
    truncating.save(str(model_dir / "tokenizer.json"))
    (model_dir / "vocab.json").write_text(json.dumps(library.get_vocab()), encoding="utf-8")
    assert resolve_vocab_file(model_dir) == model_dir / "tokenizer.json"
    text = " ".join(wiki_lines(wiki_valid)[:40])
    expected = library.encode(text, add_special_tokens=False).ids
    assert len(expected) > 100 and load_tokenizer(model_dir).encode(text) == expected
