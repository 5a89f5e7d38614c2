"""The training app end to end under torchrun (launch/local.sh): resume and resharding."""
import shutil

import pytest

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
