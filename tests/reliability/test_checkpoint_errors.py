"""Checkpoint errors in one process (no process group): a full disk, damaged checkpoints.

Issue 11 (round two): a disk that filled up during a save surfaced as DCP's CheckpointException
(a BaseException, so train.py's ``[rank r]`` line missed it) wrapping ``RuntimeError: [enforce
fail at inline_container.cc:672] . unexpected pos 704 vs 598``, with no errno and no path; a
damaged newest checkpoint (a truncated shard file, a corrupt ``ttdist_meta.json``) stopped the
resume instead of falling back to the previous complete one. The write failure is injected into
DCP's file writer (``filesystem._write_item``) and the free space is faked.
"""
import errno
import json
import re
from collections import namedtuple

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

import ttdist.checkpoint
from ttdist.checkpoint import META, CheckpointError, Checkpointer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
Usage = namedtuple("Usage", "total used free")


def _state(value: float) -> dict:
    return {"w": torch.full((64, 8), value), "train": {"step": torch.tensor(int(value))}}


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _failing_writer(error: BaseException):
    def write_item(*args, **kwargs):
        raise error
    return write_item


@pytest.mark.parametrize("injected", [OSError(errno.ENOSPC, "No space left on device"),
                                      RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")])
def test_disk_full_during_save_is_enospc_naming_the_directory_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, injected):
    ckpt = Checkpointer(tmp_path, keep_last_n=2)
    first = ckpt.save(1, _state(1.0))
    monkeypatch.setattr(dcp_fs, "_write_item", _failing_writer(injected))
    monkeypatch.setattr(ttdist.checkpoint.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError) as info:
        ckpt.save(2, _state(2.0))
    e = info.value
    assert e.errno == errno.ENOSPC and e.filename == str(tmp_path / "step_00000002.partial"), repr(e)
    message = str(e)
    assert f"No space left on device while saving checkpoint step 2 to {tmp_path}" in message, message
    assert "needs about 2056 bytes, 100 bytes are free" in message, message  # 64 x 8 float32 + the int64 step
    assert f"the previous checkpoint {first} is kept" in message, message
    assert ckpt.latest() == first and _names(tmp_path) == ["step_00000001"]  # the partial save gave its space back


def test_other_file_system_errors_keep_their_errno_and_other_failures_are_exceptions(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path)
    monkeypatch.setattr(dcp_fs, "_write_item", _failing_writer(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as info:
        ckpt.save(1, _state(1.0))
    assert info.value.errno == errno.EIO and "step_00000001.partial" in info.value.filename
    assert "no earlier checkpoint exists" in str(info.value)
    monkeypatch.setattr(dcp_fs, "_write_item", _failing_writer(ValueError("boom")))
    with pytest.raises(CheckpointError, match=r"checkpoint save of step 1 to .*step_00000001.partial failed "
                                              r"\(rank\(s\) \[0\] failed, rank 0 with ValueError: boom\)"):
        ckpt.save(1, _state(1.0))
    assert issubclass(CheckpointError, Exception)  # train.py's handler prints it as [rank r] ...


def _loader(directory):
    ckpt = Checkpointer(directory, keep_last_n=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)))
    return ckpt


def test_truncated_shard_of_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ckpt = _loader(tmp_path)
    shard = next((tmp_path / "step_00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*step_00000003: rank\(s\) \[0\] failed"):
        Checkpointer.load(tmp_path / "step_00000003", _state(0.0))
    warnings = []
    path, state = ckpt.load_newest(lambda meta: _state(0.0), warn=warnings.append)
    assert path == tmp_path / "step_00000002" and int(state["train"]["step"]) == 2
    assert torch.equal(state["w"], torch.full((64, 8), 2.0))
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: skipping damaged checkpoint {tmp_path / 'step_00000003'} (cannot load checkpoint"), warnings


def test_corrupt_meta_is_named_and_skipped(tmp_path):
    ckpt = _loader(tmp_path)
    (tmp_path / "step_00000003" / META).write_text('{"step": 3, "world_si')
    with pytest.raises(ValueError, match=f"{tmp_path / 'step_00000003' / META}: corrupt checkpoint metadata"):
        Checkpointer.meta(tmp_path / "step_00000003")
    (tmp_path / "step_00000002" / META).write_text(json.dumps([1, 2]))
    warnings = []
    path, state = ckpt.load_newest(lambda meta: _state(0.0), warn=warnings.append)
    assert path == tmp_path / "step_00000001" and int(state["train"]["step"]) == 1
    assert [w.split(":")[0] for w in warnings] == ["warning"] * 2
    assert f"{tmp_path / 'step_00000003' / META}: corrupt checkpoint metadata" in warnings[0]
    assert f"{tmp_path / 'step_00000002' / META}: corrupt checkpoint metadata" in warnings[1]


def test_no_loadable_checkpoint_is_an_error_listing_the_damaged_ones(tmp_path):
    ckpt = _loader(tmp_path)
    for step in (1, 2, 3):
        (tmp_path / f"step_{step:08d}" / META).write_bytes(b"\xff\x00")
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint in .*: damaged \[.*step_00000003', "
                                              r".*step_00000002', .*step_00000001'\]"):
        ckpt.load_newest(lambda meta: _state(0.0), warn=lambda line: None)
    assert Checkpointer(tmp_path / "none").load_newest(lambda meta: _state(0.0)) is None


# End to end (torchrun, 2 CPU ranks): checkpoints of the shared 12-step reference run, damaged.
def _damaged_copy(tmp_path, name: str):
    import shutil

    from tests.app.common import reference_run

    ckpt = tmp_path / name / "checkpoints"
    shutil.copytree(reference_run() / "checkpoints", ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000006", "step_00000012"]
    return ckpt


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path):
    from tests.app.common import launch, losses, reference_run

    ckpt = _damaged_copy(tmp_path, "damaged")
    _truncate(ckpt / "step_00000012" / "__1_0.distcp")  # the ranks must agree that the load failed
    run = launch(2, tmp_path, "damaged", "train.steps=12", "checkpoint.every_steps=6", "checkpoint.resume=true")
    assert re.search(rf"warning: skipping damaged checkpoint {ckpt}/step_00000012 \(cannot load checkpoint "
                     rf"{ckpt}/step_00000012: rank\(s\) \[[01, ]+\] failed, rank [01] with (EOFError|RuntimeError)[^\n]*\); "
                     rf"trying the previous complete one\n", run.stderr), run.tail()
    assert f"resumed from {ckpt}/step_00000006 at step 6" in run.stdout, run.tail()
    expected = losses(reference_run())
    assert losses(tmp_path / "damaged") == {s: expected[s] for s in range(7, 13)}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_no_loadable_checkpoint_stops_every_rank_naming_the_damaged_files(tmp_path):
    """Before: CheckpointException (a BaseException) escaped train.py's ``[rank r]`` handler, and a
    corrupt ttdist_meta.json raised a JSONDecodeError naming no file."""
    from tests.app.common import launch

    ckpt = _damaged_copy(tmp_path, "damaged")
    _truncate(ckpt / "step_00000012" / "__0_0.distcp")
    (ckpt / "step_00000006" / META).write_text("{")
    run = launch(2, tmp_path, "damaged", "train.steps=12", "checkpoint.resume=true", check=False)
    assert run.returncode != 0, run.tail()
    assert f"warning: skipping damaged checkpoint {ckpt}/step_00000006: {ckpt}/step_00000006/{META}: corrupt " \
           "checkpoint metadata (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))" \
        in run.stderr, run.tail()
    for rank in (0, 1):
        assert (f"[rank {rank}] CheckpointError: no loadable checkpoint in {ckpt}: damaged ['{ckpt}/step_00000012', "
                f"'{ckpt}/step_00000006'] (see the warnings above)") in run.stderr, run.tail()
