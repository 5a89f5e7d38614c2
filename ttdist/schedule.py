"""DLRM's learning-rate schedule on TorchRec's ``WarmupOptimizer``.

The rate of step s (0-based) is each parameter group's own base rate times

    (s + 1) / W                                   for s < W                 (linear warm-up)
    max(((D + S - s) / S) ** 2, 1e-7)             for s >= D, when S > 0    (poly decay, power 2)
    1                                             otherwise

with W = ``optim.warmup_steps``, D = ``optim.decay_start_step``, S = ``optim.decay_steps``.
``dlrm_stages`` writes it as WarmupStages (LINEAR, CONSTANT, POLY, CONSTANT floor); ``LRSchedule``
wraps the app's CombinedOptimizer in a WarmupOptimizer that keeps each group's base rate and puts
its step count (the ``__warmup`` key) in the optimizer's state_dict, so checkpoints resume it.
"""
from __future__ import annotations

import math
import types

import torch
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage, _get_multiplier

from ttdist.config import OptimConfig

FLOOR = 1e-7  # the decayed rate never reaches 0
FOREVER = (1 << 63) - 1


def dlrm_stages(cfg: OptimConfig) -> list[WarmupStage]:
    """The schedule above as WarmupStages. A stage covers the iterations up to its ``max_iters``
    inclusive, and its multiplier is a function of the global iteration."""
    w, d, s = cfg.warmup_steps, cfg.decay_start_step, cfg.decay_steps
    stages = []
    if w > 1:  # 1/W + (1 - 1/W) * it / (W - 1) = (it + 1) / W
        stages.append(WarmupStage(WarmupPolicy.LINEAR, max_iters=w - 1, value=1 / w))
    if s > 0:
        # constant 1 up to D (the decay's value at D is 1 too)
        stages.append(WarmupStage(WarmupPolicy.CONSTANT, max_iters=d, value=1.0))
        # (1 - it / (D + S)) ** 2 * ((D + S) / S) ** 2 = ((D + S - it) / S) ** 2, while above the floor
        left = max(1, math.ceil(s * math.sqrt(FLOOR)) - 1)  # the fewest steps left before D + S
        while (left / s) ** 2 < FLOOR:  # at which the decay is still >= FLOOR (a step or two)
            left += 1
        stages.append(WarmupStage(WarmupPolicy.POLY, max_iters=d + s - left, value=2.0, decay_iters=d + s,
                                  lr_scale=((d + s) / s) ** 2))
        stages.append(WarmupStage(WarmupPolicy.CONSTANT, max_iters=FOREVER, value=FLOOR))
    kept, end = [], 0  # a stage that ends before the previous one is hidden by it (warm-up comes first)
    for stage in stages:
        if stage.max_iters > end:
            kept.append(stage)
            end = stage.max_iters
    return kept


class LRSchedule(WarmupOptimizer):
    """``WarmupOptimizer`` with three changes: each parameter group keeps its own base rate (the
    tables' ``embedding_lr``, the MLPs' ``dense_lr``); the step count is in the state from the
    start (so the first checkpoint has it); and it is saved and loaded through this wrapper,
    because a CombinedOptimizer's ``params``/``state`` are copies that would drop it."""

    def __init__(self, optimizer: KeyedOptimizer, cfg: OptimConfig) -> None:
        self._base = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, dlrm_stages(cfg), lr=1.0)
        self.defaults["_save_param_groups"] = optimizer.defaults.get("_save_param_groups", False)
        self.state[self._warmup_param] = {"warmup": torch.tensor([0, 0], dtype=torch.long)}

    def _set_lr(self, iter_: int, stage_id: int) -> None:
        scale = _get_multiplier(self._stages[stage_id], iter_)
        for group, base in zip(self.param_groups, self._base):
            group[self._lr_param] = base * scale

    @property
    def factor(self) -> float:
        """The multiplier of the base rates for the next step."""
        iter_, stage_id = self._get_warmup_state()
        return _get_multiplier(self._stages[stage_id], iter_)

    def factor_at(self, step: int) -> float:
        """The multiplier at 0-based step ``step``, as ``step`` optimizer steps reach it."""
        return _get_multiplier(next(st for st in self._stages if step <= st.max_iters), step)

    def skip_step(self) -> None:
        """Moves the schedule on by a step without updating anything (a step skipped under
        ``train.nonfinite=skip``: the rate follows the step count, as the data does)."""
        optimizer, self._optimizer = self._optimizer, types.SimpleNamespace(step=lambda closure=None: None)
        try:
            self.step()
        finally:
            self._optimizer = optimizer

    state_dict = KeyedOptimizer.state_dict
    load_state_dict = KeyedOptimizer.load_state_dict

    def post_load_state_dict(self) -> None:
        self._optimizer.post_load_state_dict()
        super().post_load_state_dict()
