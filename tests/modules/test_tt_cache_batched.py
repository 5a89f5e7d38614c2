"""Row cache (FBTT's use_cache) and TableBatchedTTEmbeddingBag."""
import pytest
import torch

import ttdist
from ttdist import OptimType
from tests.common import random_bags


def zipf_bags(n, batch, gen):
    rows = torch.multinomial(1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2, batch * 4, replacement=True, generator=gen)
    return rows, torch.arange(0, batch * 4, 4)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cached_module_equals_uncached_right_after_populate(sparse, mode):
    gen = torch.Generator().manual_seed(1)
    cached = ttdist.TTEmbeddingBag(400, 16, [4, 4], mode=mode, use_cache=True, cache_size=20, sparse=sparse,
                                   dtype=torch.float64)
    plain = ttdist.TTEmbeddingBag(400, 16, [4, 4], mode=mode, dtype=torch.float64)
    for _ in range(3):
        cached(*zipf_bags(400, 32, gen))  # counts row frequencies
    info = cached.cache_populate()["table_0"]
    assert info["rows_cached"] == 20
    plain.load_state_dict({k: v for k, v in cached.state_dict().items() if k.startswith("tt_cores")}, strict=False)
    indices, offsets = zipf_bags(400, 64, gen)
    slots = cached.caches["0"].slots(indices)
    assert (slots >= 0).float().mean() > 0.3  # hot rows really come from the cache
    torch.testing.assert_close(cached(indices, offsets), plain(indices, offsets), rtol=1e-10, atol=1e-12)


def test_cached_rows_are_trained_in_the_cache_and_folded_into_cores():
    gen = torch.Generator().manual_seed(2)
    tt = ttdist.TTEmbeddingBag(300, 8, [8, 8], use_cache=True, cache_size=10, sparse=True,
                               optimizer=OptimType.EXACT_SGD, learning_rate=0.5, dtype=torch.float64)
    tt(*zipf_bags(300, 64, gen))
    tt.cache_populate()
    hot = tt.caches["0"].cache_rows[:3].clone()
    target = torch.ones(3, 8, dtype=torch.float64)
    for _ in range(30):  # pull the hot rows towards 1 through the cache
        out = tt(hot, torch.arange(3))
        (0.5 * (out - target).pow(2).sum()).backward()
    trained = tt.caches["0"].cache_weight[:3].detach().clone()
    assert (trained - target).abs().max() < 1e-3
    before = tt.core_rows(0, hot)  # the cores alone (rows() reads the trained cache)
    torch.testing.assert_close(tt.rows(0, hot), trained)
    info = tt.cache_populate()["table_0"]  # FBTT would overwrite `trained` with `before` here
    after = tt.core_rows(0, hot)
    assert (after - trained).norm() < 0.1 * (before - trained).norm(), "the training signal was not folded back"
    assert info["fold_residual"] < 0.1
    torch.testing.assert_close(tt(hot, torch.arange(3)), after)  # cache refilled from the updated cores


def test_hashtbl_smaller_than_table_still_counts_and_caches():
    tt = ttdist.TTEmbeddingBag(1000, 8, [4], use_cache=True, cache_size=5, hashtbl_size=64)
    tt(torch.tensor([3, 3, 3, 900, 900, 17]), torch.tensor([0]))
    tt.cache_populate()
    assert set(tt.caches["0"].cache_rows[:3].tolist()) == {3, 17, 900}
    with pytest.raises(ValueError, match="hashtbl_size"):
        ttdist.TTEmbeddingBag(1000, 8, [4], use_cache=True, cache_size=50, hashtbl_size=10)


def test_table_batched_equals_separate_tables_with_different_shapes():
    specs = [(100, 8, [3]), (5000, 16, [4, 6]), (700, 12, [2, 3, 2])]
    gens = [torch.Generator().manual_seed(t) for t in range(3)]
    batched = ttdist.TableBatchedTTEmbeddingBag(
        3, [s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs], mode=["sum", "mean", "sum"],
        generators=gens, feature_table_map=[0, 1, 2, 1], dtype=torch.float64)
    singles = [ttdist.TTEmbeddingBag(n, dim, r, mode=m, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
               for t, ((n, dim, r), m) in enumerate(zip(specs, ["sum", "mean", "sum"]))]
    B = 11
    parts = [random_bags(specs[t][0], B) for t in [0, 1, 2, 1]]
    indices = torch.cat([p[0] for p in parts])
    starts = torch.cumsum(torch.tensor([0] + [p[0].numel() for p in parts[:-1]]), 0)
    offsets = torch.cat([p[1][:-1] + s for p, s in zip(parts, starts)] + [torch.tensor([indices.numel()])])
    out = batched(indices, offsets[:-1])
    expected = torch.cat([singles[t](parts[f][0], parts[f][1][:-1])
                          for f, t in enumerate([0, 1, 2, 1])], dim=1)
    assert out.shape == (B, 8 + 16 + 12 + 16)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    for t, single in enumerate(singles):
        single.zero_grad()
    sum(singles[t](parts[f][0], parts[f][1][:-1]).square().sum() for f, t in enumerate([0, 1, 2, 1])).backward()
    for t, single in enumerate(singles):
        for core, ref in zip(batched.table_cores(t), single.tt_cores):
            torch.testing.assert_close(core.grad, ref.grad, rtol=1e-10, atol=1e-12)
