"""The CUDA kernels (csrc/cuda) against the plain-PyTorch references (and the CPU op).

Needs a CUDA device and a ttdist._C built with CUDA torch; skipped otherwise. Errors are measured
relative to the largest magnitude of the expected tensor: ``max|a - e| <= tol * max|e|``.
Tolerances: fp32 1e-5 (vs the CPU op and vs the fp64 reference); fp64 1e-12; bf16 (fp32
accumulation, outputs rounded to bf16) 8e-3 = two bf16 ulps vs the CPU bf16 op and 1.5e-2 vs the
fp64 reference evaluated on the same bf16 cores. Bad-argument parity with the CPU op:
tests/modules/test_op_errors.py (parametrised over devices).

``TTDIST_GPU_TEST_DEVICE=cpu`` runs this file on the CPU op instead (a self-check of the harness
and the references on a machine without a GPU). There the "device" result *is* the CPU op's, so
every comparison with the CPU op becomes a comparison with the plain-PyTorch reference
(ttdist.ops.tt_forward_reference, autograd of it, sparse_row_update_reference) at the reference
tolerance: nothing is compared with itself. Tests of CUDA-only behaviour (asynchronous errors,
host syncs, atomics, > 2^31-element cores) are skipped in that mode.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = os.environ.get("TTDIST_GPU_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"TTDIST_GPU_TEST_DEVICE must be cuda or cpu, got {DEVICE!r}")
SELF_CHECK = DEVICE == "cpu"  # the harness on the CPU op, against the references only
if not SELF_CHECK and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

import ttdist  # noqa: E402
from ttdist import OptimType  # noqa: E402
from ttdist.ops import (LookupSpec, check_errors, sparse_row_update_reference, sync_checks,  # noqa: E402
                        tt_forward_reference)

pytestmark = [] if SELF_CHECK else [pytest.mark.gpu]
cuda_only = pytest.mark.skipif(SELF_CHECK, reason="CUDA-only behaviour (TTDIST_GPU_TEST_DEVICE=cpu)")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 8e-3}
REF_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1.5e-2}
OPTIMIZERS = [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD]


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    if SELF_CHECK:
        return
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ttdist::tt_forward", "CUDA"):
        if os.environ.get("TTDIST_NO_CUDA") == "1":
            pytest.skip("ttdist._C was built with TTDIST_NO_CUDA=1")
        pytest.fail("ttdist._C has no CUDA kernels although CUDA is available: rebuild with a CUDA torch "
                    "(pip install --no-build-isolation -e .)")


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def assert_matches_cpu_op(actual, cpu_op, reference, tol: float, ref_tol: float, what: str = "") -> None:
    """``actual`` (DEVICE's result) vs the CPU op's, ``cpu_op()``, at ``tol``. In the self-check mode
    ``actual`` *is* the CPU op's result, so it is compared with the plain-PyTorch ``reference()`` at
    ``ref_tol`` instead, never with itself."""
    if SELF_CHECK:
        assert_rel(actual, reference(), ref_tol, f"{what} vs reference (self-check mode)")
    else:
        assert_rel(actual, cpu_op(), tol, f"{what} vs CPU op")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # an illegal access would surface here


# ---------------------------------------------------------------------------------------------
# Problems: tables of cores, feature-major bags with empty bags and duplicates.
# ---------------------------------------------------------------------------------------------
def make_cores(tables, dtype, generator):
    """tables: [(p, q, ranks)]; returns the cores (CPU, ``dtype``) and table_num_cores."""
    cores, num = [], []
    for p, q, ranks in tables:
        r = [1, *ranks, 1]
        for k in range(len(p)):
            core = torch.randn(p[k], r[k], q[k], r[k + 1], generator=generator, dtype=torch.float64)
            cores.append((core / math.sqrt(r[k])).to(dtype))
        num.append(len(p))
    return cores, num


def make_bags(rows_per_feature, batch, max_len, generator, hot=0.3):
    """Feature-major (indices [N], offsets [F * B + 1]); bag 0 of every feature is empty, hot rows repeat."""
    indices, lengths = [], []
    for rows in rows_per_feature:
        hot_rows = torch.randint(0, rows, (4,), generator=generator)
        ls = torch.randint(0, max_len + 1, (batch,), generator=generator)
        ls[0] = 0
        n = int(ls.sum())
        idx = torch.randint(0, rows, (n,), generator=generator)
        pick = torch.rand(n, generator=generator) < hot
        idx[pick] = hot_rows[torch.randint(0, 4, (int(pick.sum()),), generator=generator)]
        if n:
            idx[-1] = rows - 1
        indices.append(idx)
        lengths.append(ls)
    lengths = torch.cat(lengths)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return torch.cat(indices), offsets


class Problem:
    def __init__(self, tables, feature_table_map, modes, batch, dtype, weighted=False, max_len=5, seed=0, hot=0.3):
        g = torch.Generator().manual_seed(seed)
        self.cores, num = make_cores(tables, dtype, g)
        self.spec = LookupSpec(tuple(num), tuple(feature_table_map), tuple(modes))
        rows = [math.prod(tables[t][0]) for t in feature_table_map]
        self.indices, self.offsets = make_bags(rows, batch, max_len, g, hot)
        self.weights = torch.rand(self.indices.numel(), generator=g, dtype=torch.float64).to(dtype) * 2 - 1 if weighted else None
        self.dtype = dtype
        self.batch = batch

    def args(self, device, cores=None):
        cores = self.cores if cores is None else cores
        w = None if self.weights is None else self.weights.to(device)
        return ([c.to(device) for c in cores], list(self.spec.table_num_cores), list(self.spec.feature_table_map),
                list(self.spec.pooling_modes), self.indices.to(device), self.offsets.to(device), w)

    def forward(self, device):
        return torch.ops.ttdist.tt_forward(*self.args(device)).cpu()

    def reference(self):
        """fp64 reference evaluated on the same (dtype-rounded) cores."""
        w = None if self.weights is None else self.weights.double()
        return tt_forward_reference([c.double() for c in self.cores], self.spec, self.indices, self.offsets, w)

    def reference_grads(self, grad_out):
        leaves = [c.double().requires_grad_(True) for c in self.cores]
        w = None if self.weights is None else self.weights.double()
        tt_forward_reference(leaves, self.spec, self.indices, self.offsets, w).backward(grad_out.double())
        return [leaf.grad for leaf in leaves]

    def backward(self, device, grad_out):
        cores, *rest = self.args(device)
        grads = torch.ops.ttdist.tt_backward(grad_out.to(device), cores, *rest)
        return [g.cpu() for g in grads]


SHAPES = {
    2: [((13, 11), (4, 2), (5,)), ((9, 8), (2, 4), (6,))],
    3: [((5, 6, 7), (2, 3, 2), (4, 3)), ((8, 4, 3), (4, 2, 2), (16, 8))],
    4: [((3, 4, 3, 5), (2, 2, 2, 2), (3, 4, 2)), ((4, 3, 3, 3), (1, 3, 2, 2), (2, 5, 3))],
}
MODES = {"sum": (0, False), "mean": (1, False), "weighted": (0, True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("d", [2, 3, 4])
def test_forward_matches_cpu_and_reference(d, mode):
    code, weighted = MODES[mode]
    pb = Problem(SHAPES[d], [0, 1, 0], [code] * 3, batch=23, dtype=torch.float32, weighted=weighted, seed=d)
    out = pb.forward(DEVICE)
    assert_matches_cpu_op(out, lambda: pb.forward("cpu"), pb.reference, TOL[torch.float32], REF_TOL[torch.float32])
    assert_rel(out, pb.reference(), REF_TOL[torch.float32], "vs reference")
    empty = pb.offsets[1:] == pb.offsets[:-1]
    assert empty.any()
    assert out[0].abs().max() == 0  # bag 0 of every feature is empty


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("d", [2, 3, 4])
def test_backward_matches_cpu_and_autograd_reference(d, mode):
    code, weighted = MODES[mode]
    pb = Problem(SHAPES[d], [1, 0, 1], [code, 0, code], batch=19, dtype=torch.float32, weighted=weighted, seed=10 + d)
    grad_out = torch.randn(pb.batch, pb.forward("cpu").shape[1], generator=torch.Generator().manual_seed(1))
    grads = pb.backward(DEVICE, grad_out)
    cpu_grads, ref_grads = pb.backward("cpu", grad_out), pb.reference_grads(grad_out)
    for k, (g, c, r) in enumerate(zip(grads, cpu_grads, ref_grads)):
        assert g.dtype == torch.float32 and g.shape == pb.cores[k].shape
        assert_matches_cpu_op(g, lambda: c, lambda: r, TOL[torch.float32], REF_TOL[torch.float32], f"core {k}")
        assert_rel(g, r, REF_TOL[torch.float32], f"core {k} vs autograd reference")


def test_forward_float64():
    pb = Problem(SHAPES[3], [0, 1], [1, 0], batch=15, dtype=torch.float64, seed=3)
    assert_rel(pb.forward(DEVICE), pb.reference(), TOL[torch.float64])
    go = torch.randn(pb.batch, pb.reference().shape[1], dtype=torch.float64)
    for g, r in zip(pb.backward(DEVICE, go), pb.reference_grads(go)):
        assert_rel(g, r, TOL[torch.float64])


@pytest.mark.parametrize("d", [2, 3])
def test_bfloat16_forward_backward(d):
    pb = Problem(SHAPES[d], [0, 1], [0, 1], batch=21, dtype=torch.bfloat16, weighted=False, seed=20 + d)
    out = pb.forward(DEVICE)
    assert out.dtype == torch.bfloat16
    assert_matches_cpu_op(out, lambda: pb.forward("cpu"), pb.reference, TOL[torch.bfloat16], REF_TOL[torch.bfloat16],
                          "bf16 forward")
    assert_rel(out, pb.reference(), REF_TOL[torch.bfloat16], "vs fp64 reference")
    go = torch.randn(pb.batch, out.shape[1], generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for k, (g, c, r) in enumerate(zip(pb.backward(DEVICE, go), pb.backward("cpu", go), pb.reference_grads(go))):
        assert g.dtype == torch.bfloat16
        assert_matches_cpu_op(g, lambda: c, lambda: r, TOL[torch.bfloat16], REF_TOL[torch.bfloat16], f"core {k} bf16")
        assert_rel(g, r, REF_TOL[torch.bfloat16], f"core {k} vs reference")


def test_duplicates_only_and_int32_inputs():
    """Every position the same row (one unique row, many duplicates); int32 indices / offsets."""
    pb = Problem(SHAPES[3], [0], [0], batch=40, dtype=torch.float32, seed=4)
    pb.indices = torch.full_like(pb.indices, 17)
    cores, tnc, ftm, modes, idx, off, w = pb.args(DEVICE)
    out = torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx.int(), off.int(), w).cpu()
    assert_rel(out, pb.reference(), REF_TOL[torch.float32])


def test_large_batch_more_than_65535_bags():
    pb = Problem([((40, 50), (4, 4), (8,)), ((30, 30, 30), (2, 2, 4), (4, 4))], [0, 1], [1, 0], batch=70_001,
                 dtype=torch.float32, max_len=3, seed=5)
    out = pb.forward(DEVICE)
    assert out.shape == (70_001, 32)
    assert_matches_cpu_op(out, lambda: pb.forward("cpu"), pb.reference, TOL[torch.float32], REF_TOL[torch.float32],
                          "forward")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    expected = pb.reference_grads(go) if SELF_CHECK else pb.backward("cpu", go)
    for k, (g, e) in enumerate(zip(pb.backward(DEVICE, go), expected)):
        # sums over ~10^5 positions in different orders
        assert_matches_cpu_op(g, lambda: e, lambda: e, 1e-4, 1e-4, f"core {k}")


def test_forward_is_deterministic():
    pb = Problem(SHAPES[3], [0, 1], [0, 0], batch=300, dtype=torch.float32, seed=6)
    a, b = pb.forward(DEVICE), pb.forward(DEVICE)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Fused optimizer steps.
# ---------------------------------------------------------------------------------------------
def fused_step(pb, device, opt, states, grad_out, lr, eps):
    cores = [c.clone().to(device) for c in pb.cores]
    states = [s.clone().to(device) for s in states]
    _, tnc, ftm, modes, idx, off, w = pb.args(device)
    torch.ops.ttdist.tt_backward_fused_(grad_out.to(device), cores, states, tnc, ftm, modes, idx, off, w, opt.code, lr, eps)
    return [c.cpu() for c in cores], [s.cpu() for s in states]


def reference_fused(pb, opt, states, grad_out, lr, eps):
    """Dense reference gradient, then the optimizer on the touched slices only."""
    grads = pb.reference_grads(grad_out)
    cores = [c.double().clone() for c in pb.cores]
    states = [s.double().clone() for s in states]
    touched = [set() for _ in cores]
    for t, d in enumerate(pb.spec.table_num_cores):
        first = sum(pb.spec.table_num_cores[:t])
        ps = [cores[first + k].shape[0] for k in range(d)]
        for f, tf in enumerate(pb.spec.feature_table_map):
            if tf != t:
                continue
            lo, hi = int(pb.offsets[f * pb.batch]), int(pb.offsets[(f + 1) * pb.batch])
            for row in pb.indices[lo:hi].tolist():
                for k in reversed(range(d)):
                    touched[first + k].add(row % ps[k])
                    row //= ps[k]
    for k, core in enumerate(cores):
        ids = torch.tensor(sorted(touched[k]), dtype=torch.int64)
        if ids.numel() == 0:
            continue
        w = core.view(core.shape[0], -1)
        sparse_row_update_reference(w, states[k], ids, grads[k].reshape(core.shape[0], -1)[ids], opt.code, lr, eps)
    return cores, states, touched


def make_states(cores, opt, generator):
    out = []
    for c in cores:
        if opt.code == 1:
            out.append(torch.rand(c.shape, generator=generator, dtype=torch.float64).float() * 0.5)
        elif opt.code == 2:
            out.append(torch.rand(c.shape[0], generator=generator, dtype=torch.float64).float() * 0.5)
        else:
            out.append(torch.zeros(0))
    return out


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_fused_update_matches_cpu_and_reference(d, opt):
    pb = Problem(SHAPES[d], [0, 1, 0], [1, 0, 0], batch=17, dtype=torch.float32, seed=30 + d)
    g = torch.Generator().manual_seed(4)
    states = make_states(pb.cores, opt, g)
    go = torch.randn(pb.batch, pb.forward("cpu").shape[1], generator=g)
    cores, new_states = fused_step(pb, DEVICE, opt, states, go, 0.2, 1e-6)
    cpu_cores, cpu_states = fused_step(pb, "cpu", opt, states, go, 0.2, 1e-6)
    ref_cores, ref_states, _ = reference_fused(pb, opt, states, go, 0.2, 1e-6)
    for k in range(len(cores)):
        assert_matches_cpu_op(cores[k], lambda: cpu_cores[k], lambda: ref_cores[k], TOL[torch.float32],
                              REF_TOL[torch.float32], f"core {k}")
        assert_rel(cores[k], ref_cores[k], REF_TOL[torch.float32], f"core {k} vs reference")
        if opt.code:
            assert_matches_cpu_op(new_states[k], lambda: cpu_states[k], lambda: ref_states[k], 1e-5, 1e-5, f"state {k}")
            assert_rel(new_states[k], ref_states[k], 1e-5, f"state {k} vs reference")


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fused_update_bfloat16(opt):
    pb = Problem(SHAPES[3], [0, 1], [0, 0], batch=13, dtype=torch.bfloat16, seed=40)
    g = torch.Generator().manual_seed(5)
    states = make_states(pb.cores, opt, g)
    go = torch.randn(pb.batch, pb.forward("cpu").shape[1], generator=g).to(torch.bfloat16)
    cores, new_states = fused_step(pb, DEVICE, opt, states, go, 0.05, 1e-6)
    cpu_cores, cpu_states = fused_step(pb, "cpu", opt, states, go, 0.05, 1e-6)
    ref_cores, ref_states, _ = reference_fused(pb, opt, states, go, 0.05, 1e-6)
    for k in range(len(cores)):
        assert cores[k].dtype == torch.bfloat16 and new_states[k].dtype == torch.float32
        assert_matches_cpu_op(cores[k], lambda: cpu_cores[k], lambda: ref_cores[k], TOL[torch.bfloat16],
                              REF_TOL[torch.bfloat16], f"core {k}")
        if opt.code:
            assert_matches_cpu_op(new_states[k], lambda: cpu_states[k], lambda: ref_states[k], 1e-5,
                                  REF_TOL[torch.bfloat16], f"state {k}")


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fused_update_fbtt_shape_touches_rows_beyond_rqr(opt):
    """p = [200, 220, 250], q = [4, 4, 4], ranks [32, 32]: r_{k-1} q_k r_k = 128 < p_k for every core,
    so FBTT's launch misses slices; every touched slice must be updated, untouched ones not."""
    pb = Problem([((200, 220, 250), (4, 4, 4), (32, 32))], [0], [0], batch=64, dtype=torch.float32, seed=50, max_len=4)
    extra = torch.tensor([199 * 220 * 250 + 219 * 250 + 249, 150 * 220 * 250 + 200 * 250 + 130, 5, 129 * 220 * 250 + 129])
    pb.indices = torch.cat([pb.indices, extra])
    pb.offsets = torch.cat([pb.offsets[:-1], torch.tensor([pb.offsets[-1] + extra.numel()])])
    g = torch.Generator().manual_seed(6)
    states = make_states(pb.cores, opt, g)
    go = torch.randn(pb.batch, 64, generator=g)
    cores, new_states = fused_step(pb, DEVICE, opt, states, go, 0.1, 1e-8)
    cpu_cores, cpu_states = fused_step(pb, "cpu", opt, states, go, 0.1, 1e-8)
    ref_cores, ref_states, touched = reference_fused(pb, opt, states, go, 0.1, 1e-8)
    for k in range(3):
        assert_matches_cpu_op(cores[k], lambda: cpu_cores[k], lambda: ref_cores[k], TOL[torch.float32],
                              REF_TOL[torch.float32], f"core {k}")
        changed = (cores[k] != pb.cores[k]).flatten(1).any(dim=1)
        assert set(torch.nonzero(changed).flatten().tolist()) == touched[k], f"core {k}: updated slices != touched"
        assert max(touched[k]) >= 128, "the test must touch slices beyond r*q*r"
        if opt.code:
            assert_matches_cpu_op(new_states[k], lambda: cpu_states[k], lambda: ref_states[k], 1e-5, 1e-5, f"state {k}")


# ---------------------------------------------------------------------------------------------
# sparse_row_update_ (the row cache's update).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_sparse_row_update_matches_cpu_and_reference(opt, dtype):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(50, 96, generator=g).to(dtype)
    state = make_states([weight.view(50, 1, 96, 1)], opt, g)[0]
    state = state.view(-1) if opt.code == 1 else state
    ids = torch.randperm(50, generator=g)[:23]
    grads = torch.randn(23, 96, generator=g)
    results = {}
    for device in (DEVICE, "cpu"):
        w, s = weight.clone().to(device), state.clone().to(device)
        torch.ops.ttdist.sparse_row_update_(w, s, ids.to(device), grads.to(device), opt.code, 0.1, 1e-6)
        results[device] = (w.cpu(), s.cpu())
    ref_w, ref_s = weight.clone().double(), state.clone().double()
    sparse_row_update_reference(ref_w, ref_s, ids, grads.double(), opt.code, 0.1, 1e-6)
    w, s = results[DEVICE]
    assert_matches_cpu_op(w, lambda: results["cpu"][0], lambda: ref_w, TOL[dtype], REF_TOL[dtype], "weight")
    assert_rel(w, ref_w, REF_TOL[dtype], "weight vs reference")
    if opt.code:
        assert_matches_cpu_op(s, lambda: results["cpu"][1], lambda: ref_s, 1e-5, 1e-5, "state")
        assert_rel(s, ref_s, 1e-5, "state vs reference")


# ---------------------------------------------------------------------------------------------
# Bad input: checked on the device, excluded from the result, raised later (never read through).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, "rows", 2**40])
def test_out_of_range_index_raises(bad):
    pb = Problem(SHAPES[3], [0, 1], [0, 0], batch=9, dtype=torch.float32, seed=8)
    rows = math.prod(SHAPES[3][1][0])
    pb.indices = pb.indices.clone()
    pb.indices[-1] = rows if bad == "rows" else bad  # the last position reads table 1
    with sync_checks(), pytest.raises(IndexError, match="out of range"):
        torch.ops.ttdist.tt_forward(*pb.args(DEVICE))
    go = torch.ones(pb.batch, 28)  # D = 12 + 16
    cores, *rest = pb.args(DEVICE)
    with sync_checks(), pytest.raises(IndexError, match="out of range"):
        torch.ops.ttdist.tt_backward(go.to(DEVICE), cores, *rest)
    synchronize()
    pb.indices[-1] = 0
    assert_rel(pb.forward(DEVICE), pb.reference(), REF_TOL[torch.float32])


@cuda_only
def test_error_surfaces_at_the_next_call_or_check_errors_and_bad_entries_are_left_out():
    pb = Problem(SHAPES[2], [0], [0], batch=6, dtype=torch.float32, seed=12)
    bad = pb.indices.clone()
    bad[1] = 10**6
    cores, tnc, ftm, modes, idx, off, w = pb.args(DEVICE)
    out = torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, bad.to(DEVICE), off, w)  # does not wait, does not raise
    keep = torch.ones_like(bad, dtype=torch.bool)
    keep[1] = False
    bag = torch.arange(pb.batch).repeat_interleave(pb.offsets[1:] - pb.offsets[:-1])
    kept_offsets = torch.zeros_like(pb.offsets)
    kept_offsets[1:] = torch.bincount(bag[keep], minlength=pb.batch).cumsum(0)
    expected = tt_forward_reference([c.double() for c in pb.cores], pb.spec, pb.indices[keep], kept_offsets)
    assert_rel(out, expected, REF_TOL[torch.float32], "the good entries")
    with pytest.raises(IndexError, match=r"index 1000000 at position 1 .*found on the device in ttdist op call"):
        check_errors(DEVICE)
    check_errors(DEVICE)  # reported once
    torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, bad.to(DEVICE), off, w)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="index 1000000"):  # the next call raises it
        torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off, w)
    assert_rel(pb.forward(DEVICE), pb.reference(), REF_TOL[torch.float32])


