"""The training app end to end under torchrun (launch/local.sh): resume and resharding."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.cardinality_scale=0.002", "data.batch_size=256", "data.eval_batches=4", "model.tt_ranks=[4, 4]",
        "model.dense_arch_layer_sizes=[16, 16]", "model.over_arch_layer_sizes=[16, 1]", "train.progress_bar=false",
        "train.log_every_steps=1", "train.eval_every_steps=0", "train.world_size=0"]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def launch(nproc: int, out: Path, name: str, *overrides: str) -> dict:
    cmd = ["bash", str(ROOT / "launch/local.sh"), str(nproc), str(ROOT / "configs/demo.yaml"),
           f"train.output_dir={out}", f"train.name={name}", *TINY, *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / name / "summary.json").read_text())


def losses(out: Path, name: str) -> dict[int, float]:
    lines = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return out, launch(2, out, "full", "train.steps=12", "checkpoint.every_steps=6", "checkpoint.resume=false")


def test_stopped_and_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    out, full = uninterrupted
    launch(2, tmp_path, "split", "train.steps=6", "checkpoint.resume=false")
    resumed = launch(2, tmp_path, "split", "train.steps=12", "checkpoint.resume=true")
    expected, got = losses(out, "full"), losses(tmp_path, "split")
    assert set(range(1, 13)) <= set(got)
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    assert resumed["auc"] == pytest.approx(full["auc"], abs=1e-6)
    assert full["auc"] > 0.55  # it learnt something: the equality is not between two untrained models


@pytest.mark.parametrize("nproc", [1, 4])
def test_two_rank_checkpoint_restores_on_other_world_sizes(uninterrupted, nproc):
    out, full = uninterrupted
    restored = launch(nproc, out, "full", "train.steps=12", "checkpoint.resume=true", "checkpoint.at_end=false")
    assert restored["world_size"] == nproc
    assert restored["auc"] == pytest.approx(full["auc"], abs=1e-6)
    assert restored["logloss"] == pytest.approx(full["logloss"], rel=1e-5)
