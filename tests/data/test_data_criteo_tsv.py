"""Criteo TSV reader and streaming dataset, on the real 200-row Kaggle sample and on bad files."""

import gzip
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttdist.data import DataConfig, make_dataset, read_tsv, scaled_cardinalities

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "criteo_kaggle_sample.tsv"
needs_sample = pytest.mark.skipif(
    not SAMPLE.is_file(), reason=f"real Criteo sample not found at {SAMPLE} (shared/ data)"
)
ROWS = [1000 + 37 * f for f in range(26)]  # distinct per-feature row counts
HEX = set(b"0123456789abcdefABCDEF")
DIGITS = set(b"0123456789")


def reference_parse(data: bytes, rows):
    """Independent strict parser (plain splitting, no regex): arrays, or None if invalid."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    dense, sparse, labels = [], [], []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        fields = line.split(b"\t")
        if len(fields) != 40 or fields[0] not in (b"0", b"1"):
            return None
        ints = []
        for x in fields[1:14]:
            digits = x[1:] if x.startswith(b"-") else x
            if x and not (digits and len(digits) <= 18 and set(digits) <= DIGITS):
                return None
            ints.append(int(x) if x else 0)
        ids = []
        for x, n in zip(fields[14:], rows):
            if len(x) > 16 or not set(x) <= HEX:
                return None
            ids.append(int(x, 16) % n if x else 0)
        labels.append(float(fields[0]))
        dense.append(ints)
        sparse.append(ids)
    dense = np.log1p(
        np.maximum(np.array(dense, dtype=np.int64).reshape(-1, 13), 0).astype(np.float64)
    )
    return (
        dense.astype(np.float32),
        np.array(sparse, dtype=np.int64).reshape(-1, 26),
        np.array(labels, dtype=np.float32),
    )


def assert_arrays_equal(got, expected):
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e)


@pytest.fixture(scope="module")
def sample_bytes():
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE} (shared/ data)")
    return SAMPLE.read_bytes()


@needs_sample
def test_real_sample_rows_and_labels(sample_bytes):
    dense, sparse, labels = read_tsv(SAMPLE, ROWS)
    text = sample_bytes.decode()
    clicks = sum(line.split("\t")[0] == "1" for line in text.splitlines())
    assert dense.shape == (200, 13) and sparse.shape == (200, 26) and labels.shape == (200,)
    assert dense.dtype == labels.dtype == np.float32 and sparse.dtype == np.int64
    assert int(labels.sum()) == clicks
    assert (sparse >= 0).all() and (sparse < np.array(ROWS)).all()
    assert_arrays_equal((dense, sparse, labels), reference_parse(sample_bytes, ROWS))


@needs_sample
def test_real_sample_fields_checked_by_hand():
    # line 1: "0 \t \t 3 \t 260 \t \t 17668 ..." C1 = 05db9164, C19 and C20 empty
    # line 2: "0 \t \t -1 \t 19 ..." C1 = 68fd1e64
    dense, sparse, labels = read_tsv(SAMPLE, ROWS)
    assert labels[0] == 0.0
    assert dense[0, 0] == 0.0  # empty I1
    assert dense[0, 1] == np.float32(math.log(4))  # I2 = 3
    assert dense[0, 2] == np.float32(math.log(261))  # I3 = 260
    assert dense[0, 4] == np.float32(math.log(17669))  # I5 = 17668
    assert sparse[0, 0] == 0x05DB9164 % ROWS[0]
    assert sparse[0, 18] == 0 and sparse[0, 19] == 0  # empty C19, C20
    assert sparse[0, 20] == 0x0429F84B % ROWS[20]
    assert dense[1, 1] == 0.0  # I2 = -1 -> log(1 + 0)
    assert sparse[1, 0] == 0x68FD1E64 % ROWS[0]
    # one row count for every feature
    _, same_rows, _ = read_tsv(SAMPLE, 1000)
    assert same_rows[0, 0] == 0x05DB9164 % 1000


@needs_sample
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_streaming_rank_slices_equal_read_tsv(world_size, tmp_path):
    copy = tmp_path / "day_1.gz"  # a second (gzipped) file: batches span the file boundary
    with open(SAMPLE, "rb") as src, gzip.open(copy, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cfg = DataConfig(
        name="criteo_tsv", batch_size=48, train_path=f"{SAMPLE},{copy}", eval_path=str(SAMPLE),
        eval_batches=3, cardinality_scale=0.001,
    )  # fmt: skip
    rows = scaled_cardinalities(cfg)
    one = read_tsv(SAMPLE, rows)
    whole = [np.concatenate([a, a]) for a in one]  # 400 lines -> 8 global batches
    for split, start, batches in (("train", 0, 8), ("train", 5, 3), ("eval", 1, 2)):
        per_rank = [list(make_dataset(cfg, split, r, world_size, start)) for r in range(world_size)]
        assert [len(p) for p in per_rank] == [batches] * world_size
        for i, b in enumerate(range(start, start + batches)):
            parts = [p[i] for p in per_rank]
            assert all(len(x.labels) == 48 // world_size for x in parts)
            lo, hi = 48 * b, 48 * (b + 1)
            np.testing.assert_array_equal(
                np.concatenate([x.dense_features for x in parts]), whole[0][lo:hi]
            )
            ids = np.concatenate([x.sparse_features.values().view(26, -1).T for x in parts])
            np.testing.assert_array_equal(ids, whole[1][lo:hi])
            np.testing.assert_array_equal(
                np.concatenate([x.labels for x in parts]), whole[2][lo:hi]
            )


def write(tmp_path, name, lines, end=b"\n"):
    path = tmp_path / name
    path.write_bytes(b"".join(line + end for line in lines))
    return path


GOOD = b"1\t5\t\t-3" + b"\t7" * 10 + b"\tdeadbeef" + b"\t" * 25


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (GOOD + b"\t", "expected 40 tab-separated fields, got 41"),
        (GOOD.rsplit(b"\t", 1)[0], "got 39"),
        (GOOD.replace(b"deadbeef", b"zz12"), r"field C1 \(column 15\): not a hex hash: 'zz12'"),
        (
            GOOD.replace(b"\t5\t", b"\t1.5\t"),
            r"field I1 \(column 2\): not a base-10 integer: '1.5'",
        ),
        (b"2" + GOOD[1:], "field label"),
        (b"" + GOOD[2:], "expected 40"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, bad, message):
    path = write(tmp_path, "bad.tsv", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=message) as err:
        read_tsv(path, 100)
    assert f"{path}:3:" in str(err.value)


def test_crlf_and_missing_final_newline(tmp_path):
    lf = read_tsv(write(tmp_path, "lf.tsv", [GOOD] * 3), 100)
    crlf = read_tsv(write(tmp_path, "crlf.tsv", [GOOD] * 3, end=b"\r\n"), 100)
    last = tmp_path / "last.tsv"
    last.write_bytes(b"\r\n".join([GOOD] * 3))
    assert_arrays_equal(crlf, lf)
    assert_arrays_equal(read_tsv(last, 100), lf)
    assert lf[0][0, :3].tolist() == [np.float32(math.log(6)), 0.0, 0.0]
    assert lf[1][0, 0] == 0xDEADBEEF % 100 and lf[2][0] == 1.0


def test_empty_file(tmp_path):
    dense, sparse, labels = read_tsv(write(tmp_path, "empty.tsv", []), 100)
    assert dense.shape == (0, 13) and sparse.shape == (0, 26) and labels.shape == (0,)
    assert (dense.dtype, sparse.dtype, labels.dtype) == (np.float32, np.int64, np.float32)
    cfg = DataConfig(name="criteo_tsv", batch_size=4, train_path=str(tmp_path / "empty.tsv"))
    assert list(make_dataset(cfg, "train", 0, 1)) == []


def test_streaming_error_names_the_line_in_its_own_file(tmp_path):
    first = write(tmp_path, "a.tsv", [GOOD] * 6)
    second = write(tmp_path, "b.tsv", [GOOD, GOOD.replace(b"deadbeef", b"zz12")])  # line 8 overall
    cfg = DataConfig(name="criteo_tsv", batch_size=4, train_path=f"{first},{second}")
    with pytest.raises(ValueError, match=f"{second}:2: field C1"):
        list(make_dataset(cfg, "train", 1, 2))  # rank 1 owns lines 7-8 of batch 1
    # rank 0 never parses that line: other ranks' lines are skipped, not validated
    assert len(list(make_dataset(cfg, "train", 0, 2))) == 2


def test_missing_path_is_named():
    cfg = DataConfig(name="criteo_tsv", train_path="x.tsv")
    with pytest.raises(ValueError, match="eval_path"):
        make_dataset(cfg, "eval", 0, 1)


CHARS = [b"\t", b"\r", b"\n", b"z", b"g", b"-", b".", b" ", b"+", b"_", b"x", b"0", b"1", b"2",
         b"9", b"a", b"F", b"\xff", b"\x00", "\u0663".encode()]  # fmt: skip


@needs_sample
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    line=st.integers(0, 199),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(0, 400),
            st.sampled_from(CHARS),
        ),
        min_size=1,
        max_size=3,
    ),  # fmt: skip
)
def test_fuzzed_real_lines_parse_exactly_or_raise_value_error(tmp_path, sample_bytes, line, edits):
    data = bytearray(sample_bytes.split(b"\n")[line])
    for op, pos, char in edits:
        pos %= len(data) + 1
        if op == "replace" and pos < len(data):
            data[pos : pos + 1] = char
        elif op == "insert":
            data[pos:pos] = char
        elif pos < len(data):
            del data[pos]
    data = bytes(data) + b"\n"
    path = tmp_path / "fuzz.tsv"
    path.write_bytes(data)
    expected = reference_parse(data, ROWS)
    if expected is None:
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_tsv(path, ROWS)
    else:
        assert_arrays_equal(read_tsv(path, ROWS), expected)


@needs_sample
def test_dataloader_workers_keep_the_order():
    from torch.utils.data import DataLoader

    cfg = DataConfig(name="criteo_tsv", batch_size=32, train_path=str(SAMPLE))
    expected = list(make_dataset(cfg, "train", 1, 2, start_batch=1))  # batches 1..5 of 6
    loader = DataLoader(
        make_dataset(cfg, "train", 1, 2, start_batch=1), batch_size=None, num_workers=2
    )
    got = list(loader)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
