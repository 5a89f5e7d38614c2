"""ttdist.plan (YAML plans, validation), ttdist.distributed.plan_bytes (format_plan) and .budget (compress_to_budget), the Criteo plan and the
comm-volume formula — single process: TorchRec's planner needs no process group."""
from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from ttdist import plan as ttplan
from ttdist.distributed import budget as tt_budget, plan_bytes
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner, tt_constraints
from ttdist.modules.collection import MixedEmbeddingBagCollection, TTEmbeddingBagConfig

REPO = Path(__file__).resolve().parents[2]
logging.getLogger("torchrec").setLevel(logging.ERROR)
logging.getLogger().setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torchrec")

TT = [dict(name="t0", num_embeddings=1000, embedding_dim=8, feature_names=["f0"], tt_ranks=[4, 4]),
      dict(name="t1", num_embeddings=700, embedding_dim=8, feature_names=["f1", "f2"], tt_ranks=[5],
           pooling=PoolingType.MEAN),
      dict(name="t2", num_embeddings=3000, embedding_dim=8, feature_names=["f3"], tt_ranks=[3, 6]),
      dict(name="t3", num_embeddings=400, embedding_dim=8, feature_names=["f4"], tt_ranks=[3])]


def small_model():
    tables = [TTEmbeddingBagConfig(**t) for t in TT] + [EmbeddingBagConfig(name="e0", num_embeddings=50,
                                                                            embedding_dim=8, feature_names=["f5"])]
    return MixedEmbeddingBagCollection(tables, device=torch.device("meta"))


def sharders():
    return [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]


def small_plan(world_size=2, sharding=None):
    model = small_model()
    sharding = sharding or {"t0": "column_wise", "t1": "row_wise", "t2": "table_wise", "t3": "data_parallel"}
    planner = make_planner(Topology(world_size=world_size, compute_device="cpu"), batch_size=4,
                           constraints=tt_constraints(sharding))
    return model, planner.plan(model, sharders())


# ------------------------------------------------------------------------------- YAML files
def test_yaml_round_trip_keeps_every_field(tmp_path):
    model, plan = small_plan()
    path = tmp_path / "plan.yaml"
    ttplan.save_plan(plan, path)
    text = path.read_text()
    assert "- {offsets: [0, 0], sizes: [" in text  # one line per shard: editable
    loaded = ttplan.load_plan(path, world_size=2, tables=model)
    assert ttplan.plan_to_dict(loaded) == ttplan.plan_to_dict(plan)
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            other = loaded.plan[module_path][name]
            assert (other.sharding_type, other.compute_kernel, other.ranks) == (ps.sharding_type, ps.compute_kernel,
                                                                                 ps.ranks)
            if ps.sharding_spec is None:
                assert other.sharding_spec is None
            else:
                assert [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in other.sharding_spec.shards] == \
                       [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in ps.sharding_spec.shards]
    d = ttplan.plan_to_dict(loaded)
    assert d["tt"]["t1"]["shards"] == [{"offsets": [0, 0], "sizes": [350, 8], "rank": 0, "device": "cpu"},
                                       {"offsets": [350, 0], "sizes": [350, 8], "rank": 1, "device": "cpu"}]
    assert d["tt"]["t3"] == {"sharding_type": "data_parallel", "compute_kernel": "customized_kernel",
                             "ranks": [0, 1], "shards": []}


