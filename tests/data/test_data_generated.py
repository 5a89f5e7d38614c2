"""Properties both on-the-fly datasets (synthetic and random) must have."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ttdist.data import DataConfig, make_dataset, scaled_cardinalities

NAMES = ["synthetic", "random"]


def arrays(batch):
    """(dense [n, 13], ids [n, 26], labels [n]) of a Batch, checking the KJT layout."""
    kjt = batch.sparse_features
    n = len(batch.labels)
    assert kjt.keys() == [f"cat_{f}" for f in range(26)]
    assert kjt.values().dtype == torch.int64
    assert torch.equal(kjt.lengths(), torch.ones(26 * n, dtype=torch.int32))
    assert batch.dense_features.dtype == batch.labels.dtype == torch.float32
    assert batch.dense_features.shape == (n, 13)
    return batch.dense_features.numpy(), kjt.values().view(26, n).T.numpy(), batch.labels.numpy()


def assert_same(a, b):
    for x, y in zip(arrays(a), arrays(b)):
        np.testing.assert_array_equal(x, y)


def cfg_for(name, **kw):
    return DataConfig(name=name, batch_size=64, cardinality_scale=0.01, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_batches_other_seed_other(name):
    a = make_dataset(cfg_for(name, seed=3), "train", 0, 1)
    b = make_dataset(cfg_for(name, seed=3), "train", 0, 1)
    c = make_dataset(cfg_for(name, seed=4), "train", 0, 1)
    for i in (0, 7):
        assert_same(a.batch(i), b.batch(i))
        assert not np.array_equal(arrays(a.batch(i))[1], arrays(c.batch(i))[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_the_global_batch(name, split, world_size):
    cfg = cfg_for(name)
    whole = make_dataset(cfg, split, 0, 1)
    ranks = [make_dataset(cfg, split, r, world_size) for r in range(world_size)]
    for b in (0, 5):
        parts = [arrays(ds.batch(b)) for ds in ranks]
        assert all(len(p[2]) == 64 // world_size for p in parts)
        for k, expected in enumerate(arrays(whole.batch(b))):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), expected)


@pytest.mark.parametrize("name", NAMES)
def test_sample_n_does_not_depend_on_the_batch_size(name):
    small = make_dataset(DataConfig(name=name, batch_size=16), "train", 0, 1)
    big = make_dataset(DataConfig(name=name, batch_size=64), "train", 0, 1)
    joined = [np.concatenate(x) for x in zip(*(arrays(small.batch(i)) for i in range(4, 8)))]
    for x, y in zip(joined, arrays(big.batch(1))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_iteration_resumes_at_start_batch(name):
    cfg = cfg_for(name)
    ds = make_dataset(cfg, "train", 1, 2)
    it = iter(make_dataset(cfg, "train", 1, 2, start_batch=3))
    for b in range(3, 6):
        assert_same(next(it), ds.batch(b))


@pytest.mark.parametrize("name", NAMES)
def test_eval_split_is_finite(name):
    cfg = cfg_for(name, eval_batches=3)
    ds = make_dataset(cfg, "eval", 0, 2)
    assert len(ds) == 3 and len(list(ds)) == 3
    assert len(list(make_dataset(cfg, "eval", 0, 2, start_batch=2))) == 1
    with pytest.raises(IndexError):
        ds.batch(3)


def test_dataloader_workers_keep_the_order():
    cfg = cfg_for("synthetic", eval_batches=5)
    expected = list(make_dataset(cfg, "eval", 1, 2, start_batch=1))
    loader = DataLoader(
        make_dataset(cfg, "eval", 1, 2, start_batch=1), batch_size=None, num_workers=2
    )
    got = list(loader)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert_same(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1.0, 0.01, 1e-9])
def test_ids_in_range_for_every_feature(name, scale):
    cfg = DataConfig(name=name, batch_size=4096, cardinality_scale=scale)
    rows = np.array(scaled_cardinalities(cfg))
    ids = np.concatenate([arrays(make_dataset(cfg, "train", 0, 1).batch(b))[1] for b in range(3)])
    assert ids.min() >= 0
    assert (ids.max(axis=0) < rows).all()
    if scale == 1e-9:  # every table has 2 rows: both are used
        assert (ids.max(axis=0) == 1).all()


def test_bad_split_and_batch_size_are_rejected():
    with pytest.raises(ValueError, match="split"):
        make_dataset(DataConfig(), "test", 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(DataConfig(batch_size=100), "train", 0, 3)
