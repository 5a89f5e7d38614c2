"""DistributedModelParallel without plan=: TorchRec's default planner plans TT tables.

What DMP runs when it gets no plan (torchrec/distributed/model_parallel.py): an
EmbeddingShardingPlanner(Topology(...)) with no estimators, so its enumerator builds
[EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR), EmbeddingStorageEstimator]. The
in-process tests run that planner (no process group needed); the spawned ones run DMP itself
on 1 and 2 gloo ranks. Storage is asserted against bytes counted from the real core tensors.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import shard_estimators
from torchrec.distributed.planner import enumerators
from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorConfig, EmbeddingPerfEstimatorFactory
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from tests.distributed import default_planner_workers as w
from tests.distributed.harness import run_ranks
from tests.distributed.test_tt_costs import MODEL
from ttdist.distributed import (TT_COMPUTE_KERNEL, DefaultPlannerPerfEstimator, DefaultPlannerStorageEstimator,
                                install_default_planner_support)
from ttdist.distributed.planner import DefaultPlannerPerfEstimatorFactory, TTPerfEstimator, tt_shard_bytes
from ttdist.distributed.shard_layout import table_shards
from ttdist.modules.optim import OptimType

logging.getLogger("torchrec").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torchrec")
OPTIMIZERS = ["exact_sgd", "exact_adagrad", "exact_row_wise_adagrad"]


def assert_tt_charged_real_bytes(module, charged: dict, world_size: int, optimizer: str) -> int:
    """Every TT table of the chosen plan: customized kernel, and each shard charged exactly the
    bytes of its cores (and tt_shard_bytes). Returns the number of shards checked."""
    checked = 0
    configs = {c.name: c for c in module.embedding_bag_configs()}
    for name, config in configs.items():
        sharding_type, kernel, shards = charged[name]
        assert kernel == TT_COMPUTE_KERNEL, (name, kernel)
        cores = w.table_cores(module, name)
        ranks = sorted({r for r, _, _ in shards}) if sharding_type != "column_wise" else [r for r, _, _ in shards]
        layout = table_shards(name, config.tt_shape(), sharding_type,
                              ranks if sharding_type != "row_wise" else list(range(world_size)), world_size)
        for j, (rank, ddr, hbm) in enumerate(shards):
            real = w.real_shard_bytes(cores, sharding_type, j, len(shards), world_size, optimizer)
            local = layout[j].local_shape(config.tt_shape())
            assert ddr == real == tt_shard_bytes(config, local.num_parameters, OptimType.parse(optimizer),
                                                 sum(local.p)), (name, sharding_type, j, ddr, real)
            assert hbm == 0
            checked += 1
    return checked


# ------------------------------------------------------------------ in process: the planner DMP builds
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_default_planner_charges_tt_tables_their_real_bytes(world_size, optimizer):
    module = w.tt_collection()
    plan, charged = w.default_planner_plan(module, world_size, optimizer)
    assert set(plan.plan[""]) == {t["name"] for t in w.TT} == set(charged)
    assert {ps.compute_kernel for ps in plan.plan[""].values()} == {TT_COMPUTE_KERNEL}
    assert assert_tt_charged_real_bytes(module, charged, world_size, optimizer) >= len(w.TT)
    if optimizer == "exact_sgd" and world_size == 1:  # by hand: t0 is 10x2x4 + 10x4x2x4 + 10x4x2 = 480 floats
        assert charged["t0"][2] == [(0, 1920, 0)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_tt_option_of_the_search_space_is_its_real_bytes(world_size):
    """All four sharding types (column_wise of t3 into 2 shards: q_1 = 4), not only the chosen ones."""
    module = w.tt_collection("cpu")
    space = w.search_space_estimates(module, w.sharders("exact_adagrad"), world_size)
    assert {st for (_, st, _) in space} == {"table_wise", "row_wise", "column_wise", "data_parallel"}
    for (name, sharding_type, kernel), shards in space.items():
        assert kernel == TT_COMPUTE_KERNEL
        cores = w.table_cores(module, name)
        for j, (_, _, perf, storage) in enumerate(shards):
            real = w.real_shard_bytes(cores, sharding_type, j, len(shards), world_size, "exact_adagrad")
            assert (storage.ddr, storage.hbm) == (real, 0), (name, sharding_type, j)
            assert perf.total > 0


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_dense_tables_keep_torchrec_estimates(world_size):
    """Every dense option of the mixed model's search space has exactly the sizes, perf and
    storage that TorchRec's own estimators (not the registered ones) give a dense-only model."""
    torchrec_estimators = [EmbeddingPerfEstimatorFactory.create_with_config(EmbeddingPerfEstimatorConfig(),
                                                                            topology=w.dmp_topology(world_size)),
                           shard_estimators.EmbeddingStorageEstimator(topology=w.dmp_topology(world_size))]
    torchrec = w.search_space_estimates(EmbeddingBagCollection(w.dense_configs(), device=torch.device("meta")),
                                        [EmbeddingBagCollectionSharder()], world_size, torchrec_estimators)
    mixed = w.search_space_estimates(w.mixed("meta"), w.sharders(), world_size)
    dense = {key: value for key, value in mixed.items() if key[2] != TT_COMPUTE_KERNEL}
    assert dense == torchrec
    assert len(dense) > 5 and len(mixed) > len(dense)


