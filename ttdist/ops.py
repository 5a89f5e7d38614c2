"""The ttdist ops (``torch.ops.ttdist.*``): loading, fake impls, autograd, plain-PyTorch references.

Symbols: T tables, F features (feature f reads table ``feature_table_map[f]``), B bags per
feature, N looked-up indices, D_t the dim of table t. A TT table of d cores has core k of layout
``(p_k, r_{k-1}, q_k, r_k)`` with ``r_0 = r_d = 1``; row i has digits (i_1..i_d), row-major over
p (i_1 most significant), column j likewise over q, and
``W[i, j] = G_1[i_1, :, j_1, :] @ ... @ G_d[i_d, :, j_d, :]``.

Every lookup op takes ``indices`` [N] (int64), ``offsets`` [F * B + 1] (fbgemm's TBE layout,
features one after another), optional ``per_sample_weights`` [N] and optional ``table_num_rows``
[T] (the rows an index may name, ``num_embeddings`` <= prod p); it returns [B, sum_f D_t(f)].

Bad index values or offsets: the CPU ops raise before computing (``IndexError`` / ``ValueError``).
The CUDA ops check them on the device without making the host wait, leave the bad entries out
of the result, and raise the same errors later: at the next ttdist op call on that device once
the check has reached the host, or at ``check_errors(device)``, which waits for it (call it where
the caller synchronises anyway, e.g. when it reads the loss). ``sync_checks()`` makes every CUDA
op wait and raise at once (slow; for debugging), as does ``TTDIST_SYNC_CHECKS=1``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

try:
    from ttdist import _C  # noqa: F401  (registers torch.ops.ttdist.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "ttdist's op library ttdist._C is not built. Run `make build` (or "
        "`pip install --no-build-isolation -e .`) from the repository root."
    ) from e

POOLING_SUM = 0
POOLING_MEAN = 1
POOLING_CODES = {"sum": POOLING_SUM, "mean": POOLING_MEAN}


@dataclass(frozen=True)
class LookupSpec:
    """The non-tensor part of a table-batched lookup (see the module docstring)."""

    table_num_cores: tuple[int, ...]
    feature_table_map: tuple[int, ...]
    pooling_modes: tuple[int, ...]
    table_num_rows: Optional[tuple[int, ...]] = None  # rows an index may name per table; None: prod p

    @property
    def num_rows(self) -> Optional[list[int]]:
        return None if self.table_num_rows is None else list(self.table_num_rows)


@dataclass(frozen=True)
class FusedUpdate:
    """An optimizer step applied inside backward (``sparse=True``), as fbgemm's fused TBE does.

    ``optimizer``: 0 SGD, 1 Adagrad, 2 row-wise Adagrad; ``states``: one tensor per core, shaped
    like the core (Adagrad), ``(p_k,)`` (row-wise Adagrad) or empty (SGD).

    ``grad_hook``: for cores that other lookups or other ranks also train (a sharded table's
    replicated cores). Backward then computes the core gradients and passes ``(cores, grads)``
    to the hook instead of updating: the caller reduces them and applies ``apply_updates``.
    """

    optimizer: int
    learning_rate: float
    eps: float
    states: tuple[Tensor, ...]
    grad_hook: Optional[Callable[[Sequence[Tensor], Sequence[Tensor]], None]] = None


def _table_dims(cores: Sequence[Tensor], table_num_cores: Sequence[int]) -> list[int]:
    dims, begin = [], 0
    for d in table_num_cores:
        dim = 1
        for core in cores[begin : begin + d]:
            dim *= core.shape[2]
        dims.append(dim)
        begin += d
    return dims


@torch.library.register_fake("ttdist::tt_prepare")
def _tt_prepare_fake(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, per_sample_weights,
                     table_num_rows=None):
    return indices.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.register_fake("ttdist::tt_forward")
def _tt_forward_fake(cores, table_num_cores, feature_table_map, pooling_modes, indices, offsets, per_sample_weights,
                     table_num_rows=None, prepared=None):
    dims = _table_dims(cores, table_num_cores)
    batch = (offsets.shape[0] - 1) // len(feature_table_map)
    return cores[0].new_empty((batch, sum(dims[t] for t in feature_table_map)))


@torch.library.register_fake("ttdist::tt_backward")
def _tt_backward_fake(grad_output, cores, *args, **kwargs):
    return [torch.empty_like(c) for c in cores]


@torch.library.register_fake("ttdist::tt_backward_fused_")
def _tt_backward_fused_fake(grad_output, cores, optimizer_states, *args, **kwargs):
    return None


@torch.library.register_fake("ttdist::sparse_row_update_")
def _sparse_row_update_fake(weight, optimizer_state, row_ids, row_grads, optimizer, learning_rate, eps):
    return None


@torch.library.register_fake("ttdist::dense_update_")
def _dense_update_fake(weights, optimizer_states, grads, optimizer, learning_rate, eps):
    return None


def check_errors(device: Union[torch.device, str, None] = None) -> None:
    """Waits for the device checks of every earlier CUDA op on ``device`` (default: the current
    CUDA device) and raises the first bad input they found (``IndexError`` / ``ValueError``).
    A no-op for CPU devices, and where CUDA is not available."""
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    torch.ops.ttdist.check_errors(torch.device(device))


@contextlib.contextmanager
def sync_checks(enabled: bool = True) -> Iterator[None]:
    """Within the block every CUDA op waits for its own checks and raises at once."""
    previous = torch.ops.ttdist.set_sync_checks(enabled)
    try:
        yield
    finally:
        torch.ops.ttdist.set_sync_checks(previous)


class _TTLookup(torch.autograd.Function):
    """One autograd function for every device: forward and backward re-dispatch to the ops.

    With ``fused`` set, backward updates the cores in place and returns no core gradient; the
    cores are then read at backward time (not saved), as FBTT and fbgemm's fused TBE do, and
    ``anchor`` (a 0-element tensor requiring grad) makes autograd call backward at all.
    The batch's index plan (``tt_prepare``: indices validated, sorted, grouped by unique row) is
    made once here and kept for backward, which then neither re-sorts nor re-validates.
    """

    @staticmethod
    def forward(ctx, spec: LookupSpec, fused: Optional[FusedUpdate], indices, offsets, per_sample_weights, anchor, *cores):
        ctx.spec, ctx.fused = spec, fused
        args = (spec.table_num_cores, spec.feature_table_map, spec.pooling_modes, indices, offsets, per_sample_weights,
                spec.num_rows)
        prepared = torch.ops.ttdist.tt_prepare(list(cores), *args)
        if fused is None:
            ctx.save_for_backward(indices, offsets, per_sample_weights, prepared, *cores)
        else:
            ctx.inputs, ctx.cores = (indices, offsets, per_sample_weights, prepared), cores
        return torch.ops.ttdist.tt_forward(list(cores), *args, prepared)

    @staticmethod
    def backward(ctx, grad_output):
        spec, fused = ctx.spec, ctx.fused
        grad_output = grad_output.contiguous()
        if fused is None:
            indices, offsets, per_sample_weights, prepared, *cores = ctx.saved_tensors
            grad_weights = (_per_sample_weight_grad(grad_output, cores, spec, indices, offsets)
                            if ctx.needs_input_grad[4] else None)
            grads = torch.ops.ttdist.tt_backward(
                grad_output, cores, spec.table_num_cores, spec.feature_table_map, spec.pooling_modes,
                indices, offsets, per_sample_weights, spec.num_rows, prepared,
            )
            return (None,) * 4 + (grad_weights, None) + tuple(grads)
        indices, offsets, per_sample_weights, prepared = ctx.inputs
        # before the cores move: the weights' gradient is taken at the cores the forward used
        grad_weights = (_per_sample_weight_grad(grad_output, list(ctx.cores), spec, indices, offsets)
                        if ctx.needs_input_grad[4] else None)
        none_after = (None,) * (1 + len(ctx.cores))
        if fused.grad_hook is not None:
            grads = torch.ops.ttdist.tt_backward(
                grad_output, list(ctx.cores), spec.table_num_cores, spec.feature_table_map, spec.pooling_modes,
                indices, offsets, per_sample_weights, spec.num_rows, prepared,
            )
            fused.grad_hook(ctx.cores, grads)
            return (None,) * 4 + (grad_weights,) + none_after
        torch.ops.ttdist.tt_backward_fused_(
            grad_output, list(ctx.cores), list(fused.states), spec.table_num_cores, spec.feature_table_map,
            spec.pooling_modes, indices, offsets, per_sample_weights, fused.optimizer, fused.learning_rate, fused.eps,
            spec.num_rows, prepared,
        )
        return (None,) * 4 + (grad_weights,) + none_after


def _per_sample_weight_grad(grad_output: Tensor, cores: Sequence[Tensor], spec: LookupSpec, indices: Tensor,
                            offsets: Tensor) -> Tensor:
    """d loss / d per_sample_weights [N], as nn.EmbeddingBag gives it: for index i of feature f in
    bag b, ``<grad_output[b, columns of f], row indices[i] of f's table>`` (times 1 / bag length
    for a mean-pooled feature, where the op is called with weights directly).

    The rows come from ``tt_forward`` with one bag per index, one call per feature that has
    indices (the feature boundaries are read on the host once); plain torch otherwise, so it runs
    wherever the ops do. The pooled forward never materialises these rows, so this costs one extra
    lookup of the batch's rows, only when the weights require grad."""
    num_features = len(spec.feature_table_map)
    batch = (offsets.numel() - 1) // num_features
    dims = _table_dims(cores, spec.table_num_cores)
    scale = bag_scales(offsets, spec.pooling_modes, indices.numel(), None, grad_output.dtype)
    grad = torch.zeros(indices.numel(), dtype=grad_output.dtype, device=grad_output.device)
    bounds = offsets[torch.arange(num_features + 1, device=offsets.device) * batch].tolist()
    column = 0
    for f, t in enumerate(spec.feature_table_map):
        lo, hi, dim = bounds[f], bounds[f + 1], dims[t]
        if hi > lo and batch > 0:
            lengths = offsets[f * batch + 1 : (f + 1) * batch + 1] - offsets[f * batch : (f + 1) * batch]
            bag_of = torch.arange(batch, device=offsets.device).repeat_interleave(lengths, output_size=hi - lo)
            one_per_bag = torch.arange(hi - lo + 1, device=offsets.device)
            rows = torch.ops.ttdist.tt_forward(list(cores), spec.table_num_cores, [t], [POOLING_SUM],
                                               indices[lo:hi], one_per_bag, None, spec.num_rows)
            grad[lo:hi] = (grad_output[bag_of, column : column + dim] * rows.to(grad_output.dtype)).sum(1) * scale[lo:hi]
        column += dim
    return grad


