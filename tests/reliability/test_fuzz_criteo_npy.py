"""Hostile criteo_npy files, fuzzed at the file level: CriteoNpyDataset (TorchRec's npy layout).

Valid files (``<stem>_dense.npy`` [N, 13] floating point, ``_sparse.npy`` [N, 26] integer ids,
``_labels.npy`` [N, 1] 0/1; one to three stems; several dtypes, C or Fortran order) are written
and then (usually) damaged at the file level: truncated at a random byte, header or data bytes
overwritten, re-saved with a wrong dtype, byte order or shape, rows dropped from one file,
non-finite dense values, extreme or negative ids, bad labels, trailing garbage, an empty file, a
file that is not .npy (text, random bytes, an .npz zip, a pickle) or an object array whose
unpickling would spring a trap. numpy's own ``np.load(path, allow_pickle=False)`` plus the
documented format decide what each set of files means (the reference). The contract: every rank
yields exactly the reference's batches (ids modulo the scaled cardinalities), or raises
ValueError naming the offending file; it never raises anything else, never hangs, never
returns silently wrong data and never unpickles.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from ttdist.data import DataConfig, make_dataset, scaled_cardinalities

pytest.importorskip("iopath", reason="TorchRec's npy datapipe opens files through iopath")
pytestmark = pytest.mark.slow

B = 4  # global batch
PARTS = ("dense", "sparse", "labels")
COLUMNS = {"dense": 13, "sparse": 26, "labels": 1}
KINDS = {"dense": "f", "sparse": "iu", "labels": "biuf"}  # the documented dtypes, by numpy kind
TRAP = "TTDIST_FUZZ_NPY_UNPICKLED"
MUTATIONS = ("truncate", "header_bytes", "data_bytes", "dtype", "shape", "rows", "nonfinite", "ids", "labels",
             "empty", "not_npy", "object", "fortran", "trailing")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spring() -> int:
    os.environ[TRAP] = "1"  # the environment: shared by every copy of this module
    return 0


class Trap:
    """Unpickling it calls _spring (a loader that unpickles would leave TRAP set)."""

    def __reduce__(self):
        return (_spring, ())


class Bad(Exception):
    """The reference's verdict: the files named cannot serve (a clear error must name one)."""

    def __init__(self, *paths: str):
        super().__init__(paths)
        self.paths = paths


def config(stems: list[str]) -> DataConfig:
    return DataConfig(name="criteo_npy", batch_size=B, train_path=",".join(stems), eval_path=",".join(stems),
                      cardinality_scale=0.001)


# ------------------------------------------------------------------------------------------ files
def valid_arrays(rng: np.random.Generator, n: int, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    dense = (rng.random((n, 13)) * 5).astype(dtypes["dense"])
    sd = np.dtype(dtypes["sparse"])
    info = np.iinfo(sd)
    sparse = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), (n, 26), endpoint=True).astype(sd)
    extreme = rng.random((n, 26)) < 0.05  # the dtype's own extremes here and there
    sparse[extreme] = rng.choice(np.array([info.min, info.max, 0], dtype=sd), int(extreme.sum()))
    labels = rng.integers(0, 2, (n, 1)).astype(dtypes["labels"])
    return {"dense": dense, "sparse": sparse, "labels": labels}


def header_end(path: str) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        return f.tell()


