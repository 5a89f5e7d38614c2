"""model.max_rows reaches the data: every dataset's ids fit the model's capped tables.

configs/criteo_terabyte.yaml caps the tables at 10M rows (DLRM's --max-ind-range) while five of
its features have ~40M; each dataset's ids must then be its uncapped ids modulo the cap, on every
rank, and untouched without a cap.
"""

from pathlib import Path

import numpy as np
import pytest
import yaml

from ttdist.config import ConfigError, load_config, to_dict, validate
from ttdist.data import make_dataset
from ttdist.data.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES

TERABYTE = Path(__file__).resolve().parents[2] / "configs" / "criteo_terabyte.yaml"
CAP = 10_000_000
BATCH = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One TSV file and one npy stem of 2 * BATCH samples with ids up to 2**40 (> every table)."""
    tmp = tmp_path_factory.mktemp("max_rows")
    rng = np.random.default_rng(0)
    n = 2 * BATCH
    ids = rng.integers(0, 2**40, (n, NUM_SPARSE_FEATURES), dtype=np.int64)
    labels = rng.integers(0, 2, n)
    counts = rng.integers(0, 100, (n, NUM_DENSE_FEATURES))
    tsv = tmp / "day_0.tsv"
    tsv.write_text("".join(
        "\t".join([str(y), *map(str, c), *(f"{i:x}" for i in row)]) + "\n"
        for y, c, row in zip(labels, counts, ids)
    ))  # fmt: skip
    stem = tmp / "day_0"
    np.save(f"{stem}_dense.npy", np.log1p(counts).astype(np.float32))
    np.save(f"{stem}_sparse.npy", ids)
    np.save(f"{stem}_labels.npy", labels[:, None].astype(np.int32))
    return {"criteo_tsv": str(tsv), "criteo_npy": str(stem)}


def config(name, files, *overrides):
    paths = [f"data.train_path={files[name]}", f"data.eval_path={files[name]}"] if name in files else []
    return load_config(TERABYTE, [f"data.name={name}", f"data.batch_size={BATCH}", *paths, *overrides])


def ids(batch):
    """Sparse ids of a batch, feature-major: int64 [26, B_local]."""
    return batch.sparse_features.values().view(NUM_SPARSE_FEATURES, -1).numpy()


@pytest.mark.parametrize("name", ["synthetic", "random", "criteo_tsv", "criteo_npy"])
def test_ids_fit_the_capped_tables_on_every_rank(name, files):
    if name == "criteo_npy":
        pytest.importorskip("iopath", reason="TorchRec's npy datapipe opens files through iopath")
    capped, uncapped = config(name, files), config(name, files, "model.max_rows=0")
    rows = np.array(capped.table_rows())
    assert rows.max() == CAP and max(uncapped.table_rows()) > 3 * CAP

    got = ids(next(iter(make_dataset(capped.data, "train", 0, 1))))
    raw = ids(next(iter(make_dataset(uncapped.data, "train", 0, 1))))
    assert (raw.max(axis=1) >= CAP).sum() == 5  # the five ~40M-row features do exceed the cap
    assert (got.max(axis=1) < rows).all(), [(f, got[f].max(), rows[f]) for f in range(26) if got[f].max() >= rows[f]]
    np.testing.assert_array_equal(got, raw % CAP)

    per_rank = [ids(next(iter(make_dataset(capped.data, "train", r, 2)))) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(per_rank, axis=1), got)


def test_no_cap_leaves_the_ids_alone():
    from ttdist.data.config import cap_ids

    cfg = load_config(TERABYTE, ["model.max_rows=0"]).data
    assert cfg.max_rows == 0
    values = np.array([0, CAP, 2**40], dtype=np.int64)
    assert cap_ids(values, cfg) is values


def test_config_hands_model_max_rows_to_the_data_and_refuses_another_cap(tmp_path):
    cfg = load_config(TERABYTE)
    assert cfg.data.max_rows == cfg.model.max_rows == CAP
    saved = tmp_path / "config.yaml"  # the run directory's copy loads again
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(saved) == cfg
    with pytest.raises(ConfigError, match="data.max_rows: is 5 but model.max_rows is 10000000"):
        load_config(TERABYTE, ["data.max_rows=5"])
    cfg.model.max_rows = 0  # changed after loading: validate() catches the disagreement
    with pytest.raises(ConfigError, match="data.max_rows: is 10000000 but model.max_rows is 0"):
        validate(cfg)
