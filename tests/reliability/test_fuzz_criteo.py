"""Hostile Criteo TSV files, fuzzed at the file level: read_tsv and the streaming dataset.

Files of random valid lines are written with LF, CRLF or mixed line ends, with or without a
final newline, plain or gzip'd, and then (sometimes) damaged: truncated at a random byte, a byte
overwritten (bad hex, NUL, 0xff, tab, CR, newline), a gzip stream cut short or followed by
garbage. An independent reference parser of the documented format decides what each file
means. The contract: the reader returns exactly the reference's arrays, or raises ValueError
naming the file (and, for a bad line, ``file:line``); it never raises anything else (a corrupt
gzip used to escape as EOFError/BadGzipFile), never hangs, and an empty file is zero samples.
"""
import gzip
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ttdist.data import DataConfig, make_dataset, read_tsv

ROWS = 1000
INT = re.compile(rb"-?[0-9]{1,18}|")
HEX = re.compile(rb"[0-9a-fA-F]{1,16}|")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Bad(Exception):
    def __init__(self, line: int):
        self.line = line


def reference(data: bytes):
    """The documented format, parsed independently: (dense, sparse, labels) or Bad(line)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    dense, sparse, labels = [], [], []
    for n, line in enumerate(lines, 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        fields = line.split(b"\t")
        if len(fields) != 40 or fields[0] not in (b"0", b"1") or not all(INT.fullmatch(f) for f in fields[1:14]) \
                or not all(HEX.fullmatch(f) for f in fields[14:]):
            raise Bad(n)
        labels.append(float(fields[0] == b"1"))
        counts = np.array([int(f) if f else 0 for f in fields[1:14]], dtype=np.int64)
        dense.append(np.log1p(np.maximum(counts, 0).astype(np.float64)).astype(np.float32))
        sparse.append([int(f, 16) % ROWS if f else 0 for f in fields[14:]])
    return (np.array(dense, dtype=np.float32).reshape(-1, 13), np.array(sparse, dtype=np.int64).reshape(-1, 26),
            np.array(labels, dtype=np.float32))


def _field(alphabet: str, max_len: int):
    return st.one_of(st.just(""), st.text(alphabet, min_size=1, max_size=max_len))


LINE = st.tuples(st.sampled_from(["0", "1"]),
                 st.lists(st.one_of(st.just(""), st.integers(-10**17, 10**18 - 1).map(str)), min_size=13, max_size=13),
                 st.lists(_field("0123456789abcdefABCDEF", 16), min_size=26, max_size=26)
                 ).map(lambda t: "\t".join([t[0], *t[1], *t[2]]).encode())


@st.composite
def files(draw):
    lines = draw(st.lists(LINE, max_size=5))
    ends = [draw(st.sampled_from([b"\n", b"\n", b"\r\n"])) for _ in lines]
    data = b"".join(l + e for l, e in zip(lines, ends))
    if lines and draw(st.booleans()):
        data = data[:-len(ends[-1])]  # no final newline
    damage = draw(st.sampled_from(["none", "none", "truncate", "byte"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        byte = draw(st.sampled_from([b"g", b"Z", b"\x00", b"\xff", b"\t", b"\r", b"\n", b"-", b" "]))
        data = data[:i] + byte + data[i + 1:]
    return data, draw(st.sampled_from(["plain", "plain", "gzip", "gzip_truncated", "gzip_garbage", "plain_named_gz"]))


def _write(tmp_path, data: bytes, packing: str):
    if packing == "plain":
        path, raw = tmp_path / "day.tsv", data
    elif packing == "plain_named_gz":
        path, raw = tmp_path / "day.gz", data
    else:
        raw = gzip.compress(data)
        if packing == "gzip_truncated":
            raw = raw[:len(raw) // 2]
        elif packing == "gzip_garbage":
            raw = raw + b"not gzip"
        path = tmp_path / "day.tsv.gz"
    path.write_bytes(raw)
    return path


@SETTINGS
@given(f=files())
def test_read_tsv_equals_the_reference_or_raises_value_error_naming_the_file(tmp_path, f):
    data, packing = f
    path = _write(tmp_path, data, packing)
    try:
        expected = reference(data)
    except Bad as bad:
        expected = bad
    if packing in ("gzip_truncated", "gzip_garbage") or (packing == "plain_named_gz" and data):
        with pytest.raises(ValueError) as info:
            read_tsv(path, ROWS)
        assert str(path) in str(info.value)
        return
    if isinstance(expected, Bad):
        with pytest.raises(ValueError, match=re.escape(f"{path}:{expected.line}: ")):
            read_tsv(path, ROWS)
        return
    got = read_tsv(path, ROWS)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=files(), second=files(), batch=st.integers(1, 4))
def test_streaming_dataset_over_two_files_equals_the_reference_or_names_the_file(tmp_path, first, second, batch):
    (a, pa), (b, pb) = first, second
    (tmp_path / "1").mkdir(exist_ok=True), (tmp_path / "2").mkdir(exist_ok=True)
    p1, p2 = _write(tmp_path / "1", a, pa), _write(tmp_path / "2", b, pb)
    cfg = DataConfig(name="criteo_tsv", batch_size=batch, train_path=f"{p1},{p2}",
                     num_embeddings_per_feature=[ROWS] * 26)
    try:
        expected = [reference(a), reference(b)]
        broken = any(p in ("gzip_truncated", "gzip_garbage") or (p == "plain_named_gz" and d)
                     for d, p in ((a, pa), (b, pb)))
    except Bad:
        expected, broken = None, True
    try:
        batches = list(make_dataset(cfg, "train", 0, 1))
    except ValueError as e:
        assert broken, str(e)
        assert str(p1) in str(e) or str(p2) in str(e), str(e)
        return
    # a damaged file may still read fine when the damage lies after the last complete batch
    # (lines past it are skipped unparsed): then the batches equal the reference prefix
    labels = np.concatenate([e[2] for e in expected]) if expected else None
    got = np.concatenate([x.labels.numpy() for x in batches]) if batches else np.zeros(0, np.float32)
    if expected is not None:
        n = len(labels) // batch * batch
        np.testing.assert_array_equal(got, labels[:n])
    else:
        assert len(got) % batch == 0


@pytest.mark.parametrize("raw", [b"", gzip.compress(b"")])
def test_an_empty_file_is_zero_samples(tmp_path, raw):
    path = tmp_path / ("e.gz" if raw else "e.tsv")
    path.write_bytes(raw)
    dense, sparse, labels = read_tsv(path, ROWS)
    assert dense.shape == (0, 13) and sparse.shape == (0, 26) and labels.shape == (0,)
