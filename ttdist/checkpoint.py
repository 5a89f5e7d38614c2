"""Crash-safe checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<run>/checkpoints/``: one directory per save, ``step_<N>`` (8 digits). A save
writes into ``step_<N>.partial`` (every rank its shards, DCP's collective protocol), then rank 0
writes ``ttdist_meta.json`` and the completion marker ``COMPLETE`` last, fsyncs, and renames the
directory to ``step_<N>`` (atomic on POSIX). Only directories named ``step_<N>`` holding
``COMPLETE`` are ever loaded, so a crash at any point of a save leaves the previous checkpoint
as the newest loadable one; older checkpoints are pruned (keeping ``keep_last_n``) only after
the new one is complete, together with the ``.partial`` directories of earlier interrupted
saves. DCP stores sharded tensors by global offsets, so a checkpoint saved with N ranks loads
with M ranks (resharding). Assumes a file system shared by all ranks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MARKER, META = "COMPLETE", "ttdist_meta.json"
_NAME = re.compile(r"^step_(\d{8})$")
_PARTIAL = re.compile(r"^step_(\d{8})\.partial$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and finds complete checkpoints of one run (see the module docstring)."""

    def __init__(self, directory: Path, keep_last_n: int = 2, fault: Optional[Callable[[int], None]] = None) -> None:
        """``fault(step)``, when given, is called inside ``save`` after every rank wrote its shards
        to ``step_N.partial`` and before the directory is marked complete (fault-injection tests)."""
        if isinstance(keep_last_n, bool) or not isinstance(keep_last_n, int) or keep_last_n < 1:
            raise ValueError(f"keep_last_n must be an integer >= 1, got {keep_last_n!r}")
        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.fault = fault
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self, job: Optional[str] = None) -> Optional[Path]:
        """The newest complete checkpoint; with ``job``, the newest saved with ``meta={"job": job}``."""
        done = self.complete()
        if job is not None:
            done = [p for p in done if _read_meta(p).get("job") == job]
        return done[-1] if done else None

    def incomplete(self) -> list[Path]:
        """Directories of interrupted saves (``step_N.partial``, or ``step_N`` without the marker): never loaded."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and (
            _PARTIAL.match(p.name) or (_NAME.match(p.name) and not (p / MARKER).is_file()))]
        return sorted(found, key=lambda p: p.name)

    def save(self, step: int, state: dict[str, Any], meta: Optional[dict] = None) -> Path:
        """Collective: every rank calls it with its state; returns the complete directory."""
        final = self.directory / f"step_{step:08d}"
        partial = self.directory / f"step_{step:08d}.partial"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save
        _barrier()
        dcp.save(state, checkpoint_id=str(partial))
        _barrier()
        if self.fault is not None:
            self.fault(step)
        if self.rank == 0:
            info = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "time": time.time(), **(meta or {})}
            (partial / META).write_text(json.dumps(info, indent=2))
            with open(partial / MARKER, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(partial)
            if final.exists():  # the same step saved again (e.g. after a restart): replace it
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(self.directory)
            self._prune(final, step)
        _barrier()
        return final

    def _prune(self, saved: Path, step: int) -> None:
        """Keeps ``saved`` and the newest ``keep_last_n - 1`` other complete checkpoints (another
        job's newer checkpoint in the directory never pushes out the one just written); removes the
        ``.partial`` leftovers of saves of earlier steps."""
        others = [p for p in self.complete() if p != saved]
        for old in others[: max(len(others) - (self.keep_last_n - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.directory.iterdir():
            m = _PARTIAL.match(p.name)
            if m and int(m.group(1)) < step:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def meta(path: Path) -> dict:
        return json.loads((Path(path) / META).read_text())

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> None:
        """Collective: loads ``path`` into ``state`` in place (tensors, ShardedTensors, objects)."""
        if not (Path(path) / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
        dcp.load(state, checkpoint_id=str(path))


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states (torch CPU, and CUDA when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
