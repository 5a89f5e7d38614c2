"""Sharded twins of ttdist's modules for TorchRec's DistributedModelParallel (imports torchrec).

Importing this package lets DMP's default planner (no ``plan=``) plan TT tables:
``install_default_planner_support`` (ttdist/distributed/planner.py, docs/planner.md).
"""
from ttdist.distributed.embeddingbag import (TT_COMPUTE_KERNEL, ShardedTTEmbeddingBagCollection,
                                             TTEmbeddingBagCollectionSharder, TTFusedOptimizer)
from ttdist.distributed.planner import (DefaultPlannerPerfEstimator, DefaultPlannerStorageEstimator, TTPerfEstimator,
                                        TTStorageEstimator, install_default_planner_support, make_planner,
                                        tt_constraints)

install_default_planner_support()

__all__ = ["TT_COMPUTE_KERNEL", "DefaultPlannerPerfEstimator", "DefaultPlannerStorageEstimator",
           "ShardedTTEmbeddingBagCollection", "TTEmbeddingBagCollectionSharder", "TTFusedOptimizer", "TTPerfEstimator",
           "TTStorageEstimator", "install_default_planner_support", "make_planner", "tt_constraints"]
