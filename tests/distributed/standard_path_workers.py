"""Rank functions of TorchRec's standard training path over TT tables (importable by spawned ranks).

Written from TorchRec's public API as a TorchRec user writes a training script: the model is
built on the meta device, the embedding optimizer is given by ``apply_optimizer_in_backward``,
``DistributedModelParallel`` plans by itself (or takes a plan) and ``TrainPipelineSparseDist``
drives the steps. Swapping ``EmbeddingBagCollection`` for ``TTEmbeddingBagCollection`` and adding
the TT sharder is the only difference between the two models.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ttdist import MixedEmbeddingBagCollection, TTEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.distributed import TTEmbeddingBagCollectionSharder

ROWS, DIM, DENSE = [400, 300, 100], 16, 4
FEATURES = [f"f{i}" for i in range(len(ROWS))]


def table_configs(tt: bool, mixed: bool = False) -> list[EmbeddingBagConfig]:
    """TT tables (``tt``), TorchRec's, or (``mixed``) TT tables with TorchRec's t1 between them."""
    if mixed:
        return [c if c.name != "t1" else table_configs(False)[1] for c in table_configs(True)]
    if tt:
        return [TTEmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f],
                                     tt_ranks=[8, 8]) for i, (n, f) in enumerate(zip(ROWS, FEATURES))]
    return [EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f])
            for i, (n, f) in enumerate(zip(ROWS, FEATURES))]


def global_batch(step: int, batch: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Dense [B, 4], per-feature ids [B, 2] and labels [B]; the label is learnable from the ids
    (whether the first feature's id lies in the lower half of its table)."""
    g = torch.Generator().manual_seed(7000 + step)
    dense = torch.randn(batch, DENSE, generator=g)
    ids = [torch.randint(0, n, (batch, 2), generator=g) for n in ROWS]
    labels = ((ids[0][:, 0] < ROWS[0] // 2) ^ (torch.rand(batch, generator=g) < 0.1)).float()
    return dense, ids, labels


def local_batches(rank: int, world_size: int, steps: int, global_size: int, first_step: int = 0
                  ) -> Iterator[Batch]:
    per_rank = global_size // world_size
    for step in range(first_step, first_step + steps):
        dense, ids, labels = global_batch(step, global_size)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        values = torch.cat([x[rows].reshape(-1) for x in ids])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values,
                                                  lengths=torch.full((len(FEATURES) * per_rank,), 2))
        yield Batch(dense_features=dense[rows], sparse_features=kjt, labels=labels[rows])


OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 5.0}), "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
              "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.1})}


def build(world_size: int, tt: bool, optimizer: str = "rowwise_adagrad", plan_sharding: Optional[dict[str, str]] = None,
          global_size: int = 64, tables: Optional[list[EmbeddingBagConfig]] = None, mixed: bool = False):
    """(DMP, dense optimizer) of the standard path; ``plan_sharding``: a sharding type per table
    forced through ``ParameterConstraints`` (None: DMP plans alone); ``mixed``: TT and TorchRec
    tables in one ``MixedEmbeddingBagCollection``."""
    torch.manual_seed(0)
    if mixed:
        ebc = MixedEmbeddingBagCollection(tables or table_configs(True, mixed=True), device=torch.device("meta"))
    else:
        ebc_type = TTEmbeddingBagCollection if tt else EmbeddingBagCollection
        ebc = ebc_type(tables=tables or table_configs(tt), device=torch.device("meta"))
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[16, DIM],
                           over_arch_layer_sizes=[16, 1], dense_device=torch.device("cpu")))
    optimizer_class, kwargs = OPTIMIZERS[optimizer]
    apply_optimizer_in_backward(optimizer_class, model.model.sparse_arch.parameters(), kwargs)
    sharders = [EmbeddingBagCollectionSharder(), TTEmbeddingBagCollectionSharder()]
    plan = None
    if plan_sharding is not None:
        from torchrec.distributed.planner import Topology
        from torchrec.distributed.planner.types import ParameterConstraints

        from ttdist.distributed import make_planner

        planner = make_planner(Topology(world_size=world_size, compute_device="cpu"), global_size // world_size,
                               {t: ParameterConstraints(sharding_types=[s]) for t, s in plan_sharding.items()})
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), sharders=sharders, plan=plan,
                                   env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    dense_optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                            lambda params: torch.optim.Adagrad(params, lr=0.1))
    return dmp, dense_optimizer


def run_pipeline(dmp, dense_optimizer, rank: int, world_size: int, steps: int, global_size: int = 64,
                 first_step: int = 0) -> tuple[list[float], list[str]]:
    """Global mean loss per step under TrainPipelineSparseDist, and the modules it pipelined."""
    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer, torch.device("cpu"))
    batches = local_batches(rank, world_size, steps, global_size, first_step)
    losses = []
    for _ in range(steps):
        loss, _, _ = pipeline.progress(batches)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world_size)
    pipelined = sorted(type(m).__name__ for m in pipeline._pipelined_modules)
    pipeline.detach()  # the model's own forward again (for eval)
    return losses, pipelined