@torch.no_grad()
def apply_updates(cores: Sequence[Tensor], states: Sequence[Tensor], grads: Sequence[Tensor], optimizer: int,
                  learning_rate: float, eps: float) -> None:
    """One fused-optimizer step on whole cores from their gradients (each shaped like its core,
    ``(p_k, r_{k-1}, q_k, r_k)``): on CPU one ``ttdist::dense_update_`` call, elsewhere torch ops,
    which need no host synchronisation (``sparse_row_update_`` on CUDA checks its row ids first).

    Slices whose gradient is zero are left unchanged by every fused optimizer (SGD, Adagrad and
    row-wise Adagrad add nothing to their state and move nothing), so updating every slice gives
    exactly the sparse update of the touched slices, without searching for them.
    """
    if cores and cores[0].device.type == "cpu":
        torch.ops.ttdist.dense_update_.default([c.data for c in cores], list(states), list(grads), optimizer,
                                               learning_rate, eps)
    else:
        dense_update_with_torch_ops(cores, states, grads, optimizer, learning_rate, eps)


def dense_update_with_torch_ops(cores: Sequence[Tensor], states: Sequence[Tensor], grads: Sequence[Tensor],
                                optimizer: int, learning_rate: float, eps: float) -> None:
    """``apply_updates`` in torch ops, the fused kernels' arithmetic (in the state's dtype, fp32 for
    bf16 cores): SGD ``w -= lr g``; Adagrad ``s += g^2, w -= lr g / (sqrt(s) + eps)``; row-wise
    Adagrad per slice ``s += mean(g^2), w -= lr g / (sqrt(s) + eps)``."""
    for core, state, grad in zip(cores, states, grads):
        weight = core.data.view(core.shape[0], -1)
        g = grad.reshape(weight.shape).to(state.dtype)
        w = weight.to(state.dtype)  # the weight itself unless it is bf16
        if optimizer == 0:
            w.sub_(g, alpha=learning_rate)
        elif optimizer == 1:
            s = state.view(weight.shape)
            s.addcmul_(g, g)
            w.addcdiv_(g, s.sqrt().add_(eps), value=-learning_rate)
        else:
            state.add_(g.square().mean(1))
            w.sub_(g * (learning_rate / (state.sqrt() + eps)).unsqueeze(1))
        if w is not weight:
            weight.copy_(w)


