"""Checkpointer in one process (no process group): what counts as a checkpoint, and pruning order.

A save is crash-safe when (1) only ``step_<8 digits>`` directories holding COMPLETE are ever
listed or loaded, and (2) older checkpoints are pruned only after the new one is complete, so a
failure at any point of a save leaves the previous newest checkpoint in place. Failures are
injected in process through the Checkpointer's ``fault`` hook (the SIGKILL variant runs under
torchrun in test_elastic_restart.py) and by making the marker write or the rename fail.
"""
import json
import os

import pytest
import torch

import ttdist.checkpoint
from ttdist.checkpoint import MARKER, META, Checkpointer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "train": {"step": torch.tensor(int(value))}}


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class Boom(RuntimeError):
    pass


def _fail(step):
    raise Boom(f"injected failure while saving step {step}")


def test_partial_and_unmarked_directories_are_never_loaded(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last_n=5)
    good = ckpt.save(1, _state(1.0))
    # the leftovers of interrupted saves, and look-alikes
    with pytest.raises(Boom):
        Checkpointer(tmp_path, keep_last_n=5, fault=_fail).save(2, _state(2.0))  # shards written, no marker
    assert (tmp_path / "step_00000002.partial" / ".metadata").is_file()
    unmarked = tmp_path / "step_00000003"
    unmarked.mkdir()
    (unmarked / META).write_text("{}")
    marked_partial = tmp_path / "step_00000004.partial"
    marked_partial.mkdir()
    (marked_partial / MARKER).write_text("4\n")  # a marker inside a .partial directory still does not count
    for name in ("step_5", "step_000000006", "step_abcdefgh", "checkpoint_00000007"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text("x\n")

    assert ckpt.complete() == [good] and ckpt.latest() == good
    assert ckpt.incomplete() == [tmp_path / "step_00000002.partial", unmarked, marked_partial]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Checkpointer.load(unmarked, _state(0.0))
    loaded = _state(0.0)
    Checkpointer.load(ckpt.latest(), loaded)
    assert torch.equal(loaded["w"], torch.full((3, 2), 1.0)) and int(loaded["train"]["step"]) == 1


@pytest.mark.parametrize("where", ["after_shards", "marker_write", "rename"])
def test_pruning_happens_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch, where):
    Checkpointer(tmp_path, keep_last_n=2).save(1, _state(1.0))
    Checkpointer(tmp_path, keep_last_n=2).save(2, _state(2.0))
    ckpt = Checkpointer(tmp_path, keep_last_n=2, fault=_fail if where == "after_shards" else None)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):  # DCP renames its own files too: fail only the final rename
        if str(src).endswith(".partial"):
            _fail(3)
        return real_rename(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        if where == "rename":
            m.setattr(os, "rename", rename)
        if where == "marker_write":  # COMPLETE written into step_3.partial, its fsync fails
            m.setattr(ttdist.checkpoint, "_fsync_dir", lambda path: _fail(3))
        with pytest.raises(Boom):
            ckpt.save(3, _state(3.0))
    # nothing was pruned and the newest loadable checkpoint is still step 2
    assert _names(tmp_path) == ["step_00000001", "step_00000002", "step_00000003.partial"]
    assert ckpt.latest() == tmp_path / "step_00000002"

    Checkpointer(tmp_path, keep_last_n=2).save(3, _state(3.0))  # the retry replaces the partial directory
    assert _names(tmp_path) == ["step_00000002", "step_00000003"]
    loaded = _state(0.0)
    Checkpointer.load(tmp_path / "step_00000003", loaded)
    assert torch.equal(loaded["w"], torch.full((3, 2), 3.0))


def test_stale_partials_of_earlier_steps_are_removed_by_the_next_complete_save(tmp_path):
    with pytest.raises(Boom):
        Checkpointer(tmp_path, fault=_fail).save(2, _state(2.0))
    (tmp_path / "step_00000009.partial").mkdir()  # a later step's partial is not touched (cannot be stale yet)
    Checkpointer(tmp_path).save(4, _state(4.0))
    assert _names(tmp_path) == ["step_00000004", "step_00000009.partial"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last_n=1)
    ckpt.save(5, _state(1.0))
    ckpt.save(5, _state(7.0))
    loaded = _state(0.0)
    Checkpointer.load(ckpt.latest(), loaded)
    assert _names(tmp_path) == ["step_00000005"] and torch.equal(loaded["w"], torch.full((3, 2), 7.0))
    assert json.loads((tmp_path / "step_00000005" / META).read_text())["step"] == 5


def test_the_checkpoint_just_saved_is_never_pruned_even_below_a_newer_one(tmp_path):
    """An earlier job's step 8 in the directory (a run restarted with checkpoint.resume=false)."""
    Checkpointer(tmp_path, keep_last_n=5).save(8, _state(8.0), meta={"job": "old"})
    ckpt = Checkpointer(tmp_path, keep_last_n=1)
    ckpt.save(2, _state(2.0), meta={"job": "new"})
    assert _names(tmp_path) == ["step_00000002"]
    Checkpointer(tmp_path, keep_last_n=5).save(8, _state(8.0), meta={"job": "old"})
    Checkpointer(tmp_path, keep_last_n=2).save(3, _state(3.0), meta={"job": "new"})
    assert _names(tmp_path) == ["step_00000003", "step_00000008"]
    assert ckpt.latest(job="new") == tmp_path / "step_00000003"


def test_latest_of_a_job_ignores_other_jobs_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last_n=5)
    ckpt.save(8, _state(8.0), meta={"job": "old"})
    ckpt.save(2, _state(2.0), meta={"job": "new"})
    assert ckpt.latest() == tmp_path / "step_00000008"
    assert ckpt.latest(job="new") == tmp_path / "step_00000002"
    assert ckpt.latest(job="other") is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_keep_last_n_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(ValueError, match=f"keep_last_n must be an integer >= 1, got {bad!r}"):
        Checkpointer(tmp_path, keep_last_n=bad)
