"""Initialisation of TT cores (vectorised; FBTT's names).

``approx-normal`` / ``approx-uniform`` pick one scale per core so that entries of the *full*
table have variance ``1 / (3 N)`` — the variance of TorchRec's default EmbeddingBag init
``U(-1/sqrt(N), 1/sqrt(N))``. An entry is a sum over ``prod(r_1..r_{d-1})`` rank paths of a
product of d independent core entries, so with i.i.d. zero-mean core entries of variance s^2,
``Var W = s^(2d) * prod(r_1..r_{d-1})`` and ``s^2 = (1 / (3 N prod r)) ** (1 / d)``. The
other three names keep FBTT-Embedding's per-core formulas for compatibility.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ttdist.modules.tt_shapes import TTShape

WEIGHT_DISTS = ("uniform", "naive-uniform", "normal", "approx-uniform", "approx-normal")


def target_table_std(num_embeddings: int) -> float:
    """Std of TorchRec's default EmbeddingBag init, the target of the approx-* inits."""
    return 1.0 / math.sqrt(3.0 * num_embeddings)


def init_tt_cores(
    shape: TTShape, weight_dist: str, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """New cores ``(p_k, r_{k-1}, q_k, r_k)`` drawn on the CPU from ``generator``."""
    if weight_dist not in WEIGHT_DISTS:
        raise ValueError(f"weight_dist must be one of {WEIGHT_DISTS}, got {weight_dist!r}")
    n, d = shape.num_embeddings, shape.d
    inner = math.prod(shape.ranks[1:-1])
    cores = [torch.empty(s, dtype=torch.float64) for s in shape.core_shapes]
    for core in cores:
        if weight_dist in ("approx-normal", "approx-uniform"):
            std = (target_table_std(n) ** 2 / inner) ** (1.0 / (2 * d))
            if weight_dist == "approx-normal":
                core.normal_(0.0, std, generator=generator)
            else:
                bound = std * math.sqrt(3.0)
                core.uniform_(-bound, bound, generator=generator)
        elif weight_dist == "uniform":  # FBTT: Glorot-like scale split across cores, positive entries
            std = math.sqrt(2.0 / (n + shape.embedding_dim))
            core.uniform_(0.0, std ** (1.0 / d) * inner ** (-1.0 / (2 * d)), generator=generator)
        elif weight_dist == "naive-uniform":
            core.uniform_(0.0, 1.0 / math.sqrt(n), generator=generator)
        else:  # "normal"
            core.normal_(0.0, 1.0 / math.sqrt(n), generator=generator)
    return [c.to(dtype) for c in cores]


def table_generator(seed: int, table_name: str) -> torch.Generator:
    """A generator that depends only on (seed, table name): same cores on any world size or plan."""
    import zlib

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(table_name.encode())) % (2**63))


def tt_svd(weight: torch.Tensor, shape: TTShape) -> list[torch.Tensor]:
    """TT-SVD of a dense table ``weight`` [N, D] into cores of ``shape`` (ranks truncated).

    Rows are zero-padded to ``prod(p)``; the table is reshaped to the tensor with modes
    ``(p_1 q_1, ..., p_d q_d)`` and split core by core with truncated SVDs (in float64).
    Exact when the table has TT ranks <= ``shape.ranks``; otherwise the best rank-limited
    split of each unfolding (quasi-optimal, Oseledets 2011).
    """
    n, dim = weight.shape
    if n != shape.num_embeddings or dim != shape.embedding_dim:
        raise ValueError(f"weight is {tuple(weight.shape)} but the TT shape is ({shape.num_embeddings}, {shape.embedding_dim})")
    d = shape.d
    full = torch.zeros(math.prod(shape.p), dim, dtype=torch.float64)
    full[:n] = weight.detach().to("cpu", torch.float64)
    tensor = full.reshape(*shape.p, *shape.q)
    tensor = tensor.permute(*[x for k in range(d) for x in (k, d + k)])  # (p_1, q_1, ..., p_d, q_d)
    cores, rest, r_prev = [], tensor.reshape(-1), 1
    for k in range(d - 1):
        rest = rest.reshape(r_prev * shape.p[k] * shape.q[k], -1)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(shape.ranks[k + 1], s.numel())
        core = torch.zeros(r_prev * shape.p[k] * shape.q[k], shape.ranks[k + 1], dtype=torch.float64)
        core[:, :r] = u[:, :r]
        cores.append(core.reshape(r_prev, shape.p[k], shape.q[k], -1).permute(1, 0, 2, 3))
        rest = torch.zeros(shape.ranks[k + 1], vh.shape[1], dtype=torch.float64)
        rest[:r] = s[:r, None] * vh[:r]
        r_prev = shape.ranks[k + 1]
    cores.append(rest.reshape(r_prev, shape.p[-1], shape.q[-1], 1).permute(1, 0, 2, 3))
    return [c.contiguous().to(weight.dtype) for c in cores]
