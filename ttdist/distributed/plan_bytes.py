"""Bytes per rank of a sharding plan, and the plan as a readable table (``format_plan``).

What ``ShardedTTEmbeddingBagCollection`` allocates for a TT table (its G_1 slices plus one copy of
G_2..G_d per rank holding a shard, and the optimizer state), the weights of a plain TorchRec
table, per rank; ``format_plan`` prints them beside the plan. Plan files: ``ttdist.plan``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from ttdist.distributed.planner import tt_shard_bytes
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, ROW_WISE, table_shards
from ttdist.distributed.tt_costs import TTCostModel, shard_ids
from ttdist.modules.collection import AnyTableConfig, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType
from ttdist.plan import TableSpec, shard_rects, table_spec



# ------------------------------------------------------------------------------ bytes per rank
def element_size(config: EmbeddingBagConfig) -> int:
    return DATA_TYPE_NUM_BITS[config.data_type] // 8


def tt_bytes_per_rank(config: TTEmbeddingBagConfig, ps: ParameterSharding, world_size: int,
                      optimizer: OptimType = OptimType.EXACT_SGD) -> list[int]:
    """Bytes of the cores (and optimizer state) each rank holds of one TT table under ``ps``.

    What ``ShardedTTEmbeddingBagCollection`` allocates: the G_1 slice of every local shard plus
    one copy of G_2..G_d on every rank holding a shard (also when it holds several column_wise
    shards). TorchRec's planner estimates per shard, before placement, so its numbers count
    G_2..G_d once per shard (``ttdist.distributed.planner``).
    """
    shape = config.tt_shape()
    rects = shard_rects(ps)
    shards = table_shards(config.name, shape, ps.sharding_type, list(ps.ranks or []), world_size,
                          [r for _, _, r in rects] if ps.sharding_type == COLUMN_WISE else None)
    rest = shape.core_shapes[1:]
    out = []
    for rank in range(world_size):
        local = [s for s in shards if s.rank == rank]
        if not local:
            out.append(0)
            continue
        r0, r1 = shape.ranks[0], shape.ranks[1]
        params = (sum((s.p1[1] - s.p1[0]) * r0 * (s.q1[1] - s.q1[0]) * r1 for s in local)
                  + sum(math.prod(c) for c in rest))
        slices = sum(s.p1[1] - s.p1[0] for s in local) + sum(c[0] for c in rest)
        out.append(tt_shard_bytes(config, params, optimizer, slices, 4))
    return out


def dense_bytes_per_rank(config: EmbeddingBagConfig, ps: ParameterSharding, world_size: int) -> list[int]:
    """Weight bytes each rank holds of a plain TorchRec table (TorchRec's planner adds optimizer state and I/O)."""
    e = element_size(config)
    out = [0] * world_size
    if ps.sharding_type == DATA_PARALLEL:
        return [config.num_embeddings * config.embedding_dim * e] * world_size
    for _, size, rank in shard_rects(ps):
        out[rank] += math.prod(size) * e
    return out


def _configs_by_module(tables: TableSpec) -> dict[Optional[str], dict[str, AnyTableConfig]]:
    spec = table_spec(tables) or {}
    out = {}
    for module_path, named in spec.items():
        missing = [n for n, c in named.items() if c is None]
        if missing:
            raise ValueError(f"format_plan needs the table configs, got only the names {missing}")
        out[module_path] = dict(named)  # type: ignore[arg-type]
    return out


def _lookup(configs: dict[Optional[str], dict[str, AnyTableConfig]], module_path: str, name: str) -> AnyTableConfig:
    for key in (module_path, None):
        if key in configs and name in configs[key]:
            return configs[key][name]
    raise ValueError(f"module '{module_path}', table '{name}': no config given for this table")


def plan_bytes_per_rank(plan: ShardingPlan, tables: TableSpec, world_size: int,
                        optimizer: OptimType = OptimType.EXACT_SGD) -> dict[tuple[str, str], list[int]]:
    """(module path, table) -> bytes per rank: TT cores (+ TT optimizer state), dense weights."""
    configs = _configs_by_module(tables)
    out = {}
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = _lookup(configs, module_path, name)
            out[(module_path, name)] = (tt_bytes_per_rank(cfg, ps, world_size, optimizer)
                                        if isinstance(cfg, TTEmbeddingBagConfig)
                                        else dense_bytes_per_rank(cfg, ps, world_size))
    return out


# ------------------------------------------------------------------------------ lookups per rank
def _tt_table_shards(cfg: TTEmbeddingBagConfig, ps: ParameterSharding, world_size: int):
    rects = shard_rects(ps)
    return table_shards(cfg.name, cfg.tt_shape(), ps.sharding_type, list(ps.ranks or []), world_size,
                        [r for _, _, r in rects] if ps.sharding_type == COLUMN_WISE else None)


def lookup_load_per_rank(plan: ShardingPlan, tables: TableSpec, world_size: int, batch_per_rank: int,
                         cost_model: Optional[TTCostModel] = None, pooling: float = 1.0
                         ) -> dict[str, list[float]]:
    """What each rank looks up per step: ``{"tt_ids", "dense_ids"[, "tt_ms"]}``, one value per rank.

    Ids per shard as ``TTCostModel.shard_costs`` counts them (``pooling`` ids per sample and
    feature; B L data-parallel, W B L table-/column-wise, W B L rows_r / N row-wise), for TT
    and plain tables alike; ``tt_ms``: the model's TT forward + backward + replica update per rank.
    """
    configs = _configs_by_module(tables)
    out = {"tt_ids": [0.0] * world_size, "dense_ids": [0.0] * world_size}
    if cost_model is not None:
        out["tt_ms"] = [0.0] * world_size
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = _lookup(configs, module_path, name)
            local_ids = batch_per_rank * pooling * len(cfg.feature_names)
            if isinstance(cfg, TTEmbeddingBagConfig):
                shape, shards = cfg.tt_shape(), _tt_table_shards(cfg, ps, world_size)
                per_sample = pooling * len(cfg.feature_names)
                for shard, ids in zip(shards, shard_ids(shape, ps.sharding_type, shards, batch_per_rank, per_sample,
                                                        world_size)):
                    out["tt_ids"][shard.rank] += ids
                if cost_model is not None:
                    for cost in cost_model.shard_costs(shape, ps.sharding_type, shards, batch_per_rank, per_sample,
                                                       world_size):
                        out["tt_ms"][cost.rank] += 1e3 * (cost.fwd_seconds + cost.bwd_seconds + cost.update_seconds)
            elif ps.sharding_type == DATA_PARALLEL:
                out["dense_ids"] = [n + local_ids for n in out["dense_ids"]]
            else:
                for _, size, rank in shard_rects(ps):
                    share = size[0] / cfg.num_embeddings if ps.sharding_type == ROW_WISE else 1.0
                    out["dense_ids"][rank] += world_size * local_ids * share
    return out


def _ranks_text(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def format_plan(plan: ShardingPlan, tables: TableSpec, topology: Union[Topology, int],
                optimizer: OptimType = OptimType.EXACT_SGD, batch_per_rank: Optional[int] = None,
                cost_model: Optional[TTCostModel] = None) -> str:
    """A readable table of ``plan``: one line per table, then the total per rank.

    Columns: module, table, rows, dim, TT ranks (or 'dense'), sharding type, kernel, ranks, and
    the bytes each rank holds of the table — for TT tables the real cores (``tt_bytes_per_rank``;
    plus optimizer state when ``optimizer`` keeps one), for plain tables the weights.
    ``tables``: the model or its configs (as for ``load_plan``); ``topology``: a Topology or the
    world size. With ``batch_per_rank``, also the lookup load per rank (``lookup_load_per_rank``,
    one id per sample and feature; TT time when ``cost_model`` is given).
    """
    world = topology if isinstance(topology, int) else topology.world_size
    configs = _configs_by_module(tables)
    per_rank = plan_bytes_per_rank(plan, tables, world, optimizer)
    header = ["module", "table", "rows", "dim", "TT ranks", "sharding", "kernel", "ranks"] + [f"rank {r} bytes"
                                                                                             for r in range(world)]
    rows = []
    totals = [0] * world
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = _lookup(configs, module_path, name)
            tt = "x".join(str(r) for r in cfg.tt_ranks) if isinstance(cfg, TTEmbeddingBagConfig) else "dense"
            nbytes = per_rank[(module_path, name)]
            totals = [a + b for a, b in zip(totals, nbytes)]
            rows.append([module_path or "(root)", name, str(cfg.num_embeddings), str(cfg.embedding_dim), tt,
                         ps.sharding_type, ps.compute_kernel, _ranks_text(ps.ranks or [])]
                        + [f"{n:,}" for n in nbytes])
    rows.append(["total", "", "", "", "", "", "", ""] + [f"{n:,}" for n in totals])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    numeric = {2, 3} | set(range(8, len(header)))

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    what = "TT: cores" + (" + optimizer state" if optimizer.code else "") + "; dense: weights"
    load = []
    if batch_per_rank is not None:
        per_rank = lookup_load_per_rank(plan, tables, world, batch_per_rank, cost_model)
        names = {"tt_ids": "TT ids / step", "dense_ids": "dense ids / step", "tt_ms": "TT lookup ms (model)"}
        load = [line([names[key], "", "", "", "", "", "", ""] + [f"{v:,.0f}" if key != "tt_ms" else f"{v:.2f}"
                                                                for v in values])
                for key, values in per_rank.items()]
        load.insert(0, f"lookup load per rank (batch {batch_per_rank} per rank"
                       + (f"; TT time: {cost_model.calibration.device} calibration)" if cost_model else ")"))
    return "\n".join([f"sharding plan on {world} ranks (bytes per rank: {what})", line(header), rule]
                     + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])] + load)
