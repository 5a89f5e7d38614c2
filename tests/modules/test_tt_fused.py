"""Fused optimizers in backward (sparse=True) vs the reference gradient + reference optimizer."""
import pytest
import torch

import ttdist
from ttdist import OptimType
from ttdist.ops import sparse_row_update_reference, tt_forward_reference
from tests.common import random_bags

OPTIMIZERS = [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD]


def reference_step(cores, states, spec, indices, offsets, weights, grad_out, opt, lr, eps):
    """Reference: dense autograd gradient, then the optimizer on every slice (untouched slices get g = 0,
    which leaves SGD, Adagrad and row-wise Adagrad unchanged)."""
    leaves = [c.detach().clone().requires_grad_(True) for c in cores]
    tt_forward_reference(leaves, spec, indices, offsets, weights).backward(grad_out)
    new = []
    for leaf, state in zip(leaves, states):
        w = leaf.detach().clone().reshape(leaf.shape[0], -1)
        sparse_row_update_reference(w, state, torch.arange(w.shape[0]), leaf.grad.reshape(w.shape[0], -1), opt.code, lr, eps)
        new.append(w.reshape(leaf.shape))
    return new


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_fused_update_matches_reference(opt, d):
    shapes = {2: (90, 12, [4]), 3: (500, 8, [3, 5]), 4: (400, 16, [2, 3, 2])}
    n, dim, ranks = shapes[d]
    tt = ttdist.TTEmbeddingBag(n, dim, ranks, sparse=True, optimizer=opt, learning_rate=0.3, dtype=torch.float64,
                               mode="mean")
    ref_cores = [c.detach().clone() for c in tt.tt_cores]
    ref_states = [s.clone() for s in tt.optimizer_states]
    for step in range(3):
        indices, offsets = random_bags(n, batch=17)
        out = tt(indices, offsets[:-1])
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        ref_cores = reference_step(ref_cores, ref_states, tt._spec(), indices, offsets, None, grad_out, opt, 0.3, tt.eps)
        for core, ref in zip(tt.tt_cores, ref_cores):
            torch.testing.assert_close(core.detach(), ref, rtol=1e-10, atol=1e-12)
        for s, ref_s in zip(tt.optimizer_states, ref_states):
            torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-12)
    assert all(c.grad is None for c in tt.tt_cores)  # fused: no gradient is returned


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fused_update_reaches_every_slice_at_fbtt_benchmark_shape(opt):
    """FBTT's launch misses slices when p_k > r_{k-1} q_k r_k (here 200 > 128, 250 > 128)."""
    tt = ttdist.TTEmbeddingBag(200 * 220 * 250, 64, [32, 32], tt_p_shapes=[200, 220, 250], tt_q_shapes=[4, 4, 4],
                               sparse=True, optimizer=opt, learning_rate=0.1)
    rows = torch.tensor([199 * 220 * 250 + 219 * 250 + 249, 150 * 220 * 250 + 200 * 250 + 130, 5])
    before = [c.detach().clone() for c in tt.tt_cores]
    tt(rows, torch.tensor([0, 1, 2])).pow(2).sum().backward()
    for k, digits in enumerate([[199, 150, 5 // (220 * 250)], [219, 200, 0], [249, 130, 5]]):
        changed = (tt.tt_cores[k].detach() != before[k]).flatten(1).any(dim=1)
        assert changed[digits].all(), f"core {k}: slices {digits} were not updated"
        assert int(changed.sum()) == len(set(digits))


def test_fused_sgd_equals_autograd_then_sgd():
    a = ttdist.TTEmbeddingBag(300, 16, [6, 6], sparse=True, optimizer=OptimType.SGD, learning_rate=0.05)
    b = ttdist.TTEmbeddingBag(300, 16, [6, 6])
    b.load_state_dict(a.state_dict(), strict=False)
    opt = torch.optim.SGD(b.parameters(), lr=0.05)
    for _ in range(5):
        indices, offsets = random_bags(300, batch=32, max_len=10)
        a(indices, offsets[:-1]).square().sum().backward()
        opt.zero_grad()
        b(indices, offsets[:-1]).square().sum().backward()
        opt.step()
    for x, y in zip(a.tt_cores, b.tt_cores):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("path", ["op", "torch_ops"])
def test_apply_updates_matches_reference_on_every_core(opt, path):
    """``ops.apply_updates`` for a list of cores (CPU: one ``dense_update_`` call; other devices:
    ``dense_update_with_torch_ops``, run here on CPU) equals the reference step on every row of each
    core; rows whose gradient is zero stay unchanged."""
    from ttdist.modules.optim import optimizer_state_like
    from ttdist.ops import apply_updates, dense_update_with_torch_ops

    update = apply_updates if path == "op" else dense_update_with_torch_ops
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 1, 4, 3), (5, 3, 2, 3), (6, 3, 2, 1)]
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    states = [optimizer_state_like(c, opt) + 0.5 for c in cores]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads[1][2] = 0.0  # an untouched slice
    expected_cores = [c.clone().reshape(c.shape[0], -1) for c in cores]
    expected_states = [s.clone() for s in states]
    for w, state, grad in zip(expected_cores, expected_states, grads):
        sparse_row_update_reference(w, state, torch.arange(w.shape[0]), grad.reshape(w.shape[0], -1), opt.code, 0.2, 1e-8)
    update(cores, states, grads, opt.code, 0.2, 1e-8)
    for c, s, ec, es in zip(cores, states, expected_cores, expected_states):
        torch.testing.assert_close(c, ec.reshape(c.shape), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, es, rtol=1e-12, atol=1e-12)
    assert torch.equal(cores[1][2], expected_cores[1][2].reshape(cores[1][2].shape))


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_torch_ops_update_of_bf16_cores_equals_the_kernel(opt):
    """bf16 cores: both paths compute in fp32 and round once to bf16."""
    from ttdist.modules.optim import optimizer_state_like
    from ttdist.ops import apply_updates, dense_update_with_torch_ops

    g = torch.Generator().manual_seed(4)
    cores = [torch.randn(6, 2, 3, 2, generator=g).bfloat16() for _ in range(2)]
    grads = [torch.randn(6, 2, 3, 2, generator=g) for _ in range(2)]
    by_kernel = [[c.clone() for c in cores], [optimizer_state_like(c, opt) + 0.5 for c in cores]]
    by_torch = [[c.clone() for c in cores], [optimizer_state_like(c, opt) + 0.5 for c in cores]]
    apply_updates(*by_kernel, grads, opt.code, 0.2, 1e-8)
    dense_update_with_torch_ops(*by_torch, grads, opt.code, 0.2, 1e-8)
    for a, b in zip(by_kernel[0] + by_kernel[1], by_torch[0] + by_torch[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(by_kernel[0][0], cores[0])