def test_bad_offsets_raise():
    pb = Problem(SHAPES[2], [0], [0], batch=6, dtype=torch.float32, seed=9)
    for mutate in (lambda o: o.__setitem__(-1, o[-1] - 1), lambda o: o.__setitem__(2, o[3] + 1),
                   lambda o: o.__setitem__(0, 1), lambda o: o.__setitem__(3, 10**9)):
        off = pb.offsets.clone()
        mutate(off)
        cores, tnc, ftm, modes, idx, _, w = pb.args(DEVICE)
        with sync_checks(), pytest.raises(ValueError, match="offsets"):
            torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off.to(DEVICE), w)
    synchronize()


@cuda_only
def test_no_host_sync_in_module_forward_backward():
    """A TorchRec pipeline overlaps only if the lookup never makes the host wait for the GPU."""
    for sparse in (False, True):
        tt = ttdist.TTEmbeddingBag(10_000, 16, [8, 8], sparse=sparse, optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
                                   device=DEVICE)
        indices, offsets = make_bags([10_000], 64, 5, torch.Generator().manual_seed(3))
        indices, offsets = indices.to(DEVICE), offsets[:-1].to(DEVICE)
        tt(indices, offsets).sum().backward()  # first call: allocations, pinned staging
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # torch's own sync points raise
        try:
            torch.cuda._sleep(2_000_000_000)  # about a second of GPU work ahead of the lookup
            tt(indices, offsets).sum().backward()
            # Had anything waited for the stream (a raw cudaStreamSynchronize included), the GPU
            # would be idle by now.
            assert not torch.cuda.current_stream().query(), "the lookup made the host wait for the GPU"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        check_errors(DEVICE)


