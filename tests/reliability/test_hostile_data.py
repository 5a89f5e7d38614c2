"""Hostile and careless data (issue 11): bad labels, running out of data, eval inputs that fail late.

In process: npy labels outside {0, 1} raise naming the file and row (every reader's batches are
checked); the train stream loops ``data.epochs`` times and resumes inside a later pass; a
one-class eval split reports AUC as undefined (None), not 0.0. Under torchrun (2 CPU ranks):
running out of train data stops with an error naming the files and the step, after saving a
checkpoint of the steps trained; ``data.epochs`` loops; a missing or too small eval split stops the
run at start-up, before any step.
"""
import json
import re

import numpy as np
import pytest
import torch

from tests.app.common import launch, summary, train_records
from ttdist.data import DataConfig, make_dataset

BATCH = 256  # tests/app/common.py TINY's data.batch_size


def write_tsv(path, n: int, seed: int = 0, label=None):
    """n valid Criteo TSV lines (random counts and hashes; labels random or all ``label``)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        y = int(rng.integers(0, 2)) if label is None else label
        ints = [str(int(x)) for x in rng.integers(0, 50, 13)]
        hashes = [f"{int(h):08x}" for h in rng.integers(0, 2**32, 26)]
        lines.append("\t".join([str(y), *ints, *hashes]))
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# 3. labels
# ------------------------------------------------------------------------------------------------
def _npy_days(tmp_path, bad_day: int, bad_row: int, bad_value, dtype=np.int32):
    stems = []
    for day, n in enumerate((37, 29)):
        rng = np.random.default_rng(day)
        labels = rng.integers(0, 2, (n, 1)).astype(dtype)
        if day == bad_day:
            labels[bad_row, 0] = bad_value
        stem = tmp_path / f"day_{day}"
        np.save(f"{stem}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(f"{stem}_sparse.npy", rng.integers(0, 2**40, (n, 26), dtype=np.int64))
        np.save(f"{stem}_labels.npy", labels)
        stems.append(str(stem))
    return ",".join(stems)


@pytest.mark.parametrize("value,dtype,shown", [(7, np.int32, "7"), (-1, np.int32, "-1"), (0.5, np.float32, "0.5"),
                                               (float("nan"), np.float32, "nan")])
@pytest.mark.parametrize("world_size", [1, 2])
def test_npy_labels_outside_0_1_raise_naming_the_file_and_row(tmp_path, value, dtype, shown, world_size):
    pytest.importorskip("iopath", reason="TorchRec's npy datapipe opens files through iopath")
    stems = _npy_days(tmp_path, bad_day=1, bad_row=20, bad_value=value, dtype=dtype)  # global row 37 + 20 = 57
    cfg = DataConfig(name="criteo_npy", batch_size=8, train_path=stems, eval_path=stems, cardinality_scale=0.001)
    rank = (57 % 8) // (8 // world_size)  # the rank whose slice of global batch 7 holds row 57
    with pytest.raises(ValueError) as info:
        list(make_dataset(cfg, "train", rank, world_size))
    message = str(info.value)
    assert f"day_1_labels.npy: row 20 has label {shown}" in message, message
    assert "labels must be 0 or 1" in message and "global batch 7" in message, message
    others = [r for r in range(world_size) if r != rank]
    for r in others:  # the other rank's slices are all valid
        assert len(list(make_dataset(cfg, "train", r, world_size))) == 8


def test_every_reader_yields_labels_0_1_and_make_batch_rejects_others():
    from ttdist.data.batching import make_batch

    for name in ("synthetic", "random"):
        cfg = DataConfig(name=name, batch_size=64, cardinality_scale=0.001, eval_batches=2)
        for split in ("train", "eval"):
            for batch, _ in zip(make_dataset(cfg, split, 0, 1), range(2)):
                assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    dense, sparse = np.zeros((3, 13), np.float32), np.zeros((3, 26), np.int64)
    make_batch(dense, sparse, np.array([0, 1, 1], np.float32))
    with pytest.raises(ValueError, match=r"label of sample 2 is 7\.0; labels must be 0 or 1"):
        make_batch(dense, sparse, np.array([0, 1, 7], np.float32))


# ------------------------------------------------------------------------------------------------
# 4. running out of data; data.epochs
# ------------------------------------------------------------------------------------------------
def test_train_stream_loops_for_data_epochs_and_resumes_inside_a_later_pass(tmp_path):
    from ttdist.data import EndOfData, train_stream

    path = write_tsv(tmp_path / "t.tsv", 3 * 8 + 5)  # 3 global batches of 8 per pass
    cfg = DataConfig(name="criteo_tsv", batch_size=8, train_path=str(path), cardinality_scale=0.001)
    one_pass = [b.labels for b in make_dataset(cfg, "train", 1, 2)]
    assert len(one_pass) == 3

    def labels(epochs, start, count):
        cfg.epochs = epochs
        stream = iter(train_stream(cfg, 1, 2, start_batch=start))
        return [next(stream).labels for _ in range(count)]

    for got, want in zip(labels(2, 0, 6), one_pass * 2):
        assert torch.equal(got, want)
    for got, want in zip(labels(0, 7, 4), (one_pass * 4)[7:11]):  # pass 3, batch 1, and on
        assert torch.equal(got, want)
    for epochs, start, count in ((1, 0, 3), (2, 4, 2)):
        cfg.epochs = epochs
        stream = iter(train_stream(cfg, 1, 2, start_batch=start))
        for _ in range(count):
            next(stream)
        with pytest.raises(EndOfData, match=rf"t\.tsv\) ran out after {3 * epochs} global batches: 3 per pass x "
                                            rf"{epochs} pass\(es\) \(data\.epochs = {epochs}\)"):
            next(stream)
    cfg.epochs = 0
    (tmp_path / "empty.tsv").write_text("")
    cfg.train_path = str(tmp_path / "empty.tsv")
    with pytest.raises(EndOfData, match=r"empty\.tsv\) holds no complete global batch"):
        next(iter(train_stream(cfg, 0, 1)))  # epochs = 0 must not loop forever over nothing


def _tsv_overrides(train, eval_):
    return ("data.name=criteo_tsv", f"data.train_path={train}", f"data.eval_path={eval_}", "data.eval_batches=2",
            "checkpoint.every_steps=0", "checkpoint.resume=false", "train.eval_every_steps=0")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_running_out_of_train_data_names_files_and_step_and_saves_a_checkpoint(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", 3 * BATCH + 10)  # 3 global batches
    run = launch(2, tmp_path, "short", *_tsv_overrides(train, train), "train.steps=5", check=False, timeout=300)
    assert run.returncode != 0, run.tail()
    saved = tmp_path / "short" / "checkpoints" / "step_00000003"
    for r in (0, 1):
        m = re.search(rf"\[rank {r}\] EndOfData: step 4 of train\.steps = 5: the train data \(data\.train_path: "
                      rf"{re.escape(str(train))}\) ran out after 3 global batches: 3 per pass x 1 pass\(es\) "
                      rf"\(data\.epochs = 1\)[^\n]*", run.stderr)
        assert m, run.tail()
        assert f"saved the 3 steps trained in {saved}" in m.group(0), m.group(0)
        assert "data.epochs = 2" in m.group(0), m.group(0)  # what would be enough
    assert (saved / "COMPLETE").is_file(), run.tail()
    assert [r["step"] for r in train_records(tmp_path / "short")] == [1, 2, 3]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_data_epochs_loops_and_a_one_class_eval_split_reports_auc_as_undefined(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", 2 * BATCH)
    eval_ = write_tsv(tmp_path / "eval.tsv", BATCH + 3, seed=1, label=0)
    run = launch(2, tmp_path, "epochs", *_tsv_overrides(train, eval_), "train.steps=5", "data.epochs=3",
                 timeout=300)
    s = summary(tmp_path / "epochs")
    assert s["steps"] == 5 and s["auc"] is None and s["eval_samples"] == BATCH, s
    assert json.loads((tmp_path / "epochs" / "summary.json").read_text())["auc"] is None
    assert ("note: eval AUC is undefined: the 256 eval samples all have label 0 (AUC needs both classes); "
            "reported as null") in run.stdout + run.stderr, run.tail()


# ------------------------------------------------------------------------------------------------
# 5. eval inputs
# ------------------------------------------------------------------------------------------------
def test_one_class_eval_reports_auc_as_none_not_zero(capsys):
    from ttdist.data.batching import make_batch
    from ttdist.metrics import evaluate

    class Model(torch.nn.Module):
        def forward(self, dense, sparse):
            return dense[:, :1]

    def batch(labels):
        n = len(labels)
        rng = np.random.default_rng(n)
        return make_batch(rng.standard_normal((n, 13)).astype(np.float32), np.zeros((n, 26), np.int64),
                          np.array(labels, np.float32))

    for label in (0.0, 1.0):
        out = evaluate(Model(), [batch([label] * 5)], torch.device("cpu"))
        assert out["auc"] is None and out["eval_samples"] == 5 and 0 <= out["accuracy"] <= 1, out
        assert f"all have label {int(label)}" in capsys.readouterr().err
    out = evaluate(Model(), [batch([0.0, 1.0, 1.0])], torch.device("cpu"))
    assert isinstance(out["auc"], float)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "small"])
def test_bad_eval_split_stops_the_run_at_start_up(tmp_path, case):
    train = write_tsv(tmp_path / "train.tsv", 2 * BATCH)
    if case == "missing":
        eval_ = tmp_path / "no_such_eval.tsv"
        expected = rf"data\.eval_path: {re.escape(str(eval_))} does not exist"
    else:
        eval_ = write_tsv(tmp_path / "eval.tsv", BATCH - 1, seed=1)
        expected = (rf"data\.eval_path: the eval split \({re.escape(str(eval_))}\) holds 255 samples, fewer than one "
                    rf"global batch \(data\.batch_size = 256\); evaluation needs at least one")
    run = launch(2, tmp_path, case, *_tsv_overrides(train, eval_), "train.steps=2", check=False, timeout=300)
    assert run.returncode != 0, run.tail()
    assert re.search(rf"\[rank 0\] \w+: {expected}", run.stderr), run.tail()
    metrics = tmp_path / case / "metrics.jsonl"
    assert not metrics.exists() or train_records(tmp_path / case) == []  # stopped before the first step
