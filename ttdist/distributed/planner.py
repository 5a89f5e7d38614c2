"""TorchRec planner support for TT tables: estimators and a planner factory.

TorchRec's ``EmbeddingShardingPlanner`` plans 2-D parameters and never calls
``ModuleSharder.storage_usage()``; it asks its estimators. ``TTStorageEstimator`` gives every
TT sharding option the real bytes of the shard (its slice of G_1 plus the replicated cores —
``ttdist.distributed.shard_layout``), plus optimizer state and row cache; every other option
goes to TorchRec's own estimators, so dense tables keep TorchRec's numbers. On CPU TorchRec's
perf model knows only the dense/fused/quant kernels; ``TTPerfEstimator`` models the TT kernel.

Storage of one TT shard (bytes, e = element size):
    e * shard_params * (1 + s) + cache_size * D * e + 16 * hashtbl_size (cached tables)
with s = 1 for Adagrad (element-wise state), 0 for SGD, and row-wise Adagrad adding 4 bytes per
core slice. Transient input/output buffers are not counted.

DMP's default planner (``DistributedModelParallel(..., plan=None)``) builds its own estimators;
``install_default_planner_support()`` (run once by ``import ttdist.distributed``) makes it plan TT
tables too — see "DMP without plan=" in docs/planner.md for what that covers and what not.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Optional

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner import enumerators as _enumerators
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.perf_models import NoopPerfModel
from torchrec.distributed.planner.proposers import (GreedyProposer, GridSearchProposer, Proposer,
                                                    UniformProposer)
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory, EmbeddingPerfEstimatorV2
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import (BasicCommsBandwidths, CollectiveType, ParameterConstraints, Perf,
                                               ShardEstimator, ShardingOption, Storage)
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.types import ShardingType

from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL
from ttdist.distributed.fused_params import resolve_fused_params
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, ROW_WISE, TABLE_WISE, table_shards
from ttdist.distributed.tt_costs import TTCostModel, cost_model
from ttdist.modules.collection import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType
from ttdist.modules.tt_shapes import TTShape

TT_MODULE_KEY = sharder_name(TTEmbeddingBagCollection)
INFEASIBLE = 2**62
logger = logging.getLogger(__name__)


def _config(option: ShardingOption) -> TTEmbeddingBagConfig:
    return next(c for c in option.module[1].embedding_bag_configs() if c.name == option.name)


def _option_shards(option: ShardingOption, shape: TTShape, world_size: int):
    """The TT shards of a planner option (ranks are not chosen yet: shard j on rank j)."""
    n = len(option.shards)
    ranks = list(range(world_size)) if option.sharding_type == ROW_WISE else list(range(min(n, world_size)))
    return table_shards(option.name, shape, option.sharding_type, ranks[:1] if option.sharding_type == TABLE_WISE else ranks,
                        world_size, shard_ranks=[j % world_size for j in range(n)] if option.sharding_type == COLUMN_WISE else None)


def tt_shard_bytes(config: TTEmbeddingBagConfig, shard_params: int, optimizer: OptimType, slices: int,
                   element_size: int = 4) -> int:
    """Bytes one shard holds (see the module docstring)."""
    state = {0: 0, 1: shard_params * 4, 2: slices * 4}[optimizer.code]
    cache = (config.cache_size * config.embedding_dim * element_size + 16 * (config.hashtbl_size or config.num_embeddings)
             if config.use_cache else 0)
    return shard_params * element_size + state + cache


class TTStorageEstimator(ShardEstimator):
    """Real TT bytes for TT options; TorchRec's EmbeddingStorageEstimator for the rest."""

    def __init__(self, topology: Topology, constraints: Optional[dict[str, ParameterConstraints]] = None,
                 optimizer: OptimType = OptimType.EXACT_SGD) -> None:
        self._topology, self._optimizer = topology, optimizer
        self._default = EmbeddingStorageEstimator(topology=topology, constraints=constraints)

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:
        rest = [o for o in sharding_options if o.module_type_key != TT_MODULE_KEY]
        if rest:
            self._default.estimate(rest, sharder_data_map)
        for option in (o for o in sharding_options if o.module_type_key == TT_MODULE_KEY):
            _estimate_tt_storage(option, self._topology, self._optimizer)


