"""TorchRec's preprocessed binary Criteo (npy) files, read by TorchRec's own datapipe.

Layout (torchrec/datasets/scripts/npy_preproc_criteo.py): for every stem X, X_dense.npy float32
[N, 13] (already log-transformed), X_sparse.npy int [N, 26] (raw or contiguous ids), X_labels.npy
int32 [N, 1]. cfg.train_path / cfg.eval_path list stems separated by commas, e.g.
"/data/criteo_1tb/day_0,/data/criteo_1tb/day_1" or "/data/kaggle_npy/train"; the files of a
split are read as one sequence of rows. Needs iopath (TorchRec's file access layer).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
from torchrec.datasets.utils import Batch

from ttdist.data.batching import (
    check_split,
    first_bad_label,
    local_batch_size,
    make_batch,
    split_paths,
)
from ttdist.data.config import NUM_SPARSE_FEATURES, DataConfig, scaled_cardinalities


class CriteoNpyDataset(IterableDataset):
    """This rank's slices of global batches of cfg.batch_size rows of TorchRec npy files.

    Global batch b is rows [b * B, (b + 1) * B); the last incomplete one is dropped; ids are
    taken modulo scaled_cardinalities(cfg); the eval split stops after cfg.eval_batches batches.
    Files are memory-mapped, so a rank reads only the rows it yields (and, when resuming, the
    rows of its slices of the skipped batches). Not sharded over DataLoader workers.
    """

    def __init__(
        self, cfg: DataConfig, split: str, rank: int, world_size: int, start_batch: int = 0
    ) -> None:
        check_split(split)
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        stems = split_paths(cfg, split)
        self.split = split
        self.batch_size = cfg.batch_size
        self.local_batch_size = local_batch_size(cfg.batch_size, rank, world_size)
        self.rank = rank
        self.labels_paths = [f"{s}_labels.npy" for s in stems]
        self._file_rows: list[int] | None = None  # rows per labels file, read when a label is bad
        self.start_batch = start_batch
        self.stop_batch = cfg.eval_batches if split == "eval" else None
        # TorchRec's datapipe hands rank r the local batches r, r + W, r + 2W, ... of B_local
        # rows each: local batch b * W + r is exactly rows [b*B + r*B_local, b*B + (r+1)*B_local),
        # this rank's slice of global batch b. The whole files serve the split (its "train"
        # stage; "val"/"test" would halve the first file).
        state = np.random.get_state()  # the datapipe reseeds numpy's global RNG; undo that
        try:
            self._pipe = InMemoryBinaryCriteoIterDataPipe(
                stage="train",
                dense_paths=[f"{s}_dense.npy" for s in stems],
                sparse_paths=[f"{s}_sparse.npy" for s in stems],
                labels_paths=self.labels_paths,
                batch_size=local_batch_size(cfg.batch_size, rank, world_size),
                rank=rank,
                world_size=world_size,
                drop_last=True,
                mmap_mode=True,
                hashes=scaled_cardinalities(cfg),
            )
        finally:
            np.random.set_state(state)

    def __iter__(self) -> Iterator[Batch]:
        batches = itertools.islice(self._pipe_batches(), self.start_batch, self.stop_batch)
        for b, batch in enumerate(batches, self.start_batch):
            n = len(batch.labels)
            sparse = batch.sparse_features.values().view(NUM_SPARSE_FEATURES, n).T
            # dense still points into the read-only memory map: copy it (labels are cast anyway)
            dense = batch.dense_features.numpy().copy()
            labels = batch.labels.numpy()
            bad = first_bad_label(labels)
            if bad is not None:
                raise ValueError(self._bad_label(b, bad, labels[bad].item()))
            yield make_batch(dense, sparse.numpy(), labels)

    def _bad_label(self, batch: int, sample: int, value) -> str:
        """Message naming the labels file and row of this rank's local sample of global batch."""
        row = batch * self.batch_size + self.rank * self.local_batch_size + sample  # of the split
        where = f"row {row} of the {self.split} split ({', '.join(self.labels_paths)})"
        try:
            if self._file_rows is None:
                self._file_rows = [np.load(p, mmap_mode="r").shape[0] for p in self.labels_paths]
            for path, rows in zip(self.labels_paths, self._file_rows):
                if row < rows:
                    where = f"{path}: row {row}"
                    break
                row -= rows
        except (OSError, ValueError):  # not a local file (iopath): name the split's row instead
            pass
        return (f"{where} has label {value}; labels must be 0 or 1 (criteo_npy {self.split} split, global batch "
                f"{batch}, rank {self.rank}'s sample {sample})")

    def _pipe_batches(self) -> Iterator[Batch]:
        batches = iter(self._pipe)
        while True:
            with warnings.catch_warnings():
                # the datapipe wraps read-only memory-mapped rows as tensors; __iter__ copies them
                warnings.filterwarnings(
                    "ignore", "The given NumPy array is not writable", UserWarning
                )
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def __len__(self) -> int:
        """Batches this rank yields."""
        total = len(self._pipe)
        stop = total if self.stop_batch is None else min(total, self.stop_batch)
        return max(0, stop - self.start_batch)
