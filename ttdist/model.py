"""The DLRM of a config: TorchRec's ``DLRM`` over TT and dense tables, and its sharders.

Table t (t = 0..25) is named ``t_cat_<t>`` and reads the Criteo feature ``cat_<t>``
(TorchRec's ``DEFAULT_CAT_NAMES``). The ``model.tt_tables`` largest tables are TT tables;
the rest are plain TorchRec tables: trained by fbgemm's fused TBE where they are sharded, and by
``TableOptimizer`` (the same update) where the planner replicates them (data-parallel).
"""
from __future__ import annotations

from typing import Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ttdist.config import Config
from ttdist.distributed import TTEmbeddingBagCollectionSharder, tt_constraints
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, ROW_WISE, TABLE_WISE
from ttdist.modules.collection import MixedEmbeddingBagCollection, TTEmbeddingBagConfig


def table_configs(cfg: Config) -> list[EmbeddingBagConfig]:
    """One config per Criteo feature, TT for ``cfg.tt_table_indices()``."""
    rows, tt = cfg.table_rows(), set(cfg.tt_table_indices())
    tables: list[EmbeddingBagConfig] = []
    for t, feature in enumerate(DEFAULT_CAT_NAMES):
        common = dict(name=f"t_{feature}", feature_names=[feature], num_embeddings=rows[t],
                      embedding_dim=cfg.model.embedding_dim)
        if t in tt:
            tables.append(TTEmbeddingBagConfig(**common, tt_ranks=list(cfg.model.tt_ranks),
                                               weight_dist=cfg.model.weight_dist))
        else:
            tables.append(EmbeddingBagConfig(**common))
    return tables


def build_model(cfg: Config, device: Optional[torch.device] = None) -> DLRM:
    """TorchRec's DLRM fed by a MixedEmbeddingBagCollection; initial weights depend only on the seed."""
    torch.manual_seed(cfg.train.seed)
    collection = MixedEmbeddingBagCollection(table_configs(cfg), device=device, seed=cfg.train.seed)
    return DLRM(embedding_bag_collection=collection, dense_in_features=INT_FEATURE_COUNT,
                dense_arch_layer_sizes=list(cfg.model.dense_arch_layer_sizes),
                over_arch_layer_sizes=list(cfg.model.over_arch_layer_sizes), dense_device=device)


def fused_params(cfg: Config) -> dict:
    """TorchRec's fused-optimizer parameters, shared by TT and dense tables."""
    return {"optimizer": EmbOptimType(cfg.optim.embedding_optimizer), "learning_rate": cfg.optim.embedding_lr,
            "eps": cfg.optim.eps}


def plan_constraints(cfg: Config, device_type: str) -> dict[str, ParameterConstraints]:
    """Constraints for the planner: TT tables as ``train.sharding_types`` says; dense tables
    table-/column-wise on fbgemm's fused kernel or data-parallel (TorchRec's dense kernel, trained
    by ``TableOptimizer``, whose state is named as the fused kernel's, so checkpoints move between
    the two; ``PlainTableSharder`` pairs each type with its kernel). TorchRec's row-wise needs
    reduce-scatter, which gloo lacks, so dense tables are row-wise only on GPU."""
    forced = cfg.train.sharding_types
    dense_types = [TABLE_WISE, COLUMN_WISE, DATA_PARALLEL] + ([ROW_WISE] if device_type == "cuda" else [])
    constraints = tt_constraints({name: kind for name, kind in forced.items()})
    for config in table_configs(cfg):
        if not isinstance(config, TTEmbeddingBagConfig):
            types = [forced[config.name]] if config.name in forced else dense_types
            constraints[config.name] = ParameterConstraints(
                sharding_types=types, compute_kernels=[EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value])
    unknown = sorted(set(forced) - {c.name for c in table_configs(cfg)})
    if unknown:
        raise ValueError(f"train.sharding_types names unknown tables {unknown}; tables are t_cat_0..t_cat_25")
    return constraints


class PlainTableSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder of the plain tables, with one kernel per sharding type: fbgemm's fused
    kernel (optimizer in backward) for a sharded table, TorchRec's dense kernel for a
    data-parallel one (the only one TorchRec has) — never a sharded table on the dense kernel,
    whose sharded weight no optimizer of the app would train."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        dense = EmbeddingComputeKernel.DENSE.value
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        return [dense] if sharding_type == DATA_PARALLEL else [k for k in kernels if k != dense]


def build_sharders(cfg: Config) -> list:
    return [TTEmbeddingBagCollectionSharder(fused_params=fused_params(cfg)),
            PlainTableSharder(fused_params=fused_params(cfg))]


def replicated_plain_tables(plan: ShardingPlan) -> dict[str, str]:
    """Parameter name (as DMP names it) -> table name of every plain table the plan makes
    data-parallel (TT tables are their collection's own)."""
    return {f"{path}.embedding_bags.{table}.weight": table for path, tables in plan.plan.items()
            for table, sharding in tables.items()
            if sharding.sharding_type == DATA_PARALLEL and sharding.compute_kernel == EmbeddingComputeKernel.DENSE.value}


def embedding_bytes(cfg: Config) -> dict[str, float]:
    """Bytes of the embedding tables: all dense vs as configured, and the TT tables' compression."""
    dense_all = tt_dense = tt_cores = 0
    for config in table_configs(cfg):
        dense = config.num_embeddings * config.embedding_dim * 4
        dense_all += dense
        if isinstance(config, TTEmbeddingBagConfig):
            tt_dense += dense
            tt_cores += config.tt_shape().num_parameters * 4
    configured = dense_all - tt_dense + tt_cores
    return {"embedding_bytes_dense": dense_all, "embedding_bytes_tt": configured,
            "compression_ratio": tt_dense / tt_cores if tt_cores else 1.0,
            "embedding_compression_ratio_total": dense_all / configured}
