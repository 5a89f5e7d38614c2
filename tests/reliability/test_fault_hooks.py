"""The fault-injection hooks (ttdist.faults) and the failure reports (ttdist.failures) of ttdist.train,
in process (no torchrun).

The multi-process tests rely on these pieces: Faults.from_env (parsing, first attempt only),
the batch/loss poisoning, the readable parameter names, the detection of communication errors
and the per-rank progress report that names the ranks that never reached a collective.
"""
import math

import numpy as np
import pytest
import torch

from tests.app.common import TINY
from ttdist.config import load_config
from ttdist.model import table_configs
from ttdist.modules.collection import TTEmbeddingBagConfig
from ttdist.failures import CollectiveError, Progress, _is_comm_error, first_nonfinite_dense
from ttdist.faults import Faults
from ttdist.process_group import DistEnv
from ttdist.train import _due


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/demo.yaml", TINY)


def _batch(n=8):
    from ttdist.data.batching import make_batch

    rng = np.random.default_rng(0)
    return make_batch(rng.random((n, 13), dtype=np.float32), rng.integers(0, 2, (n, 26)),
                      rng.integers(0, 2, n).astype(np.float32))


def test_faults_parse_the_environment_and_fire_only_on_the_first_attempt():
    env = {"TTDIST_FAULT_KILL_STEP": "5", "TTDIST_FAULT_KILL_RANK": "1", "TTDIST_FAULT_KILL_IN_SAVE": "4",
           "TTDIST_FAULT_HANG_STEP": "3", "TTDIST_FAULT_NAN_STEP": "2", "TTDIST_FAULT_NAN_KIND": "param",
           "TTDIST_FAULT_BAD_INDEX_STEP": "7", "TTDIST_FAULT_BAD_INDEX_RANK": "1"}
    f = Faults.from_env(1, env, attempt=0)
    assert (f.kill_step, f.kill_rank, f.kill_in_save, f.hang_step, f.hang_rank, f.nan_step, f.nan_rank, f.nan_kind,
            f.bad_index_step, f.bad_index_rank) == (5, 1, 4, 3, 0, 2, 0, "param", 7, 1)
    assert Faults.from_env(1, env, attempt=1) == Faults(rank=1)  # a restarted attempt runs clean
    assert Faults.from_env(0, {}, attempt=0) == Faults(rank=0)  # nothing set: nothing fires


@pytest.mark.parametrize("var,value,match", [
    ("TTDIST_FAULT_KILL_STEP", "0", r"TTDIST_FAULT_KILL_STEP must be an integer >= 1, got '0'"),
    ("TTDIST_FAULT_HANG_RANK", "-1", r"TTDIST_FAULT_HANG_RANK must be an integer >= 0, got '-1'"),
    ("TTDIST_FAULT_NAN_STEP", "two", r"TTDIST_FAULT_NAN_STEP must be an integer >= 1, got 'two'"),
    ("TTDIST_FAULT_NAN_KIND", "inf", r"TTDIST_FAULT_NAN_KIND must be one of \('input', 'loss', 'param'\), got 'inf'"),
])
def test_bad_fault_settings_are_rejected_naming_the_variable(var, value, match):
    with pytest.raises(ValueError, match=match):
        Faults.from_env(0, {var: value}, attempt=0)


def test_input_and_index_poisoning_touch_only_the_chosen_rank_and_step(cfg):
    batch = _batch()
    on = Faults(rank=1, nan_step=2, nan_rank=1, bad_index_step=2, bad_index_rank=1)
    assert Faults(rank=0, nan_step=2, nan_rank=1).poison_batch(batch, 2, cfg) is batch  # other rank
    assert on.poison_batch(batch, 3, cfg) is batch  # other step
    bad = on.poison_batch(batch, 2, cfg)
    assert first_nonfinite_dense(bad.dense_features) == (3, 5, "NaN")
    assert first_nonfinite_dense(batch.dense_features) is None  # the original batch is not modified
    t = cfg.tt_table_indices()[0]
    values = bad.sparse_features.to_dict()[f"cat_{t}"].values()
    assert int(values[0]) == cfg.table_rows()[t] and int(values[1:].max()) < cfg.table_rows()[t]
    assert math.isnan(float(Faults(rank=0, nan_step=4, nan_kind="loss").poison_loss(torch.tensor(0.5), 4)))
    assert float(Faults(rank=0, nan_step=4, nan_kind="loss").poison_loss(torch.tensor(0.5), 3)) == 0.5


def test_first_nonfinite_dense_reports_sample_feature_and_kind():
    x = torch.zeros(4, 13)
    assert first_nonfinite_dense(x) is None
    x[2, 7], x[3, 1] = float("inf"), float("nan")
    assert first_nonfinite_dense(x) == (2, 7, "Inf")


@pytest.mark.parametrize("message,is_comm", [
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation", True),
    ("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:46256: Connection reset by peer", True),
    ("NCCL communicator was aborted on rank 1", True),
    ("shape '[2, 1]' is invalid for input of size 3", False),
    ("index 50 is out of range [0, 50)", False),
])
def test_communication_errors_are_told_apart_from_other_errors(message, is_comm):
    assert _is_comm_error(RuntimeError(message)) is is_comm
    assert _is_comm_error(ValueError(message)) is False  # only runtime (backend) errors
    wrapped = RuntimeError("while waiting on the all-to-all")
    wrapped.__cause__ = RuntimeError(message)
    assert _is_comm_error(wrapped) is is_comm


class FakeStore:
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def test_progress_turns_a_collective_failure_into_an_error_naming_phase_and_missing_rank():
    store = FakeStore()
    ranks = [Progress(DistEnv(r, 3, torch.device("cpu")), 10.0) for r in range(3)]
    for p in ranks:
        p.store = store
    for p in ranks:  # everybody finished step 1
        with p.phase("step 1 backward"):
            pass
    with ranks[2].phase("step 2 forward"):
        pass
    with pytest.raises(CollectiveError) as info:
        with ranks[0].phase("step 2 forward"):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv")
    text = str(info.value)
    assert text.startswith("rank 0: collective (none issued from Python in this phase: DDP's gradient all-reduce) "
                           "in 'step 2 forward' timed out after "), text
    assert "(train.collective_timeout_s = 10); rank(s) [1] never reached this collective (hung or dead)" in text
    assert "rank 1: 'step 1 backward'" in text and "rank 2: 'step 2 forward'" in text
    with pytest.raises(IndexError):  # anything else passes through untouched
        with ranks[0].phase("step 3 forward"):
            raise IndexError("index 7 is out of range [0, 5)")


def test_every_n_steps_with_n_zero_never_fires():
    assert [s for s in range(1, 10) if _due(s, 3)] == [3, 6, 9]
    assert not any(_due(s, 0) for s in range(1, 10))
