"""The job's measured links (ttdist.distributed.links) and the price of a collective call in the
rating of a plan (TTCollectivesPerfModel): what the planner then chooses. Calibration of the kernel: tests/distributed/conftest.py."""
from __future__ import annotations

import math

import pytest
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.perf_models import NoopPerfModel

from tests.distributed.harness import run_ranks
from tests.distributed.test_tt_costs import MODEL, tt_model
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner
from ttdist.distributed.links import LinkModel
from ttdist.distributed.planner import (CALLS_PER_SHARDED_GROUP, TTCollectivesPerfModel, torchrec_collective_calls,
                                       tt_collective_calls)
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, ROW_WISE, TABLE_WISE

# The demo's seven TT tables (rows at 5 % of Criteo Kaggle), dim 16, ranks 16.
DEMO_TABLES = [("t2", 506_561), ("t3", 110_130), ("t11", 417_580), ("t15", 273_065), ("t20", 352_327),
               ("t23", 14_309), ("t25", 7_129)]


@pytest.mark.parametrize("types,calls", [
    ({TABLE_WISE}, 5), ({TABLE_WISE, COLUMN_WISE}, 6), ({ROW_WISE}, 6), ({DATA_PARALLEL}, 1),
    ({TABLE_WISE, DATA_PARALLEL}, 6), ({TABLE_WISE, ROW_WISE, DATA_PARALLEL}, 11), (set(), 0)])
def test_collective_calls_of_a_plan(types, calls):
    """Ids all-to-all (3 calls) + pooled all-to-all fwd and bwd per group (table-/column-wise share
    one, row-wise has its own); one all-reduce for all replicated cores."""
    assert tt_collective_calls(types) == calls


def test_rating_adds_the_calls_of_the_plan_to_torchrec_rating():
    topology = Topology(world_size=2, compute_device="cpu")
    planner = make_planner(topology, batch_size=512, cost_model=MODEL)
    module = tt_model(("a", 200_000, 16, 16), ("b", 50_000, 16, 16))
    options = planner._enumerator.enumerate(module, [TTEmbeddingBagCollectionSharder()])
    pick = {(o.name, o.sharding_type): o for o in options}
    for o in options:
        for rank, shard in enumerate(o.shards):
            shard.rank = rank
    plan = [pick[("a", TABLE_WISE)], pick[("b", DATA_PARALLEL)]]
    torchrec_rating = NoopPerfModel(topology).rate(plan)
    assert TTCollectivesPerfModel(topology, 0.75).rate(plan) == pytest.approx(torchrec_rating + 0.75 * 6)



@pytest.mark.parametrize("types,calls", [
    ({TABLE_WISE}, 5), ({TABLE_WISE, COLUMN_WISE}, 10), ({ROW_WISE}, 5), ({DATA_PARALLEL}, 0),
    ({TABLE_WISE, DATA_PARALLEL}, 5), ({"table_row_wise"}, 7), ({TABLE_WISE, "table_column_wise"}, 10), (set(), 0)])
def test_collective_calls_of_torchrec_tables(types, calls):
    """TorchRec runs one input and one output dist per sharding type: ids' KJTAllToAll (3 calls),
    pooled all-to-all (row-wise: reduce-scatter) fwd + bwd; table-row-wise 2 + 2 (within, across
    nodes); data-parallel tables ride DDP's all-reduce."""
    assert torchrec_collective_calls(types) == calls


def test_rating_counts_the_calls_of_torchrec_sharding_groups():
    """The 19 plain tables split over table- and column-wise are two EBC groups: 5 calls more than
    all table-wise (TorchRec's summed perf alike or not); the TT collection's calls add to them."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    topology = Topology(world_size=2, compute_device="cpu")
    planner = make_planner(topology, batch_size=512, cost_model=MODEL)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=n, num_embeddings=1000, embedding_dim=16,
                                                     feature_names=[f"f_{n}"]) for n in ("x", "y")],
                                 device=torch.device("meta"))
    options = planner._enumerator.enumerate(ebc, [EmbeddingBagCollectionSharder()])
    options += planner._enumerator.enumerate(tt_model(("a", 200_000, 16, 16)), [TTEmbeddingBagCollectionSharder()])
    pick = {(o.name, o.sharding_type): o for o in options}
    for o in options:
        for rank, shard in enumerate(o.shards):
            shard.rank = rank % 2
    one = [pick[("x", TABLE_WISE)], pick[("y", TABLE_WISE)], pick[("a", TABLE_WISE)]]
    two = [pick[("x", TABLE_WISE)], pick[("y", COLUMN_WISE)], pick[("a", TABLE_WISE)]]
    dp = [pick[("x", TABLE_WISE)], pick[("y", DATA_PARALLEL)], pick[("a", TABLE_WISE)]]
    for plan, calls in ((one, 5 + 5), (two, 10 + 5), (dp, 5 + 5)):
        assert TTCollectivesPerfModel(topology, 0.75).rate(plan) == pytest.approx(
            NoopPerfModel(topology).rate(plan) + 0.75 * calls)


def _demo_plan(links: LinkModel) -> dict[str, str]:
    planner = make_planner(links.topology(2, "cpu"), batch_size=1024, cost_model=MODEL,
                           collective_latency_ms=links.latency_ms)
    module = tt_model(*[(name, rows, 16, 16) for name, rows in DEMO_TABLES])
    plan = planner.plan(module, [TTEmbeddingBagCollectionSharder()]).plan[""]
    return {name: ps.sharding_type for name, ps in plan.items()}


def test_dear_calls_make_the_demo_tables_data_parallel():
    """Gloo on this kind of machine (~0.4 ms a call, ~0.7 GB/s): every demo table data-parallel, no
    all-to-all at all. Free calls on the same links: TorchRec's per-table sums shard some of them."""
    gloo = LinkModel(latency_ms=0.4, bytes_per_ms=7e5)
    assert set(_demo_plan(gloo).values()) == {DATA_PARALLEL}
    assert set(_demo_plan(LinkModel(latency_ms=0.0, bytes_per_ms=7e5)).values()) != {DATA_PARALLEL}


