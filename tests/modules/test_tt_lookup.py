"""TT lookup vs the plain-PyTorch reference and a dense nn.EmbeddingBag from full_weight()."""
import itertools
import math

import pytest
import torch

import ttdist
from ttdist.ops import tt_forward_reference, tt_full_reference, tt_rows_reference
from tests.common import TOL, assert_close, random_bags

CASES = {  # d: (num_embeddings, dim, ranks)
    2: (97, 12, [5]),
    3: (1000, 24, [4, 6]),
    4: (600, 16, [3, 4, 2]),
}


@pytest.mark.parametrize("d,mode,dtype,weighted", [
    (d, m, dt, w) for d, m, dt, w in itertools.product((2, 3, 4), ("sum", "mean"), (torch.float64, torch.float32), (False, True))
    if not (w and m == "mean")])
def test_forward_backward_match_reference_and_dense(d, mode, dtype, weighted):
    n, dim, ranks = CASES[d]
    tt = ttdist.TTEmbeddingBag(n, dim, ranks, mode=mode, dtype=dtype, include_last_offset=True)
    indices, offsets = random_bags(n, batch=33)
    weights = torch.rand(indices.numel(), dtype=dtype) if weighted else None

    out = tt(indices, offsets, weights)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    dense = torch.nn.EmbeddingBag(n, dim, mode=mode, dtype=dtype, include_last_offset=True)
    dense.weight.data.copy_(tt.full_weight())
    assert_close(out, dense(indices, offsets, weights), dtype)
    assert out[0].abs().max() == 0  # the empty bag

    cores = [c.detach().clone().requires_grad_(True) for c in tt.tt_cores]
    ref = tt_forward_reference(cores, tt._spec(), indices, offsets, weights)
    ref.backward(grad_out)
    assert_close(out, ref.detach(), dtype)
    for core, ref_core in zip(tt.tt_cores, cores):
        assert_close(core.grad, ref_core.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,dim,ranks", [(5000, 16, [16, 16]), (5000, 64, [8, 8])])
@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted"])
def test_vectorized_shapes_match_reference(n, dim, ranks, dtype, pooling):
    """Ranks that are multiples of the CPU kernels' vector width with a narrow last core (the
    demo's q = (4, 2, 2) at rank 16, FBTT's q = (4, 4, 4) at rank 8): the vectorized narrow-product
    path, against the reference, forward and core gradients; the rows pooled (and their gradients
    gathered) by the vectorized kernel, whole register blocks of 64 values, with and without
    per-position factors."""
    tt = ttdist.TTEmbeddingBag(n, dim, ranks, dtype=dtype, include_last_offset=True,
                               mode="mean" if pooling == "mean" else "sum")
    assert tt.tt_cores[-1].shape[2] in (2, 4)
    indices, offsets = random_bags(n, batch=65, max_len=10)
    weights = torch.rand(indices.numel(), dtype=dtype) + 0.5 if pooling == "weighted" else None
    assert_lookup_matches_reference(tt, indices, offsets, dtype, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", ["scattered", "every_row"])
@pytest.mark.parametrize("q,ranks", [([4, 2, 2], [8, 8]), ([6, 2, 3], [8, 24])])
def test_three_core_backward_orders_match_reference(q, ranks, rows, dtype):
    """The CPU backward of a three-core table takes the order with fewer multiply-adds: middle-out
    for rows with distinct prefixes (i_1, i_2) and q_1 > q_3, the prefix-sharing trie walk when
    every prefix is shared by p_3 rows. Both against the reference, forward and core gradients;
    the middle-out kernel's compile-time shapes (r_3 a vector or two, q_3 = 2) and its generic ones."""
    tt = ttdist.TTEmbeddingBag(4096, math.prod(q), ranks, tt_p_shapes=[16, 16, 16], tt_q_shapes=q, dtype=dtype,
                               include_last_offset=True)
    g = torch.Generator().manual_seed(3)
    if rows == "scattered":  # one row per prefix
        indices = torch.randperm(256, generator=g)[:200] * 16 + torch.randint(0, 16, (200,), generator=g)
    else:
        indices = torch.randperm(4096, generator=g)
    assert_lookup_matches_reference(tt, indices, torch.arange(0, indices.numel() + 1, 8), dtype)


@pytest.mark.parametrize("dtype,ranks", [(torch.float32, [8, 8]), (torch.float32, [16, 8]), (torch.float64, [4, 4]),
                                         (torch.float64, [8, 4])])
def test_three_core_fused_prefix_rows_match_reference(dtype, ranks):
    """The trie walk's fused kernel for the rows under one prefix (i_1, i_2) (q = (4, 4, 4), r_3
    one vector: FBTT's shape at rank 8 in fp32; r_2 one or two vectors), for prefixes read by one
    row and by three, against the reference."""
    tt = ttdist.TTEmbeddingBag(4096, 64, ranks, tt_p_shapes=[16, 16, 16], tt_q_shapes=[4, 4, 4], dtype=dtype,
                               include_last_offset=True)
    g = torch.Generator().manual_seed(5)
    prefixes = torch.randperm(256, generator=g)
    alone = prefixes[:150] * 16 + torch.randint(0, 16, (150,), generator=g)
    shared = (prefixes[150:200, None] * 16 + torch.tensor([0, 5, 9])).flatten()
    indices = torch.cat([alone, shared])[torch.randperm(300, generator=g)]
    assert_lookup_matches_reference(tt, indices, torch.arange(0, 301, 6), dtype)


def assert_lookup_matches_reference(tt: ttdist.TTEmbeddingBag, indices, offsets, dtype, weights=None) -> None:
    """The lookup's output and core gradients (for a random output gradient) against the fp64
    reference of the same cores; absolute tolerance relative to the largest entry, since a core
    gradient sums over every row that reads its slice (an entry near zero by cancellation carries
    the rounding of terms that are not)."""
    out = tt(indices, offsets, weights)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    cores = [c.detach().double().requires_grad_(True) for c in tt.tt_cores]
    ref = tt_forward_reference(cores, tt._spec(), indices, offsets, None if weights is None else weights.double())
    ref.backward(grad_out.double())
    for actual, expected in [(out, ref.detach())] + [(c.grad, r.grad) for c, r in zip(tt.tt_cores, cores)]:
        tol = TOL[dtype]
        torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, float(expected.abs().max())))


