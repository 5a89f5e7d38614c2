"""Raw op arguments fuzzed with hypothesis, in process (issue 11, item 8 re-check).

``torch.ops.ttdist.tt_forward / tt_backward / tt_backward_fused_ / sparse_row_update_`` get a
valid table-batched lookup (1-3 tables of 1-3 cores, 1-3 features, empty bags, duplicates,
optional weights and table_num_rows) with 0-2 mutations: mismatched table_num_cores,
feature_table_map out of range, bad pooling codes, broken offsets, index dtypes / values out of
range, empty tensors, wrong ranks, mismatched ranks between cores, wrong grad_output / weight /
optimizer-state shapes and dtypes, bad optimizer codes. The contract: an unmutated call succeeds
and matches the plain-PyTorch reference; a mutated one either succeeds or raises a clear error
(RuntimeError / ValueError / IndexError / TypeError with a message). A crash (segfault, abort)
kills the test process, which fails the run. The counts are printed (``pytest -s``).

Lenient, not crashing (counted as ``success_mutated``): pooling codes other than 1 pool as sum
(CPU and CUDA alike); per_sample_weights are checked by element count only (a [1, N] or int64
tensor is converted); float32 weights / int32 indices / non-contiguous inputs are converted.
"""
import collections
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ttdist  # noqa: F401  (registers torch.ops.ttdist)
from ttdist.ops import LookupSpec, sparse_row_update_reference, tt_forward_reference

pytestmark = pytest.mark.slow

CLEAR = (RuntimeError, ValueError, IndexError, TypeError)
OPS = ("tt_forward", "tt_backward", "tt_backward_fused_", "sparse_row_update_")
LOOKUP_MUTATIONS = ("table_num_cores", "feature_table_map", "pooling", "offsets", "indices", "weights", "num_rows",
                    "cores", "grad_output", "states", "optimizer", "empty")
ROW_MUTATIONS = ("weight", "state", "row_ids", "row_grads", "optimizer", "empty")
COUNTS: collections.Counter = collections.Counter()


def _base_lookup(draw):
    T = draw(st.integers(1, 3))
    cores, table_num_cores, rows = [], [], []
    for _ in range(T):
        d = draw(st.integers(1, 3))
        ranks = [1] + [draw(st.integers(1, 3)) for _ in range(d - 1)] + [1]
        p = [draw(st.integers(1, 4)) for _ in range(d)]
        q = [draw(st.integers(1, 3)) for _ in range(d)]
        cores += [torch.randn(p[k], ranks[k], q[k], ranks[k + 1], dtype=torch.float64) for k in range(d)]
        table_num_cores.append(d)
        prod_p = 1
        for x in p:
            prod_p *= x
        rows.append(draw(st.integers(1, prod_p)))
    F = draw(st.integers(1, 3))
    feature_table_map = [draw(st.integers(0, T - 1)) for _ in range(F)]
    pooling = [draw(st.sampled_from([0, 1])) for _ in range(F)]
    B = draw(st.integers(0, 3))
    indices, offsets = [], [0]
    for f in range(F):
        for _ in range(B):
            n = draw(st.integers(0, 3))
            indices += [draw(st.integers(0, rows[feature_table_map[f]] - 1)) for _ in range(n)]
            offsets.append(len(indices))
    weighted = draw(st.booleans())
    return dict(cores=cores, table_num_cores=table_num_cores, feature_table_map=feature_table_map, pooling=pooling,
                indices=torch.tensor(indices, dtype=torch.int64), offsets=torch.tensor(offsets, dtype=torch.int64),
                weights=torch.rand(len(indices), dtype=torch.float64) if weighted else None,
                num_rows=rows if draw(st.booleans()) else None, optimizer=draw(st.sampled_from([0, 1, 2])))


