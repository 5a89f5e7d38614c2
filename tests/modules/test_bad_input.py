"""Bad input raises a clear ValueError/IndexError/TypeError before any kernel runs (fuzzed)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ttdist

N = 50


@pytest.fixture(scope="module")
def tt():
    return ttdist.TTEmbeddingBag(N, 8, [3], include_last_offset=True)


@pytest.mark.parametrize("indices,offsets,weights,exc,match", [
    (torch.tensor([1, 50]), torch.tensor([0, 2]), None, IndexError, r"index 50 at position 1 is out of range \[0, 50\)"),
    (torch.tensor([-1, 2]), torch.tensor([0, 2]), None, IndexError, r"index -1 at position 0 is out of range \[0, 50\)"),
    (torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), None, TypeError, "indices must be an int32 or int64 tensor, got torch.float32"),
    (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]), None, ValueError, r"non-decreasing: offsets\[2\] = 1 < offsets\[1\] = 2"),
    (torch.tensor([1, 2]), torch.tensor([0, 5]), None, ValueError, r"the last offset \(5\) must equal the number of indices \(2\)"),
    (torch.tensor([1, 2]), torch.tensor([1, 2]), None, ValueError, r"offsets\[0\] must be 0"),
    (torch.tensor([1, 2]), torch.tensor([0, 2]), torch.ones(3), ValueError, "per_sample_weights has shape"),
    (torch.tensor([[1, 2]]), torch.tensor([0, 2]), None, ValueError, "indices must be 1-D"),
])
def test_bad_input_names_value_and_range(tt, indices, offsets, weights, exc, match):
    with pytest.raises(exc, match=match):
        tt(indices, offsets, weights)


def test_weights_with_mean_are_rejected_like_nn_embeddingbag():
    with pytest.raises(ValueError, match="only supported with mode='sum'"):
        ttdist.TTEmbeddingBag(N, 8, [3], mode="mean")(torch.tensor([1]), torch.tensor([0]), torch.ones(1))


def test_kernel_guards_out_of_range_even_when_called_directly():
    tt = ttdist.TTEmbeddingBag(N, 8, [3])
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.ttdist.tt_forward(list(tt.tt_cores), [2], [0], [0], torch.tensor([10**9]), torch.tensor([0, 1]), None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    indices=st.lists(st.integers(-5, N + 5), max_size=12),
    cuts=st.lists(st.integers(-3, 15), min_size=1, max_size=6),
    float_indices=st.booleans(),
    weight_len=st.one_of(st.none(), st.integers(0, 14)),
)
def test_fuzzed_inputs_either_match_dense_or_raise_clearly(tt, indices, cuts, float_indices, weight_len):
    idx = torch.tensor(indices, dtype=torch.float32 if float_indices else torch.int64)
    offsets = torch.tensor(cuts, dtype=torch.int64)
    weights = None if weight_len is None else torch.rand(weight_len)
    dense = torch.nn.EmbeddingBag(N, 8, mode="sum", include_last_offset=True)
    dense.weight.data.copy_(tt.full_weight())
    valid = (not float_indices and all(0 <= i < N for i in indices) and cuts[0] == 0 and cuts[-1] == len(indices)
             and all(a <= b for a, b in zip(cuts, cuts[1:])) and (weight_len is None or weight_len == len(indices)))
    if valid:
        torch.testing.assert_close(tt(idx, offsets, weights), dense(idx, offsets, weights))
    else:
        with pytest.raises((ValueError, IndexError, TypeError)):
            tt(idx, offsets, weights)


def test_kjt_with_a_repeated_key_or_a_variable_batch_is_rejected_naming_it():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    collection = ttdist.TTEmbeddingBagCollection([ttdist.TTEmbeddingBagConfig(
        name="a", num_embeddings=100, embedding_dim=8, feature_names=["f"], tt_ranks=[4])])
    repeated = KeyedJaggedTensor.from_lengths_sync(keys=["f", "f"], values=torch.tensor([1, 2, 3]),
                                                   lengths=torch.tensor([1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"has the keys \['f'\] more than once"):
        collection(repeated)
    variable = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 2]),
                                 stride_per_key_per_rank=[[2]], inverse_indices=(["f"], torch.tensor([[0, 1, 1]])))
    with pytest.raises(ValueError, match="variable batch size per feature"):
        collection(variable)