def test_hot_row_in_a_third_of_65k_bags():
    """A Zipf-head id in 30 % of the bags: its gradient is summed by many warps in pieces."""
    g = torch.Generator().manual_seed(13)
    pb = Problem([((40, 50), (4, 4), (8,))], [0], [0], batch=65_536, dtype=torch.float32, max_len=3, seed=13, hot=0.0)
    pb.indices[torch.rand(pb.indices.numel(), generator=g) < 0.3] = 777
    go = torch.randn(pb.batch, 16, generator=g)
    expected = pb.reference_grads(go) if SELF_CHECK else pb.backward("cpu", go)
    for k, (gd, e) in enumerate(zip(pb.backward(DEVICE, go), expected)):
        assert_matches_cpu_op(gd, lambda: e, lambda: e, 1e-4, 1e-4, f"core {k}")
    cores, *rest = pb.args(DEVICE)
    assert torch.equal(torch.ops.ttdist.tt_forward(cores, *rest), torch.ops.ttdist.tt_forward(cores, *rest))


@cuda_only
def test_core_with_more_than_2_31_elements():
    """p * r q r > 2^31 (8.6 GB in fp32): 64-bit slice offsets; the first and last slices are read."""
    p0, q0, r1 = 65_600, 16, 2048  # 2.15e9 elements
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    core0 = torch.empty(p0, 1, q0, r1, device=DEVICE)
    core0[0].normal_()
    core0[-1].normal_()
    core1 = torch.randn(2, r1, 2, 1, device=DEVICE) / r1**0.5
    rows = torch.tensor([2 * (p0 - 1) + 1, 0, 2 * (p0 - 1)], device=DEVICE)
    out = torch.ops.ttdist.tt_forward([core0, core1], [2], [0], [0], rows, torch.arange(4, device=DEVICE), None)
    expected = tt_forward_reference([core0[[0, p0 - 1]].double(), core1.double()], LookupSpec((2,), (0,), (0,)),
                                    torch.tensor([3, 0, 2], device=DEVICE), torch.arange(4, device=DEVICE))
    assert_rel(out, expected, 1e-5)
    del core0
    torch.cuda.empty_cache()


