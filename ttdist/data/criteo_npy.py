"""TorchRec's preprocessed binary Criteo (npy) files, read by TorchRec's own datapipe.

Layout (torchrec/datasets/scripts/npy_preproc_criteo.py): for every stem X, X_dense.npy float32
[N, 13] (already log-transformed), X_sparse.npy int [N, 26] (raw or contiguous ids), X_labels.npy
int32 [N, 1]. cfg.train_path / cfg.eval_path list stems separated by commas, e.g.
"/data/criteo_1tb/day_0,/data/criteo_1tb/day_1" or "/data/kaggle_npy/train"; the files of a
split are read as one sequence of rows. Needs iopath (TorchRec's file access layer).

Accepted: dense of any floating dtype (read as float32), sparse of any integer dtype, labels of
bool / integer / floating dtype holding 0 or 1; native byte order, C or Fortran order, npy format
1.0-3.0. Every file's header is checked when the dataset is built (DataError naming the file:
not an .npy file, an object dtype -- never unpickled --, another dtype or shape, fewer data bytes
than the header promises, files of a stem disagreeing on the row count); a label outside {0, 1}
or a dense value that is not finite as float32 raises when its batch is read, naming file and row.
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
    DataError,
    check_split,
    first_bad_label,
    local_batch_size,
    make_batch,
    split_paths,
)
from ttdist.data.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, DataConfig, cap_ids, scaled_cardinalities

PARTS = ("dense", "sparse", "labels")
_COLUMNS = {"dense": NUM_DENSE_FEATURES, "sparse": NUM_SPARSE_FEATURES, "labels": 1}
_KINDS = {"dense": ("f", "floating point"), "sparse": ("iu", "integer"), "labels": ("biuf", "bool, integer or float")}


def npy_header(path: str, part: str) -> tuple[int, np.dtype]:
    """(rows, dtype) of ``path``, a ``<stem>_<part>.npy`` file, from its header; DataError naming the file
    unless it is an .npy file of the documented dtype and shape holding all the bytes its header
    promises. Reads the header only (numpy's own parser); an object dtype is refused there, so
    nothing is ever unpickled."""
    try:
        # open_memmap parses the header (magic, version, a literal dict) and refuses object
        # dtypes; np.memmap then refuses a file shorter than the header's shape needs
        arr = np.lib.format.open_memmap(path, mode="r")
    except Exception as e:  # noqa: BLE001 - a damaged header escapes numpy's parser as ValueError,
        # EOFError, SyntaxError or tokenize.TokenError; whatever it is, name the file
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    dtype, shape = arr.dtype, arr.shape
    del arr
    kinds, what = _KINDS[part]
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
        raise DataError(f"{path}: {part} must be {what}, got dtype {dtype}")
    if not dtype.isnative:
        raise DataError(f"{path}: dtype {dtype.str} is not in this machine's byte order; convert it "
                        f"(arr.astype(arr.dtype.newbyteorder('=')))")
    if len(shape) != 2 or shape[1] != _COLUMNS[part]:
        raise DataError(f"{path}: {part} must have shape [N, {_COLUMNS[part]}], got {list(shape)}")
    return shape[0], dtype


def check_stems(stems: list[str], split: str) -> tuple[list[int], np.dtype]:
    """Rows of every stem (its three files agree) and the ids' common integer dtype."""
    rows, sparse_dtypes = [], []
    for stem in stems:
        headers = {f"{stem}_{part}.npy": npy_header(f"{stem}_{part}.npy", part) for part in PARTS}
        counts = {path: n for path, (n, _) in headers.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"criteo_npy {split} split: the files of {stem} disagree on the number of rows: "
                            + ", ".join(f"{p} has {n}" for p, n in counts.items()))
        rows.append(next(iter(counts.values())))
        sparse_dtypes.append(headers[f"{stem}_sparse.npy"][1])
    common = np.result_type(*sparse_dtypes)
    if common.kind not in "iu":  # e.g. uint64 beside signed ids: numpy would mix them as float64
        raise DataError(f"criteo_npy {split} split: the sparse files have no common integer dtype ("
                        + ", ".join(f"{s}_sparse.npy is {d}" for s, d in zip(stems, sparse_dtypes)) + ")")
    return rows, common


class CriteoNpyDataset(IterableDataset):
    """This rank's slices of global batches of cfg.batch_size rows of TorchRec npy files.

    Global batch b is rows [b * B, (b + 1) * B); the last incomplete one is dropped; ids are
    taken modulo scaled_cardinalities(cfg) (Python's modulo: a negative id too lands in
    [0, rows)), then modulo cfg.max_rows (`cap_ids`); the eval split stops after
    cfg.eval_batches batches. Files are memory-mapped, so a rank reads only the rows it yields
    (and, when resuming, the rows of its slices of the skipped batches). Not sharded over
    DataLoader workers.
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
        self.cfg = cfg
        rows, ids_dtype = check_stems(stems, split)
        stems = [s for s, n in zip(stems, rows) if n]  # (TorchRec's datapipe needs a first row)
        self._file_rows = [n for n in rows if n]
        self.dense_paths = [f"{s}_dense.npy" for s in stems]
        self.labels_paths = [f"{s}_labels.npy" for s in stems]
        self._cards = np.array(scaled_cardinalities(cfg), dtype=np.uint64 if ids_dtype.kind == "u" else np.int64)
        self._cards = self._cards[:, None]  # feature-major ids [26, B_local]
        self.start_batch = start_batch
        self.stop_batch = cfg.eval_batches if split == "eval" else None
        self._pipe = None
        if not stems:
            return
        # TorchRec's datapipe hands rank r the local batches r, r + W, r + 2W, ... of B_local
        # rows each: local batch b * W + r is exactly rows [b*B + r*B_local, b*B + (r+1)*B_local),
        # this rank's slice of global batch b. The whole files serve the split (its "train"
        # stage; "val"/"test" would halve the first file). Ids are hashed here (__iter__), not by
        # the datapipe: its modulo by int64 turns uint64 ids into float64.
        state = np.random.get_state()  # the datapipe reseeds numpy's global RNG; undo that
        try:
            self._pipe = InMemoryBinaryCriteoIterDataPipe(
                stage="train",
                dense_paths=self.dense_paths,
                sparse_paths=[f"{s}_sparse.npy" for s in stems],
                labels_paths=self.labels_paths,
                batch_size=self.local_batch_size,
                rank=rank,
                world_size=world_size,
                drop_last=True,
                mmap_mode=True,
                hashes=None,
            )
        finally:
            np.random.set_state(state)

    def __iter__(self) -> Iterator[Batch]:
        batches = itertools.islice(self._pipe_batches(), self.start_batch, self.stop_batch)
        for b, batch in enumerate(batches, self.start_batch):
            n = len(batch.labels)
            raw = batch.sparse_features.values().view(NUM_SPARSE_FEATURES, n).numpy()
            # np.remainder: the sign of the divisor, exact in the ids' own integer dtype
            ids = np.remainder(raw, self._cards, dtype=self._cards.dtype).astype(np.int64, copy=False)
            ids = cap_ids(ids, self.cfg)
            # dense still points into the read-only memory map: copy it (labels are cast anyway)
            with np.errstate(over="ignore"):  # a float64 beyond float32's range: inf, reported below
                dense = np.array(batch.dense_features.numpy(), dtype=np.float32)
            labels = batch.labels.numpy()
            bad = first_bad_label(labels)
            if bad is not None:
                raise ValueError(self._bad_value(b, bad, f"has label {labels[bad].item()}; labels must be 0 or 1",
                                                 self.labels_paths))
            finite = np.isfinite(dense).all(axis=1)
            if not finite.all():
                bad = int(np.argmin(finite))
                raise ValueError(self._bad_value(b, bad, f"has a dense value that is not finite as float32 "
                                                 f"({dense[bad][~np.isfinite(dense[bad])][0]})", self.dense_paths))
            yield make_batch(dense, ids.T, labels)

    def _bad_value(self, batch: int, sample: int, what: str, paths: list[str]) -> str:
        """Message naming the file and row of this rank's local sample of global batch."""
        row = batch * self.batch_size + self.rank * self.local_batch_size + sample  # of the split
        where = f"row {row} of the {self.split} split ({', '.join(paths)})"
        for path, rows in zip(paths, self._file_rows):
            if row < rows:
                where = f"{path}: row {row}"
                break
            row -= rows
        return (f"{where} {what} (criteo_npy {self.split} split, global batch {batch}, rank {self.rank}'s "
                f"sample {sample})")

    def _pipe_batches(self) -> Iterator[Batch]:
        if self._pipe is None:
            return
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
        total = 0 if self._pipe is None else len(self._pipe)
        stop = total if self.stop_batch is None else min(total, self.stop_batch)
        return max(0, stop - self.start_batch)
