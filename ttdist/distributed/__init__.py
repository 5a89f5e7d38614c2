"""Sharded twins of ttdist's modules for TorchRec's DistributedModelParallel (imports torchrec)."""
from ttdist.distributed.embeddingbag import (TT_COMPUTE_KERNEL, ShardedTTEmbeddingBagCollection,
                                             TTEmbeddingBagCollectionSharder, TTFusedOptimizer)
from ttdist.distributed.planner import TTPerfEstimator, TTStorageEstimator, make_planner, tt_constraints

__all__ = ["TT_COMPUTE_KERNEL", "ShardedTTEmbeddingBagCollection", "TTEmbeddingBagCollectionSharder",
           "TTFusedOptimizer", "TTPerfEstimator", "TTStorageEstimator", "make_planner", "tt_constraints"]
