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

import logging
import math
from typing import Optional

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner import enumerators as _enumerators
from torchrec.distributed.planner.constants import DDR_MEM_BW, DEFAULT_PERF_ESTIMATOR, HBM_MEM_BW
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorConfig, EmbeddingPerfEstimatorFactory, device_bw
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, Perf, ShardEstimator, ShardingOption, Storage
from torchrec.distributed.planner.utils import sharder_name

from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL
from ttdist.distributed.fused_params import resolve_fused_params
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, ROW_WISE, TABLE_WISE, table_shards
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
    """A roofline model of the TT kernel: FLOPs at ``flops_per_s``, pooled output over ``comm_bw``.

    fwd = lookups * flops_per_row / flops_per_s; bwd = 2 * fwd; comms = B * D_shard * 4 bytes
    each way (plus the replicated cores' all-reduce for row-/column-wise and data-parallel).
    """

    def __init__(self, topology: Topology, constraints: Optional[dict[str, ParameterConstraints]] = None,
                 flops_per_s: float = 5e10, comm_bw: float = 1e10) -> None:
        self._topology, self._flops, self._bw = topology, flops_per_s, comm_bw
        self._default = EmbeddingPerfEstimator(topology=topology, constraints=constraints)

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:
        rest = [o for o in sharding_options if o.module_type_key != TT_MODULE_KEY]
        if rest:
            self._default.estimate(rest, sharder_data_map)
        world = self._topology.world_size
        for option in (o for o in sharding_options if o.module_type_key == TT_MODULE_KEY):
            shape = _config(option).tt_shape()
            dp = option.sharding_type == DATA_PARALLEL
            batch = option.batch_size * (1 if dp else world)
            pooling = sum(option.input_lengths)
            for planner_shard in option.shards:
                frac_rows = 1 / world if option.sharding_type == ROW_WISE else 1.0
                frac_cols = planner_shard.size[1] / shape.embedding_dim
                fwd = batch * pooling * frac_rows * shape.flops_per_row() * frac_cols / self._flops
                out_bytes = 0 if dp else batch * planner_shard.size[1] * 4
                replicas = 0 if option.sharding_type == TABLE_WISE else 8 * shape.num_parameters
                planner_shard.perf = Perf(fwd_compute=fwd, fwd_comms=out_bytes / self._bw, bwd_compute=2 * fwd,
                                          bwd_comms=(out_bytes + replicas) / self._bw)


def tt_constraints(tables: dict[str, str], constraints: Optional[dict[str, ParameterConstraints]] = None
                   ) -> dict[str, ParameterConstraints]:
    """ParameterConstraints forcing ``{table: sharding_type}`` with the TT kernel."""
    out = dict(constraints or {})
    for name, sharding_type in tables.items():
        out[name] = ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[TT_COMPUTE_KERNEL],
                                         min_partition=1)
    return out


def make_planner(topology: Topology, batch_size: int, constraints: Optional[dict[str, ParameterConstraints]] = None,
                 optimizer: OptimType = OptimType.EXACT_SGD) -> EmbeddingShardingPlanner:
    """TorchRec's EmbeddingShardingPlanner with the TT estimators (dense tables keep TorchRec's).

    ``batch_size``: per-rank batch size, as TorchRec's planner expects.
    """
    estimators = [TTPerfEstimator(topology, constraints), TTStorageEstimator(topology, constraints, optimizer)]
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints,
                                     estimator=estimators)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, enumerator=enumerator,
                                    constraints=constraints)


