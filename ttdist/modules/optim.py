"""Optimizers fused into the TT backward, named as in FBTT-Embedding and fbgemm (``EmbOptimType``)."""
from __future__ import annotations

import enum
from typing import Union

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
