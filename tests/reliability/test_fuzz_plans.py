"""Hostile sharding plans, fuzzed: plan YAML files (ttdist.plan.load_plan) and the TT shard layout.

A valid hand-written plan for a small model (two TT tables, one plain table, 2 ranks) gets one
mutation at a time: unknown tables and modules, ranks >= the world size or negative, sharding
types a table cannot take (column_wise into more shards than q_1, row_wise on the wrong ranks,
data_parallel with shards, names that are no sharding type), wrong kernels, shards that do not
tile the table, wrong types anywhere, bad devices, malformed YAML. ``load_plan`` must raise
ValueError naming the file and the offending table/value, or return a plan every TT table of
which the sharded module can lay out. ``table_shards`` (what the sharded module uses) must give
shards that exactly cover the first core, or ValueError naming the table.
"""
import copy
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from ttdist.distributed.shard_layout import SHARDING_TYPES, table_shards
from ttdist.modules.collection import TTEmbeddingBagConfig
from ttdist.modules.tt_shapes import make_tt_shape

plan_module = pytest.importorskip("ttdist.plan")
load_plan = plan_module.load_plan
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TT = "sparse_arch.embedding_bag_collection.tt"
DENSE = "sparse_arch.embedding_bag_collection.dense"
TABLES = {TT: [TTEmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=8, feature_names=["f0"], tt_ranks=[4, 4]),
               TTEmbeddingBagConfig(name="t1", num_embeddings=700, embedding_dim=8, feature_names=["f1"], tt_ranks=[5])],
          DENSE: [plan_module.EmbeddingBagConfig(name="d0", num_embeddings=100, embedding_dim=8, feature_names=["f2"])]}
WORLD = 2
VALID = {
    TT: {"t0": {"sharding_type": "row_wise", "compute_kernel": plan_module.TT_COMPUTE_KERNEL, "ranks": [0, 1],
                "shards": [{"offsets": [0, 0], "sizes": [500, 8], "rank": 0, "device": "cpu"},
                           {"offsets": [500, 0], "sizes": [500, 8], "rank": 1, "device": "cpu"}]},
         "t1": {"sharding_type": "column_wise", "compute_kernel": plan_module.TT_COMPUTE_KERNEL, "ranks": [1, 0],
                "shards": [{"offsets": [0, 0], "sizes": [700, 4], "rank": 1, "device": "cpu"},
                           {"offsets": [0, 4], "sizes": [700, 4], "rank": 0, "device": "cpu"}]}},
    DENSE: {"d0": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [1],
                   "shards": [{"offsets": [0, 0], "sizes": [100, 8], "rank": 1, "device": "cpu"}]}},
}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 9),
                 st.sampled_from([2**62, -(2**63), 1.5, "x", "", [], {}, [1, "a"]]))


def _write(tmp_path, data, raw: str = None):
    path = tmp_path / "plan.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(data, sort_keys=False))
    return path


def _check_usable(plan) -> None:
    """Every TT table of an accepted plan can be laid out by the sharded module."""
    for module_path, module_plan in plan.plan.items():
        configs = {c.name: c for c in TABLES.get(module_path, [])}
        for name, ps in module_plan.items():
            if isinstance(configs.get(name), TTEmbeddingBagConfig):
                spec = [s.placement.rank() for s in ps.sharding_spec.shards] if ps.sharding_spec else None
                table_shards(name, configs[name].tt_shape(), ps.sharding_type, ps.ranks or [], WORLD,
                             spec if ps.sharding_type == "column_wise" else None)


def test_the_hand_written_plan_is_valid(tmp_path):
    _check_usable(load_plan(_write(tmp_path, VALID), world_size=WORLD, tables=TABLES))


MUTATIONS = ["rename_table", "rename_module", "rank", "shard_rank", "sharding_type", "kernel", "offsets", "sizes",
             "field_type", "drop_field", "extra_field", "device", "more_cw_shards", "rw_ranks", "dp_shards"]


