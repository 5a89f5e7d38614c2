"""Data pipeline: Criteo-shaped batches for distributed DLRM training.

Symbols: B = global batch size (DataConfig.batch_size, summed over ranks), W = world size,
B_local = B // W (B must be divisible by W), F = 26 categorical ("sparse") features.

Every dataset is an iterable of torchrec.datasets.utils.Batch for one rank:
  dense_features  float32 [B_local, 13]
  sparse_features KeyedJaggedTensor, keys cat_0..cat_25, one int64 id per sample and feature
  labels          float32 [B_local], 0/1
Rank r yields samples [r * B_local, (r + 1) * B_local) of every global batch, so concatenating
the ranks' batches in rank order gives the 1-rank batch exactly. `start_batch` is the index of
the first global batch to yield (the data position to resume from).

Importing this package does not import torchrec (it costs seconds); the datasets do on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ttdist.data.batching import DataError
from ttdist.data.config import DataConfig, scaled_cardinalities
from ttdist.data.criteo import read_tsv
from ttdist.data.stream import EndOfData, check_files, train_stream

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torchrec.datasets.utils import Batch

__all__ = ["DataConfig", "DataError", "EndOfData", "check_files", "make_dataset", "read_tsv",
           "scaled_cardinalities", "train_stream"]


def make_dataset(
    cfg: DataConfig, split: str, rank: int, world_size: int, start_batch: int = 0
) -> Iterable[Batch]:
    """The dataset cfg.name names, for `split` ("train" or "eval"), yielding rank `rank`'s
    B_local-sample slices of the global batches start_batch, start_batch + 1, ..."""
    cfg.validate()
    if cfg.name == "synthetic":
        from ttdist.data.synthetic import SyntheticCriteo

        return SyntheticCriteo(cfg, split, rank, world_size, start_batch)
    if cfg.name == "random":
        from ttdist.data.random_data import RandomCriteo

        return RandomCriteo(cfg, split, rank, world_size, start_batch)
    if cfg.name == "criteo_tsv":
        from ttdist.data.criteo import CriteoTsvDataset

        return CriteoTsvDataset(cfg, split, rank, world_size, start_batch)
    from ttdist.data.criteo_npy import CriteoNpyDataset  # "criteo_npy", the last valid name

    return CriteoNpyDataset(cfg, split, rank, world_size, start_batch)
