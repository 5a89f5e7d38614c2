"""The ops' answers to bad arguments, the same on every device (CUDA runs where a GPU is present).

CPU ops raise before computing. CUDA ops check index and offset values on the device without
making the host wait: under ``ttdist.ops.sync_checks()`` they raise at once, like the CPU ops;
otherwise at the next op call or at ``ttdist.ops.check_errors`` (tests/gpu covers that path).
"""
from __future__ import annotations

import math

import pytest
import torch

import ttdist
from ttdist.ops import LookupSpec, check_errors, sync_checks, tt_forward_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
P, Q, RANKS = (5, 6, 7), (2, 3, 2), (4, 3)


def cores(device: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = [1, *RANKS, 1]
    return [torch.randn(P[k], r[k], Q[k], r[k + 1], generator=g, dtype=dtype).to(device) for k in range(3)]


def forward(device: str, indices, offsets, table_num_rows=None, table_num_cores=(3,), cs=None):
    cs = cores(device) if cs is None else cs
    with sync_checks():
        out = torch.ops.ttdist.tt_forward(cs, list(table_num_cores), [0], [0], torch.tensor(indices, device=device),
                                          torch.tensor(offsets, device=device), None, table_num_rows)
        check_errors(torch.device(device))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, math.prod(P), 2**40])
def test_index_out_of_range_is_index_error(device, bad):
    with pytest.raises(IndexError, match=rf"index {bad} at position 1 of feature 0 \(table 0\) is out of range \[0, 210\)"):
        forward(device, [3, bad, 4], [0, 2, 3])


