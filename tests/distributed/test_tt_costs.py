"""The TT cost model (ttdist.distributed.tt_costs) and the planner's use of it.

No timing here: every test injects a calibration, and asserts the formulas, what the planner
chooses from them, and the per-rank load it reports.
"""
from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import BasicCommsBandwidths, CollectiveType

from ttdist.distributed import (TTEmbeddingBagCollectionSharder, TTPerfEstimator, TTStorageEstimator, make_planner,
                                tt_constraints)
from ttdist.distributed.plan_bytes import lookup_load_per_rank
from ttdist.distributed.planner import _comms_bw
from ttdist.distributed.shard_layout import (COLUMN_WISE, DATA_PARALLEL, ROW_WISE, SHARDING_TYPES, TABLE_WISE,
                                             table_shards)
from ttdist.distributed.tt_costs import (TTCostModel, TTKernelCalibration, batch_work, distinct_prefixes,
                                         nonnegative_fit)
from ttdist.modules.collection import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.tt_shapes import make_tt_shape

logging.getLogger("torchrec").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torchrec")

CALIBRATION = TTKernelCalibration("cpu", fwd_per_id=1e-7, fwd_per_row=3e-8, fwd_per_byte=5e-10, fwd_per_flop=2e-11,
                                  bwd_per_id=1e-8, bwd_per_row=2e-7, bwd_per_byte=4e-10, bwd_per_flop=6e-11,
                                  update_per_param=1.5e-9)
MODEL = TTCostModel(CALIBRATION)


