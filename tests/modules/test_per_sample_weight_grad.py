"""Gradients of the per-sample weights (issue 11, item 2), as nn.EmbeddingBag (mode sum) returns them:
d loss / d w_i = <grad_output[bag of i, columns of feature f], row indices[i] of feature f's table>.
Plain autograd (sparse=False), the fused update (sparse=True, computed with the cores as they were
before the step), the row cache, and a weighted KJT through TTEmbeddingBagCollection.
"""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import ttdist
from ttdist import OptimType
from tests.common import random_bags

SPECS = [(100, 8, [3]), (500, 12, [4, 2]), (60, 4, [2])]  # (rows, dim, ranks) per table
FEATURE_TABLE_MAP = [0, 1, 2, 1]  # table 1 read by two features


def _batched(sparse=False, dtype=torch.float64, include_last_offset=True, **kwargs):
    return ttdist.TableBatchedTTEmbeddingBag(
        len(SPECS), [s[0] for s in SPECS], [s[1] for s in SPECS], [s[2] for s in SPECS], sparse=sparse,
        include_last_offset=include_last_offset, feature_table_map=FEATURE_TABLE_MAP, dtype=dtype,
        generators=[torch.Generator().manual_seed(t) for t in range(len(SPECS))], **kwargs)


def _feature_bags(batch, seed):
    """indices [N], offsets [F * B + 1] over the features of FEATURE_TABLE_MAP (with empty bags, duplicates)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [random_bags(SPECS[t][0], batch, generator=gen) for t in FEATURE_TABLE_MAP]
    indices = torch.cat([p[0] for p in parts])
    offsets, start = [], 0
    for idx, off in parts:
        offsets.append(off[:-1] + start)
        start += idx.numel()
    return indices, torch.cat(offsets + [torch.tensor([start])])


def _dense_reference(module, indices, offsets, weights, grad_out, include_last_offset):
    """(output, weight grad) of nn.EmbeddingBag (sum) per feature built from full_weight()."""
    F, batch = len(FEATURE_TABLE_MAP), (offsets.numel() - 1) // len(FEATURE_TABLE_MAP)
    w = weights.detach().clone().requires_grad_(True)
    outs = []
    for f, t in enumerate(FEATURE_TABLE_MAP):
        dense = torch.nn.EmbeddingBag(SPECS[t][0], SPECS[t][1], mode="sum", dtype=module.dtype,
                                      include_last_offset=include_last_offset)
        dense.weight.data.copy_(module.full_weight(t))
        lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
        off = offsets[f * batch:(f + 1) * batch + 1] - lo
        outs.append(dense(indices[lo:hi], off if include_last_offset else off[:-1], w[lo:hi]))
    out = torch.cat(outs, dim=1)
    out.backward(grad_out)
    return out.detach(), w.grad


@pytest.mark.parametrize("include_last_offset", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_weight_grad_matches_nn_embedding_bag(sparse, include_last_offset):
    module = _batched(sparse=sparse, include_last_offset=include_last_offset)
    indices, offsets = _feature_bags(batch=9, seed=3)
    weights = torch.rand(indices.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(9, sum(SPECS[t][1] for t in FEATURE_TABLE_MAP), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
    ref_out, ref_grad = _dense_reference(module, indices, offsets, weights, grad_out, include_last_offset)
    w = weights.clone().requires_grad_(True)
    out = module(indices, offsets if include_last_offset else offsets[:-1], w)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-10, atol=1e-12)
    out.backward(grad_out)
    assert w.grad is not None, "per_sample_weights got no gradient"
    torch.testing.assert_close(w.grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_weight_gradcheck_plain_and_one_table():
    module = _batched()
    indices, offsets = _feature_bags(batch=3, seed=6)
    w = torch.rand(indices.numel(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: module(indices, offsets, w), (w,))
    tt = ttdist.TTEmbeddingBag(97, 12, [5], dtype=torch.float64)
    idx, off = random_bags(97, batch=4)
    w1 = torch.rand(idx.numel(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: tt(idx, off[:-1], w), (w1,))


def test_fused_weight_grad_uses_cores_before_the_step_and_still_updates():
    module = _batched(sparse=True, optimizer=OptimType.EXACT_SGD, learning_rate=0.5)
    before = [c.detach().clone() for c in module.tt_cores]
    indices, offsets = _feature_bags(batch=6, seed=7)
    w = torch.rand(indices.numel(), dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, sum(SPECS[t][1] for t in FEATURE_TABLE_MAP), dtype=torch.float64)
    _, ref_grad = _dense_reference(module, indices, offsets, w, grad_out, True)
    module(indices, offsets, w).backward(grad_out)
    torch.testing.assert_close(w.grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.tt_cores)), "no fused step"


@pytest.mark.parametrize("sparse", [False, True])
def test_weight_grad_with_populated_row_cache(sparse):
    tt = ttdist.TTEmbeddingBag(200, 8, [4], use_cache=True, cache_size=10, sparse=sparse, dtype=torch.float64)
    idx, off = random_bags(200, batch=16, generator=torch.Generator().manual_seed(8))
    tt(idx, off[:-1])
    tt.cache_populate()
    assert bool((tt.caches["0"].slots(idx) >= 0).any())
    w = torch.rand(idx.numel(), dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(16, 8, dtype=torch.float64)
    dense = torch.nn.EmbeddingBag(200, 8, mode="sum", dtype=torch.float64)
    dense.weight.data.copy_(tt.full_weight())
    w_ref = w.detach().clone().requires_grad_(True)
    dense(idx, off[:-1], w_ref).backward(grad_out)
    tt(idx, off[:-1], w).backward(grad_out)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_weight_grad_flows_through_weighted_collection():
    tables = [ttdist.TTEmbeddingBagConfig(name="t0", num_embeddings=100, embedding_dim=8, feature_names=["f0"],
                                          tt_ranks=[3]),
              ttdist.TTEmbeddingBagConfig(name="t1", num_embeddings=50, embedding_dim=4, feature_names=["f1", "f2"],
                                          tt_ranks=[2, 2])]
    for fused_params in (None, {"optimizer": OptimType.EXACT_SGD, "learning_rate": 0.1}):
        ebc = ttdist.TTEmbeddingBagCollection(tables, is_weighted=True, fused_params=fused_params)
        values = torch.tensor([3, 99, 1, 2, 49, 7])
        lengths = torch.tensor([2, 0, 1, 2, 1, 0])  # f0: [3, 99], [], f1: [1], [2, 49], f2: [7], []
        weights = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.25, 3.0], requires_grad=True)
        kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=values, lengths=lengths, weights=weights)
        full = {"f0": ebc.tt_tables.full_weight(0), "f1": ebc.tt_tables.full_weight(1),
                "f2": ebc.tt_tables.full_weight(1)}
        out = ebc(kjt).values()
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        assert weights.grad is not None, "weighted KJT: the weights got no gradient"
        cols = {"f0": slice(0, 8), "f1": slice(8, 12), "f2": slice(12, 16)}
        bag = [("f0", 0), ("f0", 0), ("f1", 0), ("f1", 1), ("f1", 1), ("f2", 0)]
        expected = torch.stack([(grad_out[b, cols[f]] * full[f][v]).sum() for (f, b), v in zip(bag, values.tolist())])
        torch.testing.assert_close(weights.grad, expected, rtol=1e-5, atol=1e-6)


def test_weights_with_mean_pooling_are_still_rejected():
    tt = ttdist.TTEmbeddingBag(50, 8, [3], mode="mean")
    with pytest.raises(ValueError, match="per_sample_weights"):
        tt(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2, requires_grad=True))
    module = ttdist.TableBatchedTTEmbeddingBag(2, 50, 8, [3], mode=["sum", "mean"])
    with pytest.raises(ValueError, match="per_sample_weights"):
        module(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.ones(2))
