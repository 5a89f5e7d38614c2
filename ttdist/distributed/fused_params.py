"""The fused optimizer of a TT collection, as TorchRec users set it.

Two ways, as for TorchRec's own tables:
* ``fused_params`` of the sharder: ``{"optimizer": EmbOptimType/OptimType/str, "learning_rate",
  "eps"}``;
* ``torch.distributed.optim._apply_optimizer_in_backward`` / TorchRec's
  ``apply_optimizer_in_backward(cls, params, kwargs)`` on the collection's parameters, which
  tags each parameter with ``_optimizer_classes`` and ``_optimizer_kwargs``. ``torch.optim.SGD``,
  ``torch.optim.Adagrad`` and ``torchrec.optim`` SGD / Adagrad / RowWiseAdagrad map to
  EXACT_SGD / EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD (TorchRec's own mapping); ``lr`` and
  ``eps`` carry over.

Anything the TT kernels cannot do (another optimizer class, weight decay, momentum, ...) raises
naming the table and the option; so does a ``fused_params`` that disagrees with the optimizer
attached to the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from torch import nn
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type

from ttdist.modules.optim import OptimType

DEFAULT_LEARNING_RATE = 0.01
DEFAULT_EPS = 1e-10
# Optimizer kwargs whose value the fused TT update realises (or that change nothing) -> their neutral values.
_NEUTRAL_KWARGS = {"weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "lr_decay": 0.0,
                   "initial_accumulator_value": 0.0, "maximize": False, "foreach": None, "differentiable": False,
                   "fused": None}


@dataclass(frozen=True)
class TTFusedParams:
    """The resolved fused optimizer of one TT collection."""

    optimizer: OptimType
    learning_rate: float
    eps: float


def _from_fused_params(fused_params: Mapping[str, Any]) -> TTFusedParams:
    unknown = sorted(set(fused_params) - {"optimizer", "learning_rate", "eps"})
    if unknown:
        raise ValueError(f"fused_params {unknown} are not supported by TT tables (supported: optimizer, "
                         "learning_rate, eps)")
    return TTFusedParams(OptimType.parse(fused_params.get("optimizer", OptimType.EXACT_SGD)),
                         float(fused_params.get("learning_rate", DEFAULT_LEARNING_RATE)),
                         float(fused_params.get("eps", DEFAULT_EPS)))


def _from_in_backward(table: str, optimizer_class: type, kwargs: Mapping[str, Any]) -> TTFusedParams:
    try:
        optimizer = OptimType.parse(optimizer_type_to_emb_opt_type(optimizer_class))
    except ValueError:
        raise ValueError(f"table '{table}': apply_optimizer_in_backward({optimizer_class.__module__}."
                         f"{optimizer_class.__name__}) has no fused TT kernel; use torch.optim.SGD, "
                         "torch.optim.Adagrad or torchrec.optim.RowWiseAdagrad") from None
    for key, value in kwargs.items():
        if key in ("lr", "eps"):
            continue
        if key not in _NEUTRAL_KWARGS:
            raise ValueError(f"table '{table}': optimizer argument {key}={value!r} of {optimizer_class.__name__} "
                             "is not supported by the fused TT update (supported: lr, eps)")
        if value != _NEUTRAL_KWARGS[key]:
            raise ValueError(f"table '{table}': {optimizer_class.__name__}({key}={value!r}) is not supported by "
                             f"the fused TT update; leave {key} at {_NEUTRAL_KWARGS[key]!r}")
    return TTFusedParams(optimizer, float(kwargs.get("lr", DEFAULT_LEARNING_RATE)), float(kwargs.get("eps", DEFAULT_EPS)))


def resolve_fused_params(tables: Iterable[tuple[str, Iterable[nn.Parameter]]],
                         fused_params: Optional[Mapping[str, Any]]) -> TTFusedParams:
    """The fused optimizer of a collection from the sharder's ``fused_params`` and what
    ``apply_optimizer_in_backward`` attached to the parameters of each table (``tables``:
    (table name, its parameters)). Without either: EXACT_SGD at lr 0.01 (TorchRec's default)."""
    attached: dict[str, TTFusedParams] = {}
    for table, params in tables:
        for param in params:
            classes = getattr(param, "_optimizer_classes", [None])
            if not classes or classes[0] is None:
                continue
            if len(classes) != 1:
                raise ValueError(f"table '{table}': {len(classes)} optimizers were applied in backward; a TT "
                                 "table takes one")
            found = _from_in_backward(table, classes[0], getattr(param, "_optimizer_kwargs", [{}])[0])
            if attached.setdefault(table, found) != found:
                raise ValueError(f"table '{table}': its cores were given different in-backward optimizers "
                                 f"({attached[table]} and {found})")
    given = _from_fused_params(fused_params) if fused_params is not None else None
    distinct = set(attached.values())
    if len(distinct) > 1:
        raise ValueError("the TT tables of one collection must share one fused optimizer; "
                         f"apply_optimizer_in_backward gave {dict(sorted(attached.items()))}")
    if not distinct:
        return given or TTFusedParams(OptimType.EXACT_SGD, DEFAULT_LEARNING_RATE, DEFAULT_EPS)
    found = distinct.pop()
    if given is not None and given != found:
        raise ValueError(f"the sharder's fused_params {given} disagree with the optimizer that "
                         f"apply_optimizer_in_backward attached to the TT tables {found}; set one of them")
    return found
