"""Multi-process checks of plans, communication volume, bad input, replicas and checkpoints (2 gloo ranks).

Four spawns in all (module-scoped fixtures share them between tests); rank functions are in
tests/distributed/plan_workers.py.
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.distributed import plan_workers as pw
from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
STEPS = 3
PREFIX = pw.TT_PREFIX  # sparse_arch.embedding_bag_collection.embedding_bags.
CORES = {"t0": 3, "t1": 2, "t2": 3, "t3": 2}  # d of each table


def tt_keys(cores: dict[str, list[int]]) -> list[str]:
    """The per-table keys of the given cores and of their optimizer state (the fused optimizer's
    "sum", under the unsharded collection's name ``optimizer_state``)."""
    return sorted(PREFIX + f"{t}.{kind}.{k}" for t, ks in cores.items() for k in ks
                  for kind in ("tt_cores", "optimizer_state"))


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    return run_ranks(pw.plan_roundtrip_and_comm, 2, str(tmp_path_factory.mktemp("plans")), STEPS)


def test_yaml_plan_round_trip_gives_the_same_outputs(roundtrip):
    """TorchRec's plan (TT tables CW/RW/TW/DP + a TorchRec table) -> YAML -> load_plan -> DMP."""
    for r in roundtrip:
        assert r["dict_equal"]
        assert r["modules"] == ["sparse_arch.embedding_bag_collection.dense", "sparse_arch.embedding_bag_collection.tt"]
        assert r["sharding"]["sparse_arch.embedding_bag_collection.tt"] == pw.MIXED
        assert r["loaded_vs_planner_max_abs"] == 0.0  # bit for bit the planner's plan
        assert r["loaded_vs_unsharded_max_abs"] <= 1e-6, r["loaded_vs_unsharded_max_abs"]
        assert r["output_abs_mean"] > 0.05  # not a vacuous comparison of zeros


def test_comm_volume_equals_the_bytes_the_collectives_move(roundtrip):
    """Every collective call in 3 training steps, filed by what issued it, vs comm_volume x 3."""
    for rank, r in enumerate(roundtrip):
        f, measured = r["formula"], r["measured"]
        expected = {}
        for g, parts in f["index_all_to_all"].items():
            for part, nbytes in parts.items():
                if part != "total" and nbytes:
                    expected[f"index/{g}/{part}"] = STEPS * nbytes
        for g, nbytes in f["pooled_all_to_all_forward"].items():
            expected[f"pooled_forward/{g}"] = STEPS * nbytes
        for g, nbytes in f["pooled_all_to_all_backward"].items():
            expected[f"pooled_backward/{g}"] = STEPS * nbytes
        for key in ("replicated_grad_all_reduce", "input_check_all_reduce", "dense_all_reduce"):
            expected[key] = STEPS * f[key]
        expected = {k: v for k, v in expected.items() if v}
        assert measured == expected, (rank, measured, expected)
        assert set(r["calls"].values()) == {STEPS}  # one call of each kind per step, nothing else
        assert sum(measured.values()) == STEPS * f["total"]
        # a few terms by hand (B = 4, W = 2; comm_volume's docstring):
        # replicas (held by every rank, column-wise included) t0 G_2,G_3 + t1 G_2 + t3 G_1,G_2
        # = 4 * (320 + 80 + 250 + 240 + 120) bytes, in one all-reduce per backward
        assert f["replicated_grad_all_reduce"] == 4040
        # DLRM dense params: 4*8+8, (8+15)*8+8, 8+1 = 241 floats
        assert f["dense_all_reduce"] == 4 * 241
        # row_wise t1 (MEAN: weighted): lengths 2 buckets x 4 bags x 2 features int32, ids 4*1 + 4*3
        assert f["index_all_to_all"]["row_wise"] == {"splits": 64, "lengths": 64, "values": 128, "weights": 64,
                                                     "total": 320}
        # no per-forward input-check all-reduce (only with the sharder's raise_on_every_rank)
        assert f["input_check_all_reduce"] == 0 and not any("input_check" in k for k in measured)


def test_bad_input_raises_on_every_rank_without_hanging(tmp_path):
    results = run_ranks(pw.bad_input, 2, str(tmp_path))
    bad = results[0]["bad_rank"]
    assert results[1]["bad_rank"] == bad and results[0]["owner_of_t2"] == 1 - bad  # the bad ids' table is remote
    for rank, r in enumerate(results):
        own = rank == bad
        kind, msg = r["missing_feature"]
        assert kind == "KeyError", (kind, msg)
        assert (re.search(rf"features \['f3'\] are missing .*\(rank {bad}\)", msg) if own else
                re.search(rf"missing from the KeyedJaggedTensor on rank {bad}", msg)), msg
        for case, value in (("index_out_of_range", 3000), ("negative_index", -1)):
            kind, msg = r[case]
            assert kind == "IndexError", (case, kind, msg)
            assert msg == (f"table 't2', feature 'f3': index {value} is out of range [0, 3000) on rank {bad}" if own
                           else f"table 't2', feature 'f3': an index is out of range [0, 3000) on rank {bad} "
                                "(see that rank's error)"), msg
        # the process group is still in step: a good batch gives the unsharded model's output
        assert r["good_batch_after_max_abs"] <= 1e-6
        for case, pattern in (("load_unknown_table", r"unknown_table.yaml: .*tables \['t9'\] are not in the model"),
                              ("dmp_unknown_table", r"names unknown tables \['t9'\]"),
                              ("load_rank_out_of_world", r"rank_out_of_world.yaml: .*table 't2': ranks \[2\] do not "
                                                         r"exist in a world of 2 ranks"),
                              ("dmp_rank_out_of_world", r"table 't2': the plan places a shard on rank 2")):
            kind, msg = r[case]
            assert kind == "ValueError" and re.search(pattern, msg, re.S), (case, kind, msg)
        assert r["all_reduce_after"] == 2.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp"))
    two = run_ranks(pw.replicas_and_checkpoint, 2, ckpt, 5)
    one = run_ranks(pw.load_checkpoint_single_rank, 1, ckpt)[0]
    return two, one


def test_replicated_cores_and_states_stay_bit_identical(checkpoint):
    """t0 row_wise (G_2, G_3), t1 column_wise (G_2), t2 data_parallel (G_1..G_3): 5 exact_adagrad steps.
    Cores from the model's state_dict, their Adagrad state from dmp.fused_optimizer."""
    two, _ = checkpoint
    expected = tt_keys({"t0": [1, 2], "t1": [1], "t2": [0, 1, 2]})
    for r in two:
        assert r["sharding"] == pw.SAVE_PLAN
        assert r["replica_keys"] == expected
        assert r["replica_mismatches"] == []
        for key, moved in r["replica_moved"].items():  # every replica was updated (state: from 0)
            assert moved > (1e-2 if ".tt_cores." in key else 1e-7), (key, moved)


def test_checkpoint_reshards_to_another_plan_at_two_ranks(checkpoint):
    two, _ = checkpoint
    saved = two[0]["saved"]
    assert sorted(saved) == tt_keys({t: list(range(d)) for t, d in CORES.items()})
    assert all(float(v.abs().max()) > 0 for v in saved.values())  # Adagrad state is non-trivial
    assert two[0]["resharded_sharding"] == pw.LOAD_PLAN
    assert sorted(two[0]["differed_before_load"]) == sorted(saved)  # the load had to change every tensor
    assert two[0]["load_mismatches"] == [] and two[0]["loaded_keys"] == sorted(saved)
    for r in two:
        assert r["output_after_load_max_abs"] <= 1e-6


def test_checkpoint_loads_at_one_rank_into_sharded_and_unsharded_models(checkpoint):
    two, one = checkpoint
    saved = two[0]["saved"]
    assert sorted(one["unsharded"]) == sorted(saved) == sorted(one["dmp"])
    for key, value in saved.items():
        assert torch.equal(one["unsharded"][key], value), key  # TTEmbeddingBagCollection's own keys
        assert torch.equal(one["dmp"][key], value), key
    before = torch.cat([two[0]["output_before_save"], two[1]["output_before_save"]])
    assert float((one["output"] - before).abs().max()) <= 1e-6