def _edited(tmp_path, model_plan, edit):
    d = ttplan.plan_to_dict(model_plan)
    edit(d)
    path = tmp_path / "edited.yaml"
    import yaml

    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.parametrize("edit,world_size,message", [
    (lambda d: d["tt"]["t2"].update(sharding_type="diagonal"), 2, r"table 't2': unknown sharding type 'diagonal'"),
    (lambda d: d["tt"].update(t9=dict(d["tt"]["t2"])), 2, r"tables \['t9'\] are not in the model"),
    (lambda d: d["tt"].pop("t3"), 2, r"the plan misses the model's tables \['t3'\]"),
    (lambda d: d.update(bogus=dict(t0=d["tt"]["t2"])), 2, r"module 'bogus' is not an embedding collection"),
    (lambda d: (d["tt"]["t2"].update(ranks=[3]), d["tt"]["t2"]["shards"][0].update(rank=3)), 2,
     r"table 't2': ranks \[3\] do not exist in a world of 2 ranks"),
    (lambda d: d["tt"]["t2"].update(ranks=[1 - d["tt"]["t2"]["shards"][0]["rank"]]), 2,
     r"table 't2': ranks \[\d\] do not match the shards' ranks \[\d\]"),
    (lambda d: d["tt"]["t1"]["shards"][1].update(offsets=[300, 0]), 2, r"table 't1': Shards .*offsets=\[0, 0\].* and .*offsets=\[300, 0\].* overlap"),
    (lambda d: d["tt"]["t1"]["shards"][1].update(sizes=[300, 8]), 2,
     r"the shards cover 5200 of the table's 700 x 8 = 5600 entries"),
    (lambda d: d["tt"]["t1"]["shards"][1].update(sizes=[400, 8]), 2, r"lies outside the table \[700, 8\]"),
    (lambda d: d["tt"]["t0"]["shards"][0].update(sizes=[999, 4]), 2, r"column_wise shard 0 must span all 1000 rows"),
    (lambda d: d["tt"]["t3"].update(shards=[{"offsets": [0, 0], "sizes": [400, 8], "rank": 0}]), 2,
     r"data_parallel keeps a full copy on every rank and takes no shards"),
    (lambda d: d["tt"]["t2"].update(compute_kernel="fused"), 2, r"a TT table takes compute_kernel 'customized_kernel'"),
    (lambda d: d["dense"]["e0"].update(compute_kernel="warp_drive"), 2, r"unknown compute kernel 'warp_drive'"),
    # t2 has q_1 = 2: three column shards cannot split it (shard_layout.table_shards)
    (lambda d: d["tt"]["t2"].update(sharding_type="column_wise", ranks=[0, 1, 1], shards=[
        {"offsets": [0, c], "sizes": [3000, w], "rank": r, "device": "cpu"} for c, w, r in ((0, 3, 0), (3, 3, 1), (6, 2, 1))]),
     2, r"table 't2': column_wise into 3 shards needs q_1 >= 3, but q_1 = 2"),
    # TT row_wise needs a shard on every rank, in rank order
    (lambda d: d["tt"]["t1"].update(ranks=[1, 0], shards=[dict(s, rank=r) for s, r in zip(d["tt"]["t1"]["shards"], (1, 0))]),
     2, r"row_wise shards go to every rank in order 0..1"),
])
def test_load_plan_names_the_problem(tmp_path, edit, world_size, message):
    model, plan = small_plan()
    path = _edited(tmp_path, plan, edit)
    with pytest.raises(ValueError, match=message) as info:
        ttplan.load_plan(path, world_size=world_size, tables=model)
    assert str(path) in str(info.value)


def test_load_plan_accepts_table_names_per_module(tmp_path):
    model, plan = small_plan()
    path = _edited(tmp_path, plan, lambda d: d["tt"].update(t9=dict(d["tt"]["t2"])))
    with pytest.raises(ValueError, match=r"module 'tt': tables \['t9'\] are not in the model"):
        ttplan.load_plan(path, world_size=2, tables={"tt": ["t0", "t1", "t2", "t3"], "dense": ["e0"]})
    assert set(ttplan.load_plan(path, world_size=2).plan["tt"]) == {"t0", "t1", "t2", "t3", "t9"}  # no model check