def test_row_digits_are_exact_across_the_int64_range():
    """The CPU op splits a row into its digits with a double reciprocal below 2^52 and integer
    division above: rows around 2^52 and up to ~2^60 (three ~1e6 cores) give the reference's rows."""
    p = (1_000_003, 999_983, 999_979)  # primes: every digit of a row matters
    gen = torch.Generator().manual_seed(0)
    cores = [torch.rand(n, 1, 1, 1, generator=gen, dtype=torch.float64) + 0.5 for n in p]
    top = math.prod(p)
    special = [0, 1, p[2] - 1, p[2], p[1] * p[2] - 1, p[1] * p[2], 2**52 - 1, 2**52, 2**52 + 1, 2**53 + 7, top - 1]
    rows = torch.tensor(special + torch.randint(0, top, (500,), generator=gen).tolist(), dtype=torch.int64)
    out = torch.ops.ttdist.tt_forward(cores, [3], [0], [0], rows, torch.arange(rows.numel() + 1), None, None)
    torch.testing.assert_close(out, tt_rows_reference(cores, rows), rtol=0, atol=0)


def test_offsets_of_length_b_and_b_plus_1_agree():
    a = ttdist.TTEmbeddingBag(50, 8, [3], include_last_offset=False)
    b = ttdist.TTEmbeddingBag(50, 8, [3], include_last_offset=True)
    b.load_state_dict(a.state_dict())
    indices, offsets = random_bags(50, batch=9)
    torch.testing.assert_close(a(indices, offsets[:-1]), b(indices, offsets))


def test_dense_reconstruction_follows_documented_layout():
    """W[i, j] = G_1[i_1, :, j_1, :] @ G_2[i_2, :, j_2, :] @ G_3[i_3, :, j_3, :], row-major digits."""
    tt = ttdist.TTEmbeddingBag(60, 24, [2, 3], tt_p_shapes=[3, 4, 5], tt_q_shapes=[2, 3, 4], dtype=torch.float64)
    G = [c.detach() for c in tt.tt_cores]
    W = tt.full_weight()
    for i, j in [(0, 0), (59, 23), (17, 11), (42, 5)]:
        i1, i2, i3 = i // 20, (i // 5) % 4, i % 5
        j1, j2, j3 = j // 12, (j // 4) % 3, j % 4
        expected = G[0][i1, :, j1, :] @ G[1][i2, :, j2, :] @ G[2][i3, :, j3, :]
        torch.testing.assert_close(W[i, j], expected.squeeze(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tt_rows_reference(G, torch.arange(60)), tt_full_reference(G))


def test_duplicate_indices_accumulate():
    tt = ttdist.TTEmbeddingBag(40, 8, [4], dtype=torch.float64)
    indices = torch.tensor([7, 7, 7, 3])
    out = tt(indices, torch.tensor([0]))
    out.sum().backward()
    grads = [c.grad.clone() for c in tt.tt_cores]
    tt.zero_grad()
    (3 * tt(torch.tensor([7]), torch.tensor([0])) + tt(torch.tensor([3]), torch.tensor([0]))).sum().backward()
    for g, expected in zip(grads, tt.tt_cores):
        torch.testing.assert_close(g, expected.grad)


def test_bfloat16_cores_accumulate_in_fp32():
    tt = ttdist.TTEmbeddingBag(300, 16, [8, 8], dtype=torch.bfloat16)
    indices, offsets = random_bags(300, batch=20, max_len=20)
    out = tt(indices, offsets[:-1])
    assert out.dtype == torch.bfloat16
    ref = tt_forward_reference([c.detach().float() for c in tt.tt_cores], tt._spec(), indices, offsets)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)


