"""CriteoNpyDataset on tiny files in TorchRec's npy layout (X_dense / X_sparse / X_labels.npy)."""

import numpy as np
import pytest
import torch

from ttdist.data import DataConfig, make_dataset, scaled_cardinalities

pytest.importorskip("iopath", reason="TorchRec's npy datapipe opens files through iopath")


@pytest.fixture(scope="module")
def npy_days(tmp_path_factory):
    """Two days of 37 and 29 rows (66 in all) written as TorchRec's preprocessing does."""
    tmp = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(0)
    stems, parts = [], []
    for day, n in enumerate((37, 29)):
        dense = rng.random((n, 13), dtype=np.float32) * 5
        sparse = rng.integers(0, 2**40, (n, 26), dtype=np.int64)
        labels = rng.integers(0, 2, (n, 1), dtype=np.int32)
        stem = tmp / f"day_{day}"
        for suffix, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            np.save(f"{stem}_{suffix}.npy", arr)
        stems.append(str(stem))
        parts.append((dense, sparse, labels))
    whole = [np.concatenate(x) for x in zip(*parts)]
    return ",".join(stems), whole


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_round_trip(npy_days, world_size):
    stems, (dense, sparse, labels) = npy_days
    cfg = DataConfig(name="criteo_npy", batch_size=8, train_path=stems, eval_path=stems,
                     eval_batches=3, cardinality_scale=0.001)  # fmt: skip
    ids = sparse % np.array(scaled_cardinalities(cfg))
    state = np.random.get_state()
    # 66 rows -> 8 full global batches (the last 2 rows are dropped)
    for split, start, batches in (("train", 0, 8), ("train", 5, 3), ("eval", 0, 3)):
        datasets = [make_dataset(cfg, split, r, world_size, start) for r in range(world_size)]
        per_rank = [list(ds) for ds in datasets]
        assert [len(ds) for ds in datasets] == [len(p) for p in per_rank] == [batches] * world_size
        for i, b in enumerate(range(start, start + batches)):
            parts = [p[i] for p in per_rank]
            rows = slice(8 * b, 8 * (b + 1))
            for x in parts:
                assert x.dense_features.dtype == x.labels.dtype == torch.float32
                assert x.sparse_features.values().dtype == torch.int64
                assert len(x.labels) == 8 // world_size
            np.testing.assert_array_equal(
                np.concatenate([x.dense_features for x in parts]), dense[rows]
            )
            got_ids = np.concatenate([x.sparse_features.values().view(26, -1).T for x in parts])
            np.testing.assert_array_equal(got_ids, ids[rows])
            np.testing.assert_array_equal(
                np.concatenate([x.labels for x in parts]), labels[rows, 0]
            )
    new_state = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(state, new_state))  # global RNG untouched
