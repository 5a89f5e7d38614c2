"""Models, reference byte counts and rank functions of tests/distributed/test_default_planner.py.

Only TorchRec is imported at module level: ``dense_alone_then_mixed`` plans a TorchRec-only model
before ttdist is imported at all (TorchRec's planner exactly as shipped), then the mixed model.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torchrec.distributed.comm import get_local_size, get_topology_domain_multiple
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

TT = [  # q_1 = 2 everywhere but t3 (q_1 = 4: column-wise into up to 4 shards)
    dict(name="t0", num_embeddings=1000, embedding_dim=8, feature_names=["f0"], tt_ranks=[4, 4]),
    dict(name="t1", num_embeddings=700, embedding_dim=8, feature_names=["f1", "f2"], tt_ranks=[5],
         pooling=PoolingType.MEAN),
    dict(name="t2", num_embeddings=3000, embedding_dim=8, feature_names=["f3"], tt_ranks=[3, 6]),
    dict(name="t3", num_embeddings=5000, embedding_dim=256, feature_names=["f4"], tt_ranks=[8, 8],
         tt_q_shapes=[4, 8, 8]),
]
DENSE = [dict(name="e0", num_embeddings=50, embedding_dim=8, feature_names=["e0f"]),
         dict(name="e1", num_embeddings=4000, embedding_dim=256, feature_names=["e1f"]),
         dict(name="e2", num_embeddings=100_000, embedding_dim=64, feature_names=["e2f"])]


def tt_configs():
    from ttdist.modules.collection import TTEmbeddingBagConfig
    return [TTEmbeddingBagConfig(**t) for t in TT]


def dense_configs():
    return [EmbeddingBagConfig(**t) for t in DENSE]


def sharders(optimizer: str = "exact_sgd"):
    from ttdist.distributed import TTEmbeddingBagCollectionSharder
    return [EmbeddingBagCollectionSharder(), TTEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer})]


def tt_collection(device="cpu", tables=None):
    import ttdist
    return ttdist.TTEmbeddingBagCollection(tables or tt_configs(), seed=1, device=torch.device(device))


def dlrm_over_tt(device="cpu"):
    """TorchRec's DLRM over the TT tables of dim 8 (DLRM needs one embedding dim)."""
    from torchrec.models.dlrm import DLRM
    ebc = tt_collection(device, [c for c in tt_configs() if c.embedding_dim == 8])
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8],
                over_arch_layer_sizes=[8, 1], dense_device=torch.device(device))


def mixed(device="cpu"):
    from ttdist.modules.collection import MixedEmbeddingBagCollection
    return MixedEmbeddingBagCollection(tt_configs() + dense_configs(), device=torch.device(device))


def dmp_topology(world_size: int) -> Topology:
    """The topology DistributedModelParallel builds when it gets no plan (model_parallel.py)."""
    return Topology(local_world_size=get_local_size(world_size), world_size=world_size, compute_device="cpu",
                    pod_size=get_topology_domain_multiple())


class ChargedStorage:
    """Records, from EmbeddingStats.log, what the planner charged each shard of its chosen plan."""

    def __init__(self) -> None:
        self.records: dict[str, tuple] = {}
        self._log = EmbeddingStats.log

    def __enter__(self) -> "ChargedStorage":
        spy = self

        def log(stats, *args, **kwargs):
            for o in kwargs["best_plan"]:
                spy.records[o.name] = (o.sharding_type, o.compute_kernel,
                                       [(s.rank, s.storage.ddr, s.storage.hbm) for s in o.shards])
            return spy._log(stats, *args, **kwargs)

        EmbeddingStats.log = log
        return self

    def __exit__(self, *exc) -> None:
        EmbeddingStats.log = self._log


def default_planner_plan(module: nn.Module, world_size: int, optimizer: str = "exact_sgd"):
    """What DMP without plan= runs, minus the broadcast: (plan, {table: charged storage})."""
    module_sharders = sharders(optimizer)  # as for DMP: the sharders (ttdist.distributed) exist first
    with ChargedStorage() as charged:
        plan = EmbeddingShardingPlanner(topology=dmp_topology(world_size)).plan(module, module_sharders)
    return plan, charged.records


# ----------------------------------------------------------------------------- reference bytes
def table_cores(module, name: str) -> list[torch.Tensor]:
    """The real cores of TT table `name` (tt_cores holds every table's cores, table after table)."""
    configs = module.embedding_bag_configs()
    start = 0
    for c in configs:
        d = len(c.tt_shape().p)
        if c.name == name:
            return [module.tt_tables.tt_cores[start + k].detach() for k in range(d)]
        start += d
    raise KeyError(name)


