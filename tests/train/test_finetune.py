"""`berttrain finetune`: pretraining pays on a real-text task, the three file formats read alike, pairs are cut as
Hugging Face cuts them, the best epoch is what gets saved and used, early stopping, and one-line errors."""

import csv
import json
import random
import re

import pytest
import torch
from click.testing import CliRunner

from prep.errors import BertError
from train.pretrained import load_pretrained
from train.finetune import (MODEL_FILE, PREDICTIONS_FILE, RECORD_FILE, Classifier, Examples, FinetuneConfig,
                            encode_examples, finetune, label_set, predict_logits, read_examples, scores)

REPLACED_WORDS = 3




def wiki_sentences(path, min_words=6, max_words=16):
    """Sentences of WikiText-2 articles (headings and <unk> skipped) that end with ' .'."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<= \.) ", line):
            words = sentence.split()
            if min_words <= len(words) <= max_words and words[-1] == "." and "<unk>" not in words:
                out.append(sentence)
    return out


def corruption_rows(sentences, vocab_file, seed=0):
    """Is a sentence as written, or were 3 of its words replaced by random vocabulary words? Every sentence comes
    both ways, so the words alone never tell; train and val hold different sentences."""
    rng = random.Random(seed)
    words = [t for t in vocab_file.read_text(encoding="utf-8").split("\n") if t.isalpha() and len(t) > 1]
    rows = []
    for sentence in sentences:
        tokens = sentence.split()
        corrupted = list(tokens)
        for i in rng.sample(range(len(tokens) - 1), REPLACED_WORDS):
            corrupted[i] = rng.choice(words)
        rows += [(sentence, "original"), (" ".join(corrupted), "corrupted")]
    return rows


def write_tsv(path, rows, header=("sentence", "label")):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return path


@pytest.fixture(scope="module")
def corruption_task(tmp_path_factory, wiki_valid, vocab_dir):
    """400 training and 200 validation examples from WikiText-2 validation text (the pretraining saw wiki.test)."""
    sentences = wiki_sentences(wiki_valid)
    random.Random(0).shuffle(sentences)
    root = tmp_path_factory.mktemp("corruption")
    vocab_file = vocab_dir / "vocab.txt"
    train = write_tsv(root / "train.tsv", corruption_rows(sentences[:200], vocab_file, seed=1))
    val = write_tsv(root / "val.tsv", corruption_rows(sentences[200:300], vocab_file, seed=2))
    return train, val


def test_pretrained_start_beats_from_scratch_after_the_same_steps(pretrained_run, corruption_task, tmp_path):
    """What pretraining buys: on held-out sentences, a model fine-tuned from 120 steps of MLM pretraining tells
    original from corrupted sentences far better than the same architecture fine-tuned from random weights for the
    same steps, which cannot learn from 400 examples which words do not fit."""
    train, val = corruption_task
    common = dict(source=str(pretrained_run), train=str(train), val=str(val), lr=1e-3, epochs=5, batch_size=16,
                  max_len=40, patience=0, device="cpu")
    pretrained = finetune(FinetuneConfig(out_dir=str(tmp_path / "pretrained"), **common), progress=False,
                          log=lambda line: None)
    scratch = finetune(FinetuneConfig(out_dir=str(tmp_path / "scratch"), from_scratch=True, **common),
                       progress=False, log=lambda line: None)
    print("PRETRAINED", [round(e["val_acc"], 3) for e in pretrained["epochs"]],
          "SCRATCH", [round(e["val_acc"], 3) for e in scratch["epochs"]])
    assert pretrained["steps"] == scratch["steps"] == 5 * 400 // 16
    assert pretrained["best"]["val_acc"] >= 0.62
    assert pretrained["best"]["val_acc"] >= scratch["best"]["val_acc"] + 0.08
    assert pretrained["labels"] == ["corrupted", "original"]


def test_the_saved_model_is_the_best_epoch_and_labels_files(pretrained_run, corruption_task, tmp_path, cli):
    """Through the CLI: finetune.json records every epoch, model.pt holds the best epoch's weights (scoring --val
    with it reproduces the best record), --test is scored with it, and --predict writes one label with
    probabilities per input line, in order."""
    train, val = corruption_task
    predict_file = tmp_path / "unlabelled.jsonl"
    texts = ["the album was released in 2010 .", "the album cann released fitted 2010 ."]
    predict_file.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    out = tmp_path / "ft"
    result = CliRunner().invoke(cli, [
        "finetune", "--run", str(pretrained_run), "--train", str(train), "--val", str(val), "--test", str(val),
        "--predict", str(predict_file), "--out", str(out), "--epochs", "3", "--lr", "1e-3", "--batch-size", "16",
        "--max-len", "40", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / RECORD_FILE).read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    best = record["best"]
    assert best["val_acc"] == max(e["val_acc"] for e in record["epochs"])
    assert re.search(rf"best epoch {best['epoch']} of 3: epoch {best['epoch']} \(step {best['step']}\)", result.stdout)
    assert f"test: loss {record['test']['loss']:.4f}  acc {best['val_acc']:.4f}" in result.stdout

    model = Classifier.for_record(record)
    model.load_state_dict(torch.load(out / MODEL_FILE, weights_only=True))
    pretrained = load_pretrained(pretrained_run)
    labels = record["labels"]
    val_data = encode_examples(read_examples(val), pretrained.tokenizer(), 40, labels)
    again = scores(predict_logits(model, val_data, 64, torch.device("cpu")), torch.from_numpy(val_data.label_ids),
                   len(labels))
    assert again["acc"] == pytest.approx(best["val_acc"]) and again["loss"] == pytest.approx(best["val_loss"])

    predictions = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [p["text_a"] for p in predictions] == texts
    for p in predictions:
        assert p["label"] in labels and sum(p["probs"].values()) == pytest.approx(1.0)
        assert p["prob"] == max(p["probs"].values())
    assert (out / "vocab.txt").read_bytes() == pretrained.vocab_file.read_bytes()


def test_a_hugging_face_directory_fine_tunes_like_its_run(pretrained_run, hf_export, corruption_task, tmp_path):
    """--run takes the exported Hugging Face directory: the same weights, vocabulary and seed give the same epochs,
    loss for loss."""
    train, val = corruption_task
    common = dict(train=str(train), val=str(val), lr=1e-3, epochs=1, batch_size=16, max_len=40, device="cpu")
    from_run = finetune(FinetuneConfig(source=str(pretrained_run), out_dir=str(tmp_path / "a"), **common),
                        progress=False, log=lambda line: None)
    from_hf = finetune(FinetuneConfig(source=str(hf_export), out_dir=str(tmp_path / "b"), **common),
                       progress=False, log=lambda line: None)
    assert from_hf["epochs"] == from_run["epochs"]
    assert from_hf["source"] == f"Hugging Face directory {hf_export}"


def test_tsv_csv_and_jsonl_read_the_same_examples(tmp_path):
    """GLUE-style TSV (quotes are plain text there), CSV (quoted fields with commas) and JSON Lines (numeric
    labels) give the same texts and labels."""
    examples = [("it 's a `` charming '' and \"often\" affecting journey .", "1"),
                ("unflinchingly bleak , and desperate", "0"), ("a, b; c", "1")]
    tsv = write_tsv(tmp_path / "train.tsv", examples)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(examples)
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"sentence": s, "label": int(label), "idx": i}) + "\n"
                for i, (s, label) in enumerate(examples)), encoding="utf-8")
    for path in (tsv, tmp_path / "train.csv", tmp_path / "train.jsonl"):
        read = read_examples(path)
        assert list(zip(read.text_a, read.labels)) == examples, path
        assert read.text_b is None


def test_labels_order_numerically_and_unknown_labels_are_refused(tmp_path, pretrained_run):
    """Integer labels sort as numbers; a validation label the training file lacks is named in the error."""
    assert label_set(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_set(["pos", "neg"]) == ["neg", "pos"]
    val = read_examples(write_tsv(tmp_path / "val.tsv", [("good .", "3")]))
    with pytest.raises(BertError, match=r"val.tsv has labels \['3'\] that the training file does not have "
                                        r"\(it has: 1, 2\)"):
        encode_examples(val, load_pretrained(pretrained_run).tokenizer(), 16, ["1", "2"])


def test_pairs_are_cut_like_hugging_face_longest_first(pretrained_run, hf_export, wiki_valid):
    """[CLS] a [SEP] b [SEP] with token types 0/1, cut to --max-len by removing from the longer text first: the
    ids and token types of transformers' BertTokenizer(truncation="longest_first") on the exported tokenizer, for
    real sentence pairs and every budget from 5 to 40 tokens."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizer.from_pretrained(hf_export)
    sentences = wiki_sentences(wiki_valid, 3, 40)[:40]
    pairs = list(zip(sentences[0::2], sentences[1::2]))
    tokenizer = load_pretrained(pretrained_run).tokenizer()
    examples = Examples(None, [a for a, _ in pairs], [b for _, b in pairs], None)
    for max_len in range(5, 41):
        encoded = encode_examples(examples, tokenizer, max_len, None)
        for i, (a, b) in enumerate(pairs):
            start, stop = encoded.offsets[i], encoded.offsets[i + 1]
            expected = hf(a, b, truncation="longest_first", max_length=max_len)
            assert encoded.ids[start:stop].tolist() == expected["input_ids"], (max_len, i)
            assert encoded.token_types[start:stop].tolist() == expected["token_type_ids"], (max_len, i)