@cuda_only
def test_deterministic_mode_raises_for_the_atomic_backward():
    pb = Problem(SHAPES[2], [0], [0], batch=4, dtype=torch.float32, seed=14)
    cores, *rest = pb.args(DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        torch.ops.ttdist.tt_forward(cores, *rest)  # forward is deterministic
        with pytest.raises(RuntimeError, match="tt_backward.*floating-point atomics"):
            torch.ops.ttdist.tt_backward(torch.ones(4, 8, device=DEVICE), cores, *rest)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# A saved preparation: tt_prepare once per batch, the three ops given it as `prepared` (as
# ttdist/ops.py's autograd runs them).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_ops_from_a_saved_preparation_match_the_ops_without(mode):
    """Forward, backward and the fused step from one preparation equal the ops that prepare for
    themselves, with other cores in the backward than in the forward; the preparation is unchanged."""
    code, weighted = MODES[mode]
    pb = Problem(SHAPES[3], [0, 1, 0], [code, 0, code], batch=37, dtype=torch.float32, weighted=weighted, seed=60)
    cores, tnc, ftm, modes, idx, off, w = pb.args(DEVICE)
    prepared = torch.ops.ttdist.tt_prepare(cores, tnc, ftm, modes, idx, off, w)
    assert prepared.dtype == torch.int64 and prepared.dim() == 1 and prepared.device == idx.device
    unchanged = prepared.clone()
    out = torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off, w, prepared=prepared)
    assert torch.equal(out, torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off, w))  # deterministic
    assert_rel(out, pb.reference(), REF_TOL[torch.float32], "forward vs reference")
    # A fused step of another table between forward and backward moves the cores, not the batch.
    moved = [c * 1.5 for c in cores]
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(61)).to(DEVICE)
    grads = torch.ops.ttdist.tt_backward(go, moved, tnc, ftm, modes, idx, off, w, prepared=prepared)
    expected = torch.ops.ttdist.tt_backward(go, moved, tnc, ftm, modes, idx, off, w)
    for k, (g, e) in enumerate(zip(grads, expected)):
        assert e.abs().max() > 0
        assert_rel(g, e, TOL[torch.float32], f"core {k} gradient")  # CUDA's atomics vary the last bits
    opt = OptimType.EXACT_ROWWISE_ADAGRAD
    states = [s.to(DEVICE) for s in make_states(pb.cores, opt, torch.Generator().manual_seed(62))]
    stepped = []
    for given in (prepared, None):
        new_cores, new_states = [c.clone() for c in moved], [s.clone() for s in states]
        torch.ops.ttdist.tt_backward_fused_(go, new_cores, new_states, tnc, ftm, modes, idx, off, w, opt.code, 0.2,
                                            1e-6, prepared=given)
        stepped.append((new_cores, new_states))
    (cores_a, states_a), (cores_b, states_b) = stepped
    for k in range(len(cores)):
        assert not torch.equal(cores_b[k], moved[k])
        assert_rel(cores_a[k], cores_b[k], TOL[torch.float32], f"core {k} after the fused step")
        assert_rel(states_a[k], states_b[k], 1e-5, f"state {k} after the fused step")
    assert torch.equal(prepared, unchanged)