def _tensor_variant(draw, t):
    """A hostile variant of an integer tensor: other dtype, rank, emptiness, or values."""
    kind = draw(st.sampled_from(["int32", "float", "bool", "2d", "0d", "empty", "negative", "huge", "shuffle",
                                 "noncontiguous"]))
    if kind == "int32":
        return t.int()
    if kind == "float":
        return t.double()
    if kind == "bool":
        return t.bool()
    if kind == "2d":
        return t.reshape(1, -1)
    if kind == "0d":
        return t[0] if t.numel() else t.reshape(())[()] if t.numel() == 1 else torch.tensor(0)
    if kind == "empty":
        return t[:0]
    if kind == "noncontiguous":
        return torch.stack([t, t], 1)[:, 0]
    if not t.numel():
        return torch.tensor([draw(st.sampled_from([-1, 2**31, 2**62, -(2**63)]))])
    t = t.reshape(-1).clone()
    i = draw(st.integers(0, t.numel() - 1))
    if kind == "negative":
        t[i] = draw(st.sampled_from([-1, -(2**63)]))
    elif kind == "huge":
        t[i] = draw(st.sampled_from([10**6, 2**31, 2**62, 2**63 - 1]))
    else:
        t = t[torch.randperm(t.numel())]
    return t


def _set_one(draw, values, value):
    """Sets one entry of the list ``values`` (appends to an empty one)."""
    if values:
        values[draw(st.integers(0, len(values) - 1))] = value
    else:
        values.append(value)


def _mutate_lookup(draw, a, what):
    if what == "table_num_cores":
        tnc = list(a["table_num_cores"])
        choice = draw(st.sampled_from(["plus", "minus", "zero", "negative", "huge", "drop", "add"]))
        i = draw(st.integers(0, max(len(tnc) - 1, 0)))
        if not tnc:
            tnc = [0]
        if choice == "drop":
            tnc = tnc[:-1]
        elif choice == "add":
            tnc.append(draw(st.integers(-2, 4)))
        else:
            tnc[i] = {"plus": tnc[i] + 1, "minus": tnc[i] - 1, "zero": 0, "negative": -3, "huge": 2**40}[choice]
        a["table_num_cores"] = tnc
    elif what == "feature_table_map":
        ftm = list(a["feature_table_map"])
        choice = draw(st.sampled_from(["out", "negative", "huge", "empty", "extra"]))
        if choice == "empty":
            ftm = []
        elif choice == "extra":
            ftm.append(0)
        else:
            _set_one(draw, ftm, {"out": len(a["table_num_cores"]), "negative": -1, "huge": 2**62}[choice])
        a["feature_table_map"] = ftm
    elif what == "pooling":
        pm = list(a["pooling"])
        if draw(st.booleans()):
            _set_one(draw, pm, draw(st.sampled_from([2, -1, 99, 2**40])))
        else:
            pm = pm[:-1] if draw(st.booleans()) else pm + [0]
        a["pooling"] = pm
    elif what == "offsets":
        a["offsets"] = _tensor_variant(draw, a["offsets"])
    elif what == "indices":
        a["indices"] = _tensor_variant(draw, a["indices"])
    elif what == "weights":
        n = a["indices"].numel()
        a["weights"] = draw(st.sampled_from([
            torch.rand(n + 1, dtype=torch.float64), torch.rand(n, dtype=torch.float32), torch.ones(n, dtype=torch.int64),
            torch.rand(1, n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)[:0], torch.rand(2 * n)[::2].double()]))
    elif what == "num_rows":
        rows = list(a["num_rows"] or [1] * len(a["table_num_cores"]))
        choice = draw(st.sampled_from(["zero", "negative", "huge", "drop", "add"]))
        if choice == "drop":
            rows = rows[:-1]
        elif choice == "add":
            rows.append(1)
        else:
            _set_one(draw, rows, {"zero": 0, "negative": -5, "huge": 2**62}[choice])
        a["num_rows"] = rows
    elif what == "cores":
        cores = list(a["cores"])
        k = draw(st.integers(0, len(cores) - 1))  # (cores: never emptied before this mutation)
        c = cores[k]
        choice = draw(st.sampled_from(["3d", "rank_in", "rank_out", "float32", "noncontiguous", "zero_p", "empty_list",
                                       "int"]))
        if choice == "3d":
            cores[k] = c.reshape(c.shape[0], c.shape[1], -1)
        elif choice == "rank_in":
            cores[k] = torch.randn(c.shape[0], c.shape[1] + 1, c.shape[2], c.shape[3], dtype=c.dtype)
        elif choice == "rank_out":
            cores[k] = torch.randn(c.shape[0], c.shape[1], c.shape[2], c.shape[3] + 1, dtype=c.dtype)
        elif choice == "float32":
            cores[k] = c.float()
        elif choice == "noncontiguous":
            cores[k] = torch.cat([c, c], 2)[:, :, : c.shape[2]]
        elif choice == "zero_p":
            cores[k] = c[:0]
        elif choice == "int":
            cores[k] = c.long()
        else:
            cores = []
        a["cores"] = cores
    elif what == "empty":
        a["indices"], a["offsets"] = a["indices"].reshape(-1)[:0], a["offsets"].reshape(-1)[:0]
        a["weights"] = None if a["weights"] is None else a["weights"].reshape(-1)[:0]
    else:  # grad_output / states / optimizer: applied when the call is built
        a.setdefault("late", []).append((what, draw(st.integers(0, 5))))


