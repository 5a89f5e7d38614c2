import os
import subprocess
import sys
from pathlib import Path

import pytest

from ttdist.data import DataConfig, scaled_cardinalities
from ttdist.data.batching import local_batch_size
from ttdist.data.config import CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_criteo_kaggle():
    cfg = DataConfig()
    assert cfg.name == "synthetic" and cfg.batch_size == 2048
    assert cfg.num_embeddings_per_feature[:3] == [1460, 583, 10131227]
    assert cfg.num_embeddings_per_feature[-1] == 142572
    assert scaled_cardinalities(cfg) == list(CRITEO_KAGGLE_CARDINALITIES)


def test_feature_counts_match_torchrec():
    from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT

    assert (NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES) == (INT_FEATURE_COUNT, CAT_FEATURE_COUNT)


def test_scaled_cardinalities_round_and_keep_two_rows():
    cfg = DataConfig(cardinality_scale=0.01)
    scaled = scaled_cardinalities(cfg)
    assert scaled[0] == 15  # round(14.6)
    assert scaled[2] == 101312  # round(101312.27)
    assert scaled[8] == 2  # 3 rows * 0.01 -> at least 2
    assert min(scaled_cardinalities(DataConfig(cardinality_scale=1e-9))) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "criteo"),
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("num_embeddings_per_feature", [10] * 25),
        ("num_embeddings_per_feature", [10] * 25 + [0]),
        ("cardinality_scale", 0.0),
        ("cardinality_scale", float("nan")),
        ("cardinality_scale", 1000.0),  # a 10-billion-row table
        ("seed", -1),
        ("zipf_alpha", -0.5),
        ("train_path", ""),
        ("eval_path", 3),
        ("eval_batches", 0),
    ],
)
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


def test_validate_catches_later_mutation():
    cfg = DataConfig()
    cfg.batch_size = -4
    with pytest.raises(ValueError, match="batch_size"):
        cfg.validate()


def test_local_batch_size_needs_divisible_batch():
    assert local_batch_size(2048, 3, 4) == 512
    with pytest.raises(ValueError, match="batch_size"):
        local_batch_size(2050, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        local_batch_size(2048, 4, 4)


def test_package_import_does_not_load_torchrec():
    code = "import sys, ttdist.data; print('torchrec' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "False"
