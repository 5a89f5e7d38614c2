"""Hostile and careless config files (issue 11, item 10): each is rejected with ConfigError naming
the file and the key, never silently half-read or failing later with an unrelated error."""
import re

import pytest

from ttdist.config import ConfigError, load_config


def _load(tmp_path, text, overrides=(), name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return path, str(info.value)


def test_a_duplicate_section_or_key_is_rejected_naming_the_file_key_and_lines(tmp_path):
    path, message = _load(tmp_path, "train:\n  steps: 5\nmodel:\n  tt_tables: 2\ntrain:\n  name: x\n")
    assert message == (f"config file {path}: duplicate key 'train' (lines 1 and 5); YAML would silently keep only "
                       "the last one: merge them"), message
    path, message = _load(tmp_path, "model:\n  tt_ranks: [4, 4]\n  tt_tables: 2\n  tt_ranks: [2, 2]\n")
    assert message.startswith(f"config file {path}: duplicate key 'model.tt_ranks' (lines 2 and 4)"), message
    with pytest.raises(ConfigError, match=r"train\.sharding_types: the override's value .* duplicate key 't_cat_1'"):
        load_config(None, ["train.sharding_types={t_cat_1: row_wise, t_cat_1: table_wise}"])


@pytest.mark.parametrize("overrides", [(), ("train.steps=3",)])
def test_a_top_level_list_is_rejected_naming_the_file(tmp_path, overrides):
    path, message = _load(tmp_path, "- train:\n    steps: 5\n", overrides)
    assert message.startswith(f"config file {path}: the top level must be a mapping of sections (model, data, optim, "
                              "train, checkpoint), got a list"), message


def test_an_override_into_a_non_section_names_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  tt_ranks: [4, 4]\n")
    with pytest.raises(ConfigError, match=r"override 'model\.tt_ranks\.x=1': 'model\.tt_ranks' is not a section"):
        load_config(path, ["model.tt_ranks.x=1"])


def test_a_file_that_is_not_utf8_is_rejected_naming_the_file_and_line(tmp_path):
    path, message = _load(tmp_path, b"train:\n  steps: 5\n  name: caf\xe9\n")
    assert re.fullmatch(rf"config file {re.escape(str(path))} is not UTF-8 text: byte 0xe9 at line 3 \(byte offset "
                        r"29\); save it as UTF-8", message), message


@pytest.mark.parametrize("text,key", [
    ("model:\n  tt_ranks: [2.7, 4]\n", "model.tt_ranks[0]: expected int, got 2.7"),
    ("data:\n  num_embeddings_per_feature: [1000.5" + ", 10" * 25 + "]\n",
     "data.num_embeddings_per_feature[0]: expected int, got 1000.5"),
    ("optim:\n  embedding_lr: .nan\n", "optim.embedding_lr: must be a positive finite number, got nan"),
    ("optim:\n  dense_lr: -0.1\n", "optim.dense_lr: must be a positive finite number, got -0.1"),
    ("model:\n  dtype: float16\n", "unknown key 'model.dtype'"),
])
def test_bad_values_in_a_file_name_the_file_and_the_key(tmp_path, text, key):
    path, message = _load(tmp_path, text)
    assert message.startswith(f"config file {path}: {key}"), message


def test_a_bad_value_from_an_override_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.tt_ranks=[2.7]"])
    assert str(info.value) == "model.tt_ranks[0]: expected int, got 2.7 (float)"
