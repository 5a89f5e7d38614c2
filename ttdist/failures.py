"""How a failure is detected and described, on every rank alike (docs/reliability.md).

Every collective runs under ``train.collective_timeout_s``; one that fails is re-raised by
``Progress.phase`` as a CollectiveError naming the phase, the collective (``CollectiveTrace``) and
the ranks that never reached it, or as the PeerError of the rank that stopped first. Non-finite
inputs and losses stop every rank with the same NonFiniteError (``agree_step_health``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ttdist.process_group import DistEnv


class NonFiniteError(FloatingPointError):
    """A non-finite loss (or input) stopped the run; the message names the step and the culprit."""


def agree_step_health(bad_input: bool, loss: torch.Tensor) -> tuple[list[int], list[int]]:
    """The ranks with a non-finite dense input and those with a non-finite loss, the same on every
    rank: one all-reduce of a (world, 2) flag tensor on the loss's device (NCCL rejects CPU tensors)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, 2, dtype=torch.int64, device=loss.device)  # [rank] = (input bad, loss bad)
    flags[rank, 0] = int(bad_input)
    flags[rank, 1] = (~torch.isfinite(loss.detach())).to(torch.int64)
    if world > 1:
        dist.all_reduce(flags)
    flags = flags.cpu()
    return torch.nonzero(flags[:, 0]).flatten().tolist(), torch.nonzero(flags[:, 1]).flatten().tolist()


def gather(obj) -> list:
    """Every rank's ``obj`` (a collective; [obj] on one rank)."""
    if dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_nonfinite_dense(dense: torch.Tensor) -> Optional[tuple[int, int, str]]:
    """(sample, feature, 'NaN'|'Inf') of the first non-finite dense input, or None."""
    bad = ~torch.isfinite(dense)
    if not bool(bad.any()):
        return None
    sample, feature = (int(x) for x in torch.nonzero(bad)[0])
    return sample, feature, "NaN" if torch.isnan(dense[sample, feature]) else "Inf"


