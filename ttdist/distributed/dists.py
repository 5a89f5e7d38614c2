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

With W = 1 no collective is issued. Byte counts of every collective: ``ttdist.tools.comm_volume``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.embedding_sharding import bucketize_kjt_before_all2all
from torchrec.distributed.types import Awaitable, CommOp, NoWait, QuantizedCommCodecs
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def permute_features(features: KeyedJaggedTensor, perm: list[int]) -> KeyedJaggedTensor:
    """``features.permute(perm)``, or ``features`` itself where ``perm`` keeps every key in place
    (``KeyedJaggedTensor.permute`` copies values and lengths even then)."""
    return features if perm == list(range(len(features.keys()))) else features.permute(perm)


@dataclass
class Unit:
    """One (feature, shard) lookup: ``feature`` indexes the collection's features."""

    feature: int
    table: int
    shard_index: int
    rank: int  # -1: on every rank (row_wise, data_parallel)
    columns: tuple[int, int]  # output columns of the table computed by this unit
    row_block: int = 0  # row_wise: rows per bucket


def pooled_codecs(registry: Optional[dict[str, QuantizedCommCodecs]]) -> Optional[QuantizedCommCodecs]:
    """TorchRec's quantized-communication codecs of the pooled all-to-all (fp16/bf16), if any."""
    return registry.get(CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name) if registry else None


def _no_comm(kjt: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
    return NoWait(NoWait(kjt))


class TwCwDist(nn.Module):
    """table_wise / column_wise group (see module docstring).

    ``_dist`` is TorchRec's ``KJTAllToAll``: ``TrainPipelineSparseDist`` finds it there and fuses
    its splits all-to-all with the other modules'.
    """

    def __init__(self, units: list[Unit], dims: list[int], pg, world_size: int, rank: int,
                 codecs: Optional[QuantizedCommCodecs] = None) -> None:
        super().__init__()
        order = sorted(range(len(units)), key=lambda i: units[i].rank)  # stable: config order within a rank
        self.units = [units[i] for i in order]
        self.dims = [dims[i] for i in order]
        self.local_units = [u for u in self.units if u.rank == rank]
        self.world_size = world_size
        self.perm = [u.feature for u in self.units]
        splits = [sum(1 for u in self.units if u.rank == r) for r in range(world_size)]
        dim_per_rank = [sum(d for d, u in zip(self.dims, self.units) if u.rank == r) for r in range(world_size)]
        if world_size > 1:
            self._dist = KJTAllToAll(pg, splits)
            self._out = PooledEmbeddingsAllToAll(pg, dim_per_rank, codecs=codecs)

    def forward(self, kjt: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        """``kjt``: the group's features, ordered as ``self.perm``."""
        return self._dist(kjt) if self.world_size > 1 else _no_comm(kjt)

    def output_dist(self, local: Tensor, batch: int) -> Awaitable[Tensor]:
        if self.world_size == 1:
            return NoWait(local)
        return self._out(local, batch_size_per_rank=[batch] * self.world_size)


class RwDist(nn.Module):
    """row_wise group: bucketed input all-to-all, partial-sum output all-to-all + local sum."""

    def __init__(self, units: list[Unit], dims: list[int], pg, world_size: int,
                 codecs: Optional[QuantizedCommCodecs] = None) -> None:
        super().__init__()
        self.units, self.dims = units, dims
        self.local_units = units
        self.world_size = world_size
        self.perm = [u.feature for u in units]
        self.register_buffer("_blocks", torch.tensor([u.row_block for u in units], dtype=torch.int64),
                             persistent=False)
        if world_size > 1:
            self._dist = KJTAllToAll(pg, [len(units)] * world_size)
            self._out = PooledEmbeddingsAllToAll(pg, [sum(dims)] * world_size, codecs=codecs)

    def forward(self, kjt: KeyedJaggedTensor, weights: Optional[Tensor]) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        """``kjt``: the group's features, ordered as ``self.perm``; ``weights``: per-index weights to
        attach (mean bags become weighted sums) or None."""
        if weights is not None:
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), weights=weights, lengths=kjt.lengths(),
                                    stride=kjt.stride())
        if self.world_size == 1:
            return _no_comm(kjt)
        bucketed, _ = bucketize_kjt_before_all2all(kjt, num_buckets=self.world_size,
                                                   block_sizes=self._blocks.to(kjt.values().device))
        return self._dist(bucketed)

    def output_dist(self, local: Tensor, batch: int) -> Awaitable[Tensor]:
        if self.world_size == 1:
            return NoWait(local)
        return _SumOverRanks(self._out(local, batch_size_per_rank=[batch] * self.world_size), batch, self.world_size)


class _SumOverRanks(Awaitable[Tensor]):
    """The row-wise partial sums of every rank [B, W * D] -> their sum [B, D]."""

    def __init__(self, pending: Awaitable[Tensor], batch: int, world_size: int) -> None:
        super().__init__()
        self._pending, self._batch, self._world_size = pending, batch, world_size

    def _wait_impl(self) -> Tensor:
        return self._pending.wait().view(self._batch, self._world_size, -1).sum(dim=1)


class DpDist(nn.Module):
    """data_parallel group: local lookups of the local batch."""

    def __init__(self, units: list[Unit], dims: list[int]) -> None:
        super().__init__()
        self.units, self.dims = units, dims
        self.local_units = units
        self.perm = [u.feature for u in units]

    def forward(self, kjt: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        """``kjt``: the group's features, ordered as ``self.perm``."""
        return _no_comm(kjt)

    def output_dist(self, local: Tensor, batch: int) -> Awaitable[Tensor]:
        return NoWait(local)
