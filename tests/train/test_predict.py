"""`berttrain predict`: top-k fillings of [MASK] with full-softmax probabilities, the --json shape, the HTML page of
shard rows agreeing with `berttrain eval`'s accuracy, and one-line errors."""

import html
import json
import re

import pytest
import torch
from click.testing import CliRunner

from prep.errors import BertError
from prep.shards import open_dataset
from train.pretrained import load_pretrained
from train.evaluate import evaluate
from train.runtime import Runtime
from train.predict import Predictor




@pytest.fixture(scope="module")
def predictor(pretrained_run):
    return Predictor.load(load_pretrained(pretrained_run))


def test_probabilities_come_from_the_full_softmax(predictor):
    """With k = the whole vocabulary the probabilities at a [MASK] sum to 1, come sorted, and each equals the
    softmax of the model's own logits at that position: nothing is renormalised over the top k."""
    text = "the film was [MASK] by the studio in 1998 ."
    result = predictor.fill_masks([text], top_k=predictor.pretrained.config.vocab_size)[0]
    candidates = result["masks"][0]
    probs = [c["prob"] for c in candidates]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert probs == sorted(probs, reverse=True)
    ids = [predictor.vocab.special.cls, *predictor.tokenizer.encode(text), predictor.vocab.special.sep]
    logits = predictor.model.logits(torch.tensor([ids]))[0, ids.index(predictor.vocab.special.mask)]
    expected = logits.softmax(-1)
    assert [c["prob"] for c in candidates[:5]] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-6)
    assert all(predictor.vocab.tokens[c["id"]] == c["token"] for c in candidates[:50])


def test_a_text_scores_the_same_alone_and_in_a_padded_batch(predictor):
    """Batching pads shorter texts; padding must not change any probability."""
    texts = ["[MASK] .", "in 1945 the [MASK] was moved to the [MASK] of the city , where it [MASK] until 1950 .",
             "she [MASK] the album ."]
    together = predictor.fill_masks(texts, top_k=3)
    for text, batched in zip(texts, together):
        alone = predictor.fill_masks([text], top_k=3)[0]
        assert [[c["id"] for c in m] for m in alone["masks"]] == [[c["id"] for c in m] for m in batched["masks"]]
        for a, b in zip(alone["masks"], batched["masks"]):
            assert [c["prob"] for c in a] == pytest.approx([c["prob"] for c in b], abs=1e-5)
    assert len(together[1]["masks"]) == 3
    assert "[MASK]" not in together[1]["filled"] and together[1]["filled"].startswith("in 1945 the ")


def test_text_without_mask_is_a_one_line_error(pretrained_run, cli):
    """A text without [MASK] (or with a lowercase [mask], which is just text) is refused with the fix."""
    result = CliRunner().invoke(cli, ["predict", "--run", str(pretrained_run), "the cat sat on the [mask] ."])
    assert result.exit_code == 1
    assert result.output == ("Error: no [MASK] in 'the cat sat on the [mask] .': write [MASK] (in capitals) where "
                             "the model should fill in a token\n")
    with pytest.raises(BertError, match="more than the model's 512 positions"):
        Predictor.load(load_pretrained(pretrained_run)).fill_masks(["word " * 600 + "[MASK]"])


def test_json_output_shape(pretrained_run, cli, tmp_path):
    """--json prints one object a text: {"text", "masks": [[{"token", "id", "prob"} x k] per [MASK]]}; --file adds
    texts, one a line."""
    text_file = tmp_path / "texts.txt"
    text_file.write_text("the river [MASK] into the sea .\n\n[MASK] [MASK]\n")
    result = CliRunner().invoke(cli, ["predict", "--run", str(pretrained_run), "-k", "2", "--json", "--file",
                                      str(text_file), "he [MASK] ."])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == ["he [MASK] .", "the river [MASK] into the sea .", "[MASK] [MASK]"]
    assert [len(r["masks"]) for r in records] == [1, 1, 2]
    for record in records:
        for candidates in record["masks"]:
            assert len(candidates) == 2
            assert all(set(c) == {"token", "id", "prob"} and 0 < c["prob"] < 1 for c in candidates)


def test_text_output_shows_the_filling_and_the_candidates(pretrained_run, cli):
    """Plain output: the text, the text with each [MASK] filled (word pieces joined), then each mask's top-k."""
    result = CliRunner().invoke(cli, ["predict", "--run", str(pretrained_run), "-k", "3", "the [MASK] of the war ."])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "the [MASK] of the war ."
    assert lines[1].startswith("  -> the ") and lines[1].endswith(" of the war .")
    assert re.fullmatch(r"  \[MASK\] 1: (\S+ 0\.\d{3}  ){2}\S+ 0\.\d{3}", lines[2])


def test_html_page_agrees_with_eval_accuracy(pretrained_run, wiki_shards, cli, tmp_path):
    """The page colours every masked slot of the first n validation rows: its right/wrong counts equal those of
    the trainer's own evaluation of the same rows, and every slot carries its probability on hover."""
    out = tmp_path / "preds.html"
    result = CliRunner().invoke(cli, ["predict", "--run", str(pretrained_run), "--html", str(out), "-n", "12"])
    assert result.exit_code == 0, result.output
    pretrained = load_pretrained(pretrained_run)
    split = open_dataset(wiki_shards).split("val")
    scores = evaluate(pretrained.model(), split, Runtime(torch.device("cpu")), batch_rows=5, max_rows=12)
    correct = round(scores["mlm_acc"] * scores["masked"])
    assert result.stdout == (f"wrote {out}: 12 val rows, {correct} of {scores['masked']} masked tokens right "
                             f"({correct / scores['masked']:.1%})\n")
    page = out.read_text()
    ok, bad = page.count('<span class="ok" title='), page.count('<span class="bad" title=')
    assert (ok, ok + bad) == (correct, scores["masked"])
    titles = re.findall(r'class="(?:ok|bad)" title="([^"]*)"', page)
    assert all(re.fullmatch(r"model: .+ p=\d\.\d{3}; truth: .+ p=\d\.\d{3}; input held .+", html.unescape(t))
               for t in titles)
    assert page.count('<div class="row">') == 12


def test_html_needs_no_texts(pretrained_run, cli, tmp_path):
    """--html scores shard rows, so texts beside it are a usage error."""
    result = CliRunner().invoke(cli, ["predict", "--run", str(pretrained_run), "--html", str(tmp_path / "p.html"),
                                      "a [MASK] ."])
    assert result.exit_code == 2
    assert "--html scores shard rows: drop the texts and --file, or drop --html" in result.output


def test_missing_run_is_a_one_line_error(tmp_path, cli):
    """A --run that does not exist is named in one line, exit status 1."""
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp_path / "nope"), "a [MASK] ."])
    assert result.exit_code == 1
    assert result.output == f"Error: --run {tmp_path / 'nope'}: no such run, checkpoint or Hugging Face directory\n"
