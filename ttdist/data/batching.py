"""Pieces every dataset shares: the rank's slice of a global batch and the TorchRec Batch.

Symbols: B = global batch size, W = world size, B_local = B // W, F = 26 sparse features.
Rank r owns samples [r * B_local, (r + 1) * B_local) of every global batch, so concatenating
the ranks' batches in rank order gives the 1-rank batch exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ttdist.data.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, DataConfig

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

SPLITS = ("train", "eval")


class DataError(ValueError):
    """The data files cannot serve the run (missing, too short); the message names the key and file."""


def first_bad_label(labels: np.ndarray) -> int | None:
    """Index of the first label that is not 0 or 1 (NaN included), or None."""
    bad = ~((labels == 0) | (labels == 1))
    return int(np.argmax(bad)) if bad.any() else None


def local_batch_size(batch_size: int, rank: int, world_size: int) -> int:
    """B_local = B // W; ValueError if B is not divisible by W or rank is not in [0, W)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size (global, {batch_size}) must be divisible by world_size ({world_size})"
        )
    return batch_size // world_size


def check_split(split: str) -> None:
    """ValueError unless split is "train" or "eval"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_paths(cfg: DataConfig, split: str) -> list[str]:
    """Files (or stems) of a split of a file dataset: cfg.train_path / cfg.eval_path, split at
    commas. ValueError naming the field when it is unset or lists nothing."""
    check_split(split)
    field = "train_path" if split == "train" else "eval_path"
    value = getattr(cfg, field)
    paths = [p.strip() for p in (value or "").split(",") if p.strip()]
    if not paths:
        raise ValueError(
            f"{field} must name the {cfg.name} files of the {split} split, got {value!r}"
        )
    return paths


def worker_shard() -> tuple[int, int]:
    """(worker id, number of workers) of the current torch DataLoader worker, (0, 1) outside one.

    Worker w produces the global batches b with b % workers == w; DataLoader's in-order
    round-robin then returns them in the same order as a single process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
    """Wrap numpy arrays as a TorchRec Batch (shares memory where the dtypes already match).

    dense: [B_local, 13] float32; sparse: [B_local, F] integer row ids (a feature-major array's
    transpose avoids a copy); labels: [B_local] float32. The KJT has keys cat_0..cat_25, one id
    per sample and feature (int32 lengths of 1) and int64 values, ordered feature-major.
    """
    # torchrec costs seconds to import; keep `import ttdist.data` light by importing it here.
    from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = len(labels)
    bad = first_bad_label(labels)
    if bad is not None:  # the readers name the file and row first; this guards every dataset
        raise ValueError(f"label of sample {bad} is {labels[bad].item()}; labels must be 0 or 1")
    if dense.shape != (n, NUM_DENSE_FEATURES) or sparse.shape != (n, NUM_SPARSE_FEATURES):
        raise ValueError(
            f"expected dense [{n}, {NUM_DENSE_FEATURES}] and sparse [{n}, {NUM_SPARSE_FEATURES}], "
            f"got {dense.shape} and {sparse.shape}"
        )
    values = np.ascontiguousarray(sparse.T, dtype=np.int64).reshape(-1)
    kjt = KeyedJaggedTensor(
        keys=DEFAULT_CAT_NAMES,
        values=torch.from_numpy(values),
        lengths=torch.ones(NUM_SPARSE_FEATURES * n, dtype=torch.int32),
        stride=n,
        length_per_key=[n] * NUM_SPARSE_FEATURES,
        offset_per_key=[n * f for f in range(NUM_SPARSE_FEATURES + 1)],
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
    )
