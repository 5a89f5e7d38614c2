"""DLRM-style random data for throughput runs: uniform row ids, uniform dense, coin-flip labels."""

from __future__ import annotations

import numpy as np

from ttdist.data.config import (
    NUM_DENSE_FEATURES,
    NUM_SPARSE_FEATURES,
    DataConfig,
    cap_ids,
    scaled_cardinalities,
)
from ttdist.data.generated import GeneratedDataset, below, derive_key, salts, sample_hashes, to_unit

_RANDOM_TAG = 0x4A11D0  # keeps these streams apart from the synthetic ones
_SPARSE = slice(0, NUM_SPARSE_FEATURES)
_DENSE = slice(NUM_SPARSE_FEATURES, NUM_SPARSE_FEATURES + NUM_DENSE_FEATURES)
_LABEL = NUM_SPARSE_FEATURES + NUM_DENSE_FEATURES


class RandomCriteo(GeneratedDataset):
    """Random batches: dense [B_local, 13] float32 in (0, 1), row ids uniform in [0, N_f) of the
    scaled cardinalities (then modulo cfg.max_rows, `cap_ids`), labels [B_local] 0/1 with
    probability 1/2 (nothing to learn).

    Same interface and determinism as SyntheticCriteo (seed, split, rank slices, start_batch).
    """

    def __init__(
        self, cfg: DataConfig, split: str, rank: int, world_size: int, start_batch: int = 0
    ) -> None:
        super().__init__(
            cfg, split, rank, world_size, start_batch,
            streams={"train": 0, "eval": 1},
        )  # fmt: skip
        self._rows = np.array(scaled_cardinalities(cfg), dtype=np.int64)[:, None]
        self._slot_salts = salts(derive_key(cfg.seed, _RANDOM_TAG), _LABEL + 1)

    def _generate(
        self, stream: int, sample_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = sample_hashes(
            derive_key(self.cfg.seed, _RANDOM_TAG, stream), sample_ids, self._slot_salts
        )
        sparse = cap_ids(below(h[_SPARSE], self._rows), self.cfg)
        dense = to_unit(h[_DENSE]).astype(np.float32)
        labels = (h[_LABEL] >> np.uint64(63)).astype(np.float32)
        return dense.T, sparse.T, labels
