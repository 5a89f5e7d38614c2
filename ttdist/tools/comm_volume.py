"""Bytes one rank hands to the collectives in one training step of a sharded TT collection.

What is counted: for every collective call, the bytes of the tensor this rank passes in (the
``input`` of ``all_to_all_single``, the tensor of ``all_reduce``), its own block included.
Received bytes: the forward pooled all-to-all receives what the backward one sends and vice
versa; summed over ranks, sent = received.

Symbols (per step, rank r): W ranks (no collective at all when W = 1), B local batch, F_g the
features of group g, L_f pooling factor (mean ids per sample of feature f; N_f = L_f * B ids),
D_t table dim, U the TW/CW units (feature f, shard s) of the module (a table_wise feature is
one unit; a column_wise feature one unit per shard, D_u = the shard's columns, on rank(u)),
e_v, e_l, e_w = 4, e_o, e_p: bytes of an index, a length, a weight, an embedding element, a
dense parameter. omega = 1 when the group's KJT carries weights (a weighted collection; for
row_wise also when a row_wise table pools by MEAN: its bags are weighted by 1 / length).

(a) index all-to-all (TorchRec ``KJTAllToAll``: one all-to-all of the splits, then one per
    tensor: lengths, values, weights), per group present:
      table/column-wise:  splits 8 W (3 + omega)
                          lengths e_l B |U|,  values e_v sum_{u in U} N_f(u),  weights omega e_w sum_u N_f(u)
      row-wise:           splits 8 W (3 + omega)
                          lengths e_l W B |F_rw| (bucketised: B lengths per feature and rank),
                          values e_v sum_{f in F_rw} N_f,  weights omega e_w sum_{f in F_rw} N_f
(b) pooled all-to-all (TorchRec ``PooledEmbeddingsAllToAll``; row_wise sends partial sums
    of all W B samples and sums the W received blocks):
      forward:   table/column-wise  e_o W B sum_{u in U, rank(u) = r} D_u      row-wise  e_o W B sum_{f in F_rw} D_t(f)
      backward:  table/column-wise  e_o B sum_{u in U} D_u                    row-wise  e_o W B sum_{f in F_rw} D_t(f)
(c) replicated-core gradient all-reduce (one flat all-reduce per backward, on the module's
    ``_grad_pg``, of the gradients of every core that every rank holds):
      e_o sum over replicated cores |G_k|: G_2..G_d of row_wise and column_wise tables (every
      rank holds them, whether or not it holds a shard of G_1), all cores of data_parallel
      tables; nothing when no table has replicas.
(d) DDP all-reduce of the dense parameters (every parameter DDP does not ignore):
      e_p sum |p|.
(e) input-check all-reduce: none by default (bad input raises on the rank that has it, before
    any collective); 8 W per forward only with the sharder's ``raise_on_every_rank`` (one int64
    error code per rank).
The data-parallel group communicates nothing in (a) and (b).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ttdist.distributed.embeddingbag import ShardedTTEmbeddingBagCollection
from ttdist.distributed.shard_layout import replicated_cores, table_shards
from ttdist.modules.collection import TTEmbeddingBagConfig

PlanInfo = tuple  # (configs, {table: ParameterSharding})

_GROUPS = ("table_column_wise", "row_wise")


def _element(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def plan_layout(configs: Sequence[TTEmbeddingBagConfig], plan: Mapping[str, Any], world_size: int
                ) -> tuple[list[str], list[list[Any]]]:
    """(sharding type, ``shard_layout.table_shards``) of every table of plan info: what
    ``comm_volume(..., layout=)`` takes to skip rebuilding it per rank."""
    kinds, shards = [], []
    for c in configs:
        ps = plan[c.name]
        spec_ranks = ([s.placement.rank() for s in ps.sharding_spec.shards]
                      if ps.sharding_spec is not None and ps.sharding_type == "column_wise" else None)
        kinds.append(ps.sharding_type)
        shards.append(table_shards(c.name, c.tt_shape(), ps.sharding_type, ps.ranks or [], world_size, spec_ranks))
    return kinds, shards


def _module_volume(configs: Sequence[TTEmbeddingBagConfig], kinds: Sequence[str], shards: Sequence[Sequence[Any]],
                   world: int, rank: int, batch: int, pooling: Mapping[str, float], is_weighted: bool,
                   values_bytes: int, lengths_bytes: int, emb_bytes: int,
                   raise_on_every_rank: bool = False) -> dict[str, Any]:
    zero_groups = {g: {"splits": 0, "lengths": 0, "values": 0, "weights": 0, "total": 0} for g in _GROUPS}
    out: dict[str, Any] = {
        "index_all_to_all": zero_groups,
        "pooled_all_to_all_forward": {g: 0 for g in _GROUPS},
        "pooled_all_to_all_backward": {g: 0 for g in _GROUPS},
        "replicated_grad_all_reduce": 0,
        "input_check_all_reduce": 0,
    }
    if world == 1:
        return out
    out["input_check_all_reduce"] = 8 * world if raise_on_every_rank else 0

    def ids(f: str) -> float:
        return pooling[f] * batch

    # (a), (b): table/column-wise units, row-wise features
    units = []  # (feature, dim, rank)
    rw = []  # (feature, dim)
    rw_mean = False
    for c, kind, table_shards_ in zip(configs, kinds, shards):
        shape = c.tt_shape()
        for f in c.feature_names:
            if kind in ("table_wise", "column_wise"):
                for s in table_shards_:
                    lo, hi = s.columns(shape)
                    units.append((f, hi - lo, s.rank))
            elif kind == "row_wise":
                rw.append((f, c.embedding_dim))
                rw_mean = rw_mean or c.pooling.name != "SUM"
    if units:
        omega = int(is_weighted)
        n = sum(ids(f) for f, _, _ in units)
        g = out["index_all_to_all"]["table_column_wise"]
        g.update(splits=8 * world * (3 + omega), lengths=lengths_bytes * batch * len(units), values=values_bytes * n,
                 weights=omega * 4 * n)
        out["pooled_all_to_all_forward"]["table_column_wise"] = emb_bytes * world * batch * sum(
            d for _, d, r in units if r == rank)
        out["pooled_all_to_all_backward"]["table_column_wise"] = emb_bytes * batch * sum(d for _, d, _ in units)
    if rw:
        omega = int(is_weighted or rw_mean)
        n = sum(ids(f) for f, _ in rw)
        g = out["index_all_to_all"]["row_wise"]
        g.update(splits=8 * world * (3 + omega), lengths=lengths_bytes * world * batch * len(rw),
                 values=values_bytes * n, weights=omega * 4 * n)
        dims = sum(d for _, d in rw)
        out["pooled_all_to_all_forward"]["row_wise"] = emb_bytes * world * batch * dims
        out["pooled_all_to_all_backward"]["row_wise"] = emb_bytes * world * batch * dims
    for g in out["index_all_to_all"].values():
        g["total"] = g["splits"] + g["lengths"] + g["values"] + g["weights"]
    # (c)
    out["replicated_grad_all_reduce"] = emb_bytes * sum(
        math.prod(c.tt_shape().core_shapes[k]) for c, kind in zip(configs, kinds)
        for k in replicated_cores(kind, c.tt_shape().d))
    return out


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) for k in a}
    return a + b


def _total(d: Any) -> float:
    if isinstance(d, dict):
        return sum(_total(v) for k, v in d.items() if k != "total")
    return d


def dense_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that DistributedDataParallel all-reduces in ``model`` (0 without DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    total = 0
    for m in model.modules():
        if isinstance(m, DistributedDataParallel):
            ignored = getattr(m, "parameters_to_ignore", set())
            total += sum(p.numel() * p.element_size() for n, p in m.module.named_parameters()
                         if p.requires_grad and n not in ignored)
    return total


def comm_volume(source: Union[nn.Module, PlanInfo], batch_size_per_rank: int,
                pooling_factors: Union[float, Mapping[str, float]] = 1.0, *, world_size: Optional[int] = None,
                rank: Optional[int] = None, is_weighted: bool = False, values_dtype: torch.dtype = torch.int64,
                lengths_dtype: torch.dtype = torch.int32, embedding_dtype: torch.dtype = torch.float32,
                dense_bytes: Optional[int] = None, raise_on_every_rank: bool = False,
                layout: Optional[tuple[list[str], list[list[Any]]]] = None) -> dict[str, Any]:
    """Per-step bytes this rank hands to each collective (formulas: module docstring).

    Args:
        source: a ``ShardedTTEmbeddingBagCollection``, a model containing them (e.g. the
            ``DistributedModelParallel``: all its sharded TT collections are summed and (d) is
            its DDP's dense parameters), or plan info ``(configs, {table: ParameterSharding})``
            with ``world_size`` and ``rank``.
        batch_size_per_rank: B.
        pooling_factors: L_f per feature name (or one value for all): mean ids per sample.
        values_dtype, lengths_dtype: the KJT's dtypes (ttdist's data pipeline: int64, int32).
        dense_bytes: (d) for plan info, or to override the DDP count.
        raise_on_every_rank: (e) for plan info: whether the sharder was built with
            ``raise_on_every_rank`` (a module source: read from the module).
        layout: for plan info, ``plan_layout(configs, plan, world_size)`` computed once (every
            rank's call of a large plan otherwise rebuilds it).

    Returns ``{"index_all_to_all": {group: {splits, lengths, values, weights, total}},
    "pooled_all_to_all_forward": {group: bytes}, "pooled_all_to_all_backward": {group: bytes},
    "replicated_grad_all_reduce", "input_check_all_reduce", "dense_all_reduce", "total"}``
    with groups ``table_column_wise`` and ``row_wise``. Bytes are floats when L_f * B is not an
    integer (an expectation), else ints.
    """
    sizes = dict(values_bytes=_element(values_dtype), lengths_bytes=_element(lengths_dtype),
                 emb_bytes=_element(embedding_dtype))

    def pooling_for(configs) -> dict[str, float]:
        names = [f for c in configs for f in c.feature_names]
        if isinstance(pooling_factors, Mapping):
            missing = [f for f in names if f not in pooling_factors]
            if missing:
                raise ValueError(f"pooling_factors misses features {missing}")
            return {f: pooling_factors[f] for f in names}
        return {f: float(pooling_factors) for f in names}

    parts = []
    if isinstance(source, tuple):
        configs, plan = source
        if world_size is None or rank is None:
            raise ValueError("comm_volume of plan info needs world_size and rank")
        kinds, shards = layout or plan_layout(configs, plan, world_size)
        parts.append(_module_volume(configs, kinds, shards, world_size, rank, batch_size_per_rank,
                                    pooling_for(configs), is_weighted, raise_on_every_rank=raise_on_every_rank,
                                    **sizes))
        dense = dense_bytes or 0
    else:
        modules = [m for m in source.modules() if isinstance(m, ShardedTTEmbeddingBagCollection)]
        if not modules:
            raise ValueError("comm_volume: the module holds no ShardedTTEmbeddingBagCollection")
        for m in modules:
            parts.append(_module_volume(m._configs, m._sharding_type, m._shards, m._world, m._rank,
                                        batch_size_per_rank, pooling_for(m._configs), m.is_weighted(),
                                        raise_on_every_rank=m._raise_on_every_rank, **sizes))
        dense = dense_param_bytes(source) if dense_bytes is None else dense_bytes
    out = parts[0]
    for p in parts[1:]:
        out = _add(out, p)
    out["dense_all_reduce"] = dense
    out["total"] = _total(out)
    return out
