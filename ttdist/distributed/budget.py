"""``compress_to_budget``: per table, dense or TT (and the TT rank), so that TorchRec's planner
fits the model into a per-rank memory budget with the least compression."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ttdist.distributed.embeddingbag import TTEmbeddingBagCollectionSharder
from ttdist.distributed.planner import make_planner
from ttdist.distributed.plan_bytes import element_size
from ttdist.distributed.tt_costs import TTCostModel
from ttdist.modules.collection import AnyTableConfig, MixedEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType



# -------------------------------------------------------------------------- memory budget
class BudgetError(ValueError):
    """The tables do not fit the budget even at the smallest TT rank of the ladder."""

    def __init__(self, message: str, required_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.required_bytes, self.budget_bytes = required_bytes, budget_bytes


@dataclass
class BudgetResult:
    """What ``compress_to_budget`` chose."""

    configs: list[AnyTableConfig]
    """The tables in input order: plain EmbeddingBagConfig (dense) or TTEmbeddingBagConfig."""
    plan: ShardingPlan
    """TorchRec's plan of ``MixedEmbeddingBagCollection(configs)`` (module paths under ``module_fqn``)."""
    storage_per_rank: list[int]
    """The planner's estimate of the bytes each rank holds (compute-device memory)."""
    steps: list[str] = field(default_factory=list)
    """The compression steps, in order (empty: all dense fit)."""


def _tt_config(base: EmbeddingBagConfig, rank: int, num_cores: int,
               tt_options: Mapping[str, Any]) -> TTEmbeddingBagConfig:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(EmbeddingBagConfig) if f.init}
    return TTEmbeddingBagConfig(**fields, tt_ranks=[rank] * (num_cores - 1), **dict(tt_options))


def _weight_bytes(config: AnyTableConfig) -> int:
    if isinstance(config, TTEmbeddingBagConfig):
        return 4 * config.tt_shape().num_parameters
    return config.num_embeddings * config.embedding_dim * element_size(config)


def _budget_topology(topology: Topology, budget: int) -> Topology:
    topo = copy.deepcopy(topology)
    on_hbm = topo.compute_device in ("cuda", "mtia")
    for device in topo.devices:
        if on_hbm:
            device.storage.hbm = budget
        else:
            device.storage.ddr = budget
    return topo


def _rank_storage(planner, world: int, on_hbm: bool) -> list[int]:
    out = [0] * world
    for option in planner._best_plan or []:
        for shard in option.shards:
            out[shard.rank] += shard.storage.hbm if on_hbm else shard.storage.ddr
    return out


