"""TorchRec's standard training path over TT tables (gloo, CPU): a DLRM built on the meta device,
``apply_optimizer_in_backward``, ``DistributedModelParallel``, ``TrainPipelineSparseDist``,
``torch.distributed.checkpoint`` — the TorchRec user's script with ``TTEmbeddingBagCollection``
and the TT sharder swapped in (tests/distributed/standard_path_workers.py)."""
import pytest

from tests.distributed import standard_path_workers as workers
from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
RTOL = 1e-4


def assert_close(a: list, b: list, what: str) -> None:
    assert len(a) == len(b) and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b)), (what, a, b)


def test_default_planning_in_backward_optimizer_and_pipeline_train_as_torchrec_tables():
    """DMP without a plan, RowWiseAdagrad applied in backward, TrainPipelineSparseDist: the TT model's
    loss falls at least as far as the same model's with TorchRec's tables, and 2 ranks = 1 rank."""
    tt = {ws: run_ranks(workers.train_standard_path, ws, True)[0] for ws in (1, 2)}
    torchrec = run_ranks(workers.train_standard_path, 1, False)[0]
    for ws, result in tt.items():
        assert result["pipelined"] == ["ShardedTTEmbeddingBagCollection"], result["pipelined"]
        assert set(result["sharding"]) == {"t0", "t1", "t2"}
        # the optimizer state is the fused optimizer's (RowWiseAdagrad's "sum"), not the model's
        assert len(result["fused_state"]) == 9 and all(v == ["sum"] for v in result["fused_state"].values())
        assert all("optimizer_state" not in k for k in result["model_keys"])
    assert_close(tt[2]["losses"], tt[1]["losses"], "2 ranks vs 1 rank")

    def drop(losses: list) -> float:  # mean of the first 5 steps minus mean of the last 5
        return sum(losses[:5]) / 5 - sum(losses[-5:]) / 5

    assert drop(torchrec["losses"]) > 0.03, torchrec["losses"]  # the task is learnable in 40 steps
    assert drop(tt[1]["losses"]) >= drop(torchrec["losses"]), (tt[1]["losses"], torchrec["losses"])


def test_mixed_collection_pipelines_both_children_and_2_ranks_equal_1_rank():
    """A MixedEmbeddingBagCollection (TT t0, t2 and TorchRec's t1 between them) under DMP's own plan and
    TrainPipelineSparseDist: the pipeline finds and pipelines both sharded children (it traces the
    model), the loss falls, and 2 ranks give 1 rank's losses."""
    runs = {ws: run_ranks(workers.train_standard_path, ws, True, 30, "rowwise_adagrad", None, True)[0] for ws in (1, 2)}
    for result in runs.values():
        assert result["pipelined"] == ["ShardedEmbeddingBagCollection", "ShardedTTEmbeddingBagCollection"], result
        assert result["moved"] > 1e-3
    losses = runs[1]["losses"]
    assert sum(losses[:5]) / 5 - sum(losses[-5:]) / 5 > 0.03, losses
    assert_close(runs[2]["losses"], losses, "2 ranks vs 1 rank")


CASES = [  # (optimizer applied in backward, a sharding type per table): every type with every optimizer
    ("sgd", {"t0": "table_wise", "t1": "row_wise", "t2": "data_parallel"}),
    ("sgd", {"t0": "column_wise", "t1": "data_parallel", "t2": "row_wise"}),
    ("adagrad", {"t0": "table_wise", "t1": "row_wise", "t2": "data_parallel"}),
    ("adagrad", {"t0": "column_wise", "t1": "data_parallel", "t2": "row_wise"}),
    ("rowwise_adagrad", {"t0": "table_wise", "t1": "row_wise", "t2": "data_parallel"}),
    ("rowwise_adagrad", {"t0": "row_wise", "t1": "data_parallel", "t2": "table_wise"}),
]


def test_pipelined_training_on_n_ranks_equals_one_rank_for_every_sharding_type_and_optimizer():
    one, two = (run_ranks(workers.train_cases, ws, CASES, 12)[0] for ws in (1, 2))
    for case, (a, moved), (b, _) in zip(CASES, two, one):
        assert moved > 1e-3, (case, moved)  # the TT cores trained: the comparison is not vacuous
        assert_close(a, b, case)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp"))
    return path, run_ranks(workers.save_checkpoint, 2, path, 10)[0]


@pytest.mark.parametrize("world_size, plan", [
    (1, {"t0": "table_wise", "t1": "row_wise", "t2": "data_parallel"}),
    (4, {"t0": "column_wise", "t1": "row_wise", "t2": "table_wise"}),
])
def test_checkpoint_of_2_ranks_loads_on_1_and_4_ranks(checkpoint, world_size, plan):
    """Model and fused-optimizer state saved with DCP at 2 ranks (RW/TW/CW) reload under another
    plan: the same eval AUC and logits, and the same losses afterwards (the Adagrad state came along)."""
    path, saved = checkpoint
    loaded = run_ranks(workers.load_checkpoint, world_size, path, plan, 10)[0]
    assert abs(loaded["auc"] - saved["auc"]) <= 1e-6, (loaded["auc"], saved["auc"])
    assert float((loaded["logits"] - saved["logits"]).abs().max()) <= 1e-5
    assert_close(loaded["next_losses"], saved["next_losses"], "losses after loading")


def test_checkpoint_with_a_renamed_or_reshaped_table_raises_naming_it(checkpoint):
    path, _ = checkpoint
    renamed = workers.table_configs(True)
    renamed[1].name = "t1_renamed"
    with pytest.raises(AssertionError, match=r"Missing key in checkpoint state_dict: \S*embedding_bags\.t1_renamed\."):
        run_ranks(workers.load_checkpoint, 1, path, {"t0": "table_wise", "t1_renamed": "row_wise",
                                                     "t2": "table_wise"}, 10, renamed)
    reshaped = workers.table_configs(True)
    reshaped[2].tt_ranks = [4, 4]
    with pytest.raises(AssertionError, match=r"Size mismatch .* \S*embedding_bags\.t2\.tt_cores"):
        run_ranks(workers.load_checkpoint, 1, path, {"t0": "table_wise", "t1": "row_wise", "t2": "table_wise"},
                  10, reshaped)


def test_qcomm_codecs_of_the_sharder_quantize_the_pooled_all_to_all():
    """TorchRec's fp16/bf16 codecs reach the TT pooled all-to-all: fp32 is exact, fp16 and bf16 are
    off by their rounding (relative 2**-11 and 2**-8 of the largest value), not more and not zero."""
    exact, fp16, bf16 = (run_ranks(workers.pooled_error_with_codecs, 2, p) for p in (None, "FP16", "BF16"))
    assert all(err == 0.0 for err, _ in exact), exact
    for results, unit in ((fp16, 2.0 ** -11), (bf16, 2.0 ** -8)):
        for err, scale in results:
            assert 0.0 < err <= unit * scale, (results, unit)
