"""The Hugging Face registry and BERT's config mapping: config.json is read back into the config it was written
from, and an architecture we do not map is refused by name before any weight is read."""

import json

import pytest

from prep.errors import BertError
from train.hf import MAPPINGS, bert, mapping_for
from train.hf.bert import config_from_hf, hf_config_dict
from train.hf.files import load_hf_dir
from train.model import ModelConfig


def test_registry_maps_bert_and_names_what_it_reads_for_anything_else():
    """`model_type` picks the mapping module; an unknown one is a user error that lists the ones we read."""
    assert mapping_for("bert") is bert and MAPPINGS["bert"] is bert
    with pytest.raises(BertError) as err:
        mapping_for("gpt2")
    assert str(err.value) == ("Hugging Face model_type 'gpt2' has no mapping in berttrain; it reads 'bert', "
                              "'modernbert'")


@pytest.mark.parametrize("nsp", [False, True])
def test_bert_config_json_reads_back_into_the_config_it_came_from(nsp):
    """config_from_hf(hf_config_dict(c)) == c for every field config.json carries (NSP is settled by the weights,
    so it reads back false): what --init-from a Hugging Face directory relies on."""
    config = ModelConfig(vocab_size=1000, hidden=96, layers=3, heads=3, ffn=200, max_positions=128,
                         type_vocab_size=3, dropout=0.05, attention_dropout=0.0, layer_norm_eps=1e-7, pad_id=4,
                         nsp=nsp)
    hf_config = json.loads(json.dumps(hf_config_dict(config)))  # as config.json stores it
    assert config_from_hf(hf_config) == ModelConfig.from_dict({**config.as_dict(), "nsp": False})


def test_unknown_architecture_or_unsupported_bert_is_refused_with_its_path(tmp_path):
    """load_hf_dir dispatches on config.json's model_type; what no mapping reads stops there, path in the message."""
    config = ModelConfig(vocab_size=100, hidden=64, layers=1, heads=1, ffn=64)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config_dict(config), "model_type": "gpt2"}))
    with pytest.raises(BertError) as err:
        load_hf_dir(tmp_path)
    assert str(err.value) == (f"{tmp_path}: Hugging Face model_type 'gpt2' has no mapping in berttrain; it reads "
                              f"'bert', 'modernbert'")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config_dict(config), "hidden_act": "relu"}))
    with pytest.raises(BertError) as err:
        load_hf_dir(tmp_path)
    assert str(err.value) == f"{tmp_path}: config.json uses hidden_act 'relu'; berttrain's BERT uses exact 'gelu'"
