"""Counter-based randomness and the base class of the datasets generated on the fly.

Every random number of a sample is a hash (splitmix64, vectorised over numpy uint64) of
(seed, stream, global sample id, slot), so any rank can produce exactly its own samples of a
global batch, and sample n of a stream is the same whatever the batch size or world size.
Global sample id of position p in global batch b: b * B + p.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import IterableDataset

from ttdist.data.batching import check_split, local_batch_size, make_batch, worker_shard
from ttdist.data.config import DataConfig

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise over a uint64 array (a bijection); returns a new array."""
    z = x >> _U30
    z ^= x
    z *= _M1
    z ^= z >> _U27
    z *= _M2
    z ^= z >> _U31
    return z


def derive_key(*words: int) -> np.uint64:
    """One 64-bit key from a tuple of non-negative ints < 2**64 (e.g. seed, stream id)."""
    key = np.zeros(1, dtype=np.uint64)
    for w in words:
        key = mix64((key ^ np.uint64(w)) + _GAMMA)
    return key[0]


def salts(key: np.uint64, count: int) -> np.ndarray:
    """count independent 64-bit salts derived from key: uint64 [count]."""
    return mix64(np.arange(1, count + 1, dtype=np.uint64) * _GAMMA + key)


def sample_hashes(key: np.uint64, sample_ids: np.ndarray, slot_salts: np.ndarray) -> np.ndarray:
    """Hash of (key, sample id, slot) for every slot and sample: uint64 [len(slot_salts), n]."""
    base = mix64(sample_ids.astype(np.uint64) * _GAMMA + key)
    return mix64(slot_salts[:, None] ^ base[None, :])


def to_unit(h: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to float64 uniforms in the open interval (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def below(h: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to ints uniform in [0, n) (n < 2**32, broadcast): int64."""
    return (((h >> np.uint64(32)) * n.astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


class GeneratedDataset(IterableDataset):
    """Base of datasets generated from (seed, stream, sample id): this rank's slice of batch b.

    Subclasses implement `_generate(stream, sample_ids)` returning numpy (dense [n, 13] float32,
    sparse [n, F] int64, labels [n] float32) for global sample ids [n]. The train split is
    infinite; the eval split is the first cfg.eval_batches global batches of another stream.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        rank: int,
        world_size: int,
        start_batch: int = 0,
        *,
        streams: dict[str, int],
    ) -> None:
        check_split(split)
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.cfg = cfg
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.local_batch_size = local_batch_size(cfg.batch_size, rank, world_size)
        self.num_batches: int | None = cfg.eval_batches if split == "eval" else None
        """Global batches in this split; None = endless."""
        self._stream = streams[split]

    def _generate(
        self, stream: int, sample_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def local_sample_ids(self, global_batch_idx: int) -> np.ndarray:
        """Global sample ids of this rank's slice of a global batch: int64 [B_local]."""
        if global_batch_idx < 0 or (
            self.num_batches is not None and global_batch_idx >= self.num_batches
        ):
            raise IndexError(f"batch {global_batch_idx} outside the {self.split} split")
        first = global_batch_idx * self.cfg.batch_size + self.rank * self.local_batch_size
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def batch(self, global_batch_idx: int) -> Batch:
        """This rank's slice (B_local samples) of global batch `global_batch_idx`."""
        return make_batch(*self._generate(self._stream, self.local_sample_ids(global_batch_idx)))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_shard()
        first = self.start_batch + worker
        if self.num_batches is None:
            indices: Iterable[int] = itertools.count(first, workers)
        else:
            indices = range(first, self.num_batches, workers)
        return map(self.batch, indices)

    def __len__(self) -> int:
        """Batches this rank yields (eval only; the train split is endless)."""
        if self.num_batches is None:
            raise TypeError("the train split is endless")
        return max(0, self.num_batches - self.start_batch)