def test_early_stopping_after_patience_epochs_without_improvement(pretrained_run, corruption_task, tmp_path):
    """With a learning rate too small to change any prediction, validation accuracy never improves on epoch 1:
    --patience 1 stops after epoch 2 and keeps epoch 1's model."""
    train, val = corruption_task
    lines = []
    summary = finetune(FinetuneConfig(source=str(pretrained_run), train=str(train), val=str(val),
                                      out_dir=str(tmp_path / "ft"), lr=1e-12, epochs=6, patience=1, max_len=40,
                                      device="cpu"), progress=False, log=lines.append)
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert summary["best_epoch"] == 1
    assert lines[-1] == "early stop: no better validation accuracy for 1 epochs"


def test_missing_column_is_a_one_line_error(pretrained_run, tmp_path, cli):
    """A file without the --text-a column says which columns it has and which flag names the right one."""
    train = write_tsv(tmp_path / "train.tsv", [("good", "1"), ("bad", "0")], header=("text", "label"))
    result = CliRunner().invoke(cli, ["finetune", "--run", str(pretrained_run), "--train", str(train), "--out",
                                      str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output == (f"Error: {train} has no column 'sentence' (it has: text, label); name the right one "
                             f"with --text-a\n")
    assert not (tmp_path / "out").exists()
