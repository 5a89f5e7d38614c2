"""What the training loop needs of the data beyond one dataset: the files checked at start-up,
the train stream over ``data.epochs`` passes, and a clear error when it runs out.

``check_files(cfg)`` (every rank, before the model is built): each file of a file dataset's train
and eval split exists, and each split holds at least one global batch; DataError naming the key
and the file otherwise. ``train_stream(cfg, rank, world_size, start_batch)``: the train split's
batches from global batch ``start_batch`` of the concatenated passes (a checkpoint's step), over
``data.epochs`` passes of the files (0 = endless); after the last one, EndOfData naming the files,
the batches per pass and the passes. The synthetic/random train splits are endless already.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ttdist.data.batching import DataError, split_paths
from ttdist.data.config import DataConfig

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

FILE_DATASETS = ("criteo_tsv", "criteo_npy")


class EndOfData(DataError):
    """The train split has no more batches (after data.epochs passes); the training loop adds
    the step and the checkpoint it saved (``at_step``)."""

    def __init__(self, message: str, batches_per_pass: int = 0) -> None:
        super().__init__(message)
        self.batches_per_pass = batches_per_pass

    def at_step(self, step: int, steps: int, trained: int, checkpoint: str | None) -> EndOfData:
        """The error as the run reports it: 1-based ``step`` could not start; ``trained`` steps are
        in ``checkpoint`` (None: saved earlier, or nothing trained)."""
        if checkpoint:
            kept = f"saved the {trained} steps trained in {checkpoint}"
        elif trained:
            kept = f"the {trained} steps trained are in the run's checkpoint of step {trained}"
        else:
            kept = "nothing was trained"
        fix = "lower train.steps"
        if self.batches_per_pass:
            needed = -(-steps // self.batches_per_pass)
            fix = (f"to train all {steps} steps set data.epochs = {needed} (or 0: as many passes as train.steps "
                   f"needs) and run again with checkpoint.resume = true (the default) to continue from the checkpoint, "
                   f"or {fix}")
        return EndOfData(f"step {step} of train.steps = {steps}: {self}; {kept}; {fix}", self.batches_per_pass)


def _describe(cfg: DataConfig) -> str:
    return f"the train data (data.train_path: {', '.join(split_paths(cfg, 'train'))})"


def train_stream(
    cfg: DataConfig, rank: int, world_size: int, start_batch: int = 0
) -> Iterator[Batch]:
    """This rank's slices of the train split's global batches start_batch, start_batch + 1, ...
    over cfg.epochs passes of the files (file datasets); EndOfData after the last one."""
    from ttdist.data import make_dataset

    def make(start: int):
        return make_dataset(cfg, "train", rank, world_size, start_batch=start)

    if cfg.name not in FILE_DATASETS:
        yield from make(start_batch)
        return
    epochs = cfg.epochs
    epoch, offset = 0, start_batch
    if start_batch and epochs != 1:  # the position may lie in a later pass: needs the pass length
        per_pass = len(make(0))
        if per_pass == 0:
            raise EndOfData(f"{_describe(cfg)} holds no complete global batch (data.batch_size = "
                            f"{cfg.batch_size})")
        epoch, offset = divmod(start_batch, per_pass)
    per_pass = None
    while epochs == 0 or epoch < epochs:
        n = 0
        for batch in make(offset):
            n += 1
            yield batch
        if n == 0 and offset == 0:
            raise EndOfData(f"{_describe(cfg)} holds no complete global batch (data.batch_size = "
                            f"{cfg.batch_size})")
        if n or offset == 0:
            per_pass = offset + n
        epoch, offset = epoch + 1, 0
    if per_pass is None:  # resumed beyond the end of the only pass
        per_pass = len(make(0))
    raise EndOfData(f"{_describe(cfg)} ran out after {per_pass * epochs} global batches: {per_pass} per pass x "
                    f"{epochs} pass(es) (data.epochs = {epochs})", per_pass)


def check_files(cfg: DataConfig) -> None:
    """DataError (naming data.train_path / data.eval_path and the file) unless every file of a
    file dataset's splits exists and each split holds at least one global batch."""
    if cfg.name not in FILE_DATASETS:
        return
    for split in ("train", "eval"):
        key = f"data.{split}_path"
        try:
            paths = split_paths(cfg, split)
        except ValueError as e:
            raise DataError(f"data.{e}") from None
        files = ([f"{p}_{part}.npy" for p in paths for part in ("dense", "sparse", "labels")]
                 if cfg.name == "criteo_npy" else paths)
        for f in files:
            if "://" in f:  # not a local file (iopath): the dataset reports it
                continue
            if not os.path.exists(f):
                raise DataError(f"{key}: {f} does not exist")
            if not os.path.isfile(f):
                raise DataError(f"{key}: {f} is not a file")
        samples = _count_samples(cfg, paths, key)
        if samples is not None and samples < cfg.batch_size:
            use = "training" if split == "train" else "evaluation"
            raise DataError(f"{key}: the {split} split ({', '.join(paths)}) holds {samples} samples, fewer than one "
                            f"global batch (data.batch_size = {cfg.batch_size}); {use} needs at least one")


def _count_samples(cfg: DataConfig, paths: list[str], key: str) -> int | None:
    """Samples in a split, counted up to one global batch (TSV: lines; npy: rows of the files,
    whose dense/sparse/labels row counts must agree); None when a file is not local."""
    if cfg.name == "criteo_tsv":
        from ttdist.data.criteo import numbered_lines

        return sum(1 for _ in itertools.islice(numbered_lines(paths), cfg.batch_size))
    import numpy as np

    total = 0
    for stem in paths:
        if "://" in stem:
            return None
        rows = {}
        for part in ("dense", "sparse", "labels"):
            path = f"{stem}_{part}.npy"
            try:
                rows[path] = np.load(path, mmap_mode="r").shape[0]
            except (OSError, ValueError) as e:
                raise DataError(f"{key}: {path} is not a readable .npy file: {e}") from None
        if len(set(rows.values())) > 1:
            raise DataError(f"{key}: the files of {Path(stem).name} disagree on the number of rows: "
                            + ", ".join(f"{p} has {n}" for p, n in rows.items()))
        total += next(iter(rows.values()))
    return total