def first_nonfinite_parameter(model: torch.nn.Module) -> Optional[str]:
    """The first state_dict entry of this rank (weights and buffers; TT cores are named
    ``...embedding_bags.<table>.tt_cores.<k>``) holding a NaN or Inf; None when all are finite."""
    for name, value in model.state_dict().items():
        tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor)):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Hangs and dead peers: every collective runs under train.collective_timeout_s (set on every
# process group); a collective that fails is reported naming the operation and the ranks.
# ---------------------------------------------------------------------------------------------
class CollectiveError(RuntimeError):
    """A collective timed out or lost its peer; the message names the operation and the ranks."""


class PeerError(RuntimeError):
    """Another rank raised (e.g. a bad index in its batch) and this rank's next collective failed
    for it; the message is that rank's error."""


_COMM_ERROR = re.compile(r"gloo|nccl|timed out|timeout|connection (?:reset|closed|refused)|broken pipe|"
                         r"socket|peer|DistBackendError|ProcessGroup", re.IGNORECASE)


def _is_comm_error(error: BaseException) -> bool:
    seen = 0
    e: Optional[BaseException] = error
    while e is not None and seen < 5:
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COMM_ERROR.search(str(e))):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class CollectiveTrace:
    """Remembers the last collective this process issued through ``torch.distributed`` (TorchRec's
    all-to-alls, ttdist's all-reduces, DCP's object collectives...) so that a failure can name it.
    ``install()`` wraps the module's collective functions once (a name assignment per call); DDP's
    gradient all-reduce is issued from C++ and is not seen."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
             "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "gather",
             "gather_object", "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor")
    last: Optional[str] = None
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        for name in cls.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_ttdist_traced", False):
                setattr(dist, name, cls._wrap(name, fn))
        cls.installed = True

    @classmethod
    def _wrap(cls, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            cls.last = name + (" (async)" if kwargs.get("async_op") else "")
            return fn(*args, **kwargs)

        traced._ttdist_traced = True
        return traced


class Progress:
    """Where each rank is: every rank publishes the phase it enters (e.g. ``step 5 forward``) in
    the process group's key-value store (torchrun's agent hosts it, so it outlives a dead rank).
    When a collective of a phase fails, ``phase`` re-raises it as a CollectiveError naming the
    phase, this rank, how long it waited, and every rank's last published phase — the ranks that
    never reached this phase are the dead or hung ones. Costs one store write per phase (two per
    training step)."""

    def __init__(self, env: DistEnv, timeout_s: float, attempt: int = 0) -> None:
        self.rank, self.world, self.timeout_s, self.attempt = env.rank, env.world_size, timeout_s, attempt
        self.seq = 0
        self.store = None
        if env.world_size > 1:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - reports lose the other ranks' phases, nothing else
                self.store = None
        self.prefix = f"ttdist/progress/attempt{attempt}/rank"

    @classmethod
    def disabled(cls) -> "Progress":
        return cls(DistEnv(dist.get_rank() if dist.is_initialized() else 0, 1, torch.device("cpu")), 0.0)

    @contextlib.contextmanager
    def phase(self, where: str) -> Iterator[None]:
        self.seq += 1
        seq, start = self.seq, time.monotonic()
        CollectiveTrace.last = None
        if self.store is not None:
            try:
                self.store.set(f"{self.prefix}{self.rank}", json.dumps([seq, where, time.time()]))
            except Exception:  # noqa: BLE001 - the store is gone: the collective below will say so
                pass
        try:
            yield
        except (NonFiniteError, CollectiveError, PeerError):
            raise
        except Exception as e:
            if self.world <= 1:
                raise
            if not _is_comm_error(e):
                self._publish_error(where, e)
                raise
            peer = self._peer_error()
            if peer is not None:
                raise PeerError(peer) from e
            raise CollectiveError(self.describe(where, seq, time.monotonic() - start, e)) from e

    def _error_key(self, rank: int) -> str:
        return f"ttdist/error/attempt{self.attempt}/rank{rank}"

    def _publish_error(self, where: str, error: BaseException) -> None:
        """This rank's own error, for the peers whose collectives fail when it stops (no
        collective is needed to tell them: bad input costs nothing on the steps that are fine)."""
        if self.store is not None:
            try:
                self.store.set(self._error_key(self.rank), json.dumps([type(error).__name__, str(error), where]))
            except Exception:  # noqa: BLE001 - the peers then report a lost connection instead
                pass

    def _peer_error(self) -> Optional[str]:
        for r in range(self.world):
            if r == self.rank or self.store is None:
                continue
            try:
                if not self.store.check([self._error_key(r)]):
                    continue
                name, message, where = json.loads(self.store.get(self._error_key(r)))
            except Exception:  # noqa: BLE001 - the store is gone too: report the collective
                return None
            return f"rank {r} stopped in '{where}' with {name}: {message}"
        return None

    def describe(self, where: str, seq: int, waited: float, error: BaseException) -> str:
        text = " ".join(str(error).split())
        cause = ("timed out" if re.search(r"timed? ?out", text, re.IGNORECASE)
                 else "lost its connection to a peer (a rank died?)")
        op = (f"collective {CollectiveTrace.last} (the last one this rank issued)" if CollectiveTrace.last
              else "collective (none issued from Python in this phase: DDP's gradient all-reduce)")
        return (f"rank {self.rank}: {op} in '{where}' {cause} after {waited:.1f} s "
                f"(train.collective_timeout_s = {self.timeout_s:g}); {self.peers(seq)}. "
                f"Underlying error: {text[:300]}")

    def peers(self, seq: int) -> str:
        if self.store is None:
            return "the other ranks' progress is unknown (no store)"
        parts, behind = [], []
        for r in range(self.world):
            key = f"{self.prefix}{r}"
            try:
                if not self.store.check([key]):
                    parts.append(f"rank {r}: nothing published")
                    behind.append(r)
                    continue
                their_seq, their_where, t = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001
                return "the other ranks' progress is unknown (the store is unreachable)"
            parts.append(f"rank {r}: '{their_where}' ({time.time() - t:.1f} s ago)")
            if their_seq < seq:
                behind.append(r)
        verdict = (f"rank(s) {behind} never reached this collective (hung or dead)" if behind
                   else "every rank reached this phase (a rank died or hung inside it)")
        return f"{verdict}; last phase per rank: " + "; ".join(parts)


def say(line: str) -> None:
    """One line on stderr in a single write, so that the ranks sharing torchrun's stderr do not
    split it (atomic on a pipe up to 4 KiB)."""
    sys.stderr.flush()
    data = (line.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(sys.stderr.fileno(), data):]

