"""Validation and normalisation of lookup inputs, before any core is read.

Accepts nn.EmbeddingBag's bag layouts per feature block: ``offsets`` of F * B entries (bag
starts) or, with ``include_last_offset``, F * B + 1 entries; returns the F * B + 1 form.
Types, shapes and devices are checked here for every device. Index and offset *values* are
checked by the ops themselves before any core is read: on CPU by ``tt_prepare``'s plan builder,
after which a caller that wants the table's name in the message re-runs this function with
``check_values=True`` (errors name the table, the offending value and the valid range); on
CUDA on the device, so that a lookup never makes the host wait for the GPU (see
``ttdist.ops``: such errors surface at the next op call or at ``ttdist.ops.check_errors``,
naming the table by its index).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def normalize_lookup_inputs(
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Optional[Tensor],
    feature_names: Sequence[str],
    feature_num_embeddings: Sequence[int],
    include_last_offset: bool,
    dtype: torch.dtype,
    device: Optional[torch.device] = None,
    check_values: bool = True,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Checks and returns (indices int64 [N], offsets int64 [F * B + 1], weights [N] or None).

    ``device``: where the tables live; inputs elsewhere are rejected (ValueError).
    ``check_values``: also check index and offset values of CPU tensors here (O(N) tensor ops);
    False leaves them to the op, which checks them anyway.
    """
    for name, t in (("indices", indices), ("offsets", offsets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if indices.device != offsets.device:
        raise ValueError(f"indices ({indices.device}) and offsets ({offsets.device}) must be on the same device")
    if device is not None and indices.device != torch.device(device):
        raise ValueError(f"indices and offsets are on {indices.device} but the tables are on {torch.device(device)}; "
                         "move the inputs to the tables' device")
    if per_sample_weights is not None and isinstance(per_sample_weights, Tensor) \
            and per_sample_weights.device != indices.device:
        raise ValueError(f"per_sample_weights are on {per_sample_weights.device} but indices on {indices.device}")
    indices, offsets = indices.long(), offsets.long()
    num_features, n = len(feature_names), indices.numel()
    check_values = check_values and not indices.is_cuda  # CUDA: the ops check values on the device (no host sync)
    if include_last_offset:
        if offsets.numel() < 1 or (offsets.numel() - 1) % num_features:
            raise ValueError(f"with include_last_offset=True, offsets must have F * B + 1 entries (F = {num_features}), got {offsets.numel()}")
        if check_values and offsets.numel() and int(offsets[-1]) != n:
            raise ValueError(f"the last offset ({int(offsets[-1])}) must equal the number of indices ({n})")
    else:
        if offsets.numel() % num_features:
            raise ValueError(f"offsets must have F * B entries (F = {num_features}), got {offsets.numel()}")
        offsets = torch.cat([offsets, offsets.new_full((1,), n)])
    if per_sample_weights is not None:
        if not isinstance(per_sample_weights, Tensor) or not per_sample_weights.is_floating_point():
            raise TypeError("per_sample_weights must be a floating-point tensor")
        if per_sample_weights.shape != indices.shape:
            raise ValueError(f"per_sample_weights has shape {tuple(per_sample_weights.shape)}, indices {tuple(indices.shape)}: they must match")
        per_sample_weights = per_sample_weights.to(dtype).contiguous()
    if not check_values:
        return indices.contiguous(), offsets.contiguous(), per_sample_weights
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    steps = offsets[1:] - offsets[:-1]
    if offsets.numel() > 1 and bool((steps < 0).any()):
        bad = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"offsets must be non-decreasing: offsets[{bad + 1}] = {int(offsets[bad + 1])} < offsets[{bad}] = {int(offsets[bad])}")
    if int(offsets.max()) > n:
        bad = int(torch.nonzero(offsets > n)[0])
        raise ValueError(f"offsets[{bad}] = {int(offsets[bad])} exceeds the number of indices ({n})")
    batch = (offsets.numel() - 1) // num_features
    for f, (name, rows) in enumerate(zip(feature_names, feature_num_embeddings)):
        seg = indices[int(offsets[f * batch]) : int(offsets[(f + 1) * batch])]
        bad_mask = (seg < 0) | (seg >= rows)
        if seg.numel() and bool(bad_mask.any()):
            pos = int(torch.nonzero(bad_mask)[0])
            raise IndexError(f"table '{name}': index {int(seg[pos])} at position {int(offsets[f * batch]) + pos} "
                             f"is out of range [0, {rows})")
    return indices.contiguous(), offsets.contiguous(), per_sample_weights
