"""The training app end to end under torchrun (launch/local.sh): resume and resharding."""
import shutil

import pytest
import yaml

from tests.app.common import launch, losses, reference_run, summary

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def uninterrupted():
    """12 steps on 2 ranks, checkpoints at 6 and 12 (shared with tests/reliability)."""
    run_dir = reference_run()
    return run_dir, summary(run_dir)


def test_stopped_and_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, full = uninterrupted
    launch(2, tmp_path, "split", "train.steps=6", "checkpoint.resume=false")
    resumed = summary(launch(2, tmp_path, "split", "train.steps=12", "checkpoint.resume=true").dir)
    expected, got = losses(full_dir), losses(tmp_path / "split")
    assert set(range(1, 13)) <= set(got)
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    assert resumed["auc"] == pytest.approx(full["auc"], abs=1e-6)
    assert full["auc"] > 0.55  # it learnt something: the equality is not between two untrained models


@pytest.mark.parametrize("nproc", [1, 4])
def test_two_rank_checkpoint_restores_on_other_world_sizes(uninterrupted, nproc, tmp_path):
    full_dir, full = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "full" / "checkpoints")  # the shared run stays untouched
    restored = summary(launch(nproc, tmp_path, "full", "train.steps=12", "checkpoint.resume=true",
                              "checkpoint.at_end=false").dir)
    assert restored["world_size"] == nproc
    assert restored["auc"] == pytest.approx(full["auc"], abs=1e-6)
    assert restored["logloss"] == pytest.approx(full["logloss"], rel=1e-5)


def _plain_tables(kind: str) -> list[str]:
    """train.sharding_types putting every plain (non-TT) table of the TINY config on ``kind``."""
    from tests.app.common import ROOT, TINY
    from ttdist.config import load_config

    cfg = load_config(ROOT / "configs/demo.yaml", [o for o in TINY if not o.startswith("train.world_size")])
    tt = set(cfg.tt_table_indices())
    return [f"train.sharding_types.t_cat_{t}={kind}" for t in range(26) if t not in tt]


def test_plain_tables_resume_between_data_parallel_and_sharded(uninterrupted, tmp_path):
    """The shared run replicates the plain tables (TableOptimizer); its step-6 checkpoint resumed
    with them table-wise (fbgemm's fused state) trains steps 7-12 as the run that stayed
    replicated did (rel 1e-5: row-wise Adagrad does not see DDP's mean over the ranks where
    table-wise sums them, but for eps): the weights and the optimizer state crossed over by name."""
    full_dir, _ = uninterrupted
    shared = yaml.safe_load((full_dir / "plan.yaml").read_text())["sparse_arch.embedding_bag_collection.dense"]
    assert {t["sharding_type"] for t in shared.values()} == {"data_parallel"}  # the shared run's plain tables
    (tmp_path / "moved" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step_00000006", tmp_path / "moved" / "checkpoints" / "step_00000006")
    run = launch(2, tmp_path, "moved", "train.steps=12", "checkpoint.resume=true", "checkpoint.at_end=false",
                 *_plain_tables("table_wise"))
    assert "resumed from" in run.stdout + run.stderr
    plan = yaml.safe_load((tmp_path / "moved" / "plan.yaml").read_text())
    assert {t["sharding_type"] for t in plan["sparse_arch.embedding_bag_collection.dense"].values()} == {"table_wise"}
    stayed, moved = losses(full_dir), losses(tmp_path / "moved")
    for step in range(7, 13):
        assert moved[step] == pytest.approx(stayed[step], rel=1e-5), (step, moved, stayed)
