"""Rank functions of the sharding tests (importable by spawned processes)."""
from __future__ import annotations

import copy

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import ttdist
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner, tt_constraints

TABLES = [  # small shapes that exercise d = 2, 3, mean pooling and a two-feature table
    dict(name="t0", num_embeddings=1000, embedding_dim=8, feature_names=["f0"], tt_ranks=[4, 4]),
    dict(name="t1", num_embeddings=700, embedding_dim=8, feature_names=["f1", "f2"], tt_ranks=[5],
         pooling=PoolingType.MEAN),
    dict(name="t2", num_embeddings=3000, embedding_dim=8, feature_names=["f3"], tt_ranks=[3, 6]),
]
# p_1 = 3: row-wise over 4 ranks leaves the last rank without rows (only in this file's models).
SMALL_P1 = dict(name="t_p3", num_embeddings=250, embedding_dim=8, feature_names=["fp3"], tt_ranks=[2, 2],
                tt_p_shapes=[3, 10, 10], tt_q_shapes=[2, 2, 2])
FEATURES = ["f0", "f1", "f2", "f3", "fp3"]
ROWS = {"f0": 1000, "f1": 700, "f2": 700, "f3": 3000, "fp3": 250}


def make_tables():
    return [ttdist.TTEmbeddingBagConfig(**t) for t in TABLES + [SMALL_P1]]


def global_batch(step: int, batch: int):
    """(dense [B, 4], per-sample per-feature index lists, labels [B]) of global batch `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    dense = torch.randn(batch, 4, generator=g)
    ids = [[torch.randint(0, ROWS[f], (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
            for f in FEATURES] for _ in range(batch)]
    labels = torch.randint(0, 2, (batch,), generator=g).float()
    return dense, ids, labels


def kjt_of(ids, samples) -> KeyedJaggedTensor:
    lengths = torch.tensor([len(ids[s][f]) for f in range(len(FEATURES)) for s in samples])
    values = torch.cat([ids[s][f] for f in range(len(FEATURES)) for s in samples] + [torch.zeros(0, dtype=torch.int64)])
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def shard(module, world_size: int, sharding: dict, fused: dict, batch: int):
    """DMP over `module` with a plan from TorchRec's planner forcing `sharding` per table."""
    topology = Topology(world_size=world_size, compute_device="cpu")
    planner = make_planner(topology, batch_size=batch, constraints=tt_constraints(sharding))
    sharders = [TTEmbeddingBagCollectionSharder(fused_params=fused)]
    plan = planner.collective_plan(module, sharders, torch.distributed.GroupMember.WORLD)
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
                                    device=torch.device("cpu"), plan=plan, sharders=sharders), plan


def pooled_equals_unsharded_all_types(rank: int, world_size: int, sharding_types: list) -> dict:
    """{sharding type: max |sharded - unsharded|} on this rank (one spawn serves all types)."""
    return {st: pooled_equals_unsharded(rank, world_size, st) for st in sharding_types}


def train_cases(rank: int, world_size: int, cases: list, steps: int) -> list:
    """train_equals_single_process for several (plan, optimizer) cases in one spawn."""
    return [train_equals_single_process(rank, world_size, sharding, optimizer, steps) for sharding, optimizer in cases]


def pooled_equals_unsharded(rank: int, world_size: int, sharding_type: str) -> float:
    batch = 4 * world_size
    reference = ttdist.TTEmbeddingBagCollection(make_tables(), seed=3)
    dmp, _ = shard(copy.deepcopy(reference), world_size, {t["name"]: sharding_type for t in TABLES + [SMALL_P1]},
                   {"optimizer": "exact_sgd"}, batch // world_size)
    _, ids, _ = global_batch(0, batch)
    local = range(rank * batch // world_size, (rank + 1) * batch // world_size)
    out = dmp(kjt_of(ids, local)).wait()
    expected = reference(kjt_of(ids, range(batch)))
    # read by key: the sharded output's keys follow its sharding, the unsharded one's the config
    assert sorted(out.keys()) == sorted(expected.keys()), (out.keys(), expected.keys())
    got = KeyedTensor.regroup([out], [expected.keys()])[0]
    return float((got - expected.values()[rank * len(local):(rank + 1) * len(local)]).abs().max())


def dlrm(tables, fused):
    ebc = ttdist.TTEmbeddingBagCollection(tables, seed=7, fused_params=fused)
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8],
                over_arch_layer_sizes=[8, 1])


def train_equals_single_process(rank: int, world_size: int, sharding: dict, optimizer: str, steps: int):
    """Losses and final cores of `steps` DMP steps vs one process on the global batch."""
    batch, lr = 8 * world_size, 0.1
    fused = {"optimizer": optimizer, "learning_rate": 3.0 if optimizer == "exact_sgd" else lr, "eps": 1e-8}
    reference = dlrm(make_tables(), fused)
    model, _ = shard(copy.deepcopy(reference), world_size, sharding, fused, batch // world_size)
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                      lambda params: torch.optim.SGD(params, lr=lr))
    opt = CombinedOptimizer([model.fused_optimizer, dense_opt])
    ref_opt = torch.optim.SGD([p for n, p in reference.named_parameters() if "tt_tables" not in n], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    local = range(rank * batch // world_size, (rank + 1) * batch // world_size)
    losses, ref_losses = [], []
    for step in range(steps):
        dense, ids, labels = global_batch(step, batch)
        opt.zero_grad()
        loss = loss_fn(model(dense[list(local)], kjt_of(ids, local)).squeeze(1), labels[list(local)])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world_size)
        ref_opt.zero_grad()
        ref_loss = loss_fn(reference(dense, kjt_of(ids, range(batch))).squeeze(1), labels)
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(float(ref_loss))
    # Every rank compares its own shards (state_dict: ShardedTensor local shards or full replicas).
    core_err = 0.0
    ref_state = reference.state_dict()
    for key, value in model.state_dict().items():
        if "tt_cores" not in key:
            continue
        ref = ref_state[key.replace("module.", "", 1) if key not in ref_state else key]
        if hasattr(value, "local_shards"):
            for s in value.local_shards():
                sl = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))
                core_err = max(core_err, float((s.tensor - ref[sl]).abs().max() / ref.abs().max()))
        else:
            core_err = max(core_err, float((value - ref).abs().max() / ref.abs().max()))
    initial = dlrm(make_tables(), fused).state_dict()
    moved = max(float((ref_state[k] - initial[k]).abs().max() / initial[k].abs().max())
                for k in initial if "tt_cores" in k)  # relative movement of the most-trained core
    return losses, ref_losses, core_err, moved
