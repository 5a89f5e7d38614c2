"""Rank functions of the plan / comm-volume / bad-input / replica / checkpoint tests (spawned by run_ranks).

Model: TorchRec's DLRM over 4 TT tables (t0..t3, features f0..f4) and, where named, a plain
TorchRec table e0 (feature f5) in a MixedEmbeddingBagCollection. Every bag of feature f holds
exactly LENGTHS[f] ids, so the comm-volume formula is exact per step.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import ttdist
from tests.distributed import workers
from ttdist import plan as ttplan
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner, tt_constraints

TT_TABLES = workers.TABLES + [dict(name="t3", num_embeddings=400, embedding_dim=8, feature_names=["f4"], tt_ranks=[3])]
DENSE_TABLE = dict(name="e0", num_embeddings=50, embedding_dim=8, feature_names=["f5"])
LENGTHS = {"f0": 2, "f1": 1, "f2": 3, "f3": 2, "f4": 1, "f5": 2}
ROWS = {"f0": 1000, "f1": 700, "f2": 700, "f3": 3000, "f4": 400, "f5": 50}
MIXED = {"t0": "column_wise", "t1": "row_wise", "t2": "table_wise", "t3": "data_parallel"}
SAVE_PLAN = {"t0": "row_wise", "t1": "column_wise", "t2": "data_parallel", "t3": "table_wise"}
LOAD_PLAN = {"t0": "column_wise", "t1": "table_wise", "t2": "row_wise", "t3": "data_parallel"}
B = 4  # local batch
LENGTHS_DTYPE = torch.int32



def tt_configs():
    return [ttdist.TTEmbeddingBagConfig(**t) for t in TT_TABLES]


def features(with_dense: bool) -> list[str]:
    return [f for t in TT_TABLES for f in t["feature_names"]] + (["f5"] if with_dense else [])


def batch(step: int, samples: range, with_dense: bool = False, drop: Optional[str] = None,
          bad: Optional[tuple[str, int]] = None):
    """(dense [n, 4], KJT, labels [n]) of `samples` of global batch `step` (int32 lengths, int64 ids)."""
    g = torch.Generator().manual_seed(500 + step)
    n_global = max(samples.stop, 8)
    dense = torch.randn(n_global, 4, generator=g)
    labels = torch.randint(0, 2, (n_global,), generator=g).float()
    ids = {f: torch.randint(0, ROWS[f], (n_global, LENGTHS[f]), generator=g) for f in features(True)}
    keys = [f for f in features(with_dense) if f != drop]
    values = []
    for f in keys:
        v = ids[f][list(samples)].flatten().clone()
        if bad is not None and bad[0] == f:
            v[0] = bad[1]
        values.append(v)
    lengths = torch.tensor([LENGTHS[f] for f in keys for _ in samples], dtype=LENGTHS_DTYPE)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=lengths)
    return dense[list(samples)], kjt, labels[list(samples)]


def local(rank: int) -> range:
    return range(rank * B, (rank + 1) * B)


def dlrm(with_dense: bool, fused: dict, seed: int = 7) -> DLRM:
    """The same initial weights on every rank (TT cores per (seed, table); TorchRec's tables and the MLPs from `seed`)."""
    torch.manual_seed(seed)
    tables: list = tt_configs() + ([EmbeddingBagConfig(**DENSE_TABLE)] if with_dense else [])
    ebc = (ttdist.MixedEmbeddingBagCollection(tables, seed=seed, fused_params=fused) if with_dense
           else ttdist.TTEmbeddingBagCollection(tables, seed=seed, fused_params=fused))
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8],
                over_arch_layer_sizes=[8, 1])


def sharders(fused: dict, raise_on_every_rank: bool = False) -> list:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return [TTEmbeddingBagCollectionSharder(fused_params=fused, raise_on_every_rank=raise_on_every_rank),
            EmbeddingBagCollectionSharder(fused_params={"optimizer": _emb_opt(fused["optimizer"]),
                                                        "learning_rate": fused.get("learning_rate", 0.01)})]


def _emb_opt(name: str):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"exact_sgd": EmbOptimType.EXACT_SGD, "exact_adagrad": EmbOptimType.EXACT_ADAGRAD}[name]


def planner_plan(model, world_size: int, sharding: dict, fused: dict):
    planner = make_planner(Topology(world_size=world_size, compute_device="cpu"), batch_size=B,
                           constraints=tt_constraints(sharding))
    return planner.collective_plan(model, sharders(fused), dist.GroupMember.WORLD)