def _estimate_tt_storage(option: ShardingOption, topology: Topology, optimizer: OptimType) -> None:
    """Sets every shard's storage of a TT option to the real bytes of its TT shard."""
    config = _config(option)
    shape = config.tt_shape()
    on_gpu = topology.compute_device in ("cuda", "mtia")
    try:
        shards = _option_shards(option, shape, topology.world_size)
    except ValueError:  # e.g. more column shards than q_1: never choose this option
        shards = None
    for j, planner_shard in enumerate(option.shards):
        if shards is None:
            nbytes = INFEASIBLE
        else:
            local = shards[j].local_shape(shape)
            nbytes = tt_shard_bytes(config, local.num_parameters, optimizer, sum(local.p), option.tensor.element_size())
        planner_shard.storage = Storage(hbm=nbytes if on_gpu else 0, ddr=0 if on_gpu else nbytes)


class TTPerfEstimator(ShardEstimator):
    """TT options: the calibrated kernel cost (``tt_costs``) and TorchRec's topology bandwidths
    (``tt_option_perf``); every other option: TorchRec's ``EmbeddingPerfEstimator``.

    ``cost_model``: default ``tt_costs.cost_model(topology.compute_device)`` (measured once per
    process, or injected with ``tt_costs.set_calibration``).
    """

    def __init__(self, topology: Topology, constraints: Optional[dict[str, ParameterConstraints]] = None,
                 cost_model: Optional[TTCostModel] = None) -> None:
        self._topology, self._cost_model = topology, cost_model
        self._default = EmbeddingPerfEstimator(topology=topology, constraints=constraints)

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:
        rest = [o for o in sharding_options if o.module_type_key != TT_MODULE_KEY]
        if rest:
            self._default.estimate(rest, sharder_data_map)
        tt = [o for o in sharding_options if o.module_type_key == TT_MODULE_KEY]
        if tt:
            model = self._cost_model or cost_model(self._topology.compute_device)
            for option in tt:
                tt_option_perf(option, self._topology, model)


def all_reduce_bus_bandwidth(world_size: int, local_world_size: int, intra_host_bw: float,
                             inter_host_bw: float) -> float:
    """Bus bandwidth of an all-reduce over ``world_size`` ranks, ``local_world_size`` per host
    (any unit): the intra-host links' when the ranks share a host, else the slower of the
    intra-host links and the host's NICs together, one per GPU (NCCL runs one ring per NIC, each
    crossing the host boundary once: 8 HDR NICs carry 8 x 25 GB/s, capped by NVLink; NVIDIA/nccl
    issue 412). TorchRec's ``BasicCommsBandwidths`` takes ``inter_host_bw * local_world_size`` in
    every case, 8x too fast for 8 GPUs on PCIe (25 GB/s) whether or not they span hosts."""
    if world_size <= local_world_size:
        return intra_host_bw
    return min(intra_host_bw, inter_host_bw * local_world_size)


class BusBandwidths(BasicCommsBandwidths):
    """TorchRec's two-link model (``intra_host_bw`` within a host, ``inter_host_bw`` across),
    but an all-reduce priced at ``all_reduce_bus_bandwidth``. The Topologies ttdist builds (the
    app's measured links, the perf model's presets) carry it, so that TorchRec's estimator prices
    a data-parallel TorchRec table's gradient all-reduce as ttdist prices a replicated core's
    and as ``perf_model.step_time`` charges both."""

    def get_bw(self, local_world_size: int, world_size: int, collective_type: CollectiveType) -> float:
        if collective_type == CollectiveType.ALL_REDUCE:
            return all_reduce_bus_bandwidth(world_size, local_world_size, self.intra_host_bw, self.inter_host_bw)
        return super().get_bw(local_world_size, world_size, collective_type)


def bus_topology(world_size: int, compute_device: str, intra_host_bw: float, inter_host_bw: float,
                 **kwargs) -> Topology:
    """TorchRec's ``Topology`` on these links (bytes/ms), all-reduces priced by ``BusBandwidths``;
    ``kwargs``: Topology's other arguments."""
    return Topology(world_size=world_size, compute_device=compute_device,
                    generalized_comms_bandwidths=BusBandwidths(inter_host_bw=inter_host_bw, intra_host_bw=intra_host_bw),
                    **kwargs)