def train_standard_path(rank: int, world_size: int, tt: bool, steps: int = 40, optimizer: str = "rowwise_adagrad",
                        plan_sharding: Optional[dict[str, str]] = None, mixed: bool = False) -> dict:
    dmp, dense_optimizer = build(world_size, tt, optimizer, plan_sharding, mixed=mixed)
    before = local_embedding_weights(dmp)
    losses, pipelined = run_pipeline(dmp, dense_optimizer, rank, world_size, steps)
    moved = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(local_embedding_weights(dmp), before))
    sharding = {name: ps.sharding_type for module_plan in dmp.plan.plan.values() for name, ps in module_plan.items()}
    fused = dmp.fused_optimizer.state_dict()["state"]
    return {"losses": losses, "sharding": sharding, "pipelined": pipelined, "moved": moved,
            "fused_state": {key: sorted(value) for key, value in fused.items()},
            "model_keys": sorted(dmp.state_dict())}


def local_embedding_weights(dmp) -> list[torch.Tensor]:
    """Copies of this rank's embedding weights (the fused optimizer's parameters)."""
    return [t.clone() for p in dmp.fused_optimizer.params.values()
            for t in ([s.tensor for s in p.local_shards()] if hasattr(p, "local_shards") else [p])]


def train_cases(rank: int, world_size: int, cases: list[tuple[str, dict]], steps: int) -> list[tuple[list[float], float]]:
    """(losses, relative movement of the embedding weights) of several (optimizer, plan) cases of TT tables."""
    runs = [train_standard_path(rank, world_size, True, steps, optimizer, plan) for optimizer, plan in cases]
    return [(r["losses"], r["moved"]) for r in runs]


def eval_logits(dmp, rank: int, world_size: int, global_size: int = 256) -> torch.Tensor:
    """Logits of the fixed eval batch, gathered over ranks in sample order [global_size]."""
    batch = next(local_batches(rank, world_size, 1, global_size, first_step=10_000))
    dmp.eval()
    with torch.no_grad():
        _, (_, logits, _) = dmp(batch)
    dmp.train()
    gathered = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(gathered, logits)
    return torch.cat(gathered)


def auc_of(logits: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    _, _, labels = global_batch(10_000, logits.numel())
    return float(binary_auroc(logits, labels.long()))


def save_checkpoint(rank: int, world_size: int, path: str, steps: int) -> dict:
    """Trains, saves model + fused optimizer with torch.distributed.checkpoint; returns the eval."""
    import torch.distributed.checkpoint as dcp

    dmp, dense_optimizer = build(world_size, True, "adagrad", {"t0": "row_wise", "t1": "table_wise",
                                                                "t2": "column_wise"})
    run_pipeline(dmp, dense_optimizer, rank, world_size, steps)
    dcp.save({"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict(),
              "dense": dense_optimizer.state_dict()}, checkpoint_id=path)
    return evaluate_and_continue(dmp, dense_optimizer, rank, world_size, steps)


def evaluate_and_continue(dmp, dense_optimizer, rank: int, world_size: int, step: int) -> dict:
    """Eval logits and AUC, then the losses of two more training steps (they depend on the optimizer state)."""
    logits = eval_logits(dmp, rank, world_size)
    next_losses, _ = run_pipeline(dmp, dense_optimizer, rank, world_size, 2, first_step=step)
    return {"logits": logits, "auc": auc_of(logits), "next_losses": next_losses}


def load_checkpoint(rank: int, world_size: int, path: str, plan: dict[str, str], step: int,
                    tables: Optional[list[EmbeddingBagConfig]] = None) -> dict:
    """Loads the checkpoint at another world size and plan; returns evaluate_and_continue's figures."""
    import torch.distributed.checkpoint as dcp

    dmp, dense_optimizer = build(world_size, True, "adagrad", plan, tables=tables)
    dense_optimizer.init_state()
    state = {"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict(),
             "dense": dense_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    dmp.fused_optimizer.load_state_dict(state["fused"])
    dense_optimizer.load_state_dict(state["dense"])
    return evaluate_and_continue(dmp, dense_optimizer, rank, world_size, step)


def pooled_error_with_codecs(rank: int, world_size: int, precision: Optional[str]) -> tuple[float, float]:
    """(max |sharded - unsharded|, max |unsharded|) of pooled outputs, table-wise, with TorchRec's
    quantized-communication codecs at ``precision`` ("FP16", "BF16"; None: fp32) on the pooled all-to-all."""
    import copy

    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

    tables = table_configs(True)
    reference = TTEmbeddingBagCollection(tables)
    registry = None if precision is None else get_qcomm_codecs_registry(QCommsConfig(
        forward_precision=getattr(CommType, precision), backward_precision=getattr(CommType, precision)))
    sharders = [TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]
    dmp = DistributedModelParallel(copy.deepcopy(reference), device=torch.device("cpu"), sharders=sharders,
                                   env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    batch = next(local_batches(rank, world_size, 1, 8 * world_size))
    everyone = next(local_batches(0, 1, 1, 8 * world_size))
    reference_out = reference(everyone.sparse_features)
    out = KeyedTensor.regroup([dmp(batch.sparse_features).wait()], [reference_out.keys()])[0]  # by key
    expected = reference_out.values()[rank * 8:(rank + 1) * 8]
    return float((out - expected).abs().max()), float(expected.abs().max())
