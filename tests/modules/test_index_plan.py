"""``tt_prepare``'s index plan: the ops given it answer exactly as without it, a plan made for
another call is refused before it is read, and autograd makes one plan per lookup (forward),
which backward reuses. CUDA runs where a GPU is present."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ttdist
from ttdist.ops import LookupSpec

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
# Two tables (3 and 2 cores), three features: feature 2 reads table 0 again, mean-pooled.
SPEC = LookupSpec(table_num_cores=(3, 2), feature_table_map=(0, 1, 0), pooling_modes=(0, 0, 1))
SHAPES = [((5, 1, 2, 3), (6, 3, 3, 2), (7, 2, 2, 1)), ((9, 1, 4, 2), (8, 2, 3, 1))]
BAGS = 16


def make_cores(device: str, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for table in SHAPES for s in table]


def make_batch(device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [5 * 6 * 7, 9 * 8, 5 * 6 * 7]
    lengths = torch.randint(0, 4, (3 * BAGS,), generator=g)
    indices = torch.cat([torch.randint(0, rows[f], (int(lengths[f * BAGS:(f + 1) * BAGS].sum()),), generator=g)
                         for f in range(3)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = torch.rand(indices.numel(), generator=g, dtype=torch.float64)
    return indices.to(device), offsets.to(device), weights.to(device)


def args(indices, offsets, weights):
    return (list(SPEC.table_num_cores), list(SPEC.feature_table_map), list(SPEC.pooling_modes), indices, offsets,
            weights, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_ops_with_plan_equal_ops_without(device, weighted):
    cores = make_cores(device)
    indices, offsets, weights = make_batch(device)
    a = args(indices, offsets, weights if weighted else None)
    plan = torch.ops.ttdist.tt_prepare(cores, *a)
    assert plan.dtype == torch.int64 and plan.dim() == 1 and plan.device == indices.device
    out = torch.ops.ttdist.tt_forward(cores, *a)
    torch.testing.assert_close(torch.ops.ttdist.tt_forward(cores, *a, plan), out, rtol=0, atol=0)
    grad_output = torch.randn_like(out)
    for want, got in zip(torch.ops.ttdist.tt_backward(grad_output, cores, *a),
                         torch.ops.ttdist.tt_backward(grad_output, cores, *a, plan)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    updated = []
    for given in (None, plan):
        moved = [c.clone() for c in cores]
        states = [torch.zeros(c.shape[0], dtype=c.dtype, device=device) for c in cores]
        torch.ops.ttdist.tt_backward_fused_(grad_output, moved, states, *a[:6], 2, 0.1, 1e-8, None, given)
        updated.append(moved + states)
    for want, got in zip(*updated):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(not torch.equal(m, c) for m, c in zip(updated[0], cores))  # the step moved something


@pytest.mark.parametrize("device", DEVICES)
def test_plan_of_another_call_is_refused(device):
    cores = make_cores(device)
    indices, offsets, _ = make_batch(device)
    plan = torch.ops.ttdist.tt_prepare(cores, *args(indices, offsets, None))
    other_indices = indices.clone()
    other_indices[0] = (other_indices[0] + 1) % 5  # same sizes, one index differs
    other_offsets = offsets.clone()
    inner = int(torch.nonzero(offsets[1:-1] > 0)[0]) + 1  # a bag boundary that can move left
    other_offsets[inner] -= 1
    for bad_indices, bad_offsets in ((other_indices, offsets), (indices, other_offsets)):
        with pytest.raises(ValueError, match="prepared"):
            torch.ops.ttdist.tt_forward(cores, *args(bad_indices, bad_offsets, None), plan)
    for bad_plan in (plan[:-1], plan.float(), plan[:3], torch.zeros_like(plan)):
        with pytest.raises(ValueError, match="prepared"):
            torch.ops.ttdist.tt_forward(cores, *args(indices, offsets, None), bad_plan)
    grad_output = torch.zeros_like(torch.ops.ttdist.tt_forward(cores, *args(indices, offsets, None)))
    with pytest.raises(ValueError, match="prepared"):
        torch.ops.ttdist.tt_backward(grad_output, cores, *args(other_indices, offsets, None), plan)


def _prepare_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "ttdist::tt_prepare")


@pytest.mark.parametrize("fused", [False, True])
def test_autograd_prepares_once_per_lookup(fused):
    """Forward makes the plan; backward (dense gradients or the fused update) reuses it."""
    module = ttdist.TTEmbeddingBag(5 * 6 * 7, 12, [3, 2], tt_p_shapes=[5, 6, 7], tt_q_shapes=[2, 3, 2],
                                   sparse=fused, optimizer="exact_adagrad", learning_rate=0.1)
    indices = torch.tensor([3, 7, 7, 200, 1])
    offsets = torch.tensor([0, 2, 5])

    def step():
        module(indices, offsets).square().sum().backward()

    assert _prepare_calls(step) == 1


def test_large_batch_matches_reference():
    """Enough positions per table that the plan's rows are radix-sorted over several passes (a
    120,000-row table: 17 bits), with many repeated rows, two features reading one table and
    mean pooling: forward and the core gradients equal the plain-PyTorch reference's."""
    g = torch.Generator().manual_seed(3)
    shapes = [(40, 1, 2, 3), (50, 3, 2, 4), (60, 4, 2, 1), (30, 1, 4, 2), (20, 2, 2, 1)]
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    spec = LookupSpec(table_num_cores=(3, 2), feature_table_map=(0, 1, 0), pooling_modes=(0, 1, 1))
    rows, bags = [40 * 50 * 60, 30 * 20, 40 * 50 * 60], 300
    lengths = torch.randint(0, 9, (3 * bags,), generator=g)
    indices = []
    for f in range(3):
        n = int(lengths[f * bags:(f + 1) * bags].sum())
        wide = torch.randint(0, rows[f], (n,), generator=g)
        hot = torch.randint(0, 16, (n,), generator=g) * (rows[f] // 16)  # 16 rows seen many times
        indices.append(torch.where(torch.rand(n, generator=g) < 0.3, hot, wide))
    indices = torch.cat(indices)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    assert indices[: int(offsets[bags])].unique().numel() < int(offsets[bags]) - 200  # many repeated rows
    a = (list(spec.table_num_cores), list(spec.feature_table_map), list(spec.pooling_modes), indices, offsets, None,
         None)
    leaves = [c.clone().requires_grad_() for c in cores]
    want = ttdist.ops.tt_forward_reference(leaves, spec, indices, offsets)
    grad_output = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(grad_output)
    plan = torch.ops.ttdist.tt_prepare(cores, *a)
    torch.testing.assert_close(torch.ops.ttdist.tt_forward(cores, *a, plan), want.detach(), rtol=1e-10, atol=1e-10)
    for got, leaf in zip(torch.ops.ttdist.tt_backward(grad_output, cores, *a, plan), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)
