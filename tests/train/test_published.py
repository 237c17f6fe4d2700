"""Continued pretraining of a published-style ModernBERT: a Hugging Face directory (config, weights, a byte-level
BPE tokenizer.json) -> shards made with its tokenizer -> `berttrain run --init-from` -> export -> transformers
computes our logits."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import build_wiki_shards
from tests.prep.test_hf_tokenizer import train_byte_level_bpe, wiki_lines
from train.config import TrainConfig
from train.hf.export import export_hf
from train.loop import run
from train.predict import Predictor
from train.pretrained import load_pretrained

from .conftest import one_thread

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def published(tmp_path_factory, wiki_valid) -> Path:
    """A randomly initialised ModernBertForMaskedLM saved as transformers saves one, its vocabulary padded past the
    tokenizer's (as published ModernBERTs pad 50,280 tokens to 50,368 rows), beside its tokenizer.json."""
    out = tmp_path_factory.mktemp("published") / "modernbert"
    tokenizer_file = train_byte_level_bpe(wiki_lines(wiki_valid), out / "tokenizer.json", vocab_size=1500)
    tokens = json.loads(tokenizer_file.read_text())
    size = len(tokens["model"]["vocab"])
    ids = {name: tokens["model"]["vocab"][name] for name in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
    config = transformers.ModernBertConfig(
        vocab_size=size + 40, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
        local_attention=16, global_attn_every_n_layers=3, max_position_embeddings=512,
        pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"],
        bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"])
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(config).save_pretrained(out)
    return out


def test_continue_pretraining_a_published_modernbert_and_get_our_logits_back(published, tmp_path, vocab_dir,
                                                                             wiki_valid, wiki_test):
    shards = build_wiki_shards(tmp_path / "shards", published / "tokenizer.json", [wiki_test], [wiki_valid])
    run_dir = tmp_path / "run"
    with one_thread():
        summary = run(TrainConfig(shards=str(shards), run_dir=str(run_dir), arch="modernbert", init_from=str(published),
                                  steps=3, batch_size=8, eval_every=0, precision="fp32", device="cpu"),
                      progress=False)
    assert summary["step"] == 3
    ours = load_pretrained(run_dir)
    assert ours.config.local_attention == 16 and ours.config.layers == 3  # the published shape, not a --size

    out_dir = Path(export_hf(run_dir, tmp_path / "hf")["out_dir"])
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(out_dir, attn_implementation="sdpa").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token == "[PAD]"

    rows = tokenizer(["The album was released in [MASK] .", "A longer sentence about the history of the town , "
                      "its people and the river that runs through it , long enough to cross a window of sixteen ."],
                     padding=True, return_tensors="pt")
    model = ours.model()
    with torch.no_grad():
        expected = model.logits(rows["input_ids"], attention_mask=rows["attention_mask"])
        got = theirs(**rows).logits
    real = rows["attention_mask"].bool()
    assert rows["input_ids"].shape[1] > 16
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)

    # berttrain predict on the run reads "[MASK]" in text through the tokenizer.json as transformers does, and gives
    # the probabilities transformers' model gives there.
    predictor = Predictor.load(ours)
    text = "The album was released in [MASK] ."
    ids = predictor.encode(text)
    assert ids == tokenizer(text)["input_ids"] and ids.count(predictor.vocab.special.mask) == 1
    top = predictor.fill_masks([text], top_k=3)[0]["masks"][0]
    with torch.no_grad():
        probs = theirs(input_ids=torch.tensor([ids])).logits[0, ids.index(predictor.vocab.special.mask)].softmax(-1)
    for candidate in top:
        assert abs(candidate["prob"] - probs[candidate["id"]].item()) < 1e-4
    assert [c["id"] for c in top] == probs.topk(3).indices.tolist()