def real_shard_bytes(cores: list[torch.Tensor], sharding_type: str, shard: int, num_shards: int,
                     world_size: int, optimizer: str) -> int:
    """Bytes of one TT shard from the core tensors themselves: the shard's slice of G_1 (cut
    along p_1 for row_wise, along q_1 for column_wise, in ceil / even blocks) plus the full
    G_2..G_d, plus optimizer state (Adagrad: one per element; row-wise: one per core slice)."""
    g1 = cores[0]
    if sharding_type == "row_wise":
        c = -(-g1.shape[0] // world_size)
        g1 = g1[shard * c:(shard + 1) * c]
    elif sharding_type == "column_wise":
        q1 = g1.shape[2]
        g1 = g1[:, :, q1 * shard // num_shards:q1 * (shard + 1) // num_shards]
    local = [g1] + cores[1:]
    params = sum(t.numel() for t in local)
    state = {"exact_sgd": 0, "exact_adagrad": params, "exact_row_wise_adagrad": sum(t.shape[0] for t in local)}
    return 4 * (params + state[optimizer])


def plan_summary(plan) -> dict:
    """{module path: {table: (sharding type, kernel, ranks, [(offsets, sizes, placement)])}}."""
    out = {}
    for path, module_plan in plan.plan.items():
        out[path] = {}
        for name, ps in module_plan.items():
            shards = ([(list(s.shard_offsets), list(s.shard_sizes), str(s.placement)) for s in ps.sharding_spec.shards]
                      if ps.sharding_spec is not None else None)
            out[path][name] = (ps.sharding_type, ps.compute_kernel, ps.ranks, shards)
    return out


# ----------------------------------------------------------------------------- rank functions
def use_fixed_calibration() -> None:
    """The TT cost model of tests/distributed/test_tt_costs.py, so that no rank times the kernel."""
    from tests.distributed.test_tt_costs import CALIBRATION
    from ttdist.distributed.tt_costs import set_calibration
    set_calibration(CALIBRATION)


def dmp_without_plan(rank: int, world_size: int, optimizer: str) -> dict:
    """DistributedModelParallel over DLRM(TTEmbeddingBagCollection) with no plan=."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    use_fixed_calibration()
    model = dlrm_over_tt()
    with ChargedStorage() as charged:  # only rank 0 plans (collective_plan broadcasts)
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders(optimizer))
    return {"plan": plan_summary(dmp.plan), "charged": charged.records}


def search_space_estimates(module: nn.Module, module_sharders, world_size: int, estimator=None) -> dict:
    """{(table, sharding type, kernel): [(size, offset, perf, storage) per shard]} of the search
    space of DMP's default enumerator (or of one with `estimator`)."""
    enumerator = EmbeddingEnumerator(topology=dmp_topology(world_size), batch_size=BATCH_SIZE, estimator=estimator)
    return {(o.name, o.sharding_type, o.compute_kernel): [(s.size, s.offset, s.perf, s.storage) for s in o.shards]
            for o in enumerator.enumerate(module, module_sharders)}


def dense_alone_then_mixed(rank: int, world_size: int) -> dict:
    """With TorchRec only (ttdist not imported yet): the plan of DMP over TorchRec's EBC of DENSE,
    and the estimates of its search space. Then, with ttdist: DMP without plan= over
    MixedEmbeddingBagCollection(TT + DENSE), its plan, what it charged, its search space."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    assert "ttdist" not in sys.modules
    alone = DistributedModelParallel(EmbeddingBagCollection(dense_configs(), device=torch.device("cpu")),
                                     device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
    torchrec_estimates = search_space_estimates(EmbeddingBagCollection(dense_configs(), device=torch.device("meta")),
                                                [EmbeddingBagCollectionSharder()], world_size)
    module_sharders = sharders()
    use_fixed_calibration()
    with ChargedStorage() as charged:
        dmp = DistributedModelParallel(mixed(), device=torch.device("cpu"), sharders=module_sharders)
    return {"alone": plan_summary(alone.plan), "torchrec_estimates": torchrec_estimates,
            "mixed": plan_summary(dmp.plan), "charged": charged.records,
            "mixed_estimates": search_space_estimates(mixed("meta"), module_sharders, world_size)}