def _dims(a):
    dims, begin = [], 0
    for d in a["table_num_cores"]:
        dim = 1
        for c in a["cores"][begin:begin + d]:
            dim *= c.shape[2]
        dims.append(dim)
        begin += d
    return dims


def _grad_output(a, variant):
    B = (a["offsets"].numel() - 1) // max(1, len(a["feature_table_map"])) if a["offsets"].numel() else 0
    try:
        width = sum(_dims(a)[t] for t in a["feature_table_map"])
    except Exception:  # a mutated feature_table_map: any width
        width = 3
    go = torch.randn(max(B, 0), width, dtype=torch.float64)
    if variant is None:
        return go
    return [go.float(), go[:, :-1] if width else torch.randn(B, 1, dtype=torch.float64), go.reshape(-1),
            torch.randn(B + 1, width, dtype=torch.float64), go.t() if go.numel() > 1 else go[:0], go.long()][variant]


def _states(a, variant):
    opt = a["optimizer"]
    states = [torch.zeros(0) if opt == 0 else torch.zeros_like(c) if opt == 1 else torch.zeros(c.shape[0], dtype=c.dtype)
              for c in a["cores"]]
    if variant is None or not states:
        return states
    k = variant % len(states)
    if variant in (0, 1):
        return states[:-1]
    if variant in (2, 3):
        states[k] = torch.zeros(states[k].numel() + 1, dtype=torch.float64)
    else:
        states[k] = states[k].float() if states[k].numel() else torch.zeros(3, dtype=torch.float64)
    return states


def _call(op, a):
    late = dict(a.get("late", []))
    cores, spec = a["cores"], (a["table_num_cores"], a["feature_table_map"], a["pooling"])
    if op == "tt_forward":
        return torch.ops.ttdist.tt_forward(cores, *spec, a["indices"], a["offsets"], a["weights"], a["num_rows"])
    go = a["grad_out"] = _grad_output(a, late.get("grad_output"))
    if op == "tt_backward":
        return torch.ops.ttdist.tt_backward(go, cores, *spec, a["indices"], a["offsets"], a["weights"], a["num_rows"])
    optimizer = a["optimizer"] if "optimizer" not in late else [3, -1, 2**40, 3, -1, 7][late["optimizer"]]
    cores = [c.clone() for c in cores]
    torch.ops.ttdist.tt_backward_fused_(go, cores, _states(a, late.get("states")), *spec, a["indices"], a["offsets"],
                                        a["weights"], optimizer, 0.1, 1e-8, a["num_rows"])
    return cores


