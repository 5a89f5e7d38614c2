"""Issue 4's quality check: TT tables cost at most 0.5 % eval AUC against dense TorchRec tables
(TT lower by at most 0.5 %).

Both models are configs/demo.yaml's DLRM (the 7 largest tables TT at ranks [16, 16] vs
``model.dense_baseline=true``), trained the same 300 steps of batch 2048 on the same synthetic
Criteo-shaped stream at 1 % of the Kaggle cardinalities, and evaluated on the same 40 960 eval
samples. The MLPs use Adam (lr 0.005): with demo.yaml's Adagrad the AUC after a few hundred
steps still moves by ~1 % from one init seed to the next, so a 0.5 % comparison there would
test the seed, not the tables. Training runs in this process on one rank, through the app's
own pieces (``ttdist.session.build_session``: model, plan, DMP, optimizers; ``train_step``;
``run_eval``); the two models train at once, each in a process of its own with one thread.
About 30 s of CPU time, 15 s on 2 cores.
"""
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ttdist.config import load_config
from ttdist.data import make_dataset
from ttdist.process_group import DistEnv
from ttdist.session import build_session
from ttdist.train import RunStats, run_eval, train_step

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SETTINGS = ["train.world_size=0", "train.progress_bar=false", "train.eval_every_steps=0", "checkpoint.resume=false",
            "checkpoint.at_end=false", "optim.dense_optimizer=adam", "optim.dense_lr=0.005",
            "data.cardinality_scale=0.01", "data.batch_size=2048", "data.eval_batches=20", "train.steps=300",
            "model.tt_tables=7", "model.tt_ranks=[16, 16]"]
MAX_RELATIVE_AUC_GAP = 0.005


def train(overrides: list[str]) -> dict:
    """Trains and evaluates the config with ``overrides`` on one rank of its own (run in a new process)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = load_config(CONFIG, [*SETTINGS, *overrides])
    env = DistEnv(0, 1, torch.device("cpu"))
    session = build_session(cfg, env)
    loss_fn, stats = torch.nn.BCEWithLogitsLoss(), RunStats()
    batches = iter(make_dataset(cfg.data, "train", 0, 1))
    for step in range(cfg.train.steps):
        assert train_step(session.model, session.optimizer, loss_fn, next(batches), step, cfg, stats) is not None
    return run_eval(session.model, cfg, env)


def test_tt_auc_within_half_a_percent_of_dense():
    t0 = time.perf_counter()
    # forkserver: the processes fork from one that imported this module (and torch) once
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        dense, tt = pool.map(train, [["model.dense_baseline=true"], []])
    # one-sided: what TT costs. The dense model's own AUC moves by ~0.6 % with the init draw (seeds
    # 0-2, or its plain tables' plan: 0.802-0.808 here), more than the TT model's (0.806-0.808).
    gap = (dense["auc"] - tt["auc"]) / dense["auc"]
    print(f"\nAUC dense {dense['auc']:.4f}, TT {tt['auc']:.4f}: TT lower by {100 * gap:.3f} % "
          f"(limit {100 * MAX_RELATIVE_AUC_GAP:.1f} %), {time.perf_counter() - t0:.0f} s")
    assert dense["eval_samples"] == tt["eval_samples"] == 20 * 2048
    assert dense["auc"] > 0.78 and tt["auc"] > 0.78  # both learnt (teacher ceiling ~0.815, untrained ~0.5)
    assert gap <= MAX_RELATIVE_AUC_GAP, (dense, tt)
