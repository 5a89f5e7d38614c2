"""Optimizers fused into the TT backward, named as in FBTT-Embedding and fbgemm (``EmbOptimType``),
and ``TableOptimizer``: their update for whole tables that train as plain parameters."""
from __future__ import annotations

import enum
from typing import Any, Callable, Optional, Sequence, Union

import torch


@enum.unique
class OptimType(enum.Enum):
    """Fused optimizer of a TT table; values equal fbgemm's ``EmbOptimType`` values."""

    SGD = "sgd"  # exact: duplicates are summed first, so SGD and EXACT_SGD are the same update
    EXACT_SGD = "exact_sgd"
    EXACT_ADAGRAD = "exact_adagrad"  # element-wise state, shaped like each core
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"  # one state per core slice G_k[i_k]

    @property
    def code(self) -> int:
        """The integer the ops take: 0 SGD, 1 Adagrad, 2 row-wise Adagrad."""
        return {"sgd": 0, "exact_sgd": 0, "exact_adagrad": 1, "exact_row_wise_adagrad": 2}[self.value]

    @classmethod
    def parse(cls, value: Union["OptimType", str, enum.Enum]) -> "OptimType":
        """Accepts an OptimType, fbgemm's EmbOptimType (by value) or its string value."""
        raw = value.value if isinstance(value, enum.Enum) else str(value)
        try:
            return cls(raw)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unsupported TT optimizer {value!r}; valid: {valid}") from None


def optimizer_state_like(weight: torch.Tensor, optimizer: OptimType) -> torch.Tensor:
    """Zero state for ``weight`` viewed as (rows, -1): element-wise, per row, or empty for SGD."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if optimizer.code == 1:
        return torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if optimizer.code == 2:
        return torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    return torch.zeros(0, dtype=dtype, device=weight.device)


class TableOptimizer(torch.optim.Optimizer):
    """The fused optimizers' update (``ttdist.ops.apply_updates``: fbgemm's exact SGD, Adagrad,
    row-wise Adagrad) for embedding tables that train as plain parameters: TorchRec's
    data-parallel tables, whose dense gradient DDP averages over the ranks.

    ``tables``: (table name, weight [rows, dim]) pairs. The state of table ``t`` is
    ``{"t.momentum1": ...}``, named and shaped as fbgemm's fused optimizer names it (row-wise
    Adagrad [rows], Adagrad [rows, dim], SGD none), so a checkpoint taken with the table sharded
    loads with it data-parallel and back (DCP matches the key and reshards). A row whose gradient
    is zero is left unchanged, as the fused (sparse) update leaves an unread row.
    """

    def __init__(self, tables: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Union[OptimType, str],
                 lr: float, eps: float) -> None:
        super().__init__([weight for _, weight in tables], {"lr": lr, "eps": eps})
        self.optimizer = OptimType.parse(optimizer)
        for name, weight in tables:
            if self.optimizer.code != 0:  # SGD keeps none
                self.state[weight] = {f"{name}.momentum1": optimizer_state_like(weight, self.optimizer)}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        from ttdist.ops import apply_updates

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weights = [w for w in group["params"] if w.grad is not None]
            if weights:
                states = [next(iter(self.state[w].values())) if self.state[w] else optimizer_state_like(w, self.optimizer)
                          for w in weights]
                apply_updates(weights, states, [w.grad for w in weights], self.optimizer.code, group["lr"], group["eps"])
        return loss