def mutate(kind: str, rng: np.random.Generator, stems: list[str], arrays: dict[str, dict[str, np.ndarray]]) -> None:
    stem = stems[rng.integers(len(stems))]
    part = PARTS[rng.integers(3)]
    path = f"{stem}_{part}.npy"
    data = open(path, "rb").read()
    a = arrays[stem][part]
    if kind == "truncate":
        open(path, "wb").write(data[: rng.integers(0, len(data))] if data else b"")
    elif kind in ("header_bytes", "data_bytes"):
        buf = bytearray(data)
        try:
            end = header_end(path)
        except Exception:  # noqa: BLE001 - an earlier mutation broke the header
            end = min(len(buf), 128)
        lo, hi = (0, end) if kind == "header_bytes" or end >= len(buf) else (end, len(buf))
        for _ in range(rng.integers(1, 5) if hi > lo else 0):
            pos = int(rng.integers(lo, hi))
            buf[pos] = int(rng.choice([rng.integers(256), ord("9"), ord("("), ord(","), ord("'"), ord("<"), ord(">"),
                                       ord("f"), ord("i"), ord("u"), ord("O"), ord("T"), 0, 10, 255]))
        open(path, "wb").write(bytes(buf))
    elif kind == "dtype":
        wrong = {"dense": ["<i4", "<i8", "<c8", "|b1", ">f4", ">f8", "[('a', '<f4')]"],
                 "sparse": ["<f8", "<f4", "|b1", ">i8", ">u4", "<c16", "[('a', '<i8')]"],
                 "labels": ["<c8", ">i4", ">f4", "[('a', '<i4')]", "<U1"]}[part]
        dt = np.dtype(eval(w) if (w := wrong[rng.integers(len(wrong))]).startswith("[") else w)
        if dt.fields:
            out = np.zeros(a.shape, dt)
            out["a"] = a.astype(dt["a"])
        elif dt.kind == "U":
            out = a.astype(np.int64).astype(dt)
        else:
            out = a.astype(dt)
        np.save(path, out)
    elif kind == "shape":
        n, c = a.shape
        choice = rng.integers(4)
        out = (a[:, : c - 1] if choice == 0 and c > 1 else np.concatenate([a, a[:, :1]], axis=1) if choice <= 1
               else a.reshape(-1) if choice == 2 else a.reshape(n, c, 1))
        np.save(path, out)
    elif kind == "rows":
        n = len(a)
        np.save(path, a[: rng.integers(0, n)] if n and rng.random() < 0.7 else np.concatenate([a, a[:1] if n else a]))
    elif kind == "nonfinite":
        path = f"{stem}_dense.npy"
        a = arrays[stem]["dense"].copy()
        if a.size:
            for _ in range(rng.integers(1, 3)):
                a[rng.integers(a.shape[0]), rng.integers(13)] = rng.choice([np.nan, np.inf, -np.inf])
            np.save(path, a)
    elif kind == "ids":
        path = f"{stem}_sparse.npy"
        a = arrays[stem]["sparse"].copy()
        info = np.iinfo(a.dtype)
        if a.size:
            for _ in range(rng.integers(1, 6)):
                a[rng.integers(a.shape[0]), rng.integers(26)] = rng.choice(
                    np.array([info.min, info.max, info.max - 1, max(info.min, -1), 0], dtype=a.dtype))
            np.save(path, a)
    elif kind == "labels":
        path = f"{stem}_labels.npy"
        a = arrays[stem]["labels"].copy()
        if a.size and a.dtype.kind != "b":
            value = rng.choice([2, 255] if a.dtype.kind == "u" else [-1, 2, 7] if a.dtype.kind == "i"
                               else [np.nan, 0.5, -1.0, np.inf])
            a[rng.integers(a.shape[0]), 0] = value
            np.save(path, a)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "not_npy":
        choice = rng.integers(4)
        if choice == 0:
            content = b"dense,sparse,labels\n1,2,3\n"
        elif choice == 1:
            content = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
        elif choice == 2:
            stream = io.BytesIO()
            with zipfile.ZipFile(stream, "w") as z:
                z.writestr("arr_0.npy", data)
            content = stream.getvalue()
        else:
            content = pickle.dumps([Trap(), a])
        open(path, "wb").write(content)
    elif kind == "object":
        out = np.empty(a.shape, dtype=object)
        out[...] = 0
        if out.size:
            out.flat[0] = Trap()
        np.save(path, out, allow_pickle=True)
    elif kind == "fortran":
        np.save(path, np.asfortranarray(a))
    elif kind == "trailing":
        open(path, "ab").write(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes())