@cuda_only
def test_a_preparation_for_another_call_raises_value_error():
    """Told apart on the host by the tensor's device, dtype, shape and length (a function of N and
    of a tag of F, B, T, C, the tables and the feature map), before the op enqueues anything."""
    pb = Problem(SHAPES[2], [0, 0], [0, 0], batch=9, dtype=torch.float32, seed=63)  # both features read table 0
    cores, tnc, ftm, modes, idx, off, w = pb.args(DEVICE)
    prepared = torch.ops.ttdist.tt_prepare(cores, tnc, ftm, modes, idx, off, w)
    n = idx.numel()

    def spread(bags, count=n):  # offsets of `count` indices over `bags` bags
        return (torch.arange(bags + 1) * count // bags).to(DEVICE)

    one_more_core = cores[:2] + [torch.ones(1, 1, 1, 1, device=DEVICE)] + cores[2:]  # table 0: same rows, 3 cores
    other_calls = {
        "one index less": (cores, tnc, ftm, modes, idx[:-1], spread(18, n - 1), prepared),
        "other B": (cores, tnc, ftm, modes, idx, spread(20), prepared),
        "other F": (cores, tnc, [0, 0, 0], [0, 0, 0], idx, spread(27), prepared),
        "other T": (cores[:2], [2], ftm, modes, idx, off, prepared),
        "other C": (one_more_core, [3, 2], ftm, modes, idx, off, prepared),
        "int32": (cores, tnc, ftm, modes, idx, off, prepared.int()),
        "on the CPU": (cores, tnc, ftm, modes, idx, off, prepared.cpu()),
        "2-D": (cores, tnc, ftm, modes, idx, off, prepared.view(1, -1)),
        "not from tt_prepare": (cores, tnc, ftm, modes, idx, off, torch.zeros(5, dtype=torch.int64, device=DEVICE)),
    }
    for what, (cs, tn, fm, md, ix, of, given) in other_calls.items():
        batch = (of.numel() - 1) // len(fm)
        go = torch.ones(batch, 8 * len(fm), device=DEVICE)
        with pytest.raises(ValueError, match="`prepared`"):
            torch.ops.ttdist.tt_forward(cs, tn, fm, md, ix, of, None, prepared=given)
        with pytest.raises(ValueError, match="`prepared`"):
            torch.ops.ttdist.tt_backward(go, cs, tn, fm, md, ix, of, None, prepared=given)
        stepped, no_states = [c.clone() for c in cs], [torch.zeros(0, device=DEVICE)] * len(cs)
        with pytest.raises(ValueError, match="`prepared`"):
            torch.ops.ttdist.tt_backward_fused_(go, stepped, no_states, tn, fm, md, ix, of, None, 0, 0.5, 0.0,
                                                prepared=given)
        assert all(torch.equal(a, b) for a, b in zip(stepped, cs)), f"{what}: the fused step ran"
    torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off, w, prepared=prepared)  # the matching call runs
    synchronize()


