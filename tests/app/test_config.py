"""Config loading: every shipped config validates; bad keys, types and values name the key."""
from pathlib import Path

import pytest

from ttdist.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0


@pytest.mark.parametrize("overrides,match", [
    (["model.embeding_dim=8"], r"unknown key 'model.embeding_dim'"),
    (["bogus.x=1"], r"unknown key 'bogus'"),
    (["train.steps=ten"], r"train.steps: expected int"),
    (["train.steps=0"], r"train.steps: must be positive"),
    (["model.tt_ranks=[4, x]"], r"model.tt_ranks\[1\]: expected int"),
    (["model.tt_ranks=[100000, 4]"], r"model.tt_ranks: .*exceeds its unfolding's rank limit"),
    (["model.dense_arch_layer_sizes=[64, 8]"], r"model.dense_arch_layer_sizes: must end with embedding_dim"),
    (["optim.embedding_optimizer=lamb"], r"optim.embedding_optimizer: unsupported TT optimizer"),
    (["optim.dense_optimizer=nope"], r"optim.dense_optimizer: no torch.optim class"),
    (["optim.dense_lr=-1"], r"optim.dense_lr: must be a positive finite number"),
    (["data.batch_size=0"], r"data.batch_size must be >= 1"),
    (["train.sharding_types={t_cat_2: diagonal}"], r"train.sharding_types.t_cat_2: must be one of"),
    (["train.backend=mpi"], r"train.backend"),
    (["model.tt_tables=30"], r"model.tt_tables"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_world_size_mismatch_and_batch_divisibility():
    with pytest.raises(ConfigError, match=r"train.world_size: the config expects 2 ranks but torchrun started 4"):
        load_config(None, ["train.world_size=2"], world_size=4)
    with pytest.raises(ConfigError, match=r"data.batch_size: 100 is not divisible by the world size 3"):
        load_config(None, ["data.batch_size=100"], world_size=3)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    cfg = load_config(path, ["model.tt_ranks=[8, 8]", "train.plan_path=null", "optim.dense_lr=1e-3"])
    assert cfg.train.steps == 5 and cfg.model.tt_ranks == [8, 8] and cfg.optim.dense_lr == 1e-3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
