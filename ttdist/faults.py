"""Fault injection for the reliability tests (docs/reliability.md): the TTDIST_FAULT_* hooks.

Loaded by ``ttdist.train`` only when a ``TTDIST_FAULT_*`` variable is set (``fault_hooks``); a
normal run never imports this module.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ttdist.config import Config
from ttdist.failures import say
from ttdist.process_group import restart_count


@dataclass
class Faults:
    """Test hooks, read once from the environment at start-up; all unset in normal runs.

    Steps are 1-based, as in metrics.jsonl. Every hook fires only on the first attempt
    (TORCHELASTIC_RESTART_COUNT unset or 0), so a job restarted by torchrun runs clean.

    ``TTDIST_FAULT_KILL_STEP=N``, ``TTDIST_FAULT_KILL_RANK=r`` (default 0): rank r SIGKILLs
        itself at the start of step N (steps 1..N-1 and their checkpoints are done).
    ``TTDIST_FAULT_KILL_IN_SAVE=N`` (rank ``TTDIST_FAULT_KILL_RANK``): SIGKILL inside the save of
        checkpoint step N, after every rank wrote its shards to ``step_N.partial``, before the
        COMPLETE marker and the rename.
    ``TTDIST_FAULT_HANG_STEP=N``, ``TTDIST_FAULT_HANG_RANK=r`` (default 0): rank r sleeps forever
        at the start of step N (it stops taking part in collectives).
    ``TTDIST_FAULT_NAN_STEP=N``, ``TTDIST_FAULT_NAN_RANK=r`` (default 0),
    ``TTDIST_FAULT_NAN_KIND`` (default ``input``): at step N on rank r, ``input`` sets dense
        feature 5 of local sample 3 to NaN; ``loss`` makes the loss NaN (finite inputs and
        parameters); ``param`` fills one TT core of rank r with NaN before the forward.
    ``TTDIST_FAULT_BAD_INDEX_STEP=N``, ``TTDIST_FAULT_BAD_INDEX_RANK=r`` (default 0): at step N,
        local sample 0 of the first TT table's feature on rank r gets the index ``num_embeddings``
        (one past the last row).
    """

    rank: int = 0
    kill_step: Optional[int] = None
    kill_in_save: Optional[int] = None
    kill_rank: int = 0
    hang_step: Optional[int] = None
    hang_rank: int = 0
    nan_step: Optional[int] = None
    nan_rank: int = 0
    nan_kind: str = "input"
    bad_index_step: Optional[int] = None
    bad_index_rank: int = 0

    NAN_KINDS = ("input", "loss", "param")
    NAN_SAMPLE, NAN_FEATURE = 3, 5

    @classmethod
    def from_env(cls, rank: int, environ: Optional[Mapping[str, str]] = None, attempt: Optional[int] = None) -> "Faults":
        environ = os.environ if environ is None else environ
        attempt = restart_count() if attempt is None else attempt

        def num(name: str, default: Optional[int], minimum: int) -> Optional[int]:
            raw = environ.get(f"TTDIST_FAULT_{name}")
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                value = minimum - 1
            if value < minimum:
                raise ValueError(f"TTDIST_FAULT_{name} must be an integer >= {minimum}, got {raw!r}")
            return value

        kind = environ.get("TTDIST_FAULT_NAN_KIND") or "input"
        if kind not in cls.NAN_KINDS:
            raise ValueError(f"TTDIST_FAULT_NAN_KIND must be one of {cls.NAN_KINDS}, got {kind!r}")
        faults = cls(rank=rank, kill_step=num("KILL_STEP", None, 1), kill_in_save=num("KILL_IN_SAVE", None, 1),
                     kill_rank=num("KILL_RANK", 0, 0), hang_step=num("HANG_STEP", None, 1),
                     hang_rank=num("HANG_RANK", 0, 0), nan_step=num("NAN_STEP", None, 1),
                     nan_rank=num("NAN_RANK", 0, 0), nan_kind=kind, bad_index_step=num("BAD_INDEX_STEP", None, 1),
                     bad_index_rank=num("BAD_INDEX_RANK", 0, 0))
        return faults if attempt == 0 else cls(rank=rank)

    def _say(self, what: str) -> None:
        sys.stdout.flush()
        say(f"[rank {self.rank}] fault injection: {what}")

    def at_step_start(self, step: int) -> None:
        if self.kill_step == step and self.rank == self.kill_rank:
            self._say(f"SIGKILL at the start of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_step == step and self.rank == self.hang_rank:
            self._say(f"hanging at the start of step {step}")
            while True:
                time.sleep(3600)

    def in_checkpoint_save(self, step: int) -> None:
        """Checkpointer's hook: called after every rank wrote step_N.partial, before it is marked complete."""
        if self.kill_in_save == step and self.rank == self.kill_rank:
            self._say(f"SIGKILL while saving checkpoint step {step} (shards written, not marked complete)")
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_batch(self, batch, step: int, cfg: Config):
        if self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "input":
            dense = batch.dense_features.clone()
            dense[min(self.NAN_SAMPLE, dense.shape[0] - 1), self.NAN_FEATURE] = float("nan")
            batch = type(batch)(dense_features=dense, sparse_features=batch.sparse_features, labels=batch.labels)
            self._say(f"NaN in dense feature {self.NAN_FEATURE} of local sample {self.NAN_SAMPLE} at step {step}")
        if self.bad_index_step == step and self.rank == self.bad_index_rank and cfg.tt_table_indices():
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

            kjt = batch.sparse_features
            t = cfg.tt_table_indices()[0]
            rows = cfg.table_rows()[t]
            values = kjt.values().clone()
            values[kjt.offset_per_key()[t]] = rows
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride())
            batch = type(batch)(dense_features=batch.dense_features, sparse_features=kjt, labels=batch.labels)
            self._say(f"index {rows} (out of range) for feature {kjt.keys()[t]} at step {step}")
        return batch

    def poison_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "loss":
            self._say(f"NaN loss at step {step}")
            return loss * float("nan")
        return loss

    def poison_parameters(self, model: torch.nn.Module, step: int) -> None:
        if not (self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "param"):
            return
        params = [(k, p) for k, p in model.named_parameters() if "._cores." in k and p.numel()]
        # a core G_k with k >= 1 takes part in every lookup of its table: the loss is surely NaN
        later = [(k, p) for k, p in params if not k.split("._cores.")[1].split("_c")[1].startswith("0")]
        name, param = (later or params or [(k, p) for k, p in model.named_parameters() if p.numel()])[0]
        with torch.no_grad():
            param.fill_(float("nan"))
        self._say(f"NaN in parameter {name} before step {step}")


