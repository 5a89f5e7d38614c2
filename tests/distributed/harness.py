"""Runs a function on W fresh gloo ranks and returns each rank's result (multi-process tests).

The ranks are forked from a fork server (multiprocessing's ``forkserver``) that imported torch,
TorchRec, ttdist and the tests' rank functions once: each rank is a new process, as with
``spawn``, without paying those imports again (about 5 s of CPU per rank).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 - before init_process_group: see the note in ttdist/train.py
import torch.multiprocessing as mp


# Imported once by the fork server; a module missing here is imported by the rank that needs it.
PRELOAD = ["torch", "torch.distributed.nn", "torchrec.distributed.model_parallel", "torchrec.distributed.train_pipeline",
           "torch.distributed.checkpoint", "ttdist", "ttdist.distributed", "tests.distributed.workers",
           "tests.distributed.plan_workers", "tests.distributed.standard_path_workers",
           "tests.distributed.default_planner_workers"]
multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()
    # Whatever still holds the process group (the rank function's objects may), its gloo threads
    # must not meet the interpreter's shutdown (pytorch/pytorch#190489: SIGABRT). The result is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world_size: int, *args: Any, start_method: str = "forkserver") -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; raises if any rank raised. ``start_method``
    "spawn": ranks in new interpreters, for a function that must see what was not imported yet."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size,
                           join=True, start_method=start_method)
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]