def _comms_bw(topology: Topology, collective: CollectiveType, group_size: int) -> float:
    """Bandwidth (bytes/ms) of a collective over ``group_size`` ranks: the Topology's model of the
    links, TorchRec's default one (a Topology built without ``generalized_comms_bandwidths``) read
    as ``BusBandwidths``, so that an all-reduce is priced at ``all_reduce_bus_bandwidth``."""
    bandwidths = getattr(topology, "_comms_bandwidths", None) or BasicCommsBandwidths(
        inter_host_bw=topology.inter_host_bw, intra_host_bw=topology.intra_host_bw)
    if type(bandwidths) is BasicCommsBandwidths:
        bandwidths = BusBandwidths(inter_host_bw=bandwidths.inter_host_bw, intra_host_bw=bandwidths.intra_host_bw)
    local = min(topology.local_world_size, group_size)
    return bandwidths.get_bw(local_world_size=local, world_size=group_size, collective_type=collective)


def tt_option_perf(option: ShardingOption, topology: Topology, model: TTCostModel) -> None:
    """Sets every shard's ``Perf`` (ms, TorchRec's unit) of a TT planner option.

    W ranks, B = ``option.batch_size`` per rank, L = sum of the features' pooling factors,
    D_j the shard's columns, e = 4 bytes, bw_c TorchRec's bandwidth of collective c:
        compute  fwd, bwd (+ fused update, + whole-core update of replicated cores):
                 ``TTCostModel.shard_costs`` (ids: B L data-parallel, W B L table-/column-wise,
                 W B L rows_j / N row-wise)
        input    W B L * 8 / bw_a2a (the ids' all-to-all; 0 for data-parallel)
        fwd/bwd  W B D_j * e / bw_a2a each (pooled all-to-all; 0 for data-parallel)
        replicas 2 (k-1)/k * e * replicated parameters / bw_allreduce in bwd (k ranks share them:
                 W for row-wise and data-parallel, the shards for column-wise)
    The price of each collective call is not here: the tables of one sharding type share their
    calls, so it belongs to a whole plan (``TTCollectivesPerfModel``).
    """
    shape = _config(option).tt_shape()
    world = topology.world_size
    try:
        shards = _option_shards(option, shape, world)
    except ValueError:  # e.g. more column shards than q_1: the storage estimate rules it out
        for planner_shard in option.shards:
            planner_shard.perf = Perf(fwd_compute=INFEASIBLE, fwd_comms=0, bwd_compute=0, bwd_comms=0)
        return
    batch, pooling = option.batch_size, sum(option.input_lengths)
    costs = model.shard_costs(shape, option.sharding_type, shards, batch, pooling, world)
    dp = option.sharding_type == DATA_PARALLEL
    sharers = len({s.rank for s in shards}) if option.sharding_type == COLUMN_WISE else world
    a2a = _comms_bw(topology, CollectiveType.ALL_TO_ALL, world)
    all_reduce = _comms_bw(topology, CollectiveType.ALL_REDUCE, sharers)
    for planner_shard, shard, cost in zip(option.shards, shards, costs):
        lo, hi = shard.columns(shape)
        pooled = 0.0 if dp else world * batch * (hi - lo) * 4 / a2a
        replicas = 2 * (sharers - 1) / sharers * 4 * cost.replicated_parameters / all_reduce if sharers > 1 else 0.0
        planner_shard.perf = Perf(fwd_compute=1e3 * cost.fwd_seconds, fwd_comms=pooled,
                                  bwd_compute=1e3 * (cost.bwd_seconds + cost.update_seconds),
                                  bwd_comms=pooled + replicas,
                                  input_dist_comms=0.0 if dp else world * batch * pooling * 8 / a2a)


def tt_constraints(tables: dict[str, str], constraints: Optional[dict[str, ParameterConstraints]] = None
                   ) -> dict[str, ParameterConstraints]:
    """ParameterConstraints forcing ``{table: sharding_type}`` with the TT kernel."""
    out = dict(constraints or {})
    for name, sharding_type in tables.items():
        out[name] = ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[TT_COMPUTE_KERNEL],
                                         min_partition=1)
    return out