@cuda_only
def test_prepare_and_the_ops_from_it_never_make_the_host_wait():
    pb = Problem(SHAPES[3], [0, 1], [0, 1], batch=512, dtype=torch.float32, seed=64)
    cores, tnc, ftm, modes, idx, off, w = pb.args(DEVICE)
    opt = OptimType.EXACT_ADAGRAD
    states = [s.to(DEVICE) for s in make_states(pb.cores, opt, torch.Generator().manual_seed(65))]
    go = torch.ones(pb.batch, 28, device=DEVICE)  # D = 12 + 16

    def step():
        prepared = torch.ops.ttdist.tt_prepare(cores, tnc, ftm, modes, idx, off, w)
        torch.ops.ttdist.tt_forward(cores, tnc, ftm, modes, idx, off, w, prepared=prepared)
        torch.ops.ttdist.tt_backward(go, cores, tnc, ftm, modes, idx, off, w, prepared=prepared)
        torch.ops.ttdist.tt_backward_fused_(go, cores, states, tnc, ftm, modes, idx, off, w, opt.code, 0.01, 1e-8,
                                            prepared=prepared)

    step()  # first call: allocations, pinned staging
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # torch's own sync points raise
    try:
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU work ahead of the ops
        step()
        assert not torch.cuda.current_stream().query(), "tt_prepare or an op given `prepared` made the host wait"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_errors(DEVICE)