def test_load_plan_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tt:\n  t0: {sharding_type: table_wise, ranks: [0\n")
    with pytest.raises(ValueError, match=r"broken.yaml: malformed YAML"):
        ttplan.load_plan(path)
    path.write_text("tt:\n  t0: [table_wise, 0]\n")
    with pytest.raises(ValueError, match=r"broken.yaml: module 'tt', table 't0': expected a mapping"):
        ttplan.load_plan(path)
    path.write_text("tt:\n  t0: {sharding_type: table_wise, compute_kernel: customized_kernel, ranks: [zero]}\n")
    with pytest.raises(ValueError, match=r"'ranks' must be a list of integers"):
        ttplan.load_plan(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"broken.yaml: the plan file is empty"):
        ttplan.load_plan(path)


def test_format_plan_prints_real_bytes_per_rank():
    model, plan = small_plan()
    text = plan_bytes.format_plan(plan, model, 2)
    print(text)
    lines = {line.split()[1]: line.split() for line in text.splitlines()[3:] if line.split()[0] in ("tt", "dense")}
    # t1 row_wise at 2 ranks: p = (28, 25), ranks (1, 5, 1), q = (4, 2): each rank holds 14 slices of
    # G_1 (14 * 1 * 4 * 5) plus G_2 (25 * 5 * 2 * 1), 4 bytes each
    assert lines["t1"][4:8] == ["5", "row_wise", "customized_kernel", "0,1"]
    assert lines["t1"][8:] == [f"{4 * (14 * 20 + 250):,}"] * 2
    # t0 column_wise: q_1 = 2, one column of G_1 per rank (10 * 1 * 1 * 4) + G_2, G_3 (10*4*2*4 + 10*4*2*1)
    assert lines["t0"][8:] == [f"{4 * (40 + 320 + 80):,}"] * 2
    # t3 data_parallel: the whole table on both ranks; e0 table_wise: 50 x 8 fp32 on one rank
    assert lines["t3"][8:] == [f"{4 * (20 * 4 * 3 + 20 * 3 * 2):,}"] * 2
    assert sorted(lines["e0"][-2:]) == ["0", f"{50 * 8 * 4:,}"] and lines["e0"][4] == "dense"
    totals = text.splitlines()[-1].split()[1:]
    per_rank = plan_bytes.plan_bytes_per_rank(plan, model, 2)
    assert totals == [f"{sum(v[r] for v in per_rank.values()):,}" for r in range(2)]


def test_format_plan_counts_replicated_cores_once_per_rank():
    """Two column_wise shards of one table on a rank: one copy of G_2..G_d (the planner counts two)."""
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], tt_ranks=[4, 4])
    shape = cfg.tt_shape()
    assert shape.q[0] == 4
    d = {"tt": {"t": {"sharding_type": "column_wise", "compute_kernel": "customized_kernel", "ranks": [0, 0, 1, 1],
                      "shards": [{"offsets": [0, 4 * j], "sizes": [1000, 4], "rank": j // 2, "device": "cpu"}
                                 for j in range(4)]}}}
    plan = ttplan.plan_from_dict(d)
    ttplan.validate_plan(plan, 2, {"tt": [cfg]})
    g1_quarter = shape.p[0] * 1 * 1 * shape.ranks[1]
    rest = sum(math.prod(c) for c in shape.core_shapes[1:])
    assert plan_bytes.plan_bytes_per_rank(plan, [cfg], 2)[("tt", "t")] == [4 * (2 * g1_quarter + rest)] * 2


def test_plan_to_dict_refuses_fields_it_cannot_store():
    _, plan = small_plan()
    plan.plan["dense"]["e0"].stochastic_rounding = True
    with pytest.raises(ValueError, match=r"table 'e0'.*also sets \['stochastic_rounding'\]"):
        ttplan.plan_to_dict(plan)


# ----------------------------------------------------------------------------- Criteo plan
def _criteo_script():
    spec = importlib.util.spec_from_file_location("criteo_plan", REPO / "benchmarks" / "criteo_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _independent_tt_bytes(cfg, sharding_type, shard_index, num_shards, world_size):
    """Bytes of the cores a shard holds, from p, q and the TT ranks only (fp32, SGD: no state)."""
    p, q = cfg.tt_shape().p, cfg.tt_shape().q
    r = [1] + list(cfg.tt_ranks) + [1]
    rest = sum(p[k] * r[k] * q[k] * r[k + 1] for k in range(1, len(p)))
    rows, cols = p[0], q[0]
    if sharding_type == "row_wise":
        c = -(-p[0] // world_size)
        rows = min((shard_index + 1) * c, p[0]) - min(shard_index * c, p[0])
    if sharding_type == "column_wise":
        cols = q[0] * (shard_index + 1) // num_shards - q[0] * shard_index // num_shards
    return 4 * (rows * r[0] * cols * r[1] + rest)


def test_criteo_plan_tt_storage_is_the_real_core_bytes(capsys):
    """26 Criteo Kaggle tables, the 7 largest TT (ranks [32, 32], dim 16), on 4 CPU ranks; 3 TT
    tables forced to row_wise / column_wise / data_parallel, the rest as the planner likes."""
    criteo = _criteo_script()
    force = {"cat_2": "row_wise", "cat_11": "column_wise", "cat_20": "data_parallel"}
    model, plan, planner, topology = criteo.criteo_plan(world_size=4, force=force)
    assert all(p.is_meta for p in model.parameters())  # the 10M-row tables were never allocated
    configs = {c.name: c for c in model.embedding_bag_configs()}
    tt_names = [n for n, c in configs.items() if isinstance(c, TTEmbeddingBagConfig)]
    assert sorted(tt_names) == sorted(["cat_2", "cat_3", "cat_11", "cat_15", "cat_20", "cat_23", "cat_25"])
    assert {n: plan.plan["tt"][n].sharding_type for n in force} == force
    planner_rank_bytes = [0] * 4
    independent_rank_bytes = [0] * 4
    options = [o for o in planner._best_plan if o.name in tt_names]
    assert sorted(o.name for o in options) == sorted(tt_names)
    for option in options:
        cfg = configs[option.name]
        for j, shard in enumerate(option.shards):
            expected = _independent_tt_bytes(cfg, option.sharding_type, j, len(option.shards), 4)
            assert shard.storage.ddr == expected, (option.name, option.sharding_type, j)
            planner_rank_bytes[shard.rank] += shard.storage.ddr
            independent_rank_bytes[shard.rank] += expected
    assert planner_rank_bytes == independent_rank_bytes
    # no rank holds two column shards of one table here, so the planner's per-shard numbers are
    # exactly what the sharded module allocates per rank (format_plan / tt_bytes_per_rank)
    cw = next(o for o in options if o.name == "cat_11")
    assert len({s.rank for s in cw.shards}) == len(cw.shards) == 4
    real = plan_bytes.plan_bytes_per_rank(plan, model, 4)
    assert [sum(real[("tt", n)][r] for n in tt_names) for r in range(4)] == planner_rank_bytes
    # the row_wise table's per-rank bytes, by hand: p_1 = 221 -> 56, 56, 56, 53 slices of G_1
    shape = configs["cat_2"].tt_shape()
    assert shape.p == (221, 215, 214) and shape.q == (4, 2, 2)
    rest = 215 * 32 * 2 * 32 + 214 * 32 * 2 * 1
    assert real[("tt", "cat_2")] == [4 * (n * 4 * 32 + rest) for n in (56, 56, 56, 53)]
    text = plan_bytes.format_plan(plan, model, topology)
    print(text)
    for name in tt_names:
        line = next(line for line in text.splitlines() if f" {name} " in line)
        assert line.split()[-4:] == [f"{b:,}" for b in real[("tt", name)]]
    assert "32x32" in text and text.count("dense ") >= 19
    assert capsys.readouterr().out.count("cat_") >= 26


def test_criteo_script_prints_the_plan(capsys, tmp_path):
    criteo = _criteo_script()
    criteo.main(["--world-size", "2", "--tt-tables", "3", "--yaml", str(tmp_path / "criteo.yaml")])
    out = capsys.readouterr().out
    assert "sharding plan on 2 ranks" in out and "cat_2" in out and out.count("customized_kernel") == 3
    model = MixedEmbeddingBagCollection(criteo.criteo_tables(3), device=torch.device("meta"))
    assert set(ttplan.load_plan(tmp_path / "criteo.yaml", world_size=2, tables=model).plan["tt"]) == {
        "cat_2", "cat_11", "cat_20"}


# -------------------------------------------------------------------------- memory budget
BUDGET_TABLES = [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=16, feature_names=["f_" + n])
                 for n, r in (("small", 1000), ("big", 200_000), ("tiny", 10), ("mid", 50_000))]
MB = 1_000_000


def _fits(configs, budget, world_size=2) -> bool:
    topology = tt_budget._budget_topology(Topology(world_size=world_size, compute_device="cpu"), budget)
    try:
        make_planner(topology, batch_size=512).plan(MixedEmbeddingBagCollection(configs, device=torch.device("meta")),
                                                    sharders())
        return True
    except PlannerError:
        return False


def _tt(name, rank):
    base = next(t for t in BUDGET_TABLES if t.name == name)
    return tt_budget._tt_config(base, rank, 3, {})


def _kind(result):
    return {c.name: c.tt_ranks if isinstance(c, TTEmbeddingBagConfig) else "dense" for c in result.configs}


def test_compress_to_budget_all_dense_when_it_fits():
    topology = Topology(world_size=2, compute_device="cpu")
    result = tt_budget.compress_to_budget(BUDGET_TABLES, topology, 40 * MB)
    assert _kind(result) == {"small": "dense", "big": "dense", "tiny": "dense", "mid": "dense"}
    assert result.steps == [] and set(result.plan.plan) == {"dense"}
    assert max(result.storage_per_rank) <= 40 * MB
    # the dense big table alone: 200,000 x 16 fp32 = 12.8 MB of weights on one rank
    assert max(result.storage_per_rank) >= 200_000 * 16 * 4


def test_compress_to_budget_compresses_the_largest_table_first_at_the_highest_rank():
    topology = Topology(world_size=2, compute_device="cpu")
    result = tt_budget.compress_to_budget(BUDGET_TABLES, topology, 8 * MB, module_fqn="sparse_arch.embedding_bag_collection")
    assert _kind(result) == {"small": "dense", "big": [64, 64], "tiny": "dense", "mid": "dense"}
    assert len(result.steps) == 1 and result.steps[0].startswith("big: dense (12800000 bytes) -> TT rank 64")
    assert set(result.plan.plan) == {"sparse_arch.embedding_bag_collection.tt", "sparse_arch.embedding_bag_collection.dense"}
    assert max(result.storage_per_rank) <= 8 * MB
    assert not _fits(BUDGET_TABLES, 8 * MB)  # nothing less compressed fits: all dense does not
    tighter = tt_budget.compress_to_budget(BUDGET_TABLES, topology, 1 * MB)
    assert _kind(tighter) == {"small": "dense", "big": [32, 32], "tiny": "dense", "mid": [32, 32]}
    assert [s.split(":")[0] for s in tighter.steps] == ["big", "mid", "big", "mid"]
    assert max(tighter.storage_per_rank) <= 1 * MB
    # undoing the last step (mid back to rank 64) no longer fits: the least compression that fits
    assert not _fits([BUDGET_TABLES[0], _tt("big", 32), BUDGET_TABLES[2], _tt("mid", 64)], 1 * MB)
    assert _fits(tighter.configs, 1 * MB)


def test_compress_to_budget_replicates_compressed_tables_when_links_are_slow():
    """On slow links (20 MB/s) the planner makes the compressed table data-parallel: at TT rank 16
    its cores (~130 KB, all-reduced) cost less than the pooled all-to-all (2 x 4096 x 16 x 4
    bytes each way), and its replicas fit the budget, so each rank holds one. On TorchRec's
    default links the compressed table is sharded instead. ("mid" is left out: dense and
    table-wise on the other rank, it balances a table-wise "big" better than replicas on both.)"""
    tables = [t for t in BUDGET_TABLES if t.name != "mid"]
    slow = Topology(world_size=2, compute_device="cpu", intra_host_bw=2e4, inter_host_bw=2e4)
    result = tt_budget.compress_to_budget(tables, slow, 8 * MB, rank_ladder=(16,), batch_size=4096)
    tt = {c.name: c for c in result.configs if isinstance(c, TTEmbeddingBagConfig)}
    assert "big" in tt and set(result.plan.plan["tt"]) == set(tt)
    assert {ps.sharding_type for ps in result.plan.plan["tt"].values()} == {"data_parallel"}
    replicas = sum(4 * c.tt_shape().num_parameters for c in tt.values())
    assert min(result.storage_per_rank) >= replicas and max(result.storage_per_rank) <= 8 * MB
    fast = tt_budget.compress_to_budget(tables, Topology(world_size=2, compute_device="cpu"), 8 * MB,
                                        rank_ladder=(16,), batch_size=4096)
    assert "data_parallel" not in {ps.sharding_type for ps in fast.plan.plan["tt"].values()}


def test_compress_to_budget_impossible_budget_names_the_required_bytes():
    tables = [t for t in BUDGET_TABLES if t.name in ("big", "mid")]
    with pytest.raises(tt_budget.BudgetError) as info:
        tt_budget.compress_to_budget(tables, Topology(world_size=2, compute_device="cpu"), 10_000)
    # both tables at TT rank 4, table_wise (the smallest option): 4 bytes per core parameter
    big, mid = _tt("big", 4).tt_shape(), _tt("mid", 4).tt_shape()
    required = 4 * sum(math.prod(c) for s in (big, mid) for c in s.core_shapes)
    assert info.value.required_bytes == required
    assert f"need at least {required} bytes" in str(info.value)
    assert "10000 bytes per rank on 2 ranks" in str(info.value) and "TT rank 4" in str(info.value)


# ------------------------------------------------------------------------- comm volume
def test_comm_volume_formula_by_hand():
    """W = 2, B = 4, rank 0: t0 column_wise on ranks 0, 1 (4 columns each), t1 row_wise (MEAN:
    weighted), t2 table_wise on rank 0, t3 data_parallel; L = 2, 1, 3, 2, 1 ids per bag."""
    from torchrec.distributed.types import ParameterSharding

    from ttdist.tools.comm_volume import comm_volume

    configs = [TTEmbeddingBagConfig(**t) for t in TT]
    d = {"tt": {"t0": {"sharding_type": "column_wise", "compute_kernel": "customized_kernel", "ranks": [0, 1],
                       "shards": [{"offsets": [0, 4 * j], "sizes": [1000, 4], "rank": j, "device": "cpu"} for j in (0, 1)]},
                "t1": {"sharding_type": "row_wise", "compute_kernel": "customized_kernel", "ranks": [0, 1],
                       "shards": [{"offsets": [350 * j, 0], "sizes": [350, 8], "rank": j, "device": "cpu"} for j in (0, 1)]},
                "t2": {"sharding_type": "table_wise", "compute_kernel": "customized_kernel", "ranks": [0],
                       "shards": [{"offsets": [0, 0], "sizes": [3000, 8], "rank": 0, "device": "cpu"}]},
                "t3": {"sharding_type": "data_parallel", "compute_kernel": "customized_kernel", "ranks": [0, 1],
                       "shards": []}}}
    plan = ttplan.plan_from_dict(d).plan["tt"]
    assert isinstance(plan["t0"], ParameterSharding)
    L = {"f0": 2, "f1": 1, "f2": 3, "f3": 2, "f4": 1}
    v = comm_volume((configs, plan), 4, L, world_size=2, rank=0, dense_bytes=964)
    # TW/CW units: (f0, shard 0), (f0, shard 1), (f3, t2): lengths 4 x 3 int32, values 8 x (8 + 8 + 8)
    assert v["index_all_to_all"]["table_column_wise"] == {"splits": 8 * 2 * 3, "lengths": 4 * 4 * 3,
                                                          "values": 8 * 24, "weights": 0, "total": 48 + 48 + 192}
    # RW: f1, f2 bucketised into 2 buckets: 2 x 4 lengths each; 4 + 12 ids, MEAN -> weights
    assert v["index_all_to_all"]["row_wise"] == {"splits": 8 * 2 * 4, "lengths": 4 * 2 * 4 * 2, "values": 8 * 16,
                                                 "weights": 4 * 16, "total": 64 + 64 + 128 + 64}
    # rank 0 computes 4 columns of f0 and all 8 of f3 for the 8 global samples
    assert v["pooled_all_to_all_forward"] == {"table_column_wise": 4 * 8 * 12, "row_wise": 4 * 8 * 16}
    assert v["pooled_all_to_all_backward"] == {"table_column_wise": 4 * 4 * 16, "row_wise": 4 * 8 * 16}
    # replicas: t0 G_2, G_3 (10*4*2*4 + 10*4*2*1), t1 G_2 (25*5*2*1), t3 G_1, G_2 (20*1*4*3 + 20*3*2*1)
    assert v["replicated_grad_all_reduce"] == 4 * (320 + 80 + 250 + 240 + 120)
    assert v["input_check_all_reduce"] == 0 and v["dense_all_reduce"] == 964  # input checks cost no collective
    assert v["total"] == 288 + 320 + 384 + 512 + 256 + 512 + 4040 + 964
    rank1 = comm_volume((configs, plan), 4, L, world_size=2, rank=1)
    assert rank1["pooled_all_to_all_forward"]["table_column_wise"] == 4 * 8 * 4
