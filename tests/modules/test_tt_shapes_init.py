"""Shape factoring and validation, initialisation variance, TT-SVD round trip."""
import math

import pytest
import torch

import ttdist
from ttdist.modules.tt_init import target_table_std, tt_svd
from ttdist.modules.tt_shapes import factor_at_least, factor_exact, make_tt_shape


@pytest.mark.parametrize("n,d", [(10_131_227, 3), (1_000_000, 3), (97, 2), (5_461_306, 4), (3, 3), (1, 2)])
def test_row_factors_cover_rows_with_little_padding(n, d):
    p = factor_at_least(n, d)
    assert len(p) == d and math.prod(p) >= n
    assert math.prod(p) - n <= max(0.02 * n, 2 * max(p)), (p, math.prod(p) - n)
    assert max(p) <= 2 * math.ceil(n ** (1 / d)) + 2  # balanced


@pytest.mark.parametrize("dim,d,expected", [(64, 3, (4, 4, 4)), (16, 2, (4, 4)), (128, 3, (8, 4, 4)), (13, 2, (13, 1))])
def test_dim_factors_are_exact_and_balanced(dim, d, expected):
    assert factor_exact(dim, d) == expected


def test_any_embedding_dim_and_any_d():
    for dim in (1, 7, 13, 30):
        for d in (2, 3, 4, 5):
            tt = ttdist.TTEmbeddingBag(200, dim, [2] * (d - 1))
            assert tt(torch.tensor([1, 199]), torch.tensor([0, 1])).shape == (2, dim)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tt_q_shapes=[4, 4, 2]), "prod\\(tt_q_shapes\\) = 32 must equal embedding_dim = 64"),
    (dict(tt_p_shapes=[10, 10, 10]), "prod\\(tt_p_shapes\\) = 1000 < num_embeddings = 5000"),
    (dict(tt_ranks=[0, 4]), "tt_ranks must be positive"),
    (dict(tt_ranks=[4096, 4]), "exceeds its unfolding's rank limit"),
    (dict(tt_p_shapes=[5000, 1]), "has 2 factors but tt_ranks"),
    (dict(tt_ranks=[]), "at least one rank"),
])
def test_impossible_shapes_are_rejected_with_what_to_change(kwargs, match):
    args = dict(num_embeddings=5000, embedding_dim=64, tt_ranks=[4, 4])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ttdist.TTEmbeddingBag(**args)


@pytest.mark.parametrize("dist", ["approx-normal", "approx-uniform"])
@pytest.mark.parametrize("ranks", [[16, 16], [8], [8, 16, 8]])
def test_approx_init_gives_target_variance_of_full_table(dist, ranks):
    """Variance of reconstructed rows, averaged over 4 initialisations, within 10 % of 1/(3N)."""
    n = 50_000
    variances = []
    for seed in range(4):
        tt = ttdist.TTEmbeddingBag(n, 16, ranks, weight_dist=dist, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(seed))
        rows = tt.rows(0, torch.randint(0, n, (20_000,)))
        variances.append(rows.var().item())
        assert abs(rows.mean().item()) < 0.1 * target_table_std(n)
    ratio = sum(variances) / len(variances) / target_table_std(n) ** 2
    assert abs(ratio - 1) < 0.10, ratio


def test_all_weight_dists_construct_and_are_seeded():
    for dist in ("uniform", "naive-uniform", "normal", "approx-uniform", "approx-normal"):
        a = ttdist.TTEmbeddingBag(100, 8, [3], weight_dist=dist, generator=torch.Generator().manual_seed(3))
        b = ttdist.TTEmbeddingBag(100, 8, [3], weight_dist=dist, generator=torch.Generator().manual_seed(3))
        assert all(torch.equal(x, y) for x, y in zip(a.tt_cores, b.tt_cores))
    with pytest.raises(ValueError, match="weight_dist"):
        ttdist.TTEmbeddingBag(100, 8, [3], weight_dist="xavier")


@pytest.mark.parametrize("ranks,p,q", [([3, 5], [6, 7, 5], [2, 4, 2]), ([4], [30, 10], [4, 4]), ([2, 3, 2], [4, 5, 3, 3], [2, 2, 2, 2])])
def test_from_dense_round_trips_a_table_of_the_requested_ranks(ranks, p, q):
    source = ttdist.TTEmbeddingBag(math.prod(p), math.prod(q), ranks, p, q, dtype=torch.float64)
    weight = source.full_weight()
    tt = ttdist.TTEmbeddingBag.from_dense(weight, ranks, p, q)
    err = (tt.full_weight() - weight).norm() / weight.norm()
    assert err < 1e-5, err
    f32 = ttdist.TTEmbeddingBag.from_dense(weight.float(), ranks, p, q)
    assert (f32.full_weight().double() - weight).norm() / weight.norm() < 1e-5


def test_from_dense_truncates_a_full_rank_table_to_the_best_split():
    weight = torch.randn(500, 16, dtype=torch.float64)
    low = ttdist.TTEmbeddingBag.from_dense(weight, [4])
    high = ttdist.TTEmbeddingBag.from_dense(weight, [80])  # full rank of the (p1 q1, p2 q2) unfolding
    e_low = (low.full_weight() - weight).norm() / weight.norm()
    e_high = (high.full_weight() - weight).norm() / weight.norm()
    assert e_high < 1e-8 < e_low < 1.0