def _check_valid_lookup(op, a, result):
    spec = LookupSpec(tuple(a["table_num_cores"]), tuple(a["feature_table_map"]), tuple(a["pooling"]))
    if op == "tt_forward" and not a["indices"].numel():  # (the reference cannot reshape 0 rows)
        batch = (a["offsets"].numel() - 1) // len(a["feature_table_map"])
        assert tuple(result.shape) == (batch, sum(_dims(a)[t] for t in a["feature_table_map"]))
        assert not bool(result.any())
    elif op == "tt_forward":
        expected = tt_forward_reference(a["cores"], spec, a["indices"], a["offsets"], a["weights"])
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)
    else:  # the core gradients (tt_backward) or the SGD step they give (tt_backward_fused_, optimizer 0)
        cores = [c.clone().requires_grad_(True) for c in a["cores"]]
        grads = [torch.zeros_like(c) for c in cores]
        if a["indices"].numel():
            out = tt_forward_reference(cores, spec, a["indices"], a["offsets"], a["weights"])
            grads = [torch.zeros_like(c) if g is None else g
                     for c, g in zip(cores, torch.autograd.grad(out, cores, a["grad_out"], allow_unused=True))]
        assert len(result) == len(cores)
        if op == "tt_backward":
            for got, want in zip(result, grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        elif a["optimizer"] == 0:
            for got, core, grad in zip(result, a["cores"], grads):
                torch.testing.assert_close(got, core - 0.1 * grad, rtol=1e-10, atol=1e-12)


@st.composite
def row_update_case(draw):
    rows, dim = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    optimizer = draw(st.sampled_from([0, 1, 2]))
    weight = torch.randn(rows, dim, dtype=torch.float64)
    state = (torch.zeros(0) if optimizer == 0 else torch.zeros(rows * dim, dtype=torch.float64) if optimizer == 1
             else torch.zeros(rows, dtype=torch.float64))
    n = draw(st.integers(0, rows))
    row_ids = torch.randperm(rows)[:n]
    row_grads = torch.randn(n, dim, dtype=torch.float64)
    mutations = draw(st.lists(st.sampled_from(ROW_MUTATIONS), min_size=draw(st.sampled_from([0, 1, 1, 2])), max_size=2,
                              unique=True))
    for what in mutations:
        if what == "weight":
            weight = draw(st.sampled_from([weight.reshape(-1), weight.t(), weight.float(), weight[:0], weight.reshape(1, rows, dim)]))
        elif what == "state":
            state = draw(st.sampled_from([torch.zeros(state.numel() + 1, dtype=torch.float64), state.float(),
                                          torch.zeros(rows, dim, dtype=torch.float64)[:, :1].t()]))
        elif what == "row_ids":
            row_ids = _tensor_variant(draw, row_ids)
            if draw(st.booleans()) and row_ids.dim() == 1 and row_ids.numel():
                row_ids = torch.cat([row_ids, row_ids[:1]])  # duplicate
        elif what == "row_grads":
            row_grads = draw(st.sampled_from([row_grads.float(), row_grads[:, :-1], row_grads.reshape(-1),
                                              torch.randn(n + 1, dim, dtype=torch.float64)]))
        elif what == "optimizer":
            optimizer = draw(st.sampled_from([3, -1, 2**40]))
        else:
            row_ids, row_grads = row_ids.reshape(-1)[:0], row_grads.reshape(-1, dim)[:0] if row_grads.numel() % dim == 0 else row_grads[:0]
    return weight, state, row_ids, row_grads, optimizer, mutations


@st.composite
def lookup_case(draw):
    a = _base_lookup(draw)
    mutations = draw(st.lists(st.sampled_from(LOOKUP_MUTATIONS), min_size=draw(st.sampled_from([0, 1, 1, 2])),
                              max_size=2, unique=True))
    for what in mutations:
        _mutate_lookup(draw, a, what)
    return draw(st.sampled_from(OPS[:3])), a, mutations


def _record(op, mutations, fn, args=None):
    """Runs ``fn``; returns the outcome ("success" or "clear") and counts it. With
    TTDIST_FUZZ_TRACE=1 each case is printed before it runs (the last one printed crashed)."""
    if os.environ.get("TTDIST_FUZZ_TRACE") == "1":
        print(f"{op} {mutations} {args!r}", file=sys.stderr, flush=True)
    try:
        result = fn()
    except CLEAR as e:
        assert str(e).strip(), f"{op} with {mutations}: {type(e).__name__} without a message"
        if not mutations:
            raise  # a valid call must not raise
        COUNTS["clear"] += 1
        COUNTS[f"clear:{type(e).__name__}"] += 1
        return "clear", None
    COUNTS["success"] += 1
    if mutations:
        COUNTS["success_mutated"] += 1
        COUNTS["success_mutated:" + "+".join(sorted(mutations))] += 1
    return "success", result


SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(case=st.one_of(lookup_case(), lookup_case(), lookup_case(), row_update_case().map(lambda c: ("rows", c))))
def test_raw_ops_succeed_or_raise_clearly(case):
    COUNTS["cases"] += 1
    if case[0] == "rows":
        weight, state, row_ids, row_grads, optimizer, mutations = case[1]
        COUNTS["op:sparse_row_update_"] += 1
        before = weight.clone()
        outcome, _ = _record("sparse_row_update_", mutations, lambda: torch.ops.ttdist.sparse_row_update_(
            weight, state, row_ids, row_grads, optimizer, 0.1, 1e-8), case[1])
        if outcome == "success" and not mutations:
            expected_state = state.clone().zero_()
            expected = before.clone()
            sparse_row_update_reference(expected, expected_state, row_ids, row_grads, optimizer, 0.1, 1e-8)
            torch.testing.assert_close(weight, expected, rtol=1e-10, atol=1e-12)
        return
    op, a, mutations = case
    COUNTS[f"op:{op}"] += 1
    outcome, result = _record(op, mutations, lambda: _call(op, a), a)
    if outcome == "success" and not mutations:
        _check_valid_lookup(op, a, result)


def test_report_counts(capsys):
    """Runs after the fuzz test (file order): prints the counts and checks both outcomes occurred."""
    if not COUNTS["cases"]:
        pytest.skip("run together with test_raw_ops_succeed_or_raise_clearly")
    with capsys.disabled():
        print(f"\nfuzz_ops: {dict(sorted(COUNTS.items()))} crashes: 0")
    assert COUNTS["success"] > 0 and COUNTS["clear"] > 0


def test_found_by_this_fuzz_one_core_table_backward_and_empty_core_fused():
    """Crashes this fuzz found (fixed in csrc/cpu/tt_lookup_cpu.cpp): tt_backward /
    tt_backward_fused_ of a one-core table (d = 1, accepted by every op) read past its shape
    (segfault); tt_backward_fused_ with a core of p = 0 divided by zero (SIGFPE)."""
    core = torch.randn(4, 1, 3, 1, dtype=torch.float64)
    idx, off, go = torch.tensor([2, 2, 0]), torch.tensor([0, 2, 3]), torch.randn(2, 3, dtype=torch.float64)
    (grad,) = torch.ops.ttdist.tt_backward(go, [core], [1], [0], [0], idx, off, None, None)
    expected = torch.zeros_like(core)
    expected[2, 0, :, 0] = 2 * go[0]
    expected[0, 0, :, 0] = go[1]
    torch.testing.assert_close(grad, expected)
    fused = core.clone()
    torch.ops.ttdist.tt_backward_fused_(go, [fused], [torch.zeros(0)], [1], [0], [0], idx, off, None, 0, 0.5, 0.0, None)
    torch.testing.assert_close(fused, core - 0.5 * expected)
    empty = torch.zeros(0, 1, 3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="p >= 1"):
        torch.ops.ttdist.tt_backward_fused_(go, [empty], [torch.zeros(0)], [1], [0], [0], idx, off, None, 2, 0.1, 0.0,
                                            None)