def test_forward_decompresses_only_requested_rows_not_the_table():
    """A 10M x 64 table at ranks [32, 32]: < 1 % of the dense parameters, and a forward+backward
    of 4,096 lookups stays far below the 2.56 GB the dense table would take (peak RSS)."""
    import subprocess, sys, textwrap
    code = textwrap.dedent("""
        import resource, torch, ttdist
        tt = ttdist.TTEmbeddingBag(10_000_000, 64, [32, 32])
        params = sum(c.numel() for c in tt.tt_cores)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = torch.randint(0, 10_000_000, (4096,))
        out = tt(idx, torch.arange(0, 4096, 4))
        out.sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(params, (peak - base) * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    params, grown = map(int, res.stdout.split())
    assert params < 0.01 * 10_000_000 * 64, params
    assert grown < 200 * 2**20, f"forward+backward grew the RSS by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("q,ranks", [([4, 2, 2], [16, 16]), ([2, 2, 4], [16, 16]), ([4, 4, 4], [8, 8])])
def test_cpu_backward_is_bitwise_reproducible_with_threads(q, ranks):
    """Rows are split into chunks over the threads and the chunks' core gradients summed in chunk
    order, so two calls give the same bits whatever the scheduling (middle-out, trie walk, trie
    walk with the fused kernel)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dim = math.prod(q)
        tt = ttdist.TTEmbeddingBag(300_000, dim, ranks, tt_q_shapes=q)
        indices = torch.randint(0, 300_000, (4096,))
        offsets = torch.arange(0, 4097)
        spec, cores = tt._spec(), list(tt.tt_cores)
        grad_out = torch.randn(4096, dim)
        args = (grad_out, cores, spec.table_num_cores, spec.feature_table_map, spec.pooling_modes, indices, offsets,
                None, spec.num_rows, None)
        first = torch.ops.ttdist.tt_backward(*args)
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(first, torch.ops.ttdist.tt_backward(*args)))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("tables", [1, 3])
def test_index_plan_is_the_same_for_any_number_of_threads(tables):
    """tt_prepare splits a table's rows by range over the threads when there are fewer tables than
    threads (one table here: 1, 2, 3, 3 parts); the plan (sorted unique rows, positions per row,
    digits) must not depend on that split: rows shared by many positions, rows at the ends of the
    range and a repeated id included."""
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    tt = ttdist.TableBatchedTTEmbeddingBag(tables, [1000, 50_000, 7700][:tables], [16] * tables, [[4, 4]] * tables)
    spec, cores = tt._spec(), list(tt.tt_cores)
    batch = 2048  # enough positions to split: tt_prepare keeps a small table whole
    ids = [torch.cat([torch.randint(0, n, (3 * batch - 3,), generator=g), torch.tensor([0, n - 1, 0])])
           for n in [1000, 50_000, 7700][:tables]]
    indices = torch.cat(ids)
    offsets = torch.arange(0, indices.numel() + 1, 3)
    args = (cores, spec.table_num_cores, spec.feature_table_map, spec.pooling_modes, indices, offsets, None,
            spec.num_rows)
    plans = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            plans.append(torch.ops.ttdist.tt_prepare(*args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(plans[0], p) for p in plans[1:])


def test_index_plan_of_a_table_near_2_pow_60_rows_is_the_same_split_over_threads():
    """The row ranges of the split are computed without valid_rows * k, which overflows int64 for
    a table of 2^60 rows split 8 ways (it once dropped ids from the plan without an error)."""
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(1)
    p = [1 << 20] * 3
    rows = math.prod(p)
    tt = ttdist.TableBatchedTTEmbeddingBag(1, [rows], [4], [[1, 1]], tt_p_shapes=[p], tt_q_shapes=[[4, 1, 1]])
    spec, cores = tt._spec(), list(tt.tt_cores)
    indices = torch.randint(0, rows, (1 << 15,), generator=g)
    indices[:4] = torch.tensor([0, rows - 1, rows // 2, rows - 1])
    args = (cores, spec.table_num_cores, spec.feature_table_map, spec.pooling_modes, indices,
            torch.arange(0, indices.numel() + 1), None, spec.num_rows)
    plans = []
    try:
        for n in (1, 8):
            torch.set_num_threads(n)
            plans.append(torch.ops.ttdist.tt_prepare(*args))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(plans[0], plans[1])
