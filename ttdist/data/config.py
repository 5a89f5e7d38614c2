"""Configuration of the data pipeline (plain dataclass, no torch/torchrec import)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Criteo layout: 13 integer ("dense") and 26 categorical ("sparse") features. These equal
# torchrec.datasets.criteo.INT_FEATURE_COUNT / CAT_FEATURE_COUNT (a test checks it); they are
# repeated here so that importing the config does not import torchrec.
NUM_DENSE_FEATURES = 13
NUM_SPARSE_FEATURES = 26

# Rows per categorical feature of the Criteo Kaggle (Display Advertising Challenge) data set.
CRITEO_KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

DATASET_NAMES = ("synthetic", "random", "criteo_tsv", "criteo_npy")
MAX_ROWS = 2**31 - 1  # rows of one table (int32-indexable; keeps the generators' math in int64)


@dataclass
class DataConfig:
    """What data to feed the model and how to batch it (see the field comments)."""

    name: str = "synthetic"
    """Which dataset: "synthetic", "random", "criteo_tsv" or "criteo_npy"."""
    batch_size: int = 2048
    """Global batch size B, summed over all ranks; each rank gets B // world_size samples."""
    num_embeddings_per_feature: list[int] = field(
        default_factory=lambda: list(CRITEO_KAGGLE_CARDINALITIES)
    )
    """Rows of each of the 26 categorical features before scaling (default: Criteo Kaggle)."""
    cardinality_scale: float = 1.0
    """Factor applied to every cardinality (rounded, at least 2 rows) to shrink the tables."""
    max_rows: int = 0
    """Cap on the rows of every table: each id is taken modulo it (`cap_ids`, DLRM's
    --max-ind-range), so it indexes a table of min(rows, max_rows) rows; 0 = no cap. The training
    config sets model.max_rows, which Config copies here (the datasets see only DataConfig)."""
    seed: int = 0
    """Seed of the synthetic/random generators (file datasets ignore it)."""
    zipf_alpha: float = 1.05
    """Exponent of the synthetic data's power-law index popularity (0 = uniform)."""
    train_path: str | None = None
    """criteo_tsv: comma-separated .txt/.tsv(.gz) files; criteo_npy: comma-separated stems
    X meaning X_dense.npy, X_sparse.npy, X_labels.npy (TorchRec's layout)."""
    eval_path: str | None = None
    """Like train_path, for the eval split."""
    eval_batches: int = 20
    """Global batches in the eval split (synthetic/random: exactly; file datasets: at most)."""
    epochs: int = 1
    """File datasets: passes over the train files (DLRM's --nepochs); 0 = as many as train.steps
    needs. A run whose train.steps needs more stops with an error after checkpointing. The
    synthetic/random train streams are endless and ignore it."""

    def __post_init__(self) -> None:
        self.num_embeddings_per_feature = list(self.num_embeddings_per_feature)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.name not in DATASET_NAMES:
            raise ValueError(f"name must be one of {DATASET_NAMES}, got {self.name!r}")
        _check_int("batch_size", self.batch_size, minimum=1)
        cards = self.num_embeddings_per_feature
        if len(cards) != NUM_SPARSE_FEATURES:
            raise ValueError(
                f"num_embeddings_per_feature must have {NUM_SPARSE_FEATURES} entries, "
                f"got {len(cards)}"
            )
        for i, n in enumerate(cards):
            _check_int(f"num_embeddings_per_feature[{i}]", n, minimum=1)
        if not (_is_real(self.cardinality_scale) and 0 < self.cardinality_scale < math.inf):
            raise ValueError(
                f"cardinality_scale must be a finite number > 0, got {self.cardinality_scale!r}"
            )
        if max(cards) * self.cardinality_scale > MAX_ROWS:  # before rounding: inf/huge cannot round
            raise ValueError(
                f"cardinality_scale {self.cardinality_scale} gives a table of "
                f"{max(cards) * self.cardinality_scale:.3g} rows; at most {MAX_ROWS} are supported"
            )
        largest = max(scaled_cardinalities(self))
        if largest > MAX_ROWS:
            raise ValueError(
                f"cardinality_scale {self.cardinality_scale} gives a table of {largest} rows; "
                f"at most {MAX_ROWS} are supported"
            )
        _check_int("max_rows", self.max_rows, minimum=0, maximum=2**63 - 1)
        _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if not (_is_real(self.zipf_alpha) and 0 <= self.zipf_alpha < math.inf):
            raise ValueError(f"zipf_alpha must be a finite number >= 0, got {self.zipf_alpha!r}")
        for name in ("train_path", "eval_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
        _check_int("eval_batches", self.eval_batches, minimum=1)
        _check_int("epochs", self.epochs, minimum=0, maximum=2**63 - 1)


def scaled_cardinalities(cfg: DataConfig) -> list[int]:
    """Rows per feature actually used: round(n * cfg.cardinality_scale), at least 2; length 26."""
    return [max(2, round(n * cfg.cardinality_scale)) for n in cfg.num_embeddings_per_feature]


def cap_ids(ids: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Integer row ids (>= 0, any shape) as the model's tables take them: ids % cfg.max_rows, as
    DLRM's --max-ind-range; the ids themselves when cfg.max_rows is 0. Every dataset passes its
    ids through here, so all datasets and ranks map an id to the same row."""
    return ids % cfg.max_rows if cfg.max_rows else ids


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
