"""`--arch modernbert` through everything downstream of the model: train on our 15% shards with the modern recipe
(dynamic masks at 30%, no dropout), resume, eval, predict, export to transformers, fill-mask, --init-from."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prep.errors import BertError
from train.cli import main
from train.config import TrainConfig
from train.evaluate import eval_run
from train.hf.export import export_hf
from train.loop import run
from train.predict import Predictor
from train.pretrained import load_pretrained
from train.rundir import METRICS_FILE

from .conftest import one_thread

transformers = pytest.importorskip("transformers")

# A 2-layer ModernBERT: layer 0 global, layer 1 local (the window is the parity tests' concern).
MODERN = dict(arch="modernbert", size="tiny", layers=2, hidden=64, heads=2, steps=20, batch_size=16, eval_every=10,
              eval_rows=128, log_every=1, save_every=10, keep_last=5, precision="fp32", device="cpu", seed=4)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory, wiki_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("modern") / "run"
    with one_thread():  # as the tests compare against: the thread count changes float sums
        run(TrainConfig(shards=str(wiki_shards), run_dir=str(run_dir), **MODERN), progress=False)
    return run_dir


def test_the_run_records_the_architecture_and_the_modern_recipe(modern_run):
    """config.json and model.json say modernbert; untuned, the run masks dynamically at 30% without dropout."""
    saved = json.loads((modern_run / "config.json").read_text())
    assert saved["model"]["arch"] == "modernbert" and saved["train"]["arch"] == "modernbert"
    config = TrainConfig.from_dict(saved["train"])
    assert config.masking_mode == "dynamic" and config.dynamic_mask_prob == 0.3 and config.model_dropout == 0.0
    model = json.loads(next((modern_run / "checkpoints").glob("step-*/model.json")).read_text())
    assert model["arch"] == "modernbert" and model["embedding_dropout"] == 0.0


def test_resume_gives_exactly_the_losses_of_a_straight_run(modern_run, wiki_shards, tmp_path):
    """Stopped at 10 and resumed to 20 == 20 straight, bit for bit: ModernBERT's weights and the 30% masks come
    back like BERT's."""
    options = dict(MODERN, shards=str(wiki_shards), run_dir=str(tmp_path / "resumed"))
    run(TrainConfig(**options), progress=False, stop_at=10)
    run(TrainConfig(**options, resume=True), progress=False)
    straight = [(r["step"], r.get("loss"), r.get("grad_norm")) for r in _records(modern_run)]
    resumed = [(r["step"], r.get("loss"), r.get("grad_norm")) for r in _records(tmp_path / "resumed")]
    assert resumed == straight


def test_eval_predict_and_the_transformers_export_agree(modern_run, tmp_path):
    """`berttrain eval` reproduces the run's last evaluation; the export opens in transformers as
    ModernBertForMaskedLM through the Auto classes, and the fill-mask pipeline gives berttrain predict's
    probabilities."""
    last_val = [r for r in _records(modern_run) if r.get("split") == "val"][-1]
    scores = eval_run(modern_run, max_rows=128, device="cpu")
    assert scores["mlm_loss"] == pytest.approx(last_val["mlm_loss"], rel=1e-6)

    out_dir = Path(export_hf(modern_run, tmp_path / "hf")["out_dir"])
    model = transformers.AutoModelForMaskedLM.from_pretrained(out_dir)
    assert type(model).__name__ == "ModernBertForMaskedLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id == model.config.pad_token_id

    text = "the album was released in [MASK] 2010 ."
    fill = transformers.pipeline("fill-mask", model=str(out_dir), device="cpu")
    theirs = fill(text, top_k=5)
    ours = Predictor.load(load_pretrained(modern_run)).fill_masks([text], 5)[0]["masks"][0]
    assert [o["token"] for o in theirs] == [c["id"] for c in ours]
    assert [o["score"] for o in theirs] == pytest.approx([c["prob"] for c in ours], abs=1e-4)

    back, original = load_pretrained(out_dir), load_pretrained(modern_run)  # and back: the export reads in as ours
    assert back.config == original.config
    vocab_size = original.config.vocab_size  # rows past it only align the matmul and are not exported
    for name, weight in original.state.items():
        assert torch.equal(back.state[name][:vocab_size], weight[:vocab_size]), name


def test_init_from_continues_a_modernbert_and_names_the_arch_it_needs(modern_run, wiki_shards, tmp_path):
    base = dict(shards=str(wiki_shards), size="tiny", steps=2, batch_size=8, eval_every=0, precision="fp32",
                device="cpu", init_from=str(modern_run))
    with pytest.raises(BertError, match=r"holds a modernbert model: pass --arch modernbert"):
        run(TrainConfig(run_dir=str(tmp_path / "wrong"), **base), progress=False)
    summary = run(TrainConfig(run_dir=str(tmp_path / "next"), arch="modernbert", **base), progress=False)
    assert summary["step"] == 2


def test_nsp_shards_are_refused_with_a_clear_message(tmp_path, vocab_dir, wiki_valid, wiki_test):
    from tests.conftest import build_wiki_shards

    shards = build_wiki_shards(tmp_path / "nsp", vocab_dir, [wiki_test], [wiki_valid], nsp=True)
    result = CliRunner().invoke(main, ["run", "--shards", str(shards), "--arch", "modernbert", "--size", "tiny",
                                       "--steps", "1", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1
    assert "--arch modernbert has no segments or NSP head: make shards without --nsp" in result.stderr
    assert not (tmp_path / "run").exists()


def test_finetune_builds_on_the_modernbert_encoder(modern_run, tmp_path):
    """`berttrain finetune` on a ModernBERT run: the classifier's encoder carries the pretrained weights, and the
    saved model reloads (Classifier.for_record) to the same validation scores."""
    from train.finetune import (MODEL_FILE, RECORD_FILE, Classifier, FinetuneConfig, encode_examples, finetune,
                                predict_logits, read_examples, scores)

    rows = [("the album was released in 2010 .", "a"), ("he played for the club .", "b")] * 16
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    summary = finetune(FinetuneConfig(source=str(modern_run), train=str(data), val=str(data),
                                      out_dir=str(tmp_path / "ft"), epochs=1, batch_size=8, max_len=16,
                                      device="cpu", patience=0), progress=False)
    record = json.loads((tmp_path / "ft" / RECORD_FILE).read_text())
    assert record["model"]["arch"] == "modernbert"
    model = Classifier.for_record(record)
    model.load_state_dict(torch.load(tmp_path / "ft" / MODEL_FILE, weights_only=True))
    pretrained = load_pretrained(modern_run)
    encoded = encode_examples(read_examples(data), pretrained.tokenizer(), 16, record["labels"])
    again = scores(predict_logits(model, encoded, 8, torch.device("cpu")), torch.from_numpy(encoded.label_ids), 2)
    assert again["acc"] == pytest.approx(summary["best"]["val_acc"])
