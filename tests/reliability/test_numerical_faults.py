"""Non-finite losses and inputs under torchrun (2 CPU ranks): stop, skip, and bad dense input.

Faults come from TTDIST_FAULT_NAN_STEP / _RANK / _KIND (ttdist.faults.Faults). Every failing
job must exit non-zero with the error on stderr of every rank (each rank raises the same
NonFiniteError, because the finiteness flags are all-reduced before anything else happens).
"""
import re

import pytest

from tests.app.common import launch, losses, reference_run, summary, train_records

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
SHORT = ("train.steps=3", "checkpoint.at_end=false", "checkpoint.resume=false", "data.eval_batches=1")


def _nan(kind: str, rank: int, step: int = 2) -> dict:
    return {"TTDIST_FAULT_NAN_STEP": str(step), "TTDIST_FAULT_NAN_RANK": str(rank), "TTDIST_FAULT_NAN_KIND": kind}


def _both_ranks_raised(stderr: str, error: str) -> list[str]:
    # not anchored at a line start: another rank's partial line may precede it on the shared pipe
    lines = [re.search(rf"\[rank {r}\] {error}: ([^\n]*)", stderr) for r in (0, 1)]
    assert all(lines), stderr[-4000:]
    return [m.group(1) for m in lines]


def test_nonfinite_loss_stops_naming_the_step_and_first_nonfinite_parameter(tmp_path):
    run = launch(2, tmp_path, "stop", *SHORT, "train.nonfinite=stop", env=_nan("param", rank=1), check=False)
    assert run.returncode != 0, run.tail()
    poisoned = re.search(r"\[rank 1\] fault injection: NaN in parameter (\S+) before step 2", run.stderr)
    assert poisoned and "._cores.t" in poisoned.group(1), run.tail()
    messages = _both_ranks_raised(run.stderr, "NonFiniteError")
    assert messages[0] == messages[1]  # every rank reports the same culprit, found on rank 1
    assert re.fullmatch(r"step 2: the loss is not finite on rank\(s\) \[.*\]; first non-finite parameter: "
                        r"\S+\.tt\.embedding_bags\.t_cat_\d+\.tt_cores\.[1-9] on rank 1",
                        messages[0]), messages[0]
    assert [r["step"] for r in train_records(tmp_path / "stop")] == [1]  # nothing logged for the bad step


def test_nonfinite_loss_is_skipped_and_counted_with_nonfinite_skip(tmp_path):
    run = launch(2, tmp_path, "skip", "train.steps=4", "checkpoint.at_end=false", "checkpoint.resume=false",
                 "train.nonfinite=skip", env=_nan("loss", rank=0))
    assert "[rank 0] fault injection: NaN loss at step 2" in run.stderr
    assert summary(tmp_path / "skip")["nonfinite_steps_skipped"] == 1
    records = {r["step"]: r for r in train_records(tmp_path / "skip")}
    assert records[2]["skipped"] == "nonfinite_loss" and "loss" not in records[2]
    got = losses(tmp_path / "skip")
    assert sorted(got) == [1, 3, 4] and all(v == v and abs(v) < 10 for v in got.values())
    assert got[1] == losses(reference_run())[1]  # before the fault: the uninterrupted run


def test_nonfinite_dense_input_names_feature_and_batch_position(tmp_path):
    run = launch(2, tmp_path, "input", *SHORT, env=_nan("input", rank=1), check=False)
    assert run.returncode != 0, run.tail()
    for message in _both_ranks_raised(run.stderr, "NonFiniteError"):
        assert message == ("step 2: non-finite dense input on rank(s) [1]: dense feature 5 of sample 3 of rank 1's "
                           "local batch (sample 131 of the global batch of step 2) is NaN"), message
