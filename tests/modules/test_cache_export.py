"""The row cache does not hide training from export (issue 11, item 9).

After ``cache_populate()`` and fused steps the cached rows differ from the cores. ``full_weight()``
and ``rows()`` read through the cache (they equal the module's own output); the state_dict
carries the cache exactly (a cached module round-trips bit for bit), loading it into a module
without that table's cache raises naming the cache keys instead of dropping their training, and
``cache_flush()`` folds the cache into the cores so that the state_dict then loads anywhere.
"""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import ttdist
from ttdist import OptimType
from ttdist.ops import tt_rows_reference


def _trained_cached_module(num_tables=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(use_cache=True, cache_size=12, sparse=True, optimizer=OptimType.EXACT_SGD, learning_rate=0.1,
                  dtype=torch.float64)
    if num_tables == 1:
        tt = ttdist.TTEmbeddingBag(120, 8, [3], **kwargs)
    else:
        tt = ttdist.TableBatchedTTEmbeddingBag(2, [120, 80], 8, [[3], [2]], use_cache=[True, False],
                                               cache_size=[12, 0], sparse=True, optimizer=OptimType.EXACT_SGD,
                                               learning_rate=0.1, dtype=torch.float64)
    F = tt.num_tables
    hot = torch.tensor([3, 3, 5, 7, 7, 7, 11, 60, 79, 5] * 3)
    tt(hot.repeat(F), torch.arange(0, F * hot.numel(), 1))  # counts rows (one per bag)
    tt.cache_populate()
    for _ in range(4):  # fused SGD steps: the cached rows move in the cache, the rest in the cores
        idx = torch.randint(0, 80, (24,), generator=gen)
        idx[:8] = hot[:8]
        out = tt(idx.repeat(F), torch.arange(0, F * 24, 3))
        (out - 1.0).pow(2).sum().backward()
    return tt


def _one_row_bags(tt, t, rows):
    """The module's forward for one-index bags of table t -> [n, D_t]."""
    F, n = tt.num_tables, rows.numel()
    indices = torch.cat([rows % tt.shapes[f].num_embeddings for f in range(F)])  # feature f reads table f
    out = tt(indices, torch.arange(0, F * n, 1))
    begin = sum(tt.feature_dims[:t])
    return out.detach()[:, begin : begin + tt.feature_dims[t]]


@pytest.mark.parametrize("num_tables", [1, 2])
def test_full_weight_and_rows_read_through_the_cache(num_tables):
    tt = _trained_cached_module(num_tables)
    cache = tt.caches["0"]
    cached_rows = cache.cache_rows[cache.cache_rows < 120]
    from_cores = tt_rows_reference([c.detach() for c in tt.table_cores(0)], cached_rows)
    assert (cache.cache_weight.detach()[: cached_rows.numel()] - from_cores).abs().max() > 1e-3, \
        "the test needs cached rows that trained away from the cores"
    rows = torch.cat([cached_rows, torch.tensor([0, 1, 2, 119])])
    expected = _one_row_bags(tt, 0, rows)
    torch.testing.assert_close(tt.full_weight(0)[rows], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tt.rows(0, rows), expected, rtol=1e-12, atol=1e-12)
    if num_tables == 2:  # the uncached table reads from its cores
        r = torch.arange(80)
        torch.testing.assert_close(tt.full_weight(1)[r], _one_row_bags(tt, 1, r), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tt.rows(1, r), _one_row_bags(tt, 1, r), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_into_a_cached_module_is_exact():
    tt = _trained_cached_module()
    rows = torch.arange(120)
    copy = ttdist.TTEmbeddingBag(120, 8, [3], use_cache=True, cache_size=12, sparse=True, dtype=torch.float64)
    copy.load_state_dict(tt.state_dict())
    torch.testing.assert_close(_one_row_bags(copy, 0, rows), _one_row_bags(tt, 0, rows), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [False, True])
def test_loading_a_populated_cache_into_an_uncached_module_raises_naming_the_keys(strict):
    tt = _trained_cached_module()
    plain = ttdist.TTEmbeddingBag(120, 8, [3], sparse=True, dtype=torch.float64)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=r"caches\.0\.cache_weight") as info:
        plain.load_state_dict(tt.state_dict(), strict=strict)
    assert "cache_flush" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_cache_flush_folds_the_cache_into_the_cores_then_loads_anywhere():
    tt = _trained_cached_module()
    rows = torch.arange(120)
    cache = tt.caches["0"]
    hot = cache.cache_rows[cache.cache_rows < 120].clone()
    trained, unfolded = _one_row_bags(tt, 0, hot), tt.core_rows(0, hot)
    info = tt.cache_flush()["table_0"]
    assert info["rows_flushed"] == hot.numel() and not cache.populated
    flushed = _one_row_bags(tt, 0, rows)
    torch.testing.assert_close(tt.full_weight(0), flushed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tt.rows(0, rows), flushed, rtol=1e-12, atol=1e-12)
    # what the cores can represent is kept: closer to the trained rows than the unfolded cores were
    assert (flushed[hot] - trained).norm() < 0.5 * (unfolded - trained).norm()
    plain = ttdist.TTEmbeddingBag(120, 8, [3], sparse=True, dtype=torch.float64)
    result = plain.load_state_dict(tt.state_dict(), strict=False)
    assert all(k.startswith("caches.0.") for k in result.unexpected_keys)
    torch.testing.assert_close(_one_row_bags(plain, 0, rows), flushed, rtol=0, atol=0)


def test_loading_cores_without_cache_keys_into_a_cached_module_empties_its_stale_cache():
    tt = _trained_cached_module()
    other = ttdist.TTEmbeddingBag(120, 8, [3], sparse=True, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(9))
    result = tt.load_state_dict(other.state_dict(), strict=False)
    assert all(k.startswith("caches.0.") for k in result.missing_keys)
    rows = torch.arange(120)
    torch.testing.assert_close(_one_row_bags(tt, 0, rows), _one_row_bags(other, 0, rows), rtol=0, atol=0)


def test_collection_state_dict_keeps_or_refuses_the_cache():
    def ebc(use_cache):
        tables = [ttdist.TTEmbeddingBagConfig(name="t0", num_embeddings=60, embedding_dim=4, feature_names=["f0"],
                                              tt_ranks=[2], use_cache=use_cache, cache_size=5)]
        return ttdist.TTEmbeddingBagCollection(tables, fused_params={"optimizer": OptimType.EXACT_SGD,
                                                                     "learning_rate": 0.2})
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 1, 2, 3, 1, 2]), lengths=torch.tensor([2, 2, 2]))
    cached = ebc(True)
    cached(kjt)
    cached.tt_tables.cache_populate()
    for _ in range(3):
        (cached(kjt).values() - 1.0).pow(2).sum().backward()
    out = cached(kjt).values().detach()
    same = ebc(True)
    same.load_state_dict(cached.state_dict())
    torch.testing.assert_close(same(kjt).values().detach(), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"tt_tables\.caches\.0\.cache_weight.*'t0'|'t0'.*tt_tables\.caches\.0\."):
        ebc(False).load_state_dict(cached.state_dict(), strict=False)