@SETTINGS
@given(mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_mutated_plans_raise_value_error_naming_the_problem_or_are_usable(tmp_path, mutation, data):
    d = copy.deepcopy(VALID)
    module = data.draw(st.sampled_from([TT, DENSE]), label="module")
    table = data.draw(st.sampled_from(sorted(d[module])), label="table")
    entry = d[module][table]
    shard = data.draw(st.integers(0, len(entry["shards"]) - 1), label="shard")
    expect = None  # a string the error must contain
    if mutation == "rename_table":
        new = data.draw(st.text(min_size=1, max_size=6).filter(lambda s: s not in d[module]), label="name")
        d[module][new] = d[module].pop(table)
        expect = repr(new) if new.isprintable() else None
    elif mutation == "rename_module":
        new = data.draw(st.sampled_from(["sparse_arch", "x.y", "", TT + ".tt"]), label="path")
        d[new] = d.pop(module)
        expect = f"'{new}'"
    elif mutation == "rank":
        bad = data.draw(st.one_of(st.integers(WORLD, 2**62), st.integers(-5, -1)), label="rank")
        entry["ranks"][shard] = bad
        expect = str(bad)
    elif mutation == "shard_rank":
        bad = data.draw(st.one_of(st.integers(WORLD, 1000), st.integers(-5, -1), JUNK), label="rank")
        entry["shards"][shard]["rank"] = bad
    elif mutation == "sharding_type":
        st_ = data.draw(st.one_of(st.sampled_from(SHARDING_TYPES + ("table_row_wise", "grid_shard", "Row_Wise", "")),
                                  st.text(max_size=8)), label="sharding_type")
        entry["sharding_type"] = st_
    elif mutation == "kernel":
        entry["compute_kernel"] = data.draw(st.sampled_from(["fused", "dense", "customized_kernel", "quant", "nope", ""]),
                                            label="kernel")
    elif mutation in ("offsets", "sizes"):
        entry["shards"][shard][mutation] = data.draw(
            st.one_of(st.lists(st.integers(-2, 1200), min_size=1, max_size=3), JUNK), label=mutation)
    elif mutation == "field_type":
        field = data.draw(st.sampled_from(["sharding_type", "compute_kernel", "ranks", "shards"]), label="field")
        entry[field] = data.draw(JUNK, label="value")
    elif mutation == "drop_field":
        del entry[data.draw(st.sampled_from(sorted(entry)), label="field")]
    elif mutation == "extra_field":
        entry[data.draw(st.sampled_from(["cache_params", "rank", "Sharding_type"]), label="field")] = 1
    elif mutation == "device":
        entry["shards"][shard]["device"] = data.draw(st.sampled_from(["cuda:0", "meta", "gpu", "", "cpu:7", "tpu"]),
                                                     label="device")
    elif mutation == "more_cw_shards":  # column_wise split into more shards than q_1 allows
        d[TT]["t1"]["ranks"] = [0, 1, 0, 1, 0, 1, 0, 1, 0]
        d[TT]["t1"]["shards"] = [{"offsets": [0, 0], "sizes": [700, 8], "rank": r, "device": "cpu"} for r in [0] * 9]
    elif mutation == "rw_ranks":  # row_wise on ranks other than 0..W-1 in order
        d[TT]["t0"]["ranks"] = [1, 0]
        d[TT]["t0"]["shards"][0]["rank"], d[TT]["t0"]["shards"][1]["rank"] = 1, 0
        expect = "t0"
    elif mutation == "dp_shards":
        entry["sharding_type"] = "data_parallel"
    path = _write(tmp_path, d)
    try:
        plan = load_plan(path, world_size=WORLD, tables=TABLES)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        if expect is not None:
            assert expect in str(e), (expect, str(e))
        return
    assert mutation not in ("rename_table", "rename_module", "rank", "more_cw_shards", "rw_ranks"), mutation
    _check_usable(plan)


@pytest.mark.parametrize("raw,match", [
    ("", "the plan file is empty"),
    ("[1, 2]", "a plan is a mapping"),
    ("a: [", "malformed YAML"),
    ("a: {b: 1}", "expected a mapping with sharding_type"),
    ("\x00\x01", "malformed YAML"),
    ("a: 1", "must map table names to shardings"),
])
def test_malformed_plan_files_raise_value_error_naming_the_file(tmp_path, raw, match):
    path = _write(tmp_path, None, raw)
    with pytest.raises(ValueError, match=match) as info:
        load_plan(path, world_size=WORLD, tables=TABLES)
    assert str(path) in str(info.value)


def test_a_missing_plan_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the plan"):
        load_plan(tmp_path / "nope.yaml", world_size=WORLD)


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 5000), dim=st.sampled_from([4, 6, 8, 16]), ranks_d=st.integers(1, 3),
       sharding_type=st.one_of(st.sampled_from(SHARDING_TYPES), st.text(max_size=6)),
       world=st.integers(1, 8), ranks=st.lists(st.integers(-2, 9), max_size=9),
       spec=st.none() | st.lists(st.integers(-1, 9), max_size=9))
def test_table_shards_cover_the_first_core_exactly_or_raise_naming_the_table(rows, dim, ranks_d, sharding_type, world,
                                                                            ranks, spec):
    shape = make_tt_shape(rows, dim, [1] * ranks_d, table_name="t")  # rank 1 fits any table
    try:
        shards = table_shards("t", shape, sharding_type, ranks, world, spec)
    except ValueError as e:
        assert str(e).startswith("table 't': "), str(e)
        return
    assert sharding_type in SHARDING_TYPES and shards
    assert all(0 <= s.rank < world for s in shards)
    p1, q1 = shape.p[0], shape.q[0]
    if sharding_type == "row_wise":
        assert [s.p1 for s in shards] == [(min(r * math.ceil(p1 / world), p1), min((r + 1) * math.ceil(p1 / world), p1))
                                          for r in range(world)]
        assert [s.rank for s in shards] == list(range(world))
    elif sharding_type == "column_wise":
        assert shards[0].q1[0] == 0 and shards[-1].q1[1] == q1
        assert all(a.q1[1] == b.q1[0] and a.q1[0] < a.q1[1] for a, b in zip(shards, shards[1:]))
    else:
        assert all(s.p1 == (0, p1) and s.q1 == (0, q1) for s in shards)
        assert len(shards) == (world if sharding_type == "data_parallel" else 1)