def tt_lookup(
    cores: Sequence[Tensor],
    spec: LookupSpec,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor] = None,
    fused: Optional[FusedUpdate] = None,
    anchor: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable table-batched TT lookup -> [B, sum_f D_t(f)] (inputs already validated)."""
    return _TTLookup.apply(spec, fused, indices, offsets, per_sample_weights, anchor, *cores)


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch references: the ground truth every kernel test compares against.
# ----------------------------------------------------------------------------------------------


def row_digits(rows: Tensor, p_shapes: Sequence[int]) -> list[Tensor]:
    """Mixed-radix digits (i_1..i_d) of ``rows`` over ``p_shapes``, i_1 most significant."""
    digits, rest = [], rows
    for p in reversed(p_shapes):
        digits.append(rest % p)
        rest = torch.div(rest, p, rounding_mode="floor")
    return digits[::-1]


def tt_rows_reference(cores: Sequence[Tensor], rows: Tensor) -> Tensor:
    """Rows ``rows`` [n] of one TT table -> [n, D], by gathering core slices (differentiable)."""
    digits = row_digits(rows.long(), [c.shape[0] for c in cores])
    n = rows.numel()
    prefix = cores[0][digits[0]].reshape(n, cores[0].shape[2], cores[0].shape[3])  # (n, q_1, r_1)
    for core, digit in zip(cores[1:], digits[1:]):
        p, r_in, q, r_out = core.shape
        prefix = torch.bmm(prefix, core[digit].reshape(n, r_in, q * r_out)).reshape(n, prefix.shape[1] * q, r_out)
    return prefix.reshape(n, prefix.shape[1] * prefix.shape[2])


def tt_full_reference(cores: Sequence[Tensor]) -> Tensor:
    """The whole table [prod p, prod q] by contracting full cores (tests and export only)."""
    full = cores[0].permute(0, 2, 1, 3).reshape(cores[0].shape[0], cores[0].shape[2], -1)  # (P, Q, r)
    for core in cores[1:]:
        p, r_in, q, r_out = core.shape
        P, Q, _ = full.shape
        step = torch.einsum("abr,crds->acbds", full, core)  # (P, p, Q, q, r_out)
        full = step.reshape(P * p, Q * q, r_out)
    return full.squeeze(-1)


def bag_scales(offsets: Tensor, pooling_modes: Sequence[int], num_indices: int,
               per_sample_weights: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Per-position pooling factor [N]: per-sample weight, divided by the bag length for mean bags."""
    lengths = offsets[1:] - offsets[:-1]
    num_features = len(pooling_modes)
    batch = lengths.numel() // num_features
    is_mean = torch.tensor(pooling_modes, dtype=torch.bool, device=offsets.device).repeat_interleave(batch)
    per_bag = torch.where(is_mean & (lengths > 0), 1.0 / lengths.clamp(min=1).to(dtype), torch.ones((), dtype=dtype, device=offsets.device))
    scale = per_bag.repeat_interleave(lengths, output_size=num_indices)
    return scale if per_sample_weights is None else scale * per_sample_weights.to(dtype)