def test_mixed_model_at_one_rank_plans_dense_tables_as_torchrec_alone():
    plan, _ = w.default_planner_plan(w.mixed("meta"), 1)
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    alone = EmbeddingShardingPlanner(topology=w.dmp_topology(1)).plan(
        EmbeddingBagCollection(w.dense_configs(), device=torch.device("meta")), [EmbeddingBagCollectionSharder()])
    assert w.plan_summary(plan)["dense"] == w.plan_summary(alone)[""]
    assert {ps.compute_kernel for ps in plan.plan["tt"].values()} == {TT_COMPUTE_KERNEL}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_default_planner_costs_tt_options_as_make_planner(world_size):
    """Every TT option of DMP's search space has exactly the perf of make_planner's TTPerfEstimator
    with the same cost model (compute from tt_costs, comms from the topology's bandwidths)."""
    module = w.tt_collection("meta")
    default = w.search_space_estimates(module, w.sharders(), world_size)
    ours = w.search_space_estimates(module, w.sharders(), world_size,
                                    [TTPerfEstimator(w.dmp_topology(world_size), cost_model=MODEL)])
    assert {st for (_, st, _) in default} == {"table_wise", "row_wise", "column_wise", "data_parallel"}
    for key, shards in default.items():
        assert [perf for _, _, perf, _ in shards] == [perf for _, _, perf, _ in ours[key]], key
        assert all(perf.total > 0 for _, _, perf, _ in shards)


def test_install_is_idempotent_and_only_swaps_the_enumerators_names():
    install_default_planner_support()
    install_default_planner_support()
    assert enumerators.EmbeddingStorageEstimator is DefaultPlannerStorageEstimator
    assert enumerators.EmbeddingPerfEstimatorFactory is DefaultPlannerPerfEstimatorFactory
    assert issubclass(DefaultPlannerStorageEstimator, shard_estimators.EmbeddingStorageEstimator)
    assert shard_estimators.EmbeddingStorageEstimator is not DefaultPlannerStorageEstimator  # TorchRec's class intact
    # TorchRec's registry untouched: its factory still creates its own default config
    torchrec = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=w.dmp_topology(1))
    assert type(torchrec.config) is EmbeddingPerfEstimatorConfig and type(torchrec) is not DefaultPlannerPerfEstimator
    estimators = EmbeddingEnumerator(topology=w.dmp_topology(2), batch_size=8)._estimators
    assert [type(e) for e in estimators] == [DefaultPlannerPerfEstimator, DefaultPlannerStorageEstimator]
    assert type(estimators[0].config) is EmbeddingPerfEstimatorConfig


# ------------------------------------------------------------------ DMP itself, spawned gloo ranks
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,optimizer", [(1, "exact_sgd"), (2, "exact_adagrad")])
def test_dmp_without_plan_over_dlrm(world_size, optimizer):
    results = run_ranks(w.dmp_without_plan, world_size, optimizer)
    plan = results[0]["plan"]
    assert all(r["plan"] == plan for r in results)
    tables = plan["sparse_arch.embedding_bag_collection"]
    assert set(tables) == {"t0", "t1", "t2"}
    assert {kernel for _, kernel, _, _ in tables.values()} == {TT_COMPUTE_KERNEL}
    charged = results[0]["charged"]  # rank 0 plans; the others receive the plan
    assert {name: v[:2] for name, v in charged.items()} == {name: v[:2] for name, v in tables.items()}
    module = w.dlrm_over_tt().sparse_arch.embedding_bag_collection  # same seed: the same cores
    assert assert_tt_charged_real_bytes(module, charged, world_size, optimizer) >= 3


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2])
def test_dmp_without_plan_over_mixed_tables(world_size):
    results = run_ranks(w.dense_alone_then_mixed, world_size, start_method="spawn")  # before ttdist is imported
    r = results[0]
    assert all(x["mixed"] == r["mixed"] for x in results)
    # the dense options' estimates are TorchRec's own, measured before ttdist was imported
    assert {k: v for k, v in r["mixed_estimates"].items() if k[2] != TT_COMPUTE_KERNEL} == r["torchrec_estimates"]
    for name in (t["name"] for t in w.DENSE):  # what the planner charged the chosen dense options
        sharding_type, kernel, shards = r["charged"][name]
        assert [(s.ddr, s.hbm) for _, _, _, s in r["torchrec_estimates"][(name, sharding_type, kernel)]] == \
               [(ddr, hbm) for _, ddr, hbm in shards]
    if world_size == 1:  # alone, with nothing to balance against: the same plan
        assert r["mixed"]["dense"] == r["alone"][""]
    tt = {k: v for k, v in r["charged"].items() if k in {t["name"] for t in w.TT}}
    assert {kernel for _, kernel, _ in tt.values()} == {TT_COMPUTE_KERNEL}
    assert assert_tt_charged_real_bytes(w.tt_collection(), tt, world_size, "exact_sgd") >= len(w.TT)