def make_planner(topology: Topology, batch_size: int, constraints: Optional[dict[str, ParameterConstraints]] = None,
                 optimizer: OptimType = OptimType.EXACT_SGD, cost_model: Optional[TTCostModel] = None,
                 collective_latency_ms: float = 0.0) -> EmbeddingShardingPlanner:
    """TorchRec's EmbeddingShardingPlanner with the TT estimators (dense tables keep TorchRec's).

    ``batch_size``: per-rank batch size, as TorchRec's planner expects. ``cost_model``: the TT
    kernel's cost (default: calibrated on ``topology.compute_device``, ``tt_costs``).
    ``collective_latency_ms``: the price of one collective call (``links.measure_links``), which
    ``TTCollectivesPerfModel`` adds to every proposal's rating per call its sharding groups make
    per step: the TT collection's (``tt_collective_calls``) and every TorchRec embedding module's
    (``torchrec_collective_calls``).
    """
    estimators = [TTPerfEstimator(topology, constraints, cost_model), TTStorageEstimator(topology, constraints, optimizer)]
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints,
                                     estimator=estimators)
    proposers = [GridSearchProposer(), GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer(),
                 PerModuleUniformProposer()]  # TorchRec's default four, and one per module
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, enumerator=enumerator,
                                    constraints=constraints, proposer=proposers,
                                    performance_model=TTCollectivesPerfModel(topology, collective_latency_ms))


class PerModuleUniformProposer(Proposer):
    """Plans in which every embedding module's tables share one sharding type (each table its
    cheapest option of that type), one plan per combination of the modules' types.

    TorchRec's UniformProposer offers one type for every table of every module, and only a type
    that every table has: with the plain tables allowed data-parallel it offered all 26 demo tables
    data-parallel, but no longer the TT tables data-parallel beside the plain tables table-wise,
    and its greedy proposers did not reach that plan either (Criteo Terabyte, 64 GPUs on PCIe:
    the planner took table-wise TT tables, which the perf model rates 35 % slower). A TT collection
    and TorchRec's tables are one sharding group each per type, so these are the plans whose
    collective calls are fewest (``TTCollectivesPerfModel``)."""

    MAX_PROPOSALS = 1024  # 5 modules of 4 sharding types each

    def __init__(self) -> None:
        self._proposals: list[list[ShardingOption]] = []
        self._index = 0

    def load(self, search_space: list[ShardingOption], enumerator=None) -> None:
        cheapest: dict[str, dict[str, dict[str, ShardingOption]]] = {}  # module -> type -> table -> option
        tables: dict[str, set[str]] = {}
        for o in search_space:
            tables.setdefault(o.path, set()).add(o.fqn)
            best = cheapest.setdefault(o.path, {}).setdefault(o.sharding_type, {})
            if o.fqn not in best or _option_score(o) < _option_score(best[o.fqn]):
                best[o.fqn] = o
        per_module = [[list(by_table.values()) for by_table in types.values() if set(by_table) == tables[path]]
                      for path, types in cheapest.items()]
        combinations = math.prod(len(types) for types in per_module)
        # as TorchRec's GridSearchProposer, nothing where the combinations are too many to rate
        self._proposals = ([[o for group in combo for o in group] for combo in itertools.product(*per_module)]
                           if combinations <= self.MAX_PROPOSALS else [])
        self._index = 0

    def propose(self) -> Optional[list[ShardingOption]]:
        return self._proposals[self._index] if self._index < len(self._proposals) else None

    def feedback(self, partitionable: bool, plan=None, perf_rating=None, storage_constraint=None) -> None:
        self._index += 1


def _option_score(option: ShardingOption) -> float:
    """An option's busiest shard's perf (TorchRec's proposers' score)."""
    return max(shard.perf.total for shard in option.shards)


# Collective calls per step of one sharding group: the ids' KJTAllToAll (TorchRec's, which the TT
# collection's dists use too, ttdist/distributed/dists.py: one all-to-all of the splits, then one
# per tensor, lengths and values; unweighted) and the pooled embeddings' dist forward and backward.
INDEX_ALL_TO_ALL_CALLS = 3
# A TT group (table-/column-wise or row-wise: pooled all-to-all) and a TorchRec table-, column-,
# table-column- or row-wise group (PooledEmbeddingsAllToAll; row-wise: PooledEmbeddingsReduceScatter
# forward, its all-gather backward): one call forward, one backward.
CALLS_PER_SHARDED_GROUP = INDEX_ALL_TO_ALL_CALLS + 2
# A TorchRec table-row-wise or grid-sharded group (TwRwPooledEmbeddingDist, GridPooledEmbeddingDist):
# a reduce-scatter within the node, then an all-to-all across nodes, forward and backward.
CALLS_PER_TWRW_GROUP = INDEX_ALL_TO_ALL_CALLS + 4
_TWRW_TYPES = {ShardingType.TABLE_ROW_WISE.value, ShardingType.GRID_SHARD.value}


