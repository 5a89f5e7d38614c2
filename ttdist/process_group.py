"""The process group and torchrun's environment: rank, device, collective timeouts, attempts.

``init_distributed`` turns torchrun's environment (or none: one local rank) into a ``DistEnv`` and
a process group whose every collective fails after ``train.collective_timeout_s`` instead of
hanging.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
# Before any process group exists (issue 16): torch.distributed.nn's functions take
# `group=group.WORLD` as a default argument, evaluated at its first import. Imported later (torch's
# ShardedTensor ops import it lazily, e.g. at the first checkpoint), the defaults hold the job's
# process group past destroy_process_group; its gloo threads then die with the interpreter:
# "terminate called without an active exception", SIGABRT, after a finished run.
import torch.distributed.nn  # noqa: F401

from ttdist.config import Config


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device


def init_distributed(cfg: Config) -> DistEnv:
    """Process group from torchrun's environment (one local rank when run without torchrun).

    Every collective fails after ``train.collective_timeout_s`` instead of hanging.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.train.backend in ("auto", "nccl")
    backend = cfg.train.backend if cfg.train.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    warn_shared_store_restart(int(os.environ["RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    apply_collective_timeout(cfg.train.collective_timeout_s)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def apply_collective_timeout(seconds: float) -> None:
    """Puts every existing process group, and those created later without an explicit timeout,
    under ``seconds`` (init_process_group's timeout covers only the default group: a
    ``dist.new_group()`` would otherwise wait 30 minutes on gloo, 10 on NCCL)."""
    timeout = timedelta(seconds=seconds)
    c10d = dist.distributed_c10d
    # _get_default_timeout() reads these module globals when a group is created without a timeout.
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if set_timeout is None or not dist.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        set_timeout(timeout, group)


def restart_count() -> int:
    """torchrun's attempt number (TORCHELASTIC_RESTART_COUNT): 0 for the first run, 0 without torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_id() -> Optional[str]:
    """torchrun's run id (the same in every attempt of one job; random per ``--standalone`` job,
    but whatever the user chose with ``--rdzv_id``: not unique per job, see claim_run_dir)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def warn_shared_store_restart(rank: int) -> None:
    """On a torchrun restart, a rendezvous store shared with the agent still holds the dead
    attempt's keys, and process-group set-up can connect to the dead ranks' addresses
    (pytorch/pytorch#135712): launch/*.sh set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    if (rank == 0 and restart_count() > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        print("warning: torchrun restarted this job with a rendezvous store shared across attempts; if the process "
              "group set-up fails to connect, launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/*.sh do)",
              file=sys.stderr, flush=True)

