"""TTEmbeddingBagCollection behaves as TorchRec's EmbeddingBagCollection (and DLRM takes it)."""
import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import ttdist
from ttdist.modules.collection import MixedEmbeddingBagCollection, side_by_side

TABLES = [
    ttdist.TTEmbeddingBagConfig(num_embeddings=1000, embedding_dim=8, name="t0", feature_names=["f0"], tt_ranks=[4, 4]),
    EmbeddingBagConfig(num_embeddings=10, embedding_dim=8, name="d0", feature_names=["f1"]),
    ttdist.TTEmbeddingBagConfig(num_embeddings=500, embedding_dim=8, name="t1", feature_names=["f2", "f3"],
                                tt_ranks=[3], pooling=PoolingType.MEAN),
]


def random_kjt(keys, rows, batch, gen, weighted=False):
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = torch.cat([torch.randint(0, rows[k], (int(l),), generator=gen)
                        for k, chunk in zip(keys, lengths.split(batch)) for l in chunk])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def dense_twin(collection):
    """A TorchRec EmbeddingBagCollection holding the dense tables of `collection`."""
    configs = [EmbeddingBagConfig(num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim, name=c.name,
                                  feature_names=c.feature_names, pooling=c.pooling) for c in collection.embedding_bag_configs()]
    ebc = EmbeddingBagCollection(configs, is_weighted=collection.is_weighted())
    tt = collection.tt if isinstance(collection, MixedEmbeddingBagCollection) else collection
    dense = collection.dense if isinstance(collection, MixedEmbeddingBagCollection) else None
    with torch.no_grad():
        for t, cfg in enumerate(tt.embedding_bag_configs()):
            ebc.embedding_bags[cfg.name].weight.copy_(tt.tt_tables.full_weight(t))
        if dense is not None:
            for name, bag in dense.embedding_bags.items():
                ebc.embedding_bags[name].weight.copy_(bag.weight)
    return ebc


def test_collection_equals_dense_ebc_in_config_order_for_any_key_order():
    tt = MixedEmbeddingBagCollection(TABLES)
    ebc = dense_twin(tt)
    rows = {"f0": 1000, "f1": 10, "f2": 500, "f3": 500}
    kjt = random_kjt(["f3", "f1", "f0", "f2"], rows, batch=7, gen=torch.Generator().manual_seed(0))
    out, expected = tt(kjt), ebc(kjt)
    assert out.keys() == ["f0", "f1", "f2", "f3"] == expected.keys()
    torch.testing.assert_close(out.values(), expected.values(), rtol=1e-5, atol=1e-6)
    # the gradient of each column reaches its own table (the plain table sits between TT columns)
    upstream = torch.randn_like(expected.values())
    (out.values() * upstream).sum().backward()
    (expected.values() * upstream).sum().backward()
    torch.testing.assert_close(tt.dense.embedding_bags["d0"].weight.grad, ebc.embedding_bags["d0"].weight.grad)


def test_side_by_side_keeps_every_key_with_its_columns_and_gradient():
    """The sharded collection's merge: keys in the children's order, each with its own columns."""
    a = torch.randn(5, 2 + 3, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    kts = [KeyedTensor(keys=["f2", "f0"], length_per_key=[2, 3], values=a),
           KeyedTensor(keys=["f1"], length_per_key=[4], values=b)]
    out = side_by_side(kts)
    assert out.keys() == ["f2", "f0", "f1"] and out.length_per_key() == [2, 3, 4]
    by_key = out.to_dict()
    torch.testing.assert_close(by_key["f0"], a[:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(by_key["f1"], b, rtol=0, atol=0)
    upstream = torch.randn(5, 9)
    (out.values() * upstream).sum().backward()
    torch.testing.assert_close(a.grad, upstream[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(b.grad, upstream[:, 5:], rtol=0, atol=0)
    assert side_by_side(kts[:1]) is kts[0]


def test_weighted_features():
    tables = [ttdist.TTEmbeddingBagConfig(num_embeddings=300, embedding_dim=4, name="w", feature_names=["a", "b"], tt_ranks=[5])]
    tt = ttdist.TTEmbeddingBagCollection(tables, is_weighted=True)
    kjt = random_kjt(["a", "b"], {"a": 300, "b": 300}, batch=5, gen=torch.Generator().manual_seed(1), weighted=True)
    torch.testing.assert_close(tt(kjt).values(), dense_twin(tt)(kjt).values(), rtol=1e-5, atol=1e-6)


def test_initial_cores_depend_only_on_seed_and_table_name():
    a = MixedEmbeddingBagCollection(TABLES, seed=5).tt
    b = MixedEmbeddingBagCollection(list(reversed(TABLES)), seed=5).tt
    for t, cfg in enumerate(a.embedding_bag_configs()):
        tb = [c.name for c in b.embedding_bag_configs()].index(cfg.name)
        assert all(torch.equal(x, y) for x, y in zip(a.tt_tables.table_cores(t), b.tt_tables.table_cores(tb)))
    c = MixedEmbeddingBagCollection(TABLES, seed=6).tt
    assert not torch.equal(a.tt_tables.tt_cores[0], c.tt_tables.tt_cores[0])


def test_torchrec_dlrm_takes_the_collection_and_trains_it():
    model = DLRM(embedding_bag_collection=MixedEmbeddingBagCollection(TABLES), dense_in_features=4,
                 dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    kjt = random_kjt(["f0", "f1", "f2", "f3"], {"f0": 1000, "f1": 10, "f2": 500, "f3": 500}, 6, torch.Generator().manual_seed(2))
    model(torch.randn(6, 4), kjt).sum().backward()
    assert model.sparse_arch.embedding_bag_collection.tt.tt_tables.tt_cores[0].grad.abs().sum() > 0


def test_missing_feature_is_named():
    tt = MixedEmbeddingBagCollection(TABLES)
    kjt = random_kjt(["f0", "f1", "f2"], {"f0": 1000, "f1": 10, "f2": 500}, 3, torch.Generator().manual_seed(3))
    with pytest.raises(KeyError, match=r"\['f3'\].*missing"):
        tt(kjt)


def test_bad_configs_name_the_table():
    with pytest.raises(ValueError, match="TT table 'bad'.*prod\\(tt_q_shapes\\)"):
        ttdist.TTEmbeddingBagCollection([ttdist.TTEmbeddingBagConfig(num_embeddings=100, embedding_dim=8, name="bad",
                                                                     feature_names=["x"], tt_q_shapes=[2, 2, 3])])
    with pytest.raises(ValueError, match="unique"):
        ttdist.TTEmbeddingBagCollection([TABLES[0], TABLES[0]])
    with pytest.raises(TypeError, match="MixedEmbeddingBagCollection"):
        ttdist.TTEmbeddingBagCollection(TABLES)
