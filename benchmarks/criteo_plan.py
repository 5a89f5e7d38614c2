"""Plan the 26 Criteo Kaggle tables (the largest as TT, the rest plain TorchRec tables) and print the plan.

TorchRec's EmbeddingShardingPlanner (``ttdist.distributed.make_planner``: TT tables get their
real core bytes, plain tables TorchRec's estimates) plans a ``MixedEmbeddingBagCollection``
built on the meta device, so nothing is allocated, on a CPU topology; no process group needed.

    .venv/bin/python benchmarks/criteo_plan.py                      # 4 ranks, 7 TT tables, ranks [32, 32], dim 16
    .venv/bin/python benchmarks/criteo_plan.py --world-size 8 --tt-tables 3 --dim 64 --force cat_2=row_wise
    .venv/bin/python benchmarks/criteo_plan.py --yaml plan.yaml     # also save it (ttdist.plan.load_plan reads it)
"""
from __future__ import annotations

import argparse
import logging
import warnings
from typing import Optional, Sequence

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ttdist.data.config import CRITEO_KAGGLE_CARDINALITIES
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner, tt_constraints
from ttdist.modules.collection import MixedEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType
from ttdist.distributed.plan_bytes import format_plan
from ttdist.plan import save_plan


def criteo_tables(num_tt: int = 7, tt_ranks: Sequence[int] = (32, 32), dim: int = 16) -> list:
    """Table ``cat_i`` (feature ``cat_i``) per Criteo Kaggle feature; the ``num_tt`` largest are TT."""
    largest = sorted(range(len(CRITEO_KAGGLE_CARDINALITIES)), key=lambda i: -CRITEO_KAGGLE_CARDINALITIES[i])[:num_tt]
    tables = []
    for i, rows in enumerate(CRITEO_KAGGLE_CARDINALITIES):
        kw = dict(name=f"cat_{i}", num_embeddings=rows, embedding_dim=dim, feature_names=[f"cat_{i}"])
        tables.append(TTEmbeddingBagConfig(tt_ranks=list(tt_ranks), **kw) if i in largest else EmbeddingBagConfig(**kw))
    return tables


def criteo_plan(world_size: int = 4, num_tt: int = 7, tt_ranks: Sequence[int] = (32, 32), dim: int = 16,
                batch_size: int = 512, force: Optional[dict[str, str]] = None,
                optimizer: OptimType = OptimType.EXACT_SGD):
    """(model on meta, ShardingPlan, planner, Topology); ``force``: {TT table: sharding type}."""
    model = MixedEmbeddingBagCollection(criteo_tables(num_tt, tt_ranks, dim), device=torch.device("meta"))
    topology = Topology(world_size=world_size, compute_device="cpu")
    planner = make_planner(topology, batch_size=batch_size, constraints=tt_constraints(force or {}),
                           optimizer=optimizer)
    sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer}), EmbeddingBagCollectionSharder()]
    return model, planner.plan(model, sharders), planner, topology


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--tt-tables", type=int, default=7, help="how many of the largest tables are TT")
    parser.add_argument("--tt-ranks", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=512, help="per rank")
    parser.add_argument("--force", nargs="*", default=[], metavar="TABLE=SHARDING_TYPE",
                        help="sharding type of TT tables, e.g. cat_2=row_wise")
    parser.add_argument("--yaml", help="also save the plan here")
    args = parser.parse_args(argv)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    force = dict(item.split("=", 1) for item in args.force)
    model, plan, _, topology = criteo_plan(args.world_size, args.tt_tables, args.tt_ranks, args.dim, args.batch_size,
                                           force)
    print(format_plan(plan, model, topology))
    if args.yaml:
        save_plan(plan, args.yaml)
        print(f"saved to {args.yaml}")


if __name__ == "__main__":
    main()