# ----------------------------------------------------------------------------------------------
# DMP's default planner: DistributedModelParallel(module, sharders=[...]) without plan=
#
# DMP builds EmbeddingShardingPlanner(topology) (torchrec/distributed/model_parallel.py), whose
# EmbeddingEnumerator, given no estimators, creates (enumerators.py)
#   [EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, ...), EmbeddingStorageEstimator(...)].
# * Perf: the factory's registry is TorchRec's documented hook. TTKernelPerfEstimatorConfig is
#   TorchRec's default config plus a bandwidth for the TT kernel (TorchRec's @device_bw
#   annotation, keyed by (device, kernel)); every other kernel resolves exactly as before.
# * Storage: TorchRec 1.8 has no hook. The estimator never calls ModuleSharder.storage_usage();
#   calculate_shard_storages takes numel * element_size of the planned 2-D tensor, splits it in
#   proportion to the shard sizes and adds TBE input/output buffers — which cannot express a TT
#   shard (a slice of G_1 plus the replicated G_2..G_d). The last resort, scoped: the enumerator's
#   storage estimator class becomes DefaultPlannerStorageEstimator, a subclass that hands every
#   non-TT option to TorchRec's own estimate() unchanged and gives TT options their real bytes.
# ----------------------------------------------------------------------------------------------

# The TT kernel rebuilds each row from d cores (O(D * r^2) FLOPs where TorchRec's fused kernel
# reads D * 4 bytes), so it streams rows about an order of magnitude slower. The factory's config
# sees only the 2-D proxy, not the TT ranks: one fraction for every TT table. make_planner's
# TTPerfEstimator models each table's FLOPs instead.
TT_KERNEL_BW_FRACTION = 1 / 8


@device_bw(bandwidth=DDR_MEM_BW * TT_KERNEL_BW_FRACTION, device="cpu", compute_kernel=TT_COMPUTE_KERNEL)
@device_bw(bandwidth=HBM_MEM_BW * TT_KERNEL_BW_FRACTION, device="cuda", compute_kernel=TT_COMPUTE_KERNEL)
@device_bw(bandwidth=HBM_MEM_BW * TT_KERNEL_BW_FRACTION, device="mtia", compute_kernel=TT_COMPUTE_KERNEL)
class TTKernelPerfEstimatorConfig(EmbeddingPerfEstimatorConfig):
    """TorchRec's default perf config plus a device bandwidth for ttdist's TT kernel
    (``customized_kernel``): ``TT_KERNEL_BW_FRACTION`` of TorchRec's default DDR (CPU) or HBM
    (CUDA, MTIA) bandwidth. Registered as ``DEFAULT_PERF_ESTIMATOR``."""


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


def install_default_planner_support() -> None:
    """Lets DMP's default planner plan TT tables (idempotent; ``import ttdist.distributed`` runs it).

    Touches two things, each only where it is still TorchRec's own: the ``DEFAULT_PERF_ESTIMATOR``
    registration (-> ``TTKernelPerfEstimatorConfig``) and ``EmbeddingEnumerator``'s default storage
    estimator (-> ``DefaultPlannerStorageEstimator``). Dense tables keep TorchRec's numbers.
    """
    topology_log = logging.getLogger("torchrec.distributed.planner.types")  # "constructed directly": a probe
    level = topology_log.level
    topology_log.setLevel(logging.ERROR)
    try:
        probe = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR,
                                                     topology=Topology(world_size=1, compute_device="cpu"))
    finally:
        topology_log.setLevel(level)
    registered = type(probe.config)
    if registered is EmbeddingPerfEstimatorConfig:
        EmbeddingPerfEstimatorFactory.register(DEFAULT_PERF_ESTIMATOR)(TTKernelPerfEstimatorConfig)
    elif registered is not TTKernelPerfEstimatorConfig:
        logger.warning("ttdist: DEFAULT_PERF_ESTIMATOR is %s, not TorchRec's: left alone, so a planner without "
                       "estimators cannot estimate the TT kernel; use ttdist.distributed.make_planner",
                       registered.__name__)
    current = _enumerators.EmbeddingStorageEstimator
    if current is EmbeddingStorageEstimator:
        _enumerators.EmbeddingStorageEstimator = DefaultPlannerStorageEstimator
    elif current is not DefaultPlannerStorageEstimator:
        logger.warning("ttdist: EmbeddingEnumerator's storage estimator is %s, not TorchRec's: left alone, so a "
                       "planner without estimators charges TT tables their 2-D proxy's bytes; use "
                       "ttdist.distributed.make_planner", current.__name__)
