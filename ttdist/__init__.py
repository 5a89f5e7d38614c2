"""ttdist: Tensor-Train compressed embedding tables as first-class citizens of TorchRec training.

``import ttdist`` loads only torch and the op library; the TorchRec-facing names
(``TTEmbeddingBagConfig``, ``TTEmbeddingBagCollection``) import torchrec on first use, so the
kernels and single-device modules work where torchrec is not installed (e.g. a bare GPU box).
"""
from ttdist import ops
from ttdist.modules import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag, TTShape, make_tt_shape

_TORCHREC_NAMES = {
    "TTEmbeddingBagConfig": "ttdist.modules.collection",
    "TTEmbeddingBagCollection": "ttdist.modules.collection",
    "MixedEmbeddingBagCollection": "ttdist.modules.collection",
}

__all__ = ["ops", "OptimType", "TTEmbeddingBag", "TableBatchedTTEmbeddingBag", "TTShape", "make_tt_shape",
           *_TORCHREC_NAMES]


def __getattr__(name: str):
    if name in _TORCHREC_NAMES:
        import importlib

        return getattr(importlib.import_module(_TORCHREC_NAMES[name]), name)
    raise AttributeError(f"module 'ttdist' has no attribute {name!r}")
