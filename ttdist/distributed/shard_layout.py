"""Which slices of a TT table's cores each rank owns under each sharding type (pure logic).

A TT table (cores ``G_1..G_d``, ``G_k`` of shape ``(p_k, r_{k-1}, q_k, r_k)``) is split on its
first core only, so that every shard is itself a valid TT table:

* ``table_wise``: one shard, the whole table, on ``ranks[0]``.
* ``row_wise``: W shards; shard j owns the slices ``G_1[j*c : (j+1)*c]`` (c = ceil(p_1 / W)),
  i.e. the rows ``[j*c*P, (j+1)*c*P)`` with ``P = p_2...p_d`` — so it decompresses only its
  own rows. ``G_2..G_d`` are replicated. TorchRec's bucketisation uses the uniform block c*P.
* ``column_wise``: k shards; shard j owns ``G_1[:, :, lo_j:hi_j, :]`` of an even split of q_1,
  i.e. the contiguous output columns ``[lo_j*Q, hi_j*Q)`` with ``Q = q_2...q_d``.
  ``G_2..G_d`` are replicated on the ranks holding a shard.
* ``data_parallel``: every rank holds the whole table.

The planner plans a 2-D proxy ``[num_embeddings, dim]``; it chooses the sharding type and the
ranks, and this module derives the TT-aligned split (the proxy's own row/column offsets are
not TT-aligned in general). Storage estimates use the same split (``TTShard.local_shape``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from torchrec.distributed.types import ShardingType

from ttdist.modules.tt_shapes import TTShape

# TorchRec's sharding types, as the plan strings that ParameterSharding carries.
TABLE_WISE, ROW_WISE = ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value
COLUMN_WISE, DATA_PARALLEL = ShardingType.COLUMN_WISE.value, ShardingType.DATA_PARALLEL.value
SHARDING_TYPES = (TABLE_WISE, ROW_WISE, COLUMN_WISE, DATA_PARALLEL)


@dataclass(frozen=True)
class TTShard:
    """One shard of a table: the first core's slice ``[lo, hi)`` along p_1 (RW) or q_1 (CW)."""

    rank: int
    index: int
    p1: tuple[int, int]
    q1: tuple[int, int]

    def local_shape(self, shape: TTShape) -> TTShape:
        """The shard as a TT table (rows and columns of the shard only)."""
        p = (self.p1[1] - self.p1[0],) + shape.p[1:]
        q = (self.q1[1] - self.q1[0],) + shape.q[1:]
        rows = min(shape.num_embeddings - self.p1[0] * shape.rows_per_p1, p[0] * shape.rows_per_p1)
        return TTShape(num_embeddings=max(rows, 0), p=p, q=q, ranks=shape.ranks)

    def columns(self, shape: TTShape) -> tuple[int, int]:
        """Output columns ``[lo, hi)`` of the table that this shard computes."""
        per_q1 = shape.embedding_dim // shape.q[0]
        return self.q1[0] * per_q1, self.q1[1] * per_q1


def even_split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, n), sizes differing by at most one."""
    return [(n * j // parts, n * (j + 1) // parts) for j in range(parts)]


def table_shards(table: str, shape: TTShape, sharding_type: str, ranks: Sequence[int], world_size: int,
                 shard_ranks: Optional[Sequence[int]] = None) -> list[TTShard]:
    """All shards of one table (every rank's), in shard order.

    ``ranks``: the plan's ranks of the table; ``shard_ranks``: the rank of each CW shard (from
    the plan's sharding spec; defaults to ``ranks``).
    """
    full_p, full_q = (0, shape.p[0]), (0, shape.q[0])
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"table '{table}': unknown sharding type {sharding_type!r}; valid: {SHARDING_TYPES}")
    for r in list(ranks) + list(shard_ranks or []):
        if not 0 <= r < world_size:
            raise ValueError(f"table '{table}': the plan places a shard on rank {r}, valid ranks [0, {world_size})")
    if sharding_type == TABLE_WISE:
        if len(ranks) != 1:
            raise ValueError(f"table '{table}': table_wise needs exactly one rank, got {list(ranks)}")
        return [TTShard(ranks[0], 0, full_p, full_q)]
    if sharding_type == DATA_PARALLEL:
        return [TTShard(r, 0, full_p, full_q) for r in range(world_size)]
    if sharding_type == ROW_WISE:
        if list(ranks) != list(range(world_size)):
            raise ValueError(f"table '{table}': row_wise shards go to every rank in order 0..{world_size - 1}, "
                             f"got ranks {list(ranks)}")
        c = math.ceil(shape.p[0] / world_size)
        return [TTShard(r, r, (min(r * c, shape.p[0]), min((r + 1) * c, shape.p[0])), full_q) for r in range(world_size)]
    owners = list(shard_ranks if shard_ranks is not None else ranks)
    if not owners:
        raise ValueError(f"table '{table}': column_wise needs at least one shard, got no ranks")
    if len(owners) > shape.q[0]:
        raise ValueError(f"table '{table}': column_wise into {len(owners)} shards needs q_1 >= {len(owners)}, "
                         f"but q_1 = {shape.q[0]} (tt_q_shapes {list(shape.q)}); use fewer shards or a larger q_1")
    return [TTShard(r, j, full_p, q1) for j, (r, q1) in enumerate(zip(owners, even_split(shape.q[0], len(owners))))]


def row_block(shape: TTShape, world_size: int) -> int:
    """Rows per row-wise bucket: ceil(p_1 / W) slices of p_2...p_d rows."""
    return math.ceil(shape.p[0] / world_size) * shape.rows_per_p1


def replicated_cores(sharding_type: str, d: int) -> list[int]:
    """Cores (0-based) whose full copy sits on several ranks, so their gradients are all-reduced."""
    return {TABLE_WISE: [], ROW_WISE: list(range(1, d)), COLUMN_WISE: list(range(1, d)),
            DATA_PARALLEL: list(range(d))}[sharding_type]
