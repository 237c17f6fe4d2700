"""`berttrain export` and Hugging Face weights in: transformers opens the export with no code of ours and agrees with
`berttrain predict`; export -> load_hf_dir -> export is the identity; what cannot be exported is refused."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers.models.bert.tokenization_bert import load_vocab  # noqa: E402

from prep.errors import BertError  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.hf.bert import to_hf_state_dict  # noqa: E402
from train.hf.export import export_hf  # noqa: E402
from train.hf.files import PYTORCH_FILE, SAFETENSORS_FILE, is_hf_dir, load_hf_dir  # noqa: E402
from train.model import BertForPretraining, ModelConfig  # noqa: E402
from train.pretrained import load_pretrained  # noqa: E402
from train.predict import Predictor  # noqa: E402

# Real WikiText-2 validation sentences with words masked out.
TEXTS = [
    "the album was released in [MASK] 2010 .",
    "he was born in the [MASK] of new york , and studied [MASK] at the university .",
    "The Ship Was Sunk By A [MASK] In 1942 .",
    "[MASK] [MASK] [MASK]",
]




def _hf_mask_probs(model, tokenizer, text):
    """Softmax over the vocabulary at each [MASK], computed by transformers alone."""
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    positions = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
    return logits[positions].softmax(-1)


def test_transformers_fill_mask_matches_berttrain_predict(pretrained_run, hf_export):
    """AutoModelForMaskedLM + BertTokenizer on the export give the same top-k tokens and probabilities (1e-4) as
    `berttrain predict` on the run, for cased and uncased text, several masks per text: the export is usable without
    any code of ours."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_export).eval()
    tokenizer = transformers.BertTokenizer.from_pretrained(hf_export)
    assert type(model).__name__ == "BertForMaskedLM"
    ours = Predictor.load(load_pretrained(pretrained_run)).fill_masks(TEXTS, top_k=5)
    for text, result in zip(TEXTS, ours):
        probs = _hf_mask_probs(model, tokenizer, text)
        assert len(result["masks"]) == len(probs) == text.count("[MASK]")
        for candidates, hf in zip(result["masks"], probs):
            top_p, top_i = hf.topk(5)
            assert [c["id"] for c in candidates] == top_i.tolist()
            assert [c["token"] for c in candidates] == tokenizer.convert_ids_to_tokens(top_i.tolist())
            assert [c["prob"] for c in candidates] == pytest.approx(top_p.tolist(), abs=1e-4)
    from_export = Predictor.load(load_pretrained(hf_export)).fill_masks(TEXTS, top_k=5)  # --run takes the export
    assert [r["masks"] for r in from_export] == [r["masks"] for r in ours]


def test_pipeline_api_works_on_the_export(pretrained_run, hf_export):
    """transformers.pipeline("fill-mask") runs on the export directory by path and scores like berttrain predict."""
    fill = transformers.pipeline("fill-mask", model=str(hf_export), device="cpu")
    out = fill("the album was released in [MASK] 2010 .", top_k=3)
    ours = Predictor.load(load_pretrained(pretrained_run)).fill_masks(["the album was released in [MASK] 2010 ."], 3)
    assert [o["token"] for o in out] == [c["id"] for c in ours[0]["masks"][0]]
    assert [o["score"] for o in out] == pytest.approx([c["prob"] for c in ours[0]["masks"][0]], abs=1e-4)


