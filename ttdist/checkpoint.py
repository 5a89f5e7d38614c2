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

Errors: a save that fails for a file-system reason (a full disk included) raises
``OSError(errno, message, step_N.partial)`` naming the directory and the bytes of this rank's
share; other failures raise CheckpointError (DCP's CheckpointException is a BaseException).
``load_newest`` skips a damaged checkpoint (corrupt ``ttdist_meta.json``, a shard that fails to
load) with a warning naming it and falls back to the previous complete one.
"""
from __future__ import annotations

import errno
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
from torch.distributed.checkpoint.api import CheckpointException

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


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the directory and the cause.
    (DCP's own CheckpointException is a BaseException: ``except Exception`` would miss it.)"""


def _failures(error: CheckpointException) -> list[tuple[int, BaseException]]:
    out = []
    for rank, failure in sorted(error.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        out.append((rank, exc if isinstance(exc, BaseException) else RuntimeError(str(exc))))
    return out


def _describe(error: BaseException) -> str:
    """``Type: message`` of the first failing rank (one line), with the ranks that failed."""
    if isinstance(error, CheckpointException):
        failed = _failures(error)
        if failed:
            rank, exc = failed[0]
            return f"rank(s) {[r for r, _ in failed]} failed, rank {rank} with {_one_line(exc)}"
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:500]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _os_error(error: BaseException) -> Optional[OSError]:
    """The first OSError with an errno behind ``error`` (DCP's failures of every rank, causes, contexts)."""
    todo = [exc for _, exc in _failures(error)] if isinstance(error, CheckpointException) else [error]
    seen = 0
    while todo and seen < 50:
        e, seen = todo.pop(0), seen + 1
        if isinstance(e, OSError) and e.errno:
            return e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


def state_bytes(state: Any) -> int:
    """Bytes of this rank's tensors in ``state`` (local shards of ShardedTensors): about what a save writes."""
    if isinstance(state, torch.Tensor):
        if hasattr(state, "local_shards"):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in state.local_shards())
        if hasattr(state, "to_local"):  # DTensor
            state = state.to_local()
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _free_bytes(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


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
        try:
            dcp.save(state, checkpoint_id=str(partial))
        except (Exception, CheckpointException) as e:  # every rank gets DCP's gathered failures
            raise self._save_error(step, partial, state, e) from e
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

    def _save_error(self, step: int, partial: Path, state: dict, error: BaseException) -> Exception:
        """A failed DCP write as an error naming the directory: ``OSError(errno, ..., partial)`` when
        the cause is a file-system error or the disk is full (torch.save's writer reports a full
        disk as ``unexpected pos N vs M``), otherwise CheckpointError. The previous checkpoint is
        untouched; a full disk's partial directory is removed (rank 0) to give the space back."""
        needed, free = state_bytes(state), _free_bytes(self.directory)
        cause = _os_error(error)
        code = cause.errno if cause is not None else None
        if code is None and free is not None and free < needed:
            code = errno.ENOSPC
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if code is None:
            return CheckpointError(f"checkpoint save of step {step} to {partial} failed ({_describe(error)}); {kept}")
        space = (f"; this rank's share needs about {needed} bytes, {free} bytes are free on that file system"
                 if free is not None else f"; this rank's share needs about {needed} bytes")
        if code == errno.ENOSPC and self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            kept += f"; the incomplete {partial.name} was removed"
        return OSError(code, f"{os.strerror(code)} while saving checkpoint step {step} to {self.directory} "
                             f"({_describe(error)}){space}; {kept}", str(partial))

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
        """``ttdist_meta.json`` of a checkpoint; ValueError naming the file when it is corrupt."""
        file = Path(path) / META
        try:
            meta = json.loads(file.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{file}: corrupt checkpoint metadata ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("world_size", 1), int):
            raise ValueError(f"{file}: corrupt checkpoint metadata (not a JSON object with an integer world_size)")
        return meta

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> None:
        """Collective: loads ``path`` into ``state`` in place (tensors, ShardedTensors, objects).
        A damaged checkpoint raises CheckpointError (on every rank: DCP gathers the ranks' failures)."""
        if not (Path(path) / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except CheckpointException as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {_describe(e)}") from e

    def load_newest(self, make_state: Callable[[dict], dict[str, Any]], job: Optional[str] = None,
                    warn: Callable[[str], None] = print) -> Optional[tuple[Path, dict[str, Any]]]:
        """Collective: loads the newest complete checkpoint that loads (with ``job``, of that job only)
        into ``make_state(meta)``; returns (path, state), or None when there is no checkpoint.

        A damaged checkpoint (unreadable ``ttdist_meta.json``, a shard that fails to load) is
        skipped with a warning naming it, and the previous one is tried. When checkpoints exist but
        none loads, CheckpointError lists them (a failed load may have changed the state in place:
        the run must not silently start over from it)."""
        damaged = []
        for path in reversed(self.complete()):
            try:
                meta = self.meta(path)
            except (OSError, ValueError) as e:
                warn(f"warning: skipping damaged checkpoint {path}: {e}")
                damaged.append(str(path))
                continue
            if job is not None and meta.get("job") != job:
                continue
            state = make_state(meta)
            try:
                self.load(path, state)
            except CheckpointError as e:
                warn(f"warning: skipping damaged checkpoint {path} ({e}); trying the previous complete one")
                damaged.append(str(path))
                continue
            return path, state
        if damaged:
            raise CheckpointError(f"no loadable checkpoint in {self.directory}: damaged {damaged} (see the warnings "
                                  "above); move them away to start over, or repair them")
        return None


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
