"""The run directory: one job at a time (a lock), and the job's identity across torchrun restarts."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from ttdist.failures import Progress, gather
from ttdist.process_group import DistEnv, job_id, restart_count


def restarted(progress: Progress, env: DistEnv) -> bool:
    """Whether any rank is in a torchrun restart (a collective, so that every rank agrees).

    Like every collective of the app, on a tensor of the job's device: NCCL rejects CPU tensors.
    """
    flag = torch.tensor([progress.attempt], dtype=torch.int64, device=env.device)
    if env.world_size > 1:
        with progress.phase("start-up (do the ranks resume a restarted job?)"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) > 0


class RunDirInUse(RuntimeError):
    """Another job holds the run directory's lock; the message names that job, its host and pid."""


LOCK_FILE, JOB_FILE = ".lock", "job.json"
_HELD_LOCKS: dict[str, int] = {}  # run directory -> open lock file of this process (rank 0), held until exit


def claim_run_dir(run_dir: Path, env: DistEnv, again: bool, progress: Progress) -> str:
    """Collective: locks the run directory for this job and returns the job's id.

    The id is torchrun's run id plus a random part drawn at the job's first attempt and written
    to ``<run>/job.json`` with the job's torchrun agents (host, pid): the agents outlive torchrun
    restarts and are new for every launch, so a restarted attempt (``again``) takes its job's id
    back from the file, while an earlier job launched with the same run id (a fixed
    ``RDZV_ID``/``--rdzv_id``) is a different job. Checkpoints record it (``ttdist_meta.json``),
    as does every metrics.jsonl record.

    Rank 0 holds an exclusive ``flock`` on ``<run>/.lock`` as long as its process lives (the
    kernel releases it when the process dies, SIGKILL included: no stale lock; on NFS it is a
    lock of the server, so it works across nodes). A second job in the directory stops at start-up
    on every rank with RunDirInUse naming the holder (from its job.json). A restarted attempt
    waits up to 120 s for its own dead attempt's lock (a lost node's lock on NFS lasts a lease)."""
    with progress.phase("start-up (the run directory's lock and the job id)"):
        agents = sorted({(str(h), int(p)) for h, p in gather([socket.gethostname(), os.getppid()])})
        outcome = None
        if env.rank == 0:
            try:
                outcome = ("ok", _claim(run_dir, [list(a) for a in agents], again))
            except RunDirInUse as e:
                outcome = ("in use", str(e))
        if env.world_size > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
    if outcome[0] != "ok":
        raise RunDirInUse(outcome[1])
    return outcome[1]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _claim(run_dir: Path, agents: list[list], again: bool) -> str:
    """Rank 0's part of claim_run_dir: the job id, the lock, then ``job.json`` (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = job_id() or "local"
    record = _read_json(run_dir / JOB_FILE)
    ours = (again and record.get("run_id") == run_id and isinstance(record.get("job"), str)
            and any(a in record.get("agents", []) for a in agents))
    job = record["job"] if ours else f"{run_id}-{uuid.uuid4().hex[:12]}"
    key = str(run_dir.resolve())
    if key not in _HELD_LOCKS:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + (120 if ours else 0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_json(run_dir / JOB_FILE)
                if holder.get("job") == job and time.monotonic() < deadline:
                    time.sleep(1)  # this job's previous attempt: its rank 0 is still exiting
                    continue
                os.close(fd)
                raise RunDirInUse(_holder_message(run_dir, holder)) from None
        _HELD_LOCKS[key] = fd
    now = time.time()
    info = {"job": job, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "attempt": restart_count(), "started": record.get("started", now) if ours else now,
            "attempt_started": now,
            "agents": sorted({tuple(a) for a in agents + (record.get("agents", []) if ours else [])})}
    tmp = run_dir / f".{JOB_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / JOB_FILE)
    return job


def _holder_message(run_dir: Path, holder: dict) -> str:
    lock = run_dir / LOCK_FILE
    if not holder.get("job"):
        who = f"another job (its {JOB_FILE} is not written yet: it is starting)"
    else:
        started = holder.get("attempt_started", holder.get("started"))
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        who = (f"job {holder['job']} (rank 0 on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
               f"attempt {holder.get('attempt', '?')} started {when})")
    return (f"run directory {run_dir} is in use by {who}; two jobs in one run directory would overwrite each "
            f"other's checkpoints and metrics. Wait for it to end or use another train.name (lock: {lock})")


def release_run_dir(run_dir: Path) -> None:
    """Releases this process's lock of ``run_dir`` (process exit does it too)."""
    fd = _HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


