"""Input and output distribution of one sharding-type group of a sharded TT collection.

Symbols: W ranks, B local batch size (uniform across ranks), B_g = W * B. A *unit* is one
(feature, table shard) lookup; its pooled output has the shard's columns.

* ``TwCwDist`` (table_wise and column_wise): each unit lives on one rank. Input: the KJT of
  the units, sorted by rank, goes through TorchRec's ``KJTAllToAll`` (a column-wise feature is
  sent to every shard's rank). Output: each rank's [B_g, sum D_units] goes back through
  TorchRec's ``PooledEmbeddingsAllToAll`` (the butterfly shuffle) as [B, sum D_all units].
* ``RwDist`` (row_wise): indices are bucketed by row block (TorchRec's
  ``bucketize_kjt_before_all2all``; values become local rows) and exchanged; each rank pools
  its rows into partial sums [B_g, sum D], which go back through the pooled all-to-all and are
  summed locally — a reduce-scatter built from an all-to-all, so it runs on gloo and NCCL.
* ``DpDist`` (data_parallel): no communication; each rank looks up its own batch.

With W = 1 no collective is issued. Byte counts of every collective: ``ttdist.distributed.comm_volume``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.embedding_sharding import bucketize_kjt_before_all2all
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class Ready(Awaitable):
    """An awaitable whose value is computed on wait() (or already known)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__()
        self._fn = fn

    def _wait_impl(self):
        return self._fn()


@dataclass
class Unit:
    """One (feature, shard) lookup: ``feature`` indexes the collection's features."""

    feature: int
    table: int
    shard_index: int
    rank: int  # -1: on every rank (row_wise, data_parallel)
    columns: tuple[int, int]  # output columns of the table computed by this unit
    row_block: int = 0  # row_wise: rows per bucket


def _wait_all(stage: Awaitable) -> Awaitable:
    """KJTAllToAll returns an awaitable of an awaitable (splits first, then tensors)."""
    return Ready(lambda: stage.wait().wait())


class TwCwDist:
    """table_wise / column_wise group (see module docstring)."""

    def __init__(self, units: list[Unit], dims: list[int], pg, world_size: int, rank: int) -> None:
        self.units = sorted(units, key=lambda u: u.rank)  # stable: config order within a rank
        self.local_units = [u for u in self.units if u.rank == rank]
        self.world_size = world_size
        self.perm = [u.feature for u in self.units]
        splits = [sum(1 for u in self.units if u.rank == r) for r in range(world_size)]
        self.dim_per_rank = [sum(dims[i] for i, u in enumerate(self.units) if u.rank == r) for r in range(world_size)]
        self._dims = dims
        self._in = KJTAllToAll(pg, splits) if world_size > 1 else None
        self._out = PooledEmbeddingsAllToAll(pg, self.dim_per_rank) if world_size > 1 else None

    def unit_dims(self) -> list[int]:
        return [self._dims[i] for i in range(len(self.units))]

    def input_dist(self, features: KeyedJaggedTensor) -> Awaitable:
        kjt = features.permute(self.perm)
        return _wait_all(self._in(kjt)) if self._in is not None else Ready(lambda: kjt)

    def output_dist(self, local: Tensor, batch: int) -> Awaitable:
        if self._out is None:
            return Ready(lambda: local)
        return self._out(local, batch_size_per_rank=[batch] * self.world_size)

    def split_output(self, out: Tensor) -> list[tuple[Unit, Tensor]]:
        return list(zip(self.units, out.split(self.unit_dims(), dim=1)))


class RwDist:
    """row_wise group: bucketed input all-to-all, partial-sum output all-to-all + local sum."""

    def __init__(self, units: list[Unit], dims: list[int], pg, world_size: int) -> None:
        self.units = units
        self.local_units = units
        self.world_size = world_size
        self.perm = [u.feature for u in units]
        self._dims = dims
        self._blocks = torch.tensor([u.row_block for u in units], dtype=torch.int64)
        self._in = KJTAllToAll(pg, [len(units)] * world_size) if world_size > 1 else None
        self._out = PooledEmbeddingsAllToAll(pg, [sum(dims)] * world_size) if world_size > 1 else None

    def input_dist(self, features: KeyedJaggedTensor, weights: Optional[Tensor]) -> Awaitable:
        """``weights``: per-index weights to attach (mean bags become weighted sums) or None."""
        kjt = features.permute(self.perm)
        if weights is not None:
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), weights=weights, lengths=kjt.lengths(),
                                    stride=kjt.stride())
        if self._in is None:
            return Ready(lambda: kjt)
        bucketed, _ = bucketize_kjt_before_all2all(kjt, num_buckets=self.world_size,
                                                   block_sizes=self._blocks.to(kjt.values().device))
        return _wait_all(self._in(bucketed))

    def output_dist(self, local: Tensor, batch: int) -> Awaitable:
        if self._out is None:
            return Ready(lambda: local)
        pending = self._out(local, batch_size_per_rank=[batch] * self.world_size)
        return Ready(lambda: pending.wait().view(batch, self.world_size, -1).sum(dim=1))

    def split_output(self, out: Tensor) -> list[tuple[Unit, Tensor]]:
        return list(zip(self.units, out.split(self._dims, dim=1)))


class DpDist:
    """data_parallel group: local lookups of the local batch."""

    def __init__(self, units: list[Unit], dims: list[int]) -> None:
        self.units = units
        self.local_units = units
        self.perm = [u.feature for u in units]
        self._dims = dims

    def input_dist(self, features: KeyedJaggedTensor) -> Awaitable:
        kjt = features.permute(self.perm)
        return Ready(lambda: kjt)

    def output_dist(self, local: Tensor, batch: int) -> Awaitable:
        return Ready(lambda: local)

    def split_output(self, out: Tensor) -> list[tuple[Unit, Tensor]]:
        return list(zip(self.units, out.split(self._dims, dim=1)))
