"""Raw Criteo TSV files (Kaggle train.txt, 1TB day_N): a strict reader and a streaming dataset.

One sample per line, 40 tab-separated fields, '\\n' or '\\r\\n' line ends, empty = missing:
  label    "0" or "1"
  I1..I13  base-10 integers (may be negative, at most 18 digits) -> log(1 + max(x, 0)), float32
  C1..C26  hex hashes (1..16 hex digits)                         -> int(h, 16) % rows_f, int64
Missing I/C fields become 0. Anything else raises ValueError naming the file, the 1-based line
number and the offending field. Files ending in .gz are read through gzip (a corrupt or
truncated one raises ValueError naming the file).
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING

import numpy as np
from torch.utils.data import IterableDataset

from ttdist.data.batching import (
    check_split,
    local_batch_size,
    make_batch,
    split_paths,
    worker_shard,
)
from ttdist.data.config import (
    NUM_DENSE_FEATURES,
    NUM_SPARSE_FEATURES,
    DataConfig,
    cap_ids,
    scaled_cardinalities,
)

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

_LABEL = rb"[01]"
_INT = rb"-?[0-9]{1,18}|"
_HEX = rb"[0-9a-fA-F]{1,16}|"
_LINE = re.compile(
    rb"(" + _LABEL + rb")"
    + (rb"\t(" + _INT + rb")") * NUM_DENSE_FEATURES
    + (rb"\t(" + _HEX + rb")") * NUM_SPARSE_FEATURES
)  # fmt: skip
_FIELDS = [
    ("label", re.compile(_LABEL), "label must be 0 or 1"),
    *(
        (f"I{j}", re.compile(_INT), "not a base-10 integer")
        for j in range(1, NUM_DENSE_FEATURES + 1)
    ),
    *((f"C{j}", re.compile(_HEX), "not a hex hash") for j in range(1, NUM_SPARSE_FEATURES + 1)),
]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
Record = tuple[str, int, bytes]  # (file path, 1-based line number, raw line)


def read_tsv(path: str | os.PathLike[str], num_embeddings: int | Sequence[int]) -> Arrays:
    """Read a whole Criteo TSV file (N lines): dense float32 [N, 13], sparse int64 [N, 26]
    (hash % rows of its feature; num_embeddings: one row count for all or 26 of them),
    labels float32 [N]. ValueError on the first malformed line."""
    if isinstance(num_embeddings, int):
        num_embeddings = [num_embeddings] * NUM_SPARSE_FEATURES
    rows = _rows_array(num_embeddings)
    return parse_records(numbered_lines([os.fspath(path)]), rows)


def numbered_lines(paths: Iterable[str]) -> Iterator[Record]:
    """Every line of the files in order, with its file and 1-based line number. A corrupt or
    truncated .gz file raises ValueError naming the file and the last line read."""
    for path in paths:
        with _open(path) as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    yield path, lineno, line
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise ValueError(f"{path}: corrupt or truncated gzip data after line {lineno}: {e}") from None


def parse_records(records: Iterable[Record], rows: np.ndarray) -> Arrays:
    """Parse lines into dense float32 [n, 13], sparse int64 [n, 26] (hash % rows, rows uint64
    [26]) and labels float32 [n]."""
    labels: list[bool] = []
    ints: list[bytes] = []
    hashes: list[bytes] = []
    for path, lineno, raw in records:
        line = _strip_line_end(raw)
        match = _LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{path}:{lineno}: {_diagnose(line)}")
        fields = match.groups()
        labels.append(fields[0] == b"1")
        ints += fields[1 : 1 + NUM_DENSE_FEATURES]
        hashes += fields[1 + NUM_DENSE_FEATURES :]
    counts = np.array([int(x) if x else 0 for x in ints], dtype=np.int64)
    dense = np.log1p(np.maximum(counts, 0).astype(np.float64)).astype(np.float32)
    ids = np.array([int(x, 16) if x else 0 for x in hashes], dtype=np.uint64)
    sparse = (ids.reshape(-1, NUM_SPARSE_FEATURES) % rows).astype(np.int64)
    return dense.reshape(-1, NUM_DENSE_FEATURES), sparse, np.array(labels, dtype=np.float32)


class CriteoTsvDataset(IterableDataset):
    """Streams Criteo TSV files (cfg.train_path / cfg.eval_path: comma-separated, read in order
    as one sequence of lines) as this rank's slices of global batches of cfg.batch_size lines.

    Global batch b is lines [b * B, (b + 1) * B) of that sequence; this rank parses only its
    B_local lines and skips the rest unparsed. The last incomplete global batch is dropped; the
    eval split stops after cfg.eval_batches batches. Ids are hash % scaled_cardinalities(cfg),
    then modulo cfg.max_rows (`cap_ids`).
    """

    def __init__(
        self, cfg: DataConfig, split: str, rank: int, world_size: int, start_batch: int = 0
    ) -> None:
        check_split(split)
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.paths = split_paths(cfg, split)
        self.batch_size = cfg.batch_size
        self.local_batch_size = local_batch_size(cfg.batch_size, rank, world_size)
        self.rank = rank
        self.start_batch = start_batch
        self.stop_batch = cfg.eval_batches if split == "eval" else None
        self.rows = _rows_array(scaled_cardinalities(cfg))
        self.cfg = cfg

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_shard()
        lines = numbered_lines(self.paths)
        before = self.rank * self.local_batch_size
        after = self.batch_size - before - self.local_batch_size
        _skip(lines, self.start_batch * self.batch_size)
        for b in itertools.count(self.start_batch):
            if self.stop_batch is not None and b >= self.stop_batch:
                return
            if (b - self.start_batch) % workers != worker:
                if _skip(lines, self.batch_size) < self.batch_size:
                    return
                continue
            skipped = _skip(lines, before)
            mine = list(itertools.islice(lines, self.local_batch_size))
            if skipped + len(mine) + _skip(lines, after) < self.batch_size:
                return
            dense, sparse, labels = parse_records(mine, self.rows)
            yield make_batch(dense, cap_ids(sparse, self.cfg), labels)

    def __len__(self) -> int:
        """Batches this rank yields (like the npy dataset's); reads every file (lines are counted,
        not parsed)."""
        total = _skip(numbered_lines(self.paths), -1) // self.batch_size
        stop = total if self.stop_batch is None else min(total, self.stop_batch)
        return max(0, stop - self.start_batch)


def _open(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _skip(lines: Iterator[Record], n: int) -> int:
    """Advance past up to n lines (n < 0: all); returns how many there were."""
    return sum(1 for _ in (lines if n < 0 else itertools.islice(lines, n)))


def _strip_line_end(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _diagnose(line: bytes) -> str:
    fields = line.split(b"\t")
    if len(fields) != len(_FIELDS):
        return f"expected {len(_FIELDS)} tab-separated fields, got {len(fields)}"
    for column, (value, (name, pattern, problem)) in enumerate(zip(fields, _FIELDS), 1):
        if pattern.fullmatch(value) is None:
            text = value.decode("ascii", "backslashreplace")
            return f"field {name} (column {column}): {problem}: {text!r}"
    raise AssertionError(f"line rejected but no field is invalid: {line!r}")


def _rows_array(num_embeddings: Sequence[int]) -> np.ndarray:
    rows = list(num_embeddings)
    if len(rows) != NUM_SPARSE_FEATURES or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in rows
    ):
        raise ValueError(
            f"num_embeddings must be an int >= 1 or {NUM_SPARSE_FEATURES} of them, got {rows}"
        )
    return np.array(rows, dtype=np.uint64)