@pytest.mark.parametrize("device", DEVICES)
def test_table_num_rows_bounds_indices_below_prod_p(device):
    """num_embeddings < prod p (padded TT shapes): rows past num_embeddings are out of range."""
    out = forward(device, [3, 199], [0, 1, 2], table_num_rows=[200])
    spec = LookupSpec((3,), (0,), (0,))
    expected = tt_forward_reference(cores("cpu"), spec, torch.tensor([3, 199]), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match=r"index 200 at position 1 .* out of range \[0, 200\)"):
        forward(device, [3, 200], [0, 1, 2], table_num_rows=[200])
    for rows in ([0], [211], [5, 5]):
        with pytest.raises(ValueError, match="table_num_rows"):
            forward(device, [3], [0, 1], table_num_rows=rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offsets", [[1, 2, 3], [0, 2, 1, 3], [0, 1, 2]])
def test_malformed_offsets_are_value_error(device, offsets):
    indices = [3, 4, 5] if offsets[-1] == 3 else [3, 4, 5]
    with pytest.raises(ValueError, match="offsets must start at 0, be non-decreasing and end at the number of indices"):
        forward(device, indices, offsets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table_num_cores", [(5,), (0, 3), (-1, 4), (2,), (1, 1)])
def test_table_num_cores_not_matching_the_cores_is_value_error(device, table_num_cores):
    """Was a segfault on CPU (the shapes were read past the last core)."""
    with pytest.raises(ValueError, match="table_num_cores|cores"):
        forward(device, [3], [0, 1], table_num_cores=table_num_cores)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_output_of_another_dtype_or_shape(device):
    cs = cores(device)
    args = ([3], [0], [0], torch.tensor([1, 2], device=device), torch.tensor([0, 1, 2], device=device), None)
    with pytest.raises(RuntimeError, match=r"grad_output must have the cores' dtype Float, got Double"):
        torch.ops.ttdist.tt_backward(torch.ones(2, 12, dtype=torch.float64, device=device), cs, *args)
    with pytest.raises(ValueError, match=r"grad_output must be \(2, 12\)"):
        torch.ops.ttdist.tt_backward(torch.ones(2, 11, device=device), cs, *args)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_row_update_bad_and_repeated_ids(device):
    weight = torch.zeros(10, 4, device=device)
    state = torch.zeros(10, device=device)
    grads = torch.ones(2, 4, device=device)
    with sync_checks():
        with pytest.raises(IndexError, match=r"row id 10 at position 1 out of range \[0, 10\)"):
            torch.ops.ttdist.sparse_row_update_(weight, state, torch.tensor([3, 10], device=device), grads, 2, 0.1, 1e-6)
        with pytest.raises(ValueError, match="row ids must be unique; row 3 repeats"):
            torch.ops.ttdist.sparse_row_update_(weight, state, torch.tensor([3, 3], device=device), grads, 2, 0.1, 1e-6)
    assert weight[4:].abs().max() == 0 and weight[:3].abs().max() == 0  # rows never named stay untouched


def test_module_on_cpu_names_the_table():
    tt = ttdist.TableBatchedTTEmbeddingBag(2, [100, 50], 8, [3], table_names=["user", "item"])
    with pytest.raises(IndexError, match=r"table 'item': index 50 at position 1 is out of range \[0, 50\)"):
        tt(torch.tensor([1, 50]), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_first_out_of_range_finds_the_first_bad_value_of_its_feature(dtype):
    """Values grouped by feature (lengths 2, 0, 3) against each feature's own row count (5, 1, 9)."""
    first = torch.ops.ttdist.first_out_of_range
    assert first(torch.tensor([4, 0, 8, 0, 1], dtype=dtype), [2, 0, 3], [5, 1, 9]) == -1
    assert first(torch.tensor([4, 0, 8, 9, 1], dtype=dtype), [2, 0, 3], [5, 1, 9]) == 3
    assert first(torch.tensor([5, 0, 8, 9, 1], dtype=dtype), [2, 0, 3], [5, 1, 9]) == 0  # 5 is a row of feature 2 only
    assert first(torch.tensor([4, 0, -1, 0, 1], dtype=dtype), [2, 0, 3], [5, 1, 9]) == 2
    assert first(torch.tensor([], dtype=dtype), [0, 0], [1, 1]) == -1
    # a feature with rows < 0 is not checked (another module's): the first bad value after it is found
    assert first(torch.tensor([7, -3, 8, 9, 1], dtype=dtype), [2, 0, 3], [-1, 1, 9]) == 3
    assert first(torch.tensor([7, -3, 8, 0, 1], dtype=dtype), [2, 0, 3], [-1, 1, 9]) == -1
    with pytest.raises(ValueError, match="lengths add up to 4 but there are 5 values"):
        first(torch.tensor([0, 0, 0, 0, 0], dtype=dtype), [2, 2], [5, 5])


def _dense_update(weights, states, grads, optimizer=2):
    torch.ops.ttdist.dense_update_(weights, states, grads, optimizer, 0.1, 1e-8)


@pytest.mark.parametrize("call, match", [
    (lambda w, s, g: _dense_update([w, w], [s], [g]), "got 2 weights, 1 optimizer states and 1 gradients"),
    (lambda w, s, g: _dense_update([w], [s], [g[:, :2]]), r"gradient 0 has shape \[4, 2\] but its weight has \[4, 3\]"),
    (lambda w, s, g: _dense_update([w], [s[:3]], [g]), "optimizer state has 3 elements, expected 4"),
    (lambda w, s, g: _dense_update([w], [s], [g], optimizer=7), "unknown optimizer code 7"),
    (lambda w, s, g: _dense_update([w.t()], [s], [g.t()]), "contiguous 2-D weight"),
    (lambda w, s, g: torch.ops.ttdist.first_out_of_range(torch.zeros(2, 2, dtype=torch.long), [4], [5]), "1-D"),
    (lambda w, s, g: torch.ops.ttdist.first_out_of_range(torch.zeros(4), [4], [5]), "Float"),
    (lambda w, s, g: torch.ops.ttdist.first_out_of_range(torch.zeros(4, dtype=torch.long), [5, -1], [5, 5]),
     "length is negative"),
    (lambda w, s, g: torch.ops.ttdist.first_out_of_range(torch.zeros(4, dtype=torch.long), [4], [5, 5]),
     "1 feature lengths but 2 row counts"),
])
def test_update_and_range_check_ops_reject_bad_arguments(call, match):
    """dense_update_ and first_out_of_range: bad arguments raise a clear error, nothing is written."""
    w, s, g = torch.ones(4, 3), torch.zeros(4), torch.ones(4, 3)
    with pytest.raises((RuntimeError, ValueError, IndexError), match=match):
        call(w, s, g)
    assert torch.equal(w, torch.ones(4, 3)) and torch.equal(s, torch.zeros(4))