def test_exported_tokenizer_matches_ours_on_real_text(pretrained_run, hf_export, wiki_valid):
    """BertTokenizer from the export (tokenizer.json) and one built from its vocab.txt alone give our ids
    on real WikiText lines, with the casing and model_max_length written in tokenizer_config.json."""
    ours = load_pretrained(pretrained_run).tokenizer()
    lines = [line for line in wiki_valid.read_text(encoding="utf-8").splitlines() if line.strip()][:300]
    lines += ["Ünïcödé CAFÉ [MASK] [mask] naïve", "tabs\tand  spaces"]
    from_json = transformers.BertTokenizer.from_pretrained(hf_export)
    config = json.loads((hf_export / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["model_max_length"] == 64  # the run's rows: 64 tokens
    assert from_json.model_max_length == 64
    vocab_only = transformers.BertTokenizer(vocab=load_vocab(str(hf_export / "vocab.txt")), do_lower_case=True)
    for line in lines:
        expected = ours.encode(line)
        assert from_json(line, add_special_tokens=False)["input_ids"] == expected, line
        assert vocab_only(line, add_special_tokens=False)["input_ids"] == expected, line
    assert json.loads((hf_export / "special_tokens_map.json").read_text())["mask_token"] == "[MASK]"


def test_export_load_export_gives_identical_tensors(pretrained_run, hf_export, tmp_path):
    """export -> load_hf_dir -> our model -> checkpoint -> export again: every tensor identical, and equal to the
    run's own weights (vocabulary padding aside). This is what --init-from a Hugging Face directory relies on."""
    config, state, vocab_file = load_hf_dir(hf_export)
    source = load_pretrained(pretrained_run)
    assert config == source.config
    model = BertForPretraining(config)
    model.load_state_dict(state, strict=True)
    rows = config.vocab_size  # the padding rows past the vocabulary are never exported
    for name, tensor in source.state.items():
        restored = model.state_dict()[name]
        if name in ("encoder.embeddings.word.weight", "mlm_head.bias"):
            restored, tensor = restored[:rows], tensor[:rows]
        assert torch.equal(restored, tensor), name
    assert vocab_file.read_bytes() == source.vocab_file.read_bytes()

    run_dir = tmp_path / "from-hf"
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    ckpt.save_checkpoint(run_dir, 1, model.state_dict(), config.as_dict(), {}, info)
    again = export_hf(run_dir, tmp_path / "again")
    first, second = load_file(hf_export / SAFETENSORS_FILE), load_file(tmp_path / "again" / SAFETENSORS_FILE)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert (hf_export / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert again["tensors"] == len(first)


def test_exporting_a_hugging_face_directory_reproduces_it(hf_export, tmp_path):
    """A Hugging Face directory is itself a valid --run: exporting it again writes the same tensors and files."""
    assert is_hf_dir(hf_export) and not is_hf_dir(hf_export.parent)
    export_hf(hf_export, tmp_path / "copy")
    first, second = load_file(hf_export / SAFETENSORS_FILE), load_file(tmp_path / "copy" / SAFETENSORS_FILE)
    assert all(torch.equal(first[k], second[k]) for k in first) and first.keys() == second.keys()


def test_pytorch_weights_format_loads_in_transformers(pretrained_run, hf_export, tmp_path):
    """Without safetensors the export writes pytorch_model.bin, which transformers reads to the same logits."""
    out = tmp_path / "pt"
    record = export_hf(pretrained_run, out, weights_format="pytorch")
    assert record["weights"] == PYTORCH_FILE and not (out / SAFETENSORS_FILE).exists()
    a = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    b = transformers.AutoModelForMaskedLM.from_pretrained(hf_export).eval()
    ids = torch.tensor([[2, 100, 4, 200, 3]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    config, state, _ = load_hf_dir(out)
    assert all(torch.equal(state[k], v) for k, v in load_hf_dir(hf_export)[1].items())


def test_published_checkpoint_layouts_load(hf_export, tmp_path):
    """A BertForPreTraining-style checkpoint as Google's converted ones come (legacy LayerNorm gamma/beta, the tied
    decoder stored twice, NSP head and pooler, config vocab_size padded past vocab.txt) loads into our names; the
    NSP head comes along as config.nsp."""
    config, state, _ = load_hf_dir(hf_export)
    nsp_config = ModelConfig.from_dict({**config.as_dict(), "nsp": True})
    torch.manual_seed(1)
    nsp_state = {**state, **{k: v for k, v in BertForPretraining(nsp_config).state_dict().items()
                             if k.startswith(("pooler.", "nsp_head."))}}
    hf_state = to_hf_state_dict(nsp_state, nsp_config)
    legacy = {}
    for name, tensor in hf_state.items():
        if "LayerNorm" in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        tensor = tensor.clone()
        if name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"):
            tensor = torch.cat([tensor, torch.zeros(8, tensor.shape[1])])  # vocab_size padded in config.json
        if name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            tensor = torch.cat([tensor, torch.zeros(8)])
        legacy[name] = tensor
    out = tmp_path / "google"
    out.mkdir()
    torch.save(legacy, out / PYTORCH_FILE)
    hf_config = json.loads((hf_export / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf_config, "vocab_size": config.vocab_size + 8,
                                                 "architectures": ["BertForPreTraining"]}))
    shutil.copyfile(hf_export / "vocab.txt", out / "vocab.txt")
    loaded_config, loaded, _ = load_hf_dir(out)
    assert loaded_config.nsp and loaded_config.vocab_size == config.vocab_size
    assert loaded.keys() == nsp_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in nsp_state.items())


def test_bare_encoder_needs_the_mlm_head_only_for_pretraining(hf_export, tmp_path):
    """A BertModel directory (no cls.predictions.*) is refused for continued pretraining with a message that says
    why, and accepted for fine-tuning (the head is then freshly initialised)."""
    weights = load_file(hf_export / SAFETENSORS_FILE)
    out = tmp_path / "bare"
    out.mkdir()
    bare = {k.removeprefix("bert."): v for k, v in weights.items() if k.startswith("bert.")}
    torch.save(bare, out / PYTORCH_FILE)
    for name in ("config.json", "vocab.txt"):
        shutil.copyfile(hf_export / name, out / name)
    with pytest.raises(BertError, match=r"bare BertModel without the masked-LM head \(cls.predictions.\*\)"):
        load_hf_dir(out)
    config, state, _ = load_hf_dir(out, require_mlm_head=False)
    assert torch.equal(state["encoder.layers.1.ffn_out.weight"], bare["encoder.layer.1.output.dense.weight"])


def test_compiled_checkpoint_keys_export_under_transformers_names(pretrained_run, hf_export, tmp_path):
    """torch.compile's `_orig_mod.` prefixes in a checkpoint (the known way to end up with weights transformers
    silently re-initialises) are stripped: the export is the same."""
    source = load_pretrained(pretrained_run)
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    compiled = {f"_orig_mod.{k}": v for k, v in source.state.items()}
    ckpt.save_checkpoint(tmp_path / "compiled", 7, compiled, source.config.as_dict(), {}, info)
    export_hf(tmp_path / "compiled", tmp_path / "out")
    first, second = load_file(hf_export / SAFETENSORS_FILE), load_file(tmp_path / "out" / SAFETENSORS_FILE)
    assert all(torch.equal(first[k], second[k]) for k in first) and first.keys() == second.keys()


def test_a_weight_without_a_transformers_name_is_refused(pretrained_run, tmp_path):
    """Every weight must land under its transformers name: a stray tensor stops the export instead of being
    dropped, and nothing is left behind."""
    source = load_pretrained(pretrained_run)
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    ckpt.save_checkpoint(tmp_path / "odd", 1, {**source.state, "adapter.weight": torch.zeros(2)},
                         source.config.as_dict(), {}, info)
    with pytest.raises(BertError, match=r"unmapped \['adapter.weight'\]"):
        export_hf(tmp_path / "odd", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_pre_ln_run_is_refused_with_a_clear_message(pretrained_run, tmp_path, cli):
    """Pre-LN has no BertForMaskedLM equivalent: export says so in one line (exit 1) and writes nothing."""
    source = load_pretrained(pretrained_run)
    config = ModelConfig.from_dict({**source.config.as_dict(), "norm": "pre"})
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    ckpt.save_checkpoint(tmp_path / "pre", 1, BertForPretraining(config).state_dict(), config.as_dict(), {}, info)
    result = CliRunner().invoke(cli, ["export", "--run", str(tmp_path / "pre"), "--hf", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: checkpoint {tmp_path / 'pre' / 'checkpoints' / 'step-00000001'} is a pre-LN model (--norm pre): "
        "transformers' BERT is post-LN, so it has no BertForMaskedLM equivalent; export needs a run trained with "
        "--norm post"]
    assert not (tmp_path / "out").exists()


def test_export_command_output_and_refusal_to_overwrite(pretrained_run, tmp_path, cli):
    """The command prints what it wrote; a second export to the same directory needs --force."""
    out = tmp_path / "hf"
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--run", str(pretrained_run), "--hf", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: BertForMaskedLM, ")
    assert "files: berttrain.json, config.json, model.safetensors, special_tokens_map.json, tokenizer.json, " \
           "tokenizer_config.json, vocab.txt" in result.output
    result = runner.invoke(cli, ["export", "--run", str(pretrained_run), "--hf", str(out)])
    assert result.exit_code == 1
    assert result.output == f"Error: {out} already exists: pass --force to replace it, or another --hf directory\n"
    assert runner.invoke(cli, ["export", "--run", str(pretrained_run), "--hf", str(out), "--force"]).exit_code == 0


def test_moved_shards_need_the_vocab_and_a_wrong_one_is_refused(pretrained_run, tmp_path, vocab_dir):
    """A run reads its vocab.txt from its shards; when they are gone --vocab stands in, checked by sha256."""
    source = load_pretrained(pretrained_run)
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    ckpt.save_checkpoint(tmp_path / "moved", 1, source.state, source.config.as_dict(), {},
                         {**info, "shards": str(tmp_path / "gone")})
    with pytest.raises(BertError, match="lives in its shards .*gone, which are not there any more: pass --vocab"):
        load_pretrained(tmp_path / "moved")
    assert load_pretrained(tmp_path / "moved", vocab=vocab_dir).vocab_file == vocab_dir / "vocab.txt"
    other = tmp_path / "other.txt"
    other.write_text(source.vocab_file.read_text() + "extra\n")
    with pytest.raises(BertError, match="is not the vocabulary checkpoint .* was trained with"):
        load_pretrained(tmp_path / "moved", vocab=other)


def test_export_is_checked_against_transformers_own_model(pretrained_run, tmp_path, monkeypatch):
    """The names and shapes written are compared with transformers' BertForMaskedLM built from the config.json
    written beside them: a config that disagrees with the weights (here a wrong intermediate_size) stops the export
    instead of producing a directory that transformers would half re-initialise."""
    import train.hf.bert

    real = train.hf.bert.hf_config_dict
    monkeypatch.setattr(train.hf.bert, "hf_config_dict", lambda config: {**real(config), "intermediate_size": 100})
    with pytest.raises(BertError, match=r"does not match transformers .*wrong shape \['bert.encoder.layer.0"):
        export_hf(pretrained_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nsp_model_exports_as_bert_for_pretraining(pretrained_run, tmp_path):
    """A model with the NSP head exports as BertForPreTraining: transformers gives its NSP logits and its MLM logits
    as ours do (1e-5), and AutoModelForMaskedLM still opens the directory."""
    source = load_pretrained(pretrained_run)
    config = ModelConfig.from_dict({**source.config.as_dict(), "nsp": True})
    torch.manual_seed(3)
    ours = BertForPretraining(config).eval()
    ours.load_state_dict({**ours.state_dict(), **source.state})
    info = json.loads((source.checkpoint / ckpt.INFO_FILE).read_text())
    ckpt.save_checkpoint(tmp_path / "nsp", 1, ours.state_dict(), config.as_dict(), {}, info)
    record = export_hf(tmp_path / "nsp", tmp_path / "out")
    assert record["architecture"] == "BertForPreTraining"
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[2, 300, 400, 3, 500, 4, 600, 3]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types)
        mine = ours(ids, torch.tensor([[5]]), token_type_ids=types)
    assert torch.allclose(out.seq_relationship_logits, mine.nsp_logits, atol=1e-5)
    assert torch.allclose(out.prediction_logits[0, 5], mine.mlm_logits[0, 0], atol=1e-5)
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out")).__name__ == "BertForMaskedLM"


def test_init_from_a_hugging_face_directory_continues_pretraining(hf_export, wiki_shards, tmp_path):
    """`berttrain run --init-from HF_DIR` starts from the published weights (its first loss is the exported model's
    loss, far below a fresh model's) on shards made with that directory's vocab.txt, and exporting right after
    step 0 would give the same tensors back."""
    from train.config import TrainConfig
    from train.loop import run
    from tests.train.conftest import PRETRAIN

    options = {**PRETRAIN, "steps": 2, "eval_every": 0, "save_every": 0, "lr": 1e-9, "dropout": 0.0}
    run(TrainConfig(shards=str(wiki_shards), run_dir=str(tmp_path / "hf"), init_from=str(hf_export), **options),
        progress=False)
    run(TrainConfig(shards=str(wiki_shards), run_dir=str(tmp_path / "fresh"), **options), progress=False)
    first = [json.loads(line) for line in (tmp_path / "hf" / "metrics.jsonl").read_text().splitlines()][0]
    fresh = [json.loads(line) for line in (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] < fresh["loss"] - 0.5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert str(hf_export) in json.dumps(config)
    export_hf(tmp_path / "hf", tmp_path / "again")
    original, exported = load_file(hf_export / SAFETENSORS_FILE), load_file(tmp_path / "again" / SAFETENSORS_FILE)
    assert original.keys() == exported.keys()
    assert max((original[k] - exported[k]).abs().max().item() for k in original) < 1e-6