# ---------------------------------------------------------------------------------------------
# The modules on the GPU.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_tt_embedding_bag_module_on_cuda(sparse):
    kwargs = dict(num_embeddings=1000, embedding_dim=16, tt_ranks=[4, 4], mode="mean", sparse=sparse,
                  optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, eps=1e-10)
    torch.manual_seed(0)
    cpu = ttdist.TTEmbeddingBag(**kwargs)
    dev = ttdist.TTEmbeddingBag(**kwargs).to(DEVICE)
    dev.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(11)
    indices, offsets = make_bags([1000], 33, 5, g)
    # the same lookup as a Problem (one mean-pooled feature), for the plain-PyTorch references
    pb = Problem.__new__(Problem)
    pb.cores, pb.spec, pb.indices, pb.offsets = [c.detach().clone() for c in cpu.tt_cores], \
        LookupSpec((len(cpu.tt_cores),), (0,), (1,)), indices, offsets
    pb.weights, pb.dtype, pb.batch = None, torch.float32, 33
    states = [s.clone() for s in cpu.optimizer_states]
    out_cpu = cpu(indices, offsets[:-1])
    out_dev = dev(indices.to(DEVICE), offsets[:-1].to(DEVICE))
    assert out_dev.device.type == DEVICE
    assert_matches_cpu_op(out_dev, lambda: out_cpu, pb.reference, TOL[torch.float32], REF_TOL[torch.float32],
                          "forward")
    go = torch.randn(out_cpu.shape, generator=g)
    out_cpu.backward(go)
    out_dev.backward(go.to(DEVICE))
    if sparse:  # the fused row-wise Adagrad step on the touched slices
        expected, *_ = reference_fused(pb, OptimType.EXACT_ROWWISE_ADAGRAD, states, go, 0.1, 1e-10)
    else:
        expected = pb.reference_grads(go)
    for k, (c_cpu, c_dev) in enumerate(zip(cpu.tt_cores, dev.tt_cores)):
        actual, cpu_value = (c_dev.detach(), c_cpu.detach()) if sparse else (c_dev.grad, c_cpu.grad)
        assert_matches_cpu_op(actual, lambda: cpu_value, lambda: expected[k], TOL[torch.float32],
                              REF_TOL[torch.float32], f"core {k}")


def test_module_created_on_device():
    tt = ttdist.TTEmbeddingBag(500, 8, [3], device=DEVICE)
    out = tt(torch.tensor([1, 2, 499], device=DEVICE), torch.tensor([0, 2], device=DEVICE))
    assert out.shape == (2, 8) and out.device.type == DEVICE
    with sync_checks(), pytest.raises(IndexError, match=r"index 500 .* out of range \[0, 500\)"):
        tt(torch.tensor([500], device=DEVICE), torch.tensor([0], device=DEVICE))