# -------------------------------------------------------------------------------------- reference
def reference(stems: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense float32, ids int64 modulo the cardinalities, labels) of all rows, or raises Bad."""
    loaded = []
    for stem in stems:
        parts = {}
        for part in PARTS:
            path = f"{stem}_{part}.npy"
            try:
                a = np.load(path, allow_pickle=False)
            except Exception:  # noqa: BLE001 - numpy cannot read it: whatever it raised
                raise Bad(path) from None
            if not isinstance(a, np.ndarray):  # an .npz
                a.close()
                raise Bad(path)
            if (a.ndim != 2 or a.shape[1] != COLUMNS[part] or a.dtype.kind not in KINDS[part]
                    or not a.dtype.isnative or a.dtype.fields is not None):
                raise Bad(path)
            parts[part] = a
        if len({len(a) for a in parts.values()}) > 1:
            raise Bad(*(f"{stem}_{part}.npy" for part in PARTS))
        loaded.append(parts)
    # the stems' ids must have a common integer type (uint64 beside signed ids has none)
    if np.result_type(*(p["sparse"].dtype for p in loaded)).kind not in "iu":
        raise Bad(*(f"{stem}_sparse.npy" for stem in stems))
    cards = np.array(scaled_cardinalities(config(stems)), dtype=object)
    with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf (then a data error)
        dense = np.concatenate([p["dense"].astype(np.float32) for p in loaded])
    # exact integer arithmetic (Python ints), independent of numpy's mixed-sign promotion rules
    ids = np.concatenate([(p["sparse"].astype(object) % cards).astype(np.int64) for p in loaded])
    labels = np.concatenate([p["labels"][:, 0] for p in loaded])
    return dense, ids, labels


def row_file(stems: list[str], row: int, part: str) -> str:
    for stem in stems:
        n = len(np.load(f"{stem}_labels.npy"))
        if row < n:
            return f"{stem}_{part}.npy"
        row -= n
    raise AssertionError(row)


def check(stems: list[str], world: int) -> str:
    """Runs every rank against the reference; returns how the case ended (for the statistics)."""
    try:
        dense, ids, labels = reference(stems)
    except Bad as bad:
        for rank in range(world):
            with pytest.raises(ValueError) as info:
                list(make_dataset(config(stems), "train", rank, world))
            assert any(p in str(info.value) for p in bad.paths), (bad.paths, str(info.value))
        return "error: " + type(info.value).__name__
    local = B // world
    outcome = "read"
    for rank in range(world):
        ds = make_dataset(config(stems), "train", rank, world)
        assert len(ds) == len(labels) // B
        got = 0
        try:
            for b, batch in enumerate(ds):
                rows = np.arange(b * B + rank * local, b * B + (rank + 1) * local)
                np.testing.assert_array_equal(batch.dense_features.numpy(), dense[rows])
                np.testing.assert_array_equal(batch.sparse_features.values().view(26, -1).T.numpy(), ids[rows])
                np.testing.assert_array_equal(batch.labels.numpy(), labels[rows].astype(np.float32))
                assert batch.dense_features.dtype == batch.labels.dtype == torch.float32
                got += 1
        except ValueError as e:  # a bad value in this rank's next batch: the file and the row are named
            rows = np.arange(got * B + rank * local, got * B + (rank + 1) * local)
            bad_label = ~np.isin(labels[rows], (0, 1))
            bad_dense = ~np.isfinite(dense[rows]).all(axis=1)
            assert bad_label.any() or bad_dense.any(), str(e)
            first = rows[np.argmax(bad_label)] if bad_label.any() else rows[np.argmax(bad_dense)]
            part = "labels" if bad_label.any() else "dense"
            assert row_file(stems, int(first), part) in str(e), (part, str(e))
            outcome = "error in data: ValueError"
            continue
        assert got == len(labels) // B
        mine = np.concatenate([np.arange(b * B + rank * local, b * B + (rank + 1) * local) for b in range(got)] + [[]])
        mine = mine.astype(np.int64)
        assert np.isin(labels[mine], (0, 1)).all() and np.isfinite(dense[mine]).all()  # nothing bad let through
    return outcome


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.lists(st.integers(0, 13), min_size=1, max_size=3),
       dense=st.sampled_from(["<f4", "<f4", "<f8", "<f2"]),
       sparse=st.sampled_from(["<i8", "<i8", "<i4", "<u4", "<u8", "<i2", "|u1"]),
       labels=st.sampled_from(["<i4", "<i4", "<i8", "<f4", "|b1", "|u1"]),
       mutations=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2), world=st.sampled_from([1, 1, 2]))
def test_hostile_npy_files_read_exactly_or_raise_naming_the_file(seed, rows, dense, sparse, labels, mutations, world):
    rng = np.random.default_rng(seed)
    dtypes = {"dense": dense, "sparse": sparse, "labels": labels}
    with tempfile.TemporaryDirectory() as tmp:
        stems, arrays = [], {}
        for i, n in enumerate(rows):
            stem = os.path.join(tmp, f"day_{i}")
            arrays[stem] = valid_arrays(rng, n, dtypes)
            for part, a in arrays[stem].items():
                np.save(f"{stem}_{part}.npy", np.asfortranarray(a) if rng.random() < 0.2 else a)
            stems.append(stem)
        for kind in mutations:
            mutate(kind, rng, stems, arrays)
        os.environ.pop(TRAP, None)
        outcome = check(stems, world)
        assert TRAP not in os.environ, "a file was unpickled"
    event(outcome)  # pytest --hypothesis-show-statistics: how the cases ended
    event(f"{'+'.join(mutations) or 'valid'} -> {outcome}")
