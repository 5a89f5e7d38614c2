"""Single-device TT modules (no process groups here; see ttdist.distributed for sharded twins)."""
from ttdist.modules.optim import OptimType
from ttdist.modules.tt_embedding_bag import TableBatchedTTEmbeddingBag, TTEmbeddingBag
from ttdist.modules.tt_shapes import TTShape, make_tt_shape

__all__ = ["OptimType", "TTEmbeddingBag", "TableBatchedTTEmbeddingBag", "TTShape", "make_tt_shape"]