def tt_collective_calls(sharding_types: set[str]) -> int:
    """Collective calls per step of a TT collection whose tables have these sharding types: one
    group for table- and column-wise tables, one for row-wise, none for data-parallel; one
    all-reduce for every replicated core (row-/column-wise G_2..G_d, data-parallel)."""
    groups = bool(sharding_types & {TABLE_WISE, COLUMN_WISE}) + (ROW_WISE in sharding_types)
    replicas = bool(sharding_types & {ROW_WISE, COLUMN_WISE, DATA_PARALLEL})
    return CALLS_PER_SHARDED_GROUP * groups + replicas


def torchrec_collective_calls(sharding_types: set[str]) -> int:
    """Collective calls per step of a TorchRec embedding-bag collection whose tables have these
    sharding types: TorchRec builds one sharding, with its own input and output dists, per type,
    so every type is a group (``CALLS_PER_SHARDED_GROUP``; table-row-wise and grid:
    ``CALLS_PER_TWRW_GROUP``), except data-parallel, whose tables communicate only their
    gradients, in DDP's all-reduce of the dense parameters (counted by no plan: every plan has it)."""
    sharded = sharding_types - {DATA_PARALLEL}
    twrw = sharded & _TWRW_TYPES
    return CALLS_PER_SHARDED_GROUP * len(sharded - twrw) + CALLS_PER_TWRW_GROUP * len(twrw)


def plan_collective_calls(plan: list[ShardingOption]) -> int:
    """Collective calls per step of the sharded modules of a proposal: per module (its path),
    ``tt_collective_calls`` of a TT collection's sharding types, ``torchrec_collective_calls`` of
    any other's."""
    types: dict[tuple[str, bool], set[str]] = {}
    for o in plan:
        types.setdefault((o.path, o.module_type_key == TT_MODULE_KEY), set()).add(o.sharding_type)
    return sum(tt_collective_calls(t) if is_tt else torchrec_collective_calls(t) for (_, is_tt), t in types.items())


class TTCollectivesPerfModel(NoopPerfModel):
    """TorchRec's rating of a proposal (the slowest rank's summed perf) plus ``latency_ms`` for
    every collective call its sharding groups make per step (``plan_collective_calls``): those of
    the TT collection and those of the TorchRec embedding modules.

    TorchRec rates tables one at a time and its topology has bandwidths only; but a call costs
    its latency once per sharding group, however many tables share it. Where calls are dear (gloo:
    about a millisecond), a plan with fewer groups, or data-parallel tables with no all-to-all,
    wins although TorchRec's per-table sums are alike: its proposers (UniformProposer among them)
    offer such plans, this rating tells them apart — for TorchRec's tables too, which it would
    otherwise split over two sharding types (two input and two output dists) for free.
    """

    def __init__(self, topology: Topology, latency_ms: float = 0.0) -> None:
        super().__init__(topology)
        self._latency = latency_ms

    def rate(self, plan: list[ShardingOption]) -> float:
        return super().rate(plan) + self._latency * plan_collective_calls(plan)


# ----------------------------------------------------------------------------------------------
# DMP's default planner: DistributedModelParallel(module, sharders=[...]) without plan=
#
# DMP builds EmbeddingShardingPlanner(topology) (torchrec/distributed/model_parallel.py), whose
# EmbeddingEnumerator, given no estimators, creates (enumerators.py)
#   [EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, ...), EmbeddingStorageEstimator(...)].
# Neither can be made TT-aware from outside:
# * Perf: the factory's registry (TorchRec's documented hook) registers a HardwarePerfConfig, and
#   every hook of a config (@device_bw, @forward_compute, @fwd_comms ...) sees only a
#   ShardPerfContext: the 2-D proxy's rows and dim, never the sharding option, so never the TT
#   ranks or cores that decide the TT kernel's cost and a data-parallel table's all-reduce.
# * Storage: TorchRec 1.8 has no hook. The estimator never calls ModuleSharder.storage_usage();
#   calculate_shard_storages takes numel * element_size of the planned 2-D tensor, splits it in
#   proportion to the shard sizes and adds TBE input/output buffers — which cannot express a TT
#   shard (a slice of G_1 plus the replicated G_2..G_d).
# The last resort, scoped: the two names that enumerator looks up become subclasses of TorchRec's
# own (DefaultPlannerPerfEstimatorFactory, DefaultPlannerStorageEstimator) whose estimators hand
# every non-TT option to TorchRec's estimate() unchanged and give TT options make_planner's numbers.
# ----------------------------------------------------------------------------------------------