def test_link_model_becomes_torchrec_topology_bandwidths():
    topology = LinkModel(latency_ms=0.1, bytes_per_ms=123_456.0).topology(4, "cpu")
    assert topology.world_size == 4 and topology.intra_host_bw == topology.inter_host_bw == 123_456.0


def _measure(rank: int, world_size: int):
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from ttdist.distributed import links

    measured = links.measure_links(torch.device("cpu"), large_bytes=1 << 18, repeats=3)
    step = links._sharded_group_step(torch.device("cpu"), dist.group.WORLD)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    calls = sum(e.name.startswith("c10d::") for e in prof.events())
    # the fit on scripted timings: the group's step 2.5 ms; 8 bytes 0.1 ms; 2^18 bytes 0.1 ms + 2^18 B at 1 GB/s
    timings = iter([2.5, 0.1, 0.1 + (1 << 18) / 1e6])
    links._median_ms = lambda fn, repeats: (fn(), next(timings))[1]
    scripted = links.measure_links(torch.device("cpu"), large_bytes=1 << 18, repeats=3)
    return measured, calls, scripted


@pytest.mark.slow
def test_measured_links_price_a_call_as_torchrec_dists_make_it():
    """The ranks agree on the figures; a call's price is a sharding group's step of TorchRec's own
    dists divided by the calls the planner counts for a group (which are the calls that step makes):
    2.5 ms / 5 = 0.5 ms, not a bare all-to-all's 0.1 ms; bandwidth from the two all-to-alls."""
    results = run_ranks(_measure, 2)
    (measured, calls, scripted), (measured_1, _, _) = results
    assert measured == measured_1
    assert measured.latency_ms > 0 and measured.bytes_per_ms > 0
    assert calls == CALLS_PER_SHARDED_GROUP == tt_collective_calls({TABLE_WISE})
    assert scripted == LinkModel(latency_ms=0.5, bytes_per_ms=2.0 ** (round(2 * math.log2(1e6)) / 2))


def test_per_module_uniform_proposer_offers_every_combination_of_module_types():
    """One plan per (TT module type, TorchRec module type) pair that covers every table of each
    module, each table on its cheapest option of that type; a type some table lacks is never
    offered for that module. (TorchRec's UniformProposer offers one type for all modules.)"""
    from types import SimpleNamespace

    from ttdist.distributed.planner import PerModuleUniformProposer

    def option(path, table, kind, perf):
        return SimpleNamespace(path=path, fqn=f"{path}.{table}", sharding_type=kind,
                               shards=[SimpleNamespace(perf=SimpleNamespace(total=perf))])

    space = [option("tt", "a", TABLE_WISE, 2.0), option("tt", "a", TABLE_WISE, 1.0), option("tt", "a", DATA_PARALLEL, 3.0),
             option("tt", "b", TABLE_WISE, 1.0), option("tt", "b", DATA_PARALLEL, 1.0), option("tt", "b", ROW_WISE, 1.0),
             option("ebc", "x", TABLE_WISE, 1.0), option("ebc", "x", COLUMN_WISE, 1.0), option("ebc", "x", DATA_PARALLEL, 1.0)]
    proposer = PerModuleUniformProposer()
    proposer.load(space)
    proposals = []
    while (p := proposer.propose()) is not None:
        proposals.append(p)
        proposer.feedback(partitionable=True)
    kinds = sorted((p[0].sharding_type, p[2].sharding_type) for p in proposals)
    assert kinds == sorted((t, e) for t in (TABLE_WISE, DATA_PARALLEL) for e in (TABLE_WISE, COLUMN_WISE, DATA_PARALLEL))
    for p in proposals:
        assert sorted(o.fqn for o in p) == ["ebc.x", "tt.a", "tt.b"]
        assert all(o.shards[0].perf.total == 1.0 for o in p if o.sharding_type == TABLE_WISE)  # the cheapest
    capped = PerModuleUniformProposer()
    capped.MAX_PROPOSALS = 5  # more combinations than it rates: none offered (TorchRec's grid search does the same)
    capped.load(space)
    assert capped.propose() is None
