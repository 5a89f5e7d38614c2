"""Hangs and failing ranks: a job never waits longer than train.collective_timeout_s.

End to end (torchrun, 2 CPU ranks): a rank that stops taking part in collectives
(TTDIST_FAULT_HANG_*) makes its peer fail after the timeout with an error naming the
collective, the phase and the missing rank; a rank that raises (a bad index,
TTDIST_FAULT_BAD_INDEX_*) makes every rank raise at once, the others with its error (PeerError). The subprocess timeout is the hang
detector. In process: apply_collective_timeout puts every process group, including those
created later by dist.new_group (30 minutes by default on gloo), under the configured timeout.
"""
import re
from datetime import timedelta

import pytest

from tests.app.common import launch

TIMEOUT_S = 10
SHORT = ("train.steps=3", "checkpoint.at_end=false", "checkpoint.resume=false", "data.eval_batches=1")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hung_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    run = launch(2, tmp_path, "hang", *SHORT, f"train.collective_timeout_s={TIMEOUT_S}", check=False, timeout=240,
                 env={"TTDIST_FAULT_HANG_STEP": "2", "TTDIST_FAULT_HANG_RANK": "1"})
    assert run.returncode != 0, run.tail()
    assert "[rank 1] fault injection: hanging at the start of step 2" in run.stderr
    # the first collective of a step: an all-to-all, or an all-reduce where every table is replicated
    m = re.search(r"\[rank 0\] CollectiveError: rank 0: collective (?:all_to_all_single|all_reduce)(?: \(async\))? "
                  r"\(the last one this rank issued\) "
                  r"in 'step 2 forward' timed out after ([\d.]+) s \(train.collective_timeout_s = 10\); "
                  r"rank\(s\) \[1\] never reached this collective \(hung or dead\); last phase per rank: "
                  r"rank 0: 'step 2 forward' [^\n]*; rank 1: 'step 1 backward'", run.stderr)
    assert m, run.tail()
    assert TIMEOUT_S - 0.5 <= float(m.group(1)) <= TIMEOUT_S + 20  # failed after the timeout, not later


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bad_index_on_one_rank_makes_every_rank_fail(tmp_path):
    run = launch(2, tmp_path, "badindex", *SHORT, check=False, timeout=240,
                 env={"TTDIST_FAULT_BAD_INDEX_STEP": "2", "TTDIST_FAULT_BAD_INDEX_RANK": "1"})
    assert run.returncode != 0, run.tail()
    m = re.search(r"\[rank 1\] IndexError: table '(t_cat_\d+)', feature '(cat_\d+)': index (\d+) is out of range "
                  r"\[0, (\d+)\) on rank 1\n", run.stderr)
    assert m and m.group(3) == m.group(4), run.tail()
    assert (f"[rank 0] PeerError: rank 1 stopped in 'step 2 forward' with IndexError: table '{m.group(1)}', "
            f"feature '{m.group(2)}': index {m.group(3)} is out of range [0, {m.group(4)}) on rank 1\n") in run.stderr, \
        run.tail()


def test_every_process_group_gets_the_collective_timeout(tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from ttdist.process_group import apply_collective_timeout

    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)  # restored afterwards
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                           timeout=timedelta(seconds=60))
    try:
        before = dist.new_group(backend="gloo")

        def timeout_of(group) -> timedelta:
            return group._get_backend(torch.device("cpu")).options._timeout

        assert timeout_of(before) == timedelta(minutes=30)  # what torch gives a new group: the hang this fixes
        apply_collective_timeout(7.0)
        after = dist.new_group(backend="gloo")
        assert {timeout_of(g) for g in (dist.group.WORLD, before, after)} == {timedelta(seconds=7)}
    finally:
        dist.destroy_process_group()