def compress_to_budget(tables: Sequence[EmbeddingBagConfig], topology: Topology, hbm_per_rank: int,
                       rank_ladder: Sequence[int] = (4, 8, 16, 32, 64), *, batch_size: int = 512,
                       num_cores: int = 3, optimizer: OptimType = OptimType.EXACT_SGD,
                       tt_options: Optional[Mapping[str, Any]] = None, constraints=None, sharders=None,
                       module_fqn: str = "", cost_model: Optional[TTCostModel] = None) -> BudgetResult:
    """Dense or TT per table, and the TT rank, so that the model fits ``hbm_per_rank`` bytes per rank.

    The rule (greedy, largest table first):

    1. Start with every table dense.
    2. Plan with TorchRec's ``EmbeddingShardingPlanner`` (``make_planner``) on ``topology`` with
       each rank's memory set to ``hbm_per_rank`` (HBM on cuda/mtia, DDR on cpu). Storage is
       TorchRec's estimate for dense tables and the real TT bytes for TT tables
       (``TTStorageEstimator``: the cores of each shard, ``TTShape.num_parameters``, plus
       optimizer state). The planner chooses each table's sharding type by estimated time under
       that memory: a TT table may be data-parallel (a full replica of its cores and optimizer
       state on every rank, no all-to-all) where the replicas fit and are cheaper, or table-,
       row- or column-wise (``TTPerfEstimator``). If the plan fits, stop. (The plan is skipped
       when the weights alone, summed over tables, exceed ``world_size * hbm_per_rank``.)
    3. Otherwise compress by one step the table holding the most bytes now (weights:
       rows * dim * element size dense, 4 * TT parameters): a dense table becomes TT at the
       highest ladder rank whose cores are smaller than the dense table (never if none is); a TT
       table moves one rung down the ladder. Ties go to the earlier table. Back to 2. (Ranks
       above a table's TT rank limit — ``make_tt_shape`` — are skipped.)
    4. If no table can be compressed further, raise ``BudgetError`` with the bytes required.

    So each table keeps as much capacity as possible: only the largest tables are compressed,
    every TT table reaches a rung before any is pushed below it while it is the largest, and the
    result is minimal in that undoing its last step no longer fits.

    Args:
        tables: plain TorchRec EmbeddingBagConfigs.
        rank_ladder: TT ranks to choose from (every inner rank of a table is the same).
        batch_size: per-rank batch size for the planner.
        num_cores: TT cores d of a compressed table (``tt_ranks`` has d - 1 entries).
        optimizer: the TT fused optimizer (its state counts in the TT bytes).
        tt_options: extra TTEmbeddingBagConfig fields for compressed tables (e.g. weight_dist).
        constraints: TorchRec ParameterConstraints per table name (applied in every plan).
        sharders: default ``[TTEmbeddingBagCollectionSharder({"optimizer": optimizer}),
            EmbeddingBagCollectionSharder()]``.
        module_fqn: where the MixedEmbeddingBagCollection sits in the model (e.g.
            ``"sparse_arch.embedding_bag_collection"``); prefixes the plan's module paths.
        cost_model: the TT kernel's cost for the planner (default: calibrated, ``tt_costs``).
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    tables = list(tables)
    tt_given = [c.name for c in tables if isinstance(c, TTEmbeddingBagConfig)]
    if tt_given:
        raise TypeError(f"compress_to_budget takes plain EmbeddingBagConfigs, got TT tables {tt_given}")
    ladder = sorted(set(int(r) for r in rank_ladder), reverse=True)
    if not ladder or ladder[-1] < 1:
        raise ValueError(f"rank_ladder must hold positive ranks, got {list(rank_ladder)}")
    if hbm_per_rank <= 0:
        raise ValueError(f"hbm_per_rank must be positive, got {hbm_per_rank}")
    sharders = sharders or [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer}),
                            EmbeddingBagCollectionSharder()]
    topo = _budget_topology(topology, hbm_per_rank)
    world, on_hbm = topo.world_size, topo.compute_device in ("cuda", "mtia")
    opts = dict(tt_options or {})
    state: list[Optional[int]] = [None] * len(tables)  # None: dense; i: TT at ladder[i]

    def config(i: int, s: Optional[int]) -> AnyTableConfig:
        return tables[i] if s is None else _tt_config(tables[i], ladder[s], num_cores, opts)

    def next_state(i: int) -> Optional[int]:
        s = state[i]
        if s is None:  # the highest valid ladder rank with smaller cores than the dense table
            dense = _weight_bytes(tables[i])
            for k in range(len(ladder)):
                try:
                    if _weight_bytes(config(i, k)) < dense:
                        return k
                except ValueError:  # rank above the unfolding's limit (make_tt_shape)
                    continue
            return None
        return s + 1 if s + 1 < len(ladder) else None

    def attempt(configs: list[AnyTableConfig]):
        planner = make_planner(topo, batch_size=batch_size, constraints=constraints, optimizer=optimizer,
                               cost_model=cost_model)
        model = MixedEmbeddingBagCollection(configs, device=torch.device("meta"))
        try:
            return planner, planner.plan(model, sharders)
        except PlannerError as e:
            # TorchRec reports a shard that fits no rank as STRICT_CONSTRAINTS
            if e.error_type not in (PlannerErrorType.INSUFFICIENT_STORAGE, PlannerErrorType.PARTITION,
                                    PlannerErrorType.STRICT_CONSTRAINTS):
                raise
            last_error[0] = str(e).strip().splitlines()[-1].strip()
            reserved = getattr(planner._storage_reservation, "last_reserved_topology", None)
            if reserved is not None:
                available[0] = [d.storage.hbm if on_hbm else d.storage.ddr for d in reserved.devices]
            return planner, None

    steps: list[str] = []
    last_error = ["the weights alone exceed the budget"]
    available: list = [None]  # bytes per rank left to the tables after TorchRec's storage reservation
    while True:
        configs = [config(i, s) for i, s in enumerate(state)]
        if sum(_weight_bytes(c) for c in configs) <= world * hbm_per_rank:
            planner, plan = attempt(configs)
            if plan is not None:
                if module_fqn:
                    plan = ShardingPlan(plan={f"{module_fqn}.{k}" if k else module_fqn: v
                                              for k, v in plan.plan.items()})
                return BudgetResult(configs, plan, _rank_storage(planner, world, on_hbm), steps)
        movable = [i for i in range(len(tables)) if next_state(i) is not None]
        if not movable:
            required = _required_bytes(configs, topo, batch_size, constraints, optimizer, sharders, on_hbm, cost_model)
            smallest = [c.name for c in configs if isinstance(c, TTEmbeddingBagConfig)]
            left = ""
            if available[0]:
                most = max(available[0])
                left = (f"; TorchRec's storage reservation (a margin, dense parameters, input buffers) leaves "
                        f"{most} bytes for the tables on the emptiest rank" if most > 0 else
                        f"; TorchRec's storage reservation (a margin, dense parameters, input buffers) alone exceeds "
                        f"the budget by {-most} bytes per rank")
            raise BudgetError(
                f"the tables do not fit {hbm_per_rank} bytes per rank on {world} ranks "
                f"({world * hbm_per_rank} in all): with {smallest or 'no table'} at TT rank {ladder[-1]} and the rest "
                f"dense (no smaller TT rank on the ladder {sorted(ladder)}), the tables need at least {required} bytes "
                f"in all ({math.ceil(required / world)} per rank if spread evenly) by the planner's estimates{left}; "
                f"planner: {last_error[0]}", required, hbm_per_rank)
        i = max(movable, key=lambda k: (_weight_bytes(configs[k]), -k))
        before = "dense" if state[i] is None else f"TT rank {ladder[state[i]]}"
        state[i] = next_state(i)
        steps.append(f"{tables[i].name}: {before} ({_weight_bytes(configs[i])} bytes) -> TT rank {ladder[state[i]]} "
                     f"({_weight_bytes(config(i, state[i]))} bytes)")


def _required_bytes(configs, topo, batch_size, constraints, optimizer, sharders, on_hbm, cost_model) -> int:
    """Sum over tables of the smallest total storage of any of its sharding options."""
    planner = make_planner(topo, batch_size=batch_size, constraints=constraints, optimizer=optimizer,
                           cost_model=cost_model)
    options = planner._enumerator.enumerate(MixedEmbeddingBagCollection(configs, device=torch.device("meta")), sharders)
    best: dict[str, int] = {}
    for o in options:
        total = sum((s.storage.hbm if on_hbm else s.storage.ddr) for s in o.shards)
        best[o.fqn] = min(best.get(o.fqn, total), total)
    return sum(best.values())