def tt_forward_reference(
    cores: Sequence[Tensor],
    spec: LookupSpec,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor] = None,
) -> Tensor:
    """Reference of ``ttdist::tt_forward`` (differentiable; autograd of it is the backward reference)."""
    num_features = len(spec.feature_table_map)
    batch = (offsets.numel() - 1) // num_features
    scale = bag_scales(offsets, spec.pooling_modes, indices.numel(), per_sample_weights, cores[0].dtype)
    begins = [sum(spec.table_num_cores[:t]) for t in range(len(spec.table_num_cores))]
    outputs = []
    for f, t in enumerate(spec.feature_table_map):
        table = list(cores[begins[t] : begins[t] + spec.table_num_cores[t]])
        lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
        lengths = offsets[f * batch + 1 : (f + 1) * batch + 1] - offsets[f * batch : (f + 1) * batch]
        bag_of = torch.arange(batch, device=offsets.device).repeat_interleave(lengths, output_size=hi - lo)
        rows = tt_rows_reference(table, indices[lo:hi]) * scale[lo:hi, None]
        dim = 1
        for core in table:
            dim *= core.shape[2]
        outputs.append(torch.zeros(batch, dim, dtype=cores[0].dtype, device=cores[0].device).index_add(0, bag_of, rows))
    return torch.cat(outputs, dim=1)


def sparse_row_update_reference(weight: Tensor, state: Tensor, row_ids: Tensor, row_grads: Tensor,
                                optimizer: int, learning_rate: float, eps: float) -> None:
    """Reference of ``ttdist::sparse_row_update_`` on a 2-D ``weight`` (updates in place)."""
    g = row_grads.to(state.dtype if state.numel() else weight.dtype)
    if optimizer == 0:
        weight[row_ids] -= learning_rate * g.to(weight.dtype)
    elif optimizer == 1:
        state2 = state.view(weight.shape)
        state2[row_ids] += g * g
        weight[row_ids] -= (learning_rate * g / (state2[row_ids].sqrt() + eps)).to(weight.dtype)
    else:
        state[row_ids] += (g * g).mean(dim=1)
        weight[row_ids] -= (learning_rate * g / (state[row_ids].sqrt() + eps)[:, None]).to(weight.dtype)