def dmp(model, plan, fused: dict, raise_on_every_rank: bool = False) -> DistributedModelParallel:
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=torch.device("cpu"),
                                    plan=plan, sharders=sharders(fused, raise_on_every_rank))


def yaml_round_trip(plan, path: str, world_size: int, model):
    if dist.get_rank() == 0:
        ttplan.save_plan(plan, path)
    dist.barrier()
    return ttplan.load_plan(path, world_size=world_size, tables=model)


def optimizer(model, lr: float = 0.1):
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=lr))
    return CombinedOptimizer([model.fused_optimizer, dense])


# ---------------------------------------------------------------------- plan round trip + comm
class CollectiveCounter:
    """Wraps torch.distributed's collectives and files the input bytes of each call by what issued it."""

    NAMES = ("all_to_all_single", "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "reduce_scatter", "all_to_all")

    def __init__(self, module) -> None:
        self.module = module  # the ShardedTTEmbeddingBagCollection
        self.bytes: dict[tuple, int] = {}
        self.calls: dict[tuple, int] = {}
        self._orig = {n: getattr(dist, n) for n in self.NAMES}
        self.enabled = False

    def __enter__(self):
        for name, fn in self._orig.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.enabled:
                tensor = kwargs.get("input") if name == "all_to_all_single" else kwargs.get("tensor")
                if tensor is None:
                    tensor = args[1] if name == "all_to_all_single" else args[0]
                nbytes = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else -1
                key = self._classify(name)
                self.bytes[key] = self.bytes.get(key, 0) + nbytes
                self.calls[key] = self.calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    def _group_of_keys(self, keys: list[str]) -> str:
        m = self.module
        world = m._world
        for group in m._input_dists:
            sent = [m.feature_names[u.feature] for u in group.units]
            if type(group).__name__ == "TwCwDist" and keys == sent:
                return "table_column_wise"
            if type(group).__name__ == "RwDist" and keys == sent * world:
                return "row_wise"
        return f"unknown keys {keys}"

    def _group_of_dims(self, dims: list[int]) -> str:
        m = self.module
        found = []
        for group in m._input_dists:
            if type(group).__name__ == "TwCwDist":
                dim_per_rank = [sum(d for d, u in zip(group.dims, group.units) if u.rank == r) for r in range(m._world)]
                if dims == dim_per_rank:
                    found.append("table_column_wise")
            if type(group).__name__ == "RwDist" and dims == [sum(group.dims)] * m._world:
                found.append("row_wise")
        assert len(found) == 1, (dims, found)
        return found[0]

    def _classify(self, name: str) -> tuple:
        frame = sys._getframe(2)
        while frame is not None:
            code, loc = frame.f_code.co_name, frame.f_locals
            owner = type(loc["self"]).__name__ if "self" in loc else ""
            if code == "__init__" and owner == "SplitsAllToAllAwaitable":
                split_frame = frame.f_back
                while split_frame.f_code.co_name != "__init__" or "input" not in split_frame.f_locals:
                    split_frame = split_frame.f_back
                return ("index", self._group_of_keys(split_frame.f_locals["input"].keys()), "splits")
            if code == "__init__" and owner == "KJTAllToAllTensorsAwaitable":
                return ("index", self._group_of_keys(loc["input"].keys()), loc["label"])
            if code == "forward" and "a2ai" in loc:
                return ("pooled_forward", self._group_of_dims(list(loc["a2ai"].dim_sum_per_rank)))
            if code == "backward" and "a2ai" in loc:
                return ("pooled_backward", self._group_of_dims(list(loc["a2ai"].dim_sum_per_rank)))
            if code == "_update_replicas":
                return ("replicated_grad_all_reduce",)
            if code == "_check_input":
                return ("input_check_all_reduce",)
            if code == "_allreduce_fut":
                return ("dense_all_reduce",)
            frame = frame.f_back
        return ("other", name)


def plan_roundtrip_and_comm(rank: int, world_size: int, tmpdir: str, steps: int) -> dict[str, Any]:
    """(1) planner plan -> YAML -> load_plan -> DMP: same outputs as the planner's plan and the
    unsharded model (DLRM over TT tables + a TorchRec table); (2) the bytes the collectives move
    in `steps` training steps of a TT-only DLRM with a mixed plan vs ttdist's comm_volume."""
    out: dict[str, Any] = {}
    fused = {"optimizer": "exact_sgd", "learning_rate": 0.1}
    # (1) round trip, DLRM over MixedEmbeddingBagCollection (TT + TorchRec table)
    reference = dlrm(True, fused)
    plan = planner_plan(reference, world_size, MIXED, fused)
    loaded = yaml_round_trip(plan, f"{tmpdir}/mixed_plan.yaml", world_size, reference)
    out["dict_equal"] = ttplan.plan_to_dict(loaded) == ttplan.plan_to_dict(plan)
    out["modules"] = sorted(loaded.plan)
    out["sharding"] = {m: {t: ps.sharding_type for t, ps in mp.items()} for m, mp in loaded.plan.items()}
    models = []
    for p in (plan, loaded):
        m = dmp(copy.deepcopy(reference), p, fused)
        # TorchRec's ShardedEBC re-initialises its weights on CPU: give it the reference's
        m.module.sparse_arch.embedding_bag_collection.dense.load_state_dict(
            reference.sparse_arch.embedding_bag_collection.dense.state_dict())
        models.append(m)
    dense, kjt, _ = batch(0, local(rank), with_dense=True)
    y_plan, y_loaded = (m(dense, kjt).detach() for m in models)
    gdense, gkjt, _ = batch(0, range(B * world_size), with_dense=True)
    y_ref = reference(gdense, gkjt).detach()[rank * B:(rank + 1) * B]
    out["loaded_vs_planner_max_abs"] = float((y_plan - y_loaded).abs().max())
    out["loaded_vs_unsharded_max_abs"] = float((y_loaded - y_ref).abs().max())
    out["output_abs_mean"] = float(y_ref.abs().mean())
    del models

    # (2) communication volume, TT-only DLRM, plan loaded from YAML
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from ttdist.tools.comm_volume import comm_volume

    tt_ref = dlrm(False, fused)
    tt_plan = yaml_round_trip(planner_plan(tt_ref, world_size, MIXED, fused), f"{tmpdir}/tt_plan.yaml", world_size,
                              tt_ref)
    model = dmp(copy.deepcopy(tt_ref), tt_plan, fused)
    # DDP's built-in all-reduce runs in C++; its Python twin goes through dist.all_reduce
    model._dmp_wrapped_module.register_comm_hook(state=None, hook=default_hooks.allreduce_hook)
    opt = optimizer(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    sharded = model.module.sparse_arch.embedding_bag_collection
    with CollectiveCounter(sharded) as counter:
        for step in range(steps):
            dense, kjt, labels = batch(step, local(rank))
            counter.enabled = True
            opt.zero_grad()
            loss = loss_fn(model(dense, kjt).squeeze(1), labels)
            loss.backward()
            opt.step()
            counter.enabled = False
    out["measured"] = {"/".join(k): v for k, v in counter.bytes.items()}
    out["calls"] = {"/".join(k): v for k, v in counter.calls.items()}
    out["formula"] = comm_volume(model, B, {f: float(n) for f, n in LENGTHS.items()})
    out["sharding_tt"] = sharded.sharding_types()
    return out


# ----------------------------------------------------------------------------------- bad input
def _expect_error(fn) -> tuple[str, str]:
    """(exception type name, message) of ``fn()``. A rank stuck in a collective would instead
    fail with the process group's timeout (harness: 120 s), a different error type."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return type(e).__name__, str(e)
    return "no error", ""


def bad_input(rank: int, world_size: int, tmpdir: str) -> dict[str, Any]:
    """With ``raise_on_every_rank`` (the sharder's debugging option: one all-reduce of error codes
    per forward), every bad-input case raises on EVERY rank (not a collective timeout), and the
    process group stays usable. (Without it the rank with the bad input raises before any collective and the others
    only learn of it from their next collective.)"""
    fused = {"optimizer": "exact_sgd", "learning_rate": 0.1}
    reference = dlrm(False, fused)
    plan = planner_plan(reference, world_size, MIXED, fused)
    model = dmp(copy.deepcopy(reference), plan, fused, raise_on_every_rank=True)
    module_path = "sparse_arch.embedding_bag_collection"
    owner = plan.plan[module_path]["t2"].ranks[0]  # t2 (feature f3) is table_wise on `owner`
    bad_rank = 1 - owner  # the rank whose input is bad; the table lives on the other rank
    out: dict[str, Any] = {"owner_of_t2": owner, "bad_rank": bad_rank}

    def forward(**kw):
        dense, kjt, labels = batch(0, local(rank), **(kw if rank == bad_rank else {}))
        model(dense, kjt).sum().backward()

    out["missing_feature"] = _expect_error(lambda: forward(drop="f3"))
    out["index_out_of_range"] = _expect_error(lambda: forward(bad=("f3", 3000)))
    out["negative_index"] = _expect_error(lambda: forward(bad=("f3", -1)))
    dense, kjt, _ = batch(1, local(rank))
    gdense, gkjt, _ = batch(1, range(B * world_size))
    expected = reference(gdense, gkjt).detach()[rank * B:(rank + 1) * B]
    out["good_batch_after_max_abs"] = float((model(dense, kjt).detach() - expected).abs().max())

    from ttdist.plan import plan_to_dict, plan_from_dict
    d = plan_to_dict(plan)
    unknown = copy.deepcopy(d)
    unknown[module_path]["t9"] = copy.deepcopy(unknown[module_path]["t2"])
    too_big = copy.deepcopy(d)
    too_big[module_path]["t2"]["ranks"] = [world_size]
    too_big[module_path]["t2"]["shards"][0]["rank"] = world_size
    for name, bad_plan in (("unknown_table", unknown), ("rank_out_of_world", too_big)):
        path = f"{tmpdir}/{name}.yaml"
        if rank == 0:
            import yaml

            with open(path, "w") as f:
                yaml.safe_dump(bad_plan, f, sort_keys=False)
        dist.barrier()
        out[f"load_{name}"] = _expect_error(lambda: ttplan.load_plan(path, world_size=world_size, tables=reference))
        # the same plan, unvalidated, straight into DMP: the sharded module rejects it on every rank
        out[f"dmp_{name}"] = _expect_error(lambda: dmp(copy.deepcopy(reference), plan_from_dict(bad_plan), fused))
    flag = torch.ones(1)
    dist.all_reduce(flag)
    out["all_reduce_after"] = float(flag)
    return out


# ------------------------------------------------------------------ replicas and checkpoints
EBC = "sparse_arch.embedding_bag_collection."
TT_PREFIX = EBC + "embedding_bags."  # per-table keys: embedding_bags.<table>.tt_cores.<k> / .optimizer_state.<k>


def _tt_state(model) -> dict[str, Any]:
    """A DMP's TT weights (its state_dict: ``embedding_bags.<table>.tt_cores.<k>``) and their fused
    optimizer state (``dmp.fused_optimizer``'s "sum", keyed by the core), the latter under the
    unsharded collection's names ``embedding_bags.<table>.optimizer_state.<k>``. ShardedTensor or
    plain tensor, as the module holds them."""
    out = {k: v for k, v in model.state_dict().items() if k.startswith(TT_PREFIX)}
    for key, state in model.fused_optimizer.state_dict()["state"].items():
        if key.startswith(TT_PREFIX) and "sum" in state:
            out[key.replace(".tt_cores.", ".optimizer_state.")] = state["sum"]
    return out


def _full_tt_state(model) -> dict[str, torch.Tensor]:
    """Every TT core and optimizer state as a full tensor (gathered to rank 0; plain tensors as they are)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in _tt_state(model).items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        else:
            out[key] = value.detach().clone()
    return out


def _checkpoint_state(model) -> dict[str, Any]:
    """What the tests save and load with DCP, as TorchRec's standard path does: the model's
    state_dict and the fused optimizer's."""
    return {"model": model.state_dict(), "fused": model.fused_optimizer.state_dict()}


def train(model, steps: int, rank: int, lr: float = 0.1) -> None:
    opt = optimizer(model, lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(steps):
        dense, kjt, labels = batch(step, local(rank))
        opt.zero_grad()
        loss_fn(model(dense, kjt).squeeze(1), labels).backward()
        opt.step()


def replicas_and_checkpoint(rank: int, world_size: int, ckpt_dir: str, steps: int) -> dict[str, Any]:
    """Train with SAVE_PLAN (exact_adagrad), compare replicas bit for bit across ranks, save with
    DCP, then load into the same model resharded with LOAD_PLAN and compare with what was saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    fused = {"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8}
    reference = dlrm(False, fused)
    model = dmp(copy.deepcopy(reference), planner_plan(reference, world_size, SAVE_PLAN, fused), fused)
    initial = {k: v.detach().clone() for k, v in _tt_state(model).items() if not isinstance(v, ShardedTensor)}
    train(model, steps, rank)
    out: dict[str, Any] = {"sharding": model.module.sparse_arch.embedding_bag_collection.sharding_types()}

    # replicas: every plain (non-sharded) TT core / optimizer state is a replica; compare all ranks' bits
    replicas = {k: v.detach().clone() for k, v in _tt_state(model).items() if not isinstance(v, ShardedTensor)}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, replicas)
    out["replica_keys"] = sorted(replicas)
    out["replica_mismatches"] = [k for k in replicas
                                 if not all(torch.equal(g[k].view(torch.int32), replicas[k].view(torch.int32))
                                            for g in gathered)]
    out["replica_moved"] = {k: float((replicas[k] - initial[k]).abs().max()) for k in replicas}

    dense, kjt, _ = batch(100, local(rank))
    out["output_before_save"] = model(dense, kjt).detach()
    saved = _full_tt_state(model)
    dcp.save(_checkpoint_state(model), checkpoint_id=ckpt_dir)
    out["saved"] = saved if rank == 0 else None

    # load at the same world size with another plan (and other initial cores)
    other = dlrm(False, fused, seed=11)
    resharded = dmp(copy.deepcopy(other), planner_plan(other, world_size, LOAD_PLAN, fused), fused)
    out["resharded_sharding"] = resharded.module.sparse_arch.embedding_bag_collection.sharding_types()
    before = _full_tt_state(resharded)
    state = _checkpoint_state(resharded)
    dcp.load(state, checkpoint_id=ckpt_dir)
    resharded.load_state_dict(state["model"])
    resharded.fused_optimizer.load_state_dict(state["fused"])
    loaded = _full_tt_state(resharded)
    if rank == 0:
        out["differed_before_load"] = [k for k in saved if not torch.equal(before[k], saved[k])]
        out["load_mismatches"] = [k for k in saved if not torch.equal(loaded[k], saved[k])]
        out["loaded_keys"] = sorted(loaded)
    out["output_after_load_max_abs"] = float((resharded(dense, kjt).detach() - out["output_before_save"]).abs().max())
    return out


def load_checkpoint_single_rank(rank: int, world_size: int, ckpt_dir: str) -> dict[str, Any]:
    """At 1 rank: the checkpoint loaded into the unsharded TT collection (its own per-table keys,
    optimizer state included) and into a 1-rank DMP."""
    import torch.distributed.checkpoint as dcp

    fused = {"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8}
    unsharded = ttdist.TTEmbeddingBagCollection(tt_configs(), seed=11, fused_params=fused)
    own = {k: v for k, v in unsharded.state_dict().items() if ".tt_cores." in k or ".optimizer_state." in k}
    # the checkpoint's layout (TorchRec's): weights under "model", the Adagrad sums under "fused"
    state = {"model": {EBC + k: v for k, v in own.items() if ".tt_cores." in k},
             "fused": {"state": {EBC + k.replace(".optimizer_state.", ".tt_cores."): {"sum": v}
                                 for k, v in own.items() if ".optimizer_state." in k}}}
    dcp.load(state, checkpoint_id=ckpt_dir)
    flat = {**state["model"], **{k.replace(".tt_cores.", ".optimizer_state."): v["sum"]
                                 for k, v in state["fused"]["state"].items()}}
    unsharded.load_state_dict({k[len(EBC):]: v for k, v in flat.items()}, strict=False)
    out = {"unsharded": {EBC + k: v.detach().clone() for k, v in unsharded.state_dict().items()
                         if ".tt_cores." in k or ".optimizer_state." in k}}
    other = dlrm(False, fused, seed=11)
    model = dmp(copy.deepcopy(other), planner_plan(other, 1, {t["name"]: "table_wise" for t in TT_TABLES}, fused),
                fused)
    state = _checkpoint_state(model)
    dcp.load(state, checkpoint_id=ckpt_dir)
    model.load_state_dict(state["model"])
    model.fused_optimizer.load_state_dict(state["fused"])
    out["dmp"] = _full_tt_state(model)
    dense, kjt, _ = batch(100, range(0, 2 * B))
    out["output"] = model(dense, kjt).detach()
    return out