class DefaultPlannerPerfEstimator(EmbeddingPerfEstimatorV2):
    """TorchRec's hardware-config estimator (what its factory creates) for every option but the TT sharder's; those get
    ``tt_option_perf`` with the calibrated cost model of the topology's device (``tt_costs``)."""

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:
        rest = [o for o in sharding_options if o.module_type_key != TT_MODULE_KEY]
        if rest:
            super().estimate(rest, sharder_data_map)
        tt = [o for o in sharding_options if o.module_type_key == TT_MODULE_KEY]
        if tt:
            model = cost_model(self._topology.compute_device)
            for option in tt:
                tt_option_perf(option, self._topology, model)


class DefaultPlannerPerfEstimatorFactory(EmbeddingPerfEstimatorFactory):
    """TorchRec's factory (same registry, same configs); ``create`` returns a
    ``DefaultPlannerPerfEstimator`` with the config TorchRec's ``create`` chose."""

    @classmethod
    def create(cls, hardware_name: str, is_inference: bool = False, topology: Optional[Topology] = None,
               constraints: Optional[dict[str, ParameterConstraints]] = None, **kwargs) -> EmbeddingPerfEstimatorV2:
        config = super().create(hardware_name, is_inference, topology, constraints, **kwargs).config
        return DefaultPlannerPerfEstimator(topology=topology, constraints=constraints, is_inference=is_inference,
                                           config=config, **kwargs)


class DefaultPlannerStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's ``EmbeddingStorageEstimator`` for every option but the TT sharder's; those get
    the real bytes of their TT shards, with the collection's fused optimizer (``_option_optimizer``)."""

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:
        rest = [o for o in sharding_options if o.module_type_key != TT_MODULE_KEY]
        if rest:
            super().estimate(rest, sharder_data_map)
        for option in (o for o in sharding_options if o.module_type_key == TT_MODULE_KEY):
            _estimate_tt_storage(option, self._topology, _option_optimizer(option, sharder_data_map))


def _option_optimizer(option: ShardingOption, sharder_data_map) -> OptimType:
    """The fused optimizer the option's collection will train with: the TT sharder's
    ``fused_params`` or what ``apply_optimizer_in_backward`` attached to its parameters."""
    data = (sharder_data_map or {}).get(TT_MODULE_KEY)
    return resolve_fused_params(option.module[1].table_parameters(), (data.fused_params or None) if data else None).optimizer


def _install(name: str, torchrec_class: type, ours: type) -> None:
    current = getattr(_enumerators, name)
    if current is torchrec_class:
        setattr(_enumerators, name, ours)
    elif current is not ours:
        logger.warning("ttdist: EmbeddingEnumerator's %s is %s, not TorchRec's: left alone, so a planner without "
                       "estimators cannot estimate TT tables; use ttdist.distributed.make_planner", name,
                       current.__name__)


def install_default_planner_support() -> None:
    """Lets DMP's default planner plan TT tables (idempotent; ``import ttdist.distributed`` runs it).

    Points two names of ``torchrec.distributed.planner.enumerators``, each only where it is still
    TorchRec's own, at ttdist's subclasses: ``EmbeddingPerfEstimatorFactory`` (->
    ``DefaultPlannerPerfEstimatorFactory``) and ``EmbeddingStorageEstimator`` (->
    ``DefaultPlannerStorageEstimator``). TorchRec's classes and its registry are untouched, and
    dense tables keep TorchRec's numbers.
    """
    _install("EmbeddingPerfEstimatorFactory", EmbeddingPerfEstimatorFactory, DefaultPlannerPerfEstimatorFactory)
    _install("EmbeddingStorageEstimator", EmbeddingStorageEstimator, DefaultPlannerStorageEstimator)
