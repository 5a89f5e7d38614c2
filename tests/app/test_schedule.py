"""DLRM's learning-rate schedule on TorchRec's WarmupOptimizer (ttdist.schedule.LRSchedule) gives
the rate of the schedule it replaced at every step, on every parameter group, and resumes from
its state_dict."""
import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from ttdist.config import OptimConfig
from ttdist.schedule import LRSchedule


def reference_factor(cfg: OptimConfig, step: int) -> float:
    """The hand-written schedule ttdist.train used before (LearningRateSchedule.factor)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay_steps and step >= cfg.decay_start_step:
        remaining = max(cfg.decay_start_step + cfg.decay_steps - step, 0)
        return max((remaining / cfg.decay_steps) ** 2, 1e-7)
    return 1.0


def two_group_optimizer(tables_lr: float = 0.1, dense_lr: float = 0.05) -> CombinedOptimizer:
    """Like the app's: two optimizers with their own base rates, combined."""
    def keyed(name, lr):
        return KeyedOptimizerWrapper({name: torch.nn.Parameter(torch.ones(3))},
                                     lambda params: torch.optim.SGD(params, lr=lr))

    optimizer = CombinedOptimizer([keyed("tables", tables_lr), keyed("dense", dense_lr)])
    optimizer.init_state()
    return optimizer


CONFIGS = [  # (warmup_steps, decay_start_step, decay_steps, steps to check)
    (10, 20, 30, 70),  # warm-up, constant, decay, floor
    (5, 0, 8, 20),  # decay from step 0, hidden by the warm-up until step 5
    (8, 3, 4, 12),  # the decay ends inside the warm-up: the floor right after it
    (0, 1, 4, 8),
    (1, 0, 0, 5),
    (0, 0, 0, 3),
    (3, 10, 5000, 5020),  # long decay: the last steps sit on the 1e-7 floor
]


@pytest.mark.parametrize("warmup,decay_start,decay,steps", CONFIGS)
def test_warmup_optimizer_gives_the_old_schedules_rate_at_every_step(warmup, decay_start, decay, steps):
    cfg = OptimConfig(warmup_steps=warmup, decay_start_step=decay_start, decay_steps=decay)
    schedule = LRSchedule(two_group_optimizer(), cfg)
    for step in range(steps):
        expected = reference_factor(cfg, step)
        assert schedule.factor == pytest.approx(expected, rel=1e-12, abs=0), step
        assert schedule.factor_at(step) == pytest.approx(expected, rel=1e-12, abs=0), step
        lrs = [g["lr"] for g in schedule.param_groups]
        assert lrs == pytest.approx([0.1 * expected, 0.05 * expected], rel=1e-12, abs=0), step
        schedule.skip_step() if step % 7 == 3 else schedule.step()  # a skipped step counts too


def test_the_schedules_position_is_in_the_state_dict_and_resumes():
    cfg = OptimConfig(warmup_steps=4, decay_start_step=6, decay_steps=10)
    first = LRSchedule(two_group_optimizer(), cfg)
    assert "__warmup" in first.state_dict()["state"]  # in the template of the first checkpoint too
    for _ in range(9):
        first.step()
    saved = first.state_dict()
    again = LRSchedule(two_group_optimizer(), cfg)
    again.load_state_dict(saved)
    assert again.factor == first.factor == pytest.approx(reference_factor(cfg, 9), rel=1e-12)
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in first.param_groups]
