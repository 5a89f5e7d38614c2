"""ShardedTTEmbeddingBagCollection under TorchRec DMP on gloo vs the unsharded collection."""
import pytest

from tests.distributed import workers
from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
TYPES = ["table_wise", "row_wise", "column_wise", "data_parallel"]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_pooled_outputs_equal_unsharded_for_every_sharding_type(world_size):
    per_rank = run_ranks(workers.pooled_equals_unsharded_all_types, world_size, TYPES)
    for sharding_type in TYPES:
        errors = [r[sharding_type] for r in per_rank]
        assert max(errors) < 1e-6, (sharding_type, errors)


MIXED = {"t0": "row_wise", "t1": "column_wise", "t2": "table_wise", "t_p3": "row_wise"}
CASES = {  # world size: [(plan, fused optimizer)]
    1: [(MIXED, "exact_adagrad")],
    2: [(MIXED, "exact_adagrad"),
        ({"t0": "data_parallel", "t1": "table_wise", "t2": "row_wise"}, "exact_row_wise_adagrad"),
        ({"t0": "column_wise", "t1": "row_wise", "t2": "data_parallel"}, "exact_sgd")],
    4: [(MIXED, "exact_adagrad"),
        ({"t0": "data_parallel", "t1": "table_wise", "t2": "row_wise"}, "exact_row_wise_adagrad")],
}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_training_equals_single_process_on_the_global_batch(world_size):
    """20 DMP steps of TorchRec's DLRM: same loss sequence and same final cores (rtol 1e-4)."""
    per_rank = run_ranks(workers.train_cases, world_size, CASES[world_size], 20)
    for case, results in zip(CASES[world_size], zip(*per_rank)):
        losses, ref_losses, _, moved = results[0]
        assert moved > 1e-3, f"{case}: cores moved by only {moved:.1e} (relative): the comparison would be vacuous"
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-4 * abs(b), (case, losses, ref_losses)
        assert max(r[2] for r in results) < 1e-4, (case, [r[2] for r in results])