def test_distinct_prefixes_match_a_sample():
    shape = make_tt_shape(2_000, 16, [8, 8])  # p = (14, 13, 11)
    ids = 3_000
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(20):
        rows = torch.randint(0, shape.num_embeddings, (ids,), generator=gen)
        counts.append([len(torch.unique(rows // math.prod(shape.p[k:]))) for k in range(1, shape.d + 1)])
    sampled = torch.tensor(counts, dtype=torch.float64).mean(0).tolist()
    for expected, seen in zip(distinct_prefixes(shape, ids), sampled):
        assert expected == pytest.approx(seen, rel=0.02)
    assert distinct_prefixes(shape, 1) == pytest.approx([1.0] * shape.d)


def test_one_id_costs_flops_per_row():
    shape = make_tt_shape(100_000, 64, [16, 32])
    n, rows, nbytes, flops = batch_work(shape, 1)
    assert (n, rows, nbytes) == (1.0, pytest.approx(1.0), pytest.approx(4 * 64))
    assert flops == pytest.approx(shape.flops_per_row())


def test_lookup_seconds_is_the_formula():
    shape = make_tt_shape(500_000, 16, [16, 16])
    n, rows, nbytes, flops = batch_work(shape, 2048)
    bwd_flops = batch_work(shape, 2048, direction="bwd", device=MODEL.calibration.device)[3]
    assert MODEL.lookup_seconds(shape, 2048, "fwd") == pytest.approx(1e-7 * n + 3e-8 * rows + 5e-10 * nbytes
                                                                     + 2e-11 * flops)
    assert MODEL.lookup_seconds(shape, 2048, "bwd") == pytest.approx(1e-8 * n + 2e-7 * rows + 4e-10 * nbytes
                                                                     + 6e-11 * bwd_flops)


def test_cpu_backward_of_three_cores_counts_the_cheaper_order():
    """q = (4, 2, 2), rank 16, one id: the trie walk's 3 * 2048 + 2 * 256 = 6656 multiply-adds
    against middle-out's 2 * 256 + 3 * 1024 = 3584 (csrc/cpu: middle_out_is_cheaper); CUDA and
    the forward keep the trie walk's count, and q = (2, 2, 4) is cheaper as a trie walk."""
    shape = make_tt_shape(500_000, 16, [16, 16], tt_q_shapes=[4, 2, 2])
    flops = batch_work(shape, 1)[3]
    assert batch_work(shape, 1, direction="bwd", device="cpu")[3] == pytest.approx(flops * 3584 / 6656)
    assert batch_work(shape, 1, direction="bwd", device="cuda")[3] == flops
    ascending = make_tt_shape(500_000, 16, [16, 16], tt_q_shapes=[2, 2, 4])
    assert batch_work(ascending, 1, direction="bwd", device="cpu")[3] == batch_work(ascending, 1)[3]
    with pytest.raises(ValueError, match="direction"):
        MODEL.lookup_seconds(shape, 1, "backward")


def test_nonnegative_fit_recovers_coefficients():
    truth = [2e-7, 0.0, 5e-11]
    features = [[1000, 3e6, 1e7], [500, 1e7, 2e6], [4000, 2e5, 5e7], [100, 5e6, 1e5]]
    times = [sum(a * b for a, b in zip(f, truth)) for f in features]
    fitted, error = nonnegative_fit(features, times)
    assert fitted == pytest.approx(truth, rel=1e-6, abs=1e-18)
    assert error < 1e-9


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_shard_costs_count_ids_and_replicas(sharding_type):
    shape, world, batch = make_tt_shape(100_000, 16, [8, 8], tt_q_shapes=[4, 2, 2]), 4, 256  # q_1 = 4: 4 CW shards
    ranks = [2] if sharding_type == TABLE_WISE else list(range(world))
    shards = table_shards("t", shape, sharding_type, ranks, world)
    costs = MODEL.shard_costs(shape, sharding_type, shards, batch, 1.0, world)
    ids = [c.ids for c in costs]
    expected = {TABLE_WISE: [world * batch], DATA_PARALLEL: [batch] * world, COLUMN_WISE: [world * batch] * world}
    if sharding_type == ROW_WISE:
        assert sum(ids) == pytest.approx(world * batch)
    else:
        assert ids == expected[sharding_type]
    others = sum(math.prod(c) for c in shape.core_shapes[1:])
    replicated = {TABLE_WISE: 0, ROW_WISE: others, COLUMN_WISE: others, DATA_PARALLEL: shape.num_parameters}
    for cost, shard in zip(costs, shards):
        assert cost.replicated_parameters == replicated[sharding_type]
        assert cost.update_seconds == pytest.approx(1.5e-9 * cost.replicated_parameters)
        assert cost.fwd_seconds == pytest.approx(MODEL.lookup_seconds(shard.local_shape(shape), cost.ids, "fwd"))


# ------------------------------------------------------------------ the planner
def tt_model(*tables) -> TTEmbeddingBagCollection:
    """TT tables (name, rows, dim, rank), one feature each, on the meta device."""
    return TTEmbeddingBagCollection([TTEmbeddingBagConfig(name=n, num_embeddings=rows, embedding_dim=dim,
                                                          feature_names=[f"f_{n}"], tt_ranks=[r, r])
                                     for n, rows, dim, r in tables], device=torch.device("meta"))


def plan_of(module, topology, batch=512, constraints=None):
    planner = make_planner(topology, batch_size=batch, constraints=constraints, cost_model=MODEL)
    return planner, planner.plan(module, [TTEmbeddingBagCollectionSharder()]).plan[""]


def test_estimator_perf_is_the_formula():
    world, batch = 2, 512
    topology = Topology(world_size=world, compute_device="cpu")
    module = tt_model(("a", 200_000, 16, 16))
    planner = make_planner(topology, batch_size=batch, cost_model=MODEL)
    options = {o.sharding_type: o for o in planner._enumerator.enumerate(module, [TTEmbeddingBagCollectionSharder()])}
    shape = module.embedding_bag_configs()[0].tt_shape()
    a2a, all_reduce = (_comms_bw(topology, c, world) for c in (CollectiveType.ALL_TO_ALL, CollectiveType.ALL_REDUCE))
    tw = options[TABLE_WISE].shards[0].perf
    assert tw.fwd_compute == pytest.approx(1e3 * MODEL.lookup_seconds(shape, world * batch, "fwd"))
    assert tw.bwd_compute == pytest.approx(1e3 * MODEL.lookup_seconds(shape, world * batch, "bwd"))
    assert tw.fwd_comms == tw.bwd_comms == pytest.approx(world * batch * 16 * 4 / a2a)
    assert tw.input_dist_comms == pytest.approx(world * batch * 8 / a2a)
    for shard in options[DATA_PARALLEL].shards:
        dp = shard.perf
        assert dp.fwd_compute == pytest.approx(1e3 * MODEL.lookup_seconds(shape, batch, "fwd"))
        assert dp.bwd_compute == pytest.approx(1e3 * (MODEL.lookup_seconds(shape, batch, "bwd")
                                                      + 1.5e-9 * shape.num_parameters))
        assert dp.fwd_comms == dp.input_dist_comms == 0
        assert dp.bwd_comms == pytest.approx((world - 1) / world * 2 * 4 * shape.num_parameters / all_reduce)


def test_all_reduce_priced_on_the_hosts_links_and_nics():
    """A replicated core's all-reduce runs on the host's links when its ranks share a host, else on
    the slower of those and the host's NICs together (one per GPU). TorchRec's BasicCommsBandwidths
    takes inter_host_bw * local_world_size in every case: 8 GPUs on PCIe (25 GB/s) at 200 GB/s."""
    pcie, nvlink = (25e6, 25e6), (450e6, 25e6)  # (intra, inter) bytes/ms: 25 / 450 GB/s, HDR 25 GB/s

    def bus(world: int, links: tuple[float, float]) -> float:
        topology = Topology(world_size=world, local_world_size=8, compute_device="cuda", intra_host_bw=links[0],
                            inter_host_bw=links[1])
        return _comms_bw(topology, CollectiveType.ALL_REDUCE, world)

    assert bus(8, pcie) == 25e6 and bus(64, pcie) == 25e6
    assert bus(8, nvlink) == 450e6 and bus(64, nvlink) == 8 * 25e6
    assert bus(2, (450e6, 25e6)) == 450e6  # a group of 2 within the host

    class Measured(BasicCommsBandwidths):  # a model of the links given by the user is used as it is
        def get_bw(self, local_world_size, world_size, collective_type):
            return 123.0

    custom = Topology(world_size=8, local_world_size=8, compute_device="cuda",
                      generalized_comms_bandwidths=Measured(intra_host_bw=1.0, inter_host_bw=1.0))
    assert _comms_bw(custom, CollectiveType.ALL_REDUCE, 8) == 123.0


def test_torchrec_data_parallel_tables_priced_by_the_same_all_reduce_rule():
    """On the Topologies ttdist builds (bus_topology: the app's links, the perf model's presets)
    TorchRec's own estimator prices a data-parallel TorchRec table's gradient all-reduce by
    all_reduce_bus_bandwidth too: 8 GPUs on PCIe at 25 GB/s, not TorchRec's BasicCommsBandwidths'
    200 GB/s (the optimizer kernels it adds are alike), which made the planner replicate plain tables that the perf
    model then charged 1.5x a data-parallel TT plan's step."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from ttdist.distributed.planner import BusBandwidths, bus_topology

    assert BusBandwidths(inter_host_bw=25e6, intra_host_bw=25e6).get_bw(8, 8, CollectiveType.ALL_REDUCE) == 25e6
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", num_embeddings=100_000, embedding_dim=64,
                                                     feature_names=["f"])], device=torch.device("meta"))

    def dp_bwd_comms(topology: Topology) -> float:
        enumerator = EmbeddingEnumerator(topology, 512, estimator=[EmbeddingPerfEstimator(topology)])
        options = enumerator.enumerate(ebc, [EmbeddingBagCollectionSharder()])
        return next(o for o in options if o.sharding_type == DATA_PARALLEL).shards[0].perf.bwd_comms

    kwargs = dict(world_size=8, local_world_size=8, compute_device="cuda")
    ours = dp_bwd_comms(bus_topology(intra_host_bw=25e6, inter_host_bw=25e6, **kwargs))
    torchrec = dp_bwd_comms(Topology(intra_host_bw=25e6, inter_host_bw=25e6, **kwargs))
    table_bytes = 100_000 * 64 * 4  # one host: TorchRec's ring factor (2 n - 1) / n is 1
    assert ours - torchrec == pytest.approx(table_bytes / 25e6 - table_bytes / (8 * 25e6), rel=1e-9)


def test_data_parallel_when_communication_is_expensive_and_cores_small():
    slow = Topology(world_size=4, compute_device="cpu", intra_host_bw=2e4, inter_host_bw=2e4)  # 20 MB/s
    _, plan = plan_of(tt_model(("small", 5_000, 16, 4), ("tiny", 800, 16, 4)), slow)
    assert {ps.sharding_type for ps in plan.values()} == {DATA_PARALLEL}


def test_sharded_when_cores_are_huge():
    slow = Topology(world_size=4, compute_device="cpu", intra_host_bw=2e4, inter_host_bw=2e4)
    _, plan = plan_of(tt_model(("huge", 5_000_000, 64, 128)), slow)
    assert plan["huge"].sharding_type != DATA_PARALLEL


def test_sharded_when_memory_is_tight():
    """Slow links: four small tables are all data-parallel on 4 ranks while replicas fit; with
    room for about two tables per rank, at most one is replicated and the rest are sharded."""
    module = tt_model(*[(f"s{i}", 5_000, 16, 4) for i in range(4)])
    table_bytes = 4 * module.embedding_bag_configs()[0].tt_shape().num_parameters
    slow = dict(world_size=4, compute_device="cpu", intra_host_bw=2e4, inter_host_bw=2e4)

    def plan_with_cap(ddr_cap):  # no storage reservation: the tables alone count against the cap
        topology = Topology(**slow, ddr_cap=ddr_cap)
        enumerator = EmbeddingEnumerator(topology=topology, batch_size=512,
                                         estimator=[TTPerfEstimator(topology, cost_model=MODEL),
                                                    TTStorageEstimator(topology)])
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=512, enumerator=enumerator,
                                           storage_reservation=FixedPercentageStorageReservation(0.0))
        return planner, planner.plan(module, [TTEmbeddingBagCollectionSharder()]).plan[""]

    _, roomy = plan_with_cap(None)
    planner, squeezed = plan_with_cap(int(2.2 * table_bytes))
    assert {ps.sharding_type for ps in roomy.values()} == {DATA_PARALLEL}
    assert sum(ps.sharding_type == DATA_PARALLEL for ps in squeezed.values()) <= 1
    per_rank = [0] * 4
    for option in planner._best_plan:
        for shard in option.shards:
            per_rank[shard.rank] += shard.storage.ddr
    assert max(per_rank) <= 2.2 * table_bytes


def test_table_wise_tables_are_balanced():
    """Eight TT tables of different sizes, forced table-wise, on 2 ranks: the partitioner puts
    the tables so that the model's TT time per rank differs by less than the costliest table."""
    tables = [(f"t{i}", rows, 16, 16) for i, rows in enumerate([500_000, 400_000, 350_000, 270_000, 110_000,
                                                                  50_000, 14_000, 7_000])]
    module = tt_model(*tables)
    topology = Topology(world_size=2, compute_device="cpu")
    _, plan = plan_of(module, topology, constraints=tt_constraints({t[0]: TABLE_WISE for t in tables}))
    from torchrec.distributed.types import ShardingPlan
    load = lookup_load_per_rank(ShardingPlan({"": plan}), module, 2, 512, MODEL)
    assert sorted(sum(ps.ranks) for ps in plan.values()).count(0) >= 2  # both ranks own tables
    assert load["tt_ids"] == [pytest.approx(2 * 512 * sum(ps.ranks == [r] for ps in plan.values())) for r in (0, 1)]
    single = [1e3 * sum(c.fwd_seconds + c.bwd_seconds for c in MODEL.shard_costs(
        cfg.tt_shape(), TABLE_WISE, table_shards(cfg.name, cfg.tt_shape(), TABLE_WISE, [0], 2), 512, 1.0, 2))
        for cfg in module.embedding_bag_configs()]
    assert abs(load["tt_ms"][0] - load["tt_ms"][1]) < max(single)
    assert sum(load["tt_ms"]) == pytest.approx(sum(single))
