"""One job per run directory, and a job identity that a reused torchrun run id cannot fool.

Issue 11 (round two). (1) launch/multinode.sh gave every job the torchrun run id ``ttdist``, and
the restart filter "only this job's checkpoints" compared run ids: a restarted second job in the
same run directory resumed from the first job's last checkpoint, trained nothing and reported
the first job's AUC. (6) Two jobs in one run directory deleted each other's ``.partial``
directories and interleaved metrics.jsonl; nothing stopped the second one. Now the job id is the
run id plus a part drawn at the job's first attempt (``<run>/job.json``, recognised on a restart
by the job's torchrun agents), and rank 0 holds a flock on ``<run>/.lock`` for the job's life.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.app.common import ROOT, TINY, Run, launch, losses, train_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multinode(out, name: str, *overrides: str, env: dict = None, check: bool = True) -> Run:
    """``launch/multinode.sh`` as a one-node job of 2 ranks (RDZV_ID left to the script's default)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTDIST_") and k not in ("RDZV_ID", "SLURM_JOB_ID")}
    full_env.update({"NNODES": "1", "NPROC_PER_NODE": "2", "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(_free_port()),
                     "TTDIST_MAX_RESTARTS": "0", **(env or {})})
    cmd = ["bash", str(ROOT / "launch/multinode.sh"), str(ROOT / "configs/demo.yaml"), f"train.output_dir={out}",
           f"train.name={name}", *TINY, *overrides]
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=full_env)
    run = Run(res.returncode, res.stdout, res.stderr, time.monotonic() - start, out, name)
    if check:
        assert run.returncode == 0, run.tail()
    return run


@pytest.mark.multiprocess
@pytest.mark.slow
def test_restarted_job_does_not_resume_an_earlier_jobs_checkpoint_under_the_same_run_id(tmp_path):
    """Both jobs through launch/multinode.sh with its default RDZV_ID, checkpoint.resume=false."""
    first = _multinode(tmp_path, "run", "train.steps=12", "checkpoint.every_steps=6", "checkpoint.resume=false")
    ckpt = tmp_path / "run" / "checkpoints"
    first_job = json.loads((ckpt / "step_00000012" / "ttdist_meta.json").read_text())["job"]
    # the second job is killed at the start of step 5; its restart must continue from its own step 4
    second = _multinode(tmp_path, "run", "train.steps=12", "checkpoint.every_steps=2", "checkpoint.resume=false",
                        env={"TTDIST_MAX_RESTARTS": "1", "TTDIST_FAULT_KILL_STEP": "5", "TTDIST_FAULT_KILL_RANK": "1"})
    assert "[rank 1] fault injection: SIGKILL at the start of step 5" in second.stderr, second.tail()
    assert f"resumed from {ckpt}/step_00000004 at step 4" in second.stdout, second.tail()
    assert "step_00000012 at step 12" not in second.stdout, second.tail()

    second_job = json.loads((ckpt / "step_00000012" / "ttdist_meta.json").read_text())["job"]
    assert second_job != first_job and second_job.startswith("ttdist-") and first_job.startswith("ttdist-")
    assert json.loads((tmp_path / "run" / "job.json").read_text())["job"] == second_job
    records = train_records(tmp_path / "run")
    mine = [(r["step"], r["attempt"]) for r in records if r["job"] == second_job]
    assert mine == [(s, 0) for s in range(1, 5)] + [(s, 1) for s in range(5, 13)]
    assert [r["step"] for r in records if r["job"] == first_job] == list(range(1, 13))
    assert losses(tmp_path / "run") == {r["step"]: r["loss"] for r in records if r["job"] == first_job}  # same seed


def _start_holder(out, name: str, log) -> subprocess.Popen:
    """A job that holds the run directory: rank 1 hangs at step 1, rank 0 waits in its collective."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTDIST_")}
    env.update(TTDIST_FAULT_HANG_STEP="1", TTDIST_FAULT_HANG_RANK="1")
    cmd = ["bash", str(ROOT / "launch/local.sh"), "2", str(ROOT / "configs/demo.yaml"), f"train.output_dir={out}",
           f"train.name={name}", *TINY, "train.steps=3", "checkpoint.resume=false", "train.collective_timeout_s=300"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_second_job_in_the_same_run_dir_fails_at_start_naming_the_holder(tmp_path):
    log_path = tmp_path / "holder.log"
    with open(log_path, "w") as log:
        holder = _start_holder(tmp_path, "shared", log)
    try:
        deadline = time.monotonic() + 300
        while "fault injection: hanging at the start of step 1" not in log_path.read_text():
            assert holder.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        config = (tmp_path / "shared" / "config.yaml").read_text()
        second = launch(2, tmp_path, "shared", "train.steps=2", "checkpoint.resume=false", check=False, timeout=300)
        assert second.returncode != 0, second.tail()
        holder_info = json.loads((tmp_path / "shared" / "job.json").read_text())
        for rank in (0, 1):
            m = re.search(rf"\[rank {rank}\] RunDirInUse: run directory {tmp_path / 'shared'} is in use by job "
                          rf"(\S+) \(rank 0 on host (\S+), pid (\d+), attempt 0 started [-\d: +]+\); two jobs in one "
                          rf"run directory would overwrite each other's checkpoints and metrics\. Wait for it to end "
                          rf"or use another train\.name \(lock: {tmp_path / 'shared' / '.lock'}\)\n", second.stderr)
            assert m, second.tail()
            assert (m.group(1), m.group(2), int(m.group(3))) == \
                (holder_info["job"], socket.gethostname(), holder_info["pid"])
        assert holder.poll() is None  # the holder is untouched ...
        assert (tmp_path / "shared" / "config.yaml").read_text() == config  # ... and so is its run directory
    finally:
        _stop(holder)


def _stop(job: subprocess.Popen) -> None:
    """SIGTERM first: torchrun's agent then stops its workers (they live in their own sessions, so
    a SIGKILL of the agent's group alone would leave them running); SIGKILL what is left."""
    os.killpg(job.pid, signal.SIGTERM)
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


HOLD = """\
import os, sys, time
from pathlib import Path
from ttdist.run_dir import _claim
print(_claim(Path(sys.argv[1]), [["h", 1]], False), flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_job_does_not_block_and_a_live_one_does(tmp_path):
    """In process: the holder is a process that took the lock (rank 0's part of claim_run_dir)."""
    from ttdist.run_dir import RunDirInUse, _claim, release_run_dir

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        job = holder.stdout.readline().strip()
        assert job.startswith("local-"), job
        with pytest.raises(RunDirInUse, match=rf"run directory {run_dir} is in use by job {job} \(rank 0 on host "
                                              rf"\S+, pid {holder.pid}, attempt 0 started "):
            _claim(run_dir, [["h", 2]], False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ".lock").exists()  # the dead job's lock file stays, its lock does not
    mine = _claim(run_dir, [["h", 2]], False)
    try:
        assert mine != job and json.loads((run_dir / "job.json").read_text())["pid"] == os.getpid()
        # a restart of this job (same agent) takes its id back; a new job (other agents) gets a new one
        assert _claim(run_dir, [["h", 2]], True) == mine
        assert _claim(run_dir, [["h", 3]], True) != mine
    finally:
        release_run_dir(run_dir)
