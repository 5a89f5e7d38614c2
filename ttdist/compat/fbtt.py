"""FBTT-Embedding's Python API on ttdist's kernels: switch by changing the import.

    from tt_embeddings_ops import OptimType, TTEmbeddingBag, ...        # FBTT-Embedding
    from ttdist.compat.fbtt import OptimType, TTEmbeddingBag, ...       # the same, on ttdist

Names, defaults, positional order, layouts and outputs are FBTT's (facebookresearch/FBTT-Embedding,
``tt_embeddings_ops.py``):

- ``TableBatchedTTEmbeddingBag(num_tables, num_embeddings, embedding_dim, tt_ranks, tt_p_shapes=None,
  tt_q_shapes=None, optimizer=OptimType.SGD, learning_rate=0.1, eps=1e-10, sparse=True,
  use_cache=False, cache_size=0, hashtbl_size=0, weight_dist="approx-normal",
  enforce_embedding_dim=False)``; ``TTEmbeddingBag`` the same for one table, with ``use_cache=True``.
- ``tt_cores[k]`` is one parameter per core position, ``(num_tables, p_k, r_k * q_k * r_{k+1})``;
  each table's slice viewed as ``(p_k, r_k, q_k, r_{k+1})`` is exactly a ttdist core, so the ops
  run on views of it and gradients and in-place updates land in it. ``optimizer_state[k]`` is
  shaped like ``tt_cores[k]`` (Adagrad) or empty (SGD); ``tt_ranks`` holds ``[1, *ranks, 1]``.
- ``forward(indices, offsets, warmup=True)``: ``offsets`` has ``num_tables * B + 1`` entries (FBTT
  always passes the last offset); sum pooling; the output is ``(num_tables, B, D)`` (``TTEmbeddingBag``:
  ``(B, D)``). ``warmup`` is accepted and ignored, as in FBTT.
- ``sparse=True`` fuses the optimizer into backward. ``OptimType.SGD`` / ``EXACT_SGD``: SGD;
  ``EXACT_ADAGRAD``: element-wise Adagrad; ``EXACT_ROWWISE_ADAGRAD``: element-wise Adagrad too, which
  is what FBTT runs for it (ttdist's own ``TTEmbeddingBag`` has a true row-wise Adagrad). FBTT
  silently runs Adagrad for ``LAMB``, ``ADAM``, ``LARS_SGD`` and the ``PARTIAL_*`` optimizers; here
  they raise ``ValueError``.
- ``tt_matrix_to_full``, ``full_weight()``, ``cache_populate()``, ``update_cache(indices)``,
  ``reset_cache()``, ``set_learning_rate``, ``get_params``.

Beyond FBTT: runs on CPU as well as CUDA (modules are created on the default device; ``.to()``
moves them), d >= 2 cores without FBTT's limit of 4, any embedding dim. Differences: when
``tt_p_shapes`` / ``tt_q_shapes`` are omitted, ttdist's factorisation picks them (FBTT's needs
scipy and sympy and may round the dim up); ``approx-normal`` / ``approx-uniform`` use ttdist's
variance-matched inits (``ttdist.modules.tt_init``); the cache is ttdist's (trained cached rows are
folded back into the cores at ``cache_populate()``; FBTT overwrites them), so its buffers are not
FBTT's ``hashtbl`` / ``cache_state``.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ttdist.modules.optim import OptimType as TTOptimType
from ttdist.modules.optim import optimizer_state_like
from ttdist.modules.tt_embedding_bag import TableBatchedTTEmbeddingBag as _TTTableBatched
from ttdist.modules.tt_init import init_tt_cores
from ttdist.ops import tt_full_reference

__all__ = ["OptimType", "TableBatchedTTEmbeddingBag", "TTEmbeddingBag", "tt_matrix_to_full"]


@enum.unique
class OptimType(enum.Enum):
    """FBTT-Embedding's optimizer names and values."""

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    LAMB = "lamb"
    ADAM = "adam"
    EXACT_ADAGRAD = "exact_adagrad"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"
    LARS_SGD = "lars_sgd"
    PARTIAL_ROWWISE_ADAM = "partial_row_wise_adam"
    PARTIAL_ROWWISE_LAMB = "partial_row_wise_lamb"

    def __str__(self) -> str:
        return self.value


# FBTT's fused updates: SGD for the SGDs, element-wise Adagrad for both Adagrads.
_FUSED = {OptimType.SGD: TTOptimType.EXACT_SGD, OptimType.EXACT_SGD: TTOptimType.EXACT_SGD,
          OptimType.EXACT_ADAGRAD: TTOptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD: TTOptimType.EXACT_ADAGRAD}


def _fused_optimizer(optimizer: Any, sparse: bool) -> TTOptimType:
    optimizer = OptimType(optimizer.value if isinstance(optimizer, enum.Enum) else optimizer)
    if optimizer in _FUSED:
        return _FUSED[optimizer]
    if not sparse:  # FBTT ignores the optimizer without sparse=True
        return TTOptimType.EXACT_SGD
    supported = ", ".join(o.name for o in _FUSED)
    raise ValueError(f"OptimType.{optimizer.name} is not supported with sparse=True (FBTT-Embedding runs element-wise "
                     f"Adagrad for it without saying so); supported: {supported}")


def tt_matrix_to_full(tt_p_shapes: list[int], tt_q_shapes: list[int], tt_ranks: list[int], tt_cores: Sequence[Tensor],
                      tt_permute: Optional[list[int]] = None) -> Tensor:
    """The full table ``(prod p, prod q)`` of one TT table, as FBTT's function of the same name.

    ``tt_cores[k]``: FBTT's storage of core k (``(1, p_k, r_k q_k r_{k+1})`` or any shape holding those
    elements), viewed with the sizes of ``(r_k, p_k, q_k, r_{k+1})`` taken in the order ``tt_permute``
    and permuted by ``tt_permute`` (FBTT's steps; FBTT passes ``[1, 0, 2, 3]``: storage
    ``(p_k, r_k, q_k, r_{k+1})``); without it, stored as ``(r_k, p_k, q_k, r_{k+1})``.
    ``tt_ranks``: inner ranks or ``[1, *ranks, 1]``. Differentiable.
    """
    d = len(tt_p_shapes)
    ranks = list(tt_ranks) if len(tt_ranks) == d + 1 else [1, *tt_ranks, 1]
    cores = []
    for k, core in enumerate(tt_cores):
        natural = [ranks[k], tt_p_shapes[k], tt_q_shapes[k], ranks[k + 1]]  # (r, p, q, r')
        if tt_permute is not None:
            core = core.reshape([natural[i] for i in tt_permute]).permute(*tt_permute)
        cores.append(core.reshape(natural).permute(1, 0, 2, 3))  # ttdist's (p, r, q, r')
    return tt_full_reference(cores).float()


class TableBatchedTTEmbeddingBag(_TTTableBatched):
    """FBTT's table-batched TT EmbeddingBag: ``num_tables`` tables of one shape, one op call."""

    def __init__(
        self,
        num_tables: int,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: list[int],
        tt_p_shapes: Optional[list[int]] = None,
        tt_q_shapes: Optional[list[int]] = None,
        optimizer: OptimType = OptimType.SGD,
        learning_rate: float = 0.1,
        eps: float = 1.0e-10,
        sparse: bool = True,
        use_cache: bool = False,
        cache_size: int = 0,
        hashtbl_size: int = 0,
        weight_dist: str = "approx-normal",
        enforce_embedding_dim: bool = False,
    ) -> None:
        if num_tables != 1 and use_cache:
            raise ValueError("cannot use cache when num_tables != 1 (as in FBTT-Embedding)")
        # enforce_embedding_dim: accepted; ttdist always keeps prod(q) == embedding_dim.
        super().__init__(num_tables, int(num_embeddings), int(embedding_dim), [int(r) for r in tt_ranks],
                         [int(p) for p in tt_p_shapes] if tt_p_shapes is not None else None,
                         [int(q) for q in tt_q_shapes] if tt_q_shapes is not None else None,
                         mode="sum", sparse=sparse, optimizer=_fused_optimizer(optimizer, sparse),
                         learning_rate=learning_rate, eps=eps, use_cache=use_cache, cache_size=cache_size,
                         hashtbl_size=hashtbl_size, weight_dist=weight_dist, include_last_offset=True)
        shape = self.shapes[0]
        self.num_embeddings, self.embedding_dim, self.tt_ndim = shape.num_embeddings, shape.embedding_dim, shape.d
        self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks = list(shape.p), list(shape.q), list(shape.ranks)
        self.warmup = True
        stride = [math.prod(shape.p[k + 1:]) for k in range(shape.d)]
        self.register_buffer("L", torch.tensor(stride, dtype=torch.int64, device=self.tt_cores[0].device))

    def _create_cores(self, weight_dists: list[str], generators: Sequence[Optional[torch.Generator]],
                      device: Optional[torch.device], dtype: torch.dtype) -> None:
        """FBTT's storage: per core position k one parameter (num_tables, p_k, r_k q_k r_{k+1})."""
        shape, T = self.shapes[0], len(self.shapes)
        if any(s != shape for s in self.shapes):
            raise ValueError("FBTT's TableBatchedTTEmbeddingBag needs tables of one shape")
        tables = [init_tt_cores(shape, dist, gen, dtype) for dist, gen in zip(weight_dists, generators)]
        self.tt_cores = nn.ParameterList(
            nn.Parameter(torch.stack([t[k].reshape(shape.p[k], -1) for t in tables]).to(device),
                         requires_grad=not self.sparse)
            for k in range(shape.d))
        self.table_num_cores = [shape.d] * T
        self.optimizer_state = _BufferList("optimizer_state", [optimizer_state_like(core, self.optimizer)
                                                               for core in self.tt_cores])
        self._anchor = nn.Parameter(torch.zeros(0, device=device, dtype=dtype)) if self.sparse else None

    def lookup_cores(self) -> list[Tensor]:
        shape = self.shapes[0]
        return [self.tt_cores[k][t].view(shape.core_shapes[k]) for t in range(len(self.shapes)) for k in range(shape.d)]

    @property
    def optimizer_states(self) -> list[Tensor]:
        shape = self.shapes[0]
        return [self.optimizer_state[k][t].view(shape.core_shapes[k]) if self.optimizer.code == 1
                else self.optimizer_state[k] for t in range(len(self.shapes)) for k in range(shape.d)]

    def forward(self, indices: Tensor, offsets: Tensor, warmup: bool = True) -> Tensor:  # noqa: ARG002 (FBTT's)
        """Pooled sums -> ``(num_tables, B, D)``; ``offsets`` has ``num_tables * B + 1`` entries."""
        out = super().forward(indices.long(), offsets.long())  # (B, T * D)
        return out.view(out.shape[0], len(self.shapes), self.embedding_dim).transpose(0, 1).contiguous()

    def full_weight(self) -> Tensor:
        """The full table ``(prod p, prod q)`` (``num_tables == 1``, as in FBTT)."""
        if len(self.shapes) != 1:
            raise ValueError("full_weight() only supported for num_tables == 1 (as in FBTT-Embedding)")
        return tt_matrix_to_full(self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks, list(self.tt_cores), [1, 0, 2, 3])

    def update_cache(self, indices: Tensor) -> None:
        """Counts ``indices`` towards the rows the next ``cache_populate()`` caches."""
        if "0" in self.caches:
            self.caches["0"].count(indices.long())

    def reset_cache(self) -> None:
        """Forgets the counts (the cached rows stay until the next ``cache_populate()``)."""
        if "0" in self.caches:
            self.caches["0"].cache_freq.zero_()
            self.caches["0"].cache_freq_rows.fill_(-1)

    def cache_populate(self) -> dict:
        out = super().cache_populate()
        self.warmup = False
        return out

    @property
    def cache_weight(self) -> Optional[Tensor]:
        return self.caches["0"].cache_weight if "0" in self.caches else None

    def get_params(self) -> list[Tensor]:
        """The cores, and the cache's rows when there is a cache (FBTT's get_params, without its
        side effect on ``tt_cores``)."""
        params = list(self.tt_cores)
        return params + [self.cache_weight] if self.cache_weight is not None else params


class TTEmbeddingBag(TableBatchedTTEmbeddingBag):
    """FBTT's one-table TT EmbeddingBag; ``forward(indices, offsets)`` -> ``(B, D)``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: list[int],
        tt_p_shapes: Optional[list[int]] = None,
        tt_q_shapes: Optional[list[int]] = None,
        optimizer: OptimType = OptimType.SGD,
        learning_rate: float = 0.1,
        eps: float = 1.0e-10,
        sparse: bool = True,
        use_cache: bool = True,
        cache_size: int = 0,
        hashtbl_size: int = 0,
        weight_dist: str = "approx-normal",
        enforce_embedding_dim: bool = False,
    ) -> None:
        super().__init__(1, num_embeddings, embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes, optimizer,
                         learning_rate, eps, sparse, use_cache, cache_size, hashtbl_size, weight_dist,
                         enforce_embedding_dim)

    def forward(self, indices: Tensor, offsets: Tensor, warmup: bool = True) -> Tensor:
        return super().forward(indices, offsets, warmup)[0]


class _BufferList(nn.Module):
    """FBTT's BufferList: buffers ``<name>0, <name>1, ...`` indexed like a list (FBTT's state_dict keys)."""

    def __init__(self, name: str, buffers: Sequence[Tensor]) -> None:
        super().__init__()
        self._name = name
        for i, buffer in enumerate(buffers):
            self.register_buffer(f"{name}{i}", buffer)
        self._length = len(buffers)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Tensor:
        if not -self._length <= index < self._length:
            raise IndexError(f"{self._name}[{index}]: there are {self._length}")
        return getattr(self, f"{self._name}{index % self._length}")

    def __iter__(self):
        return (self[i] for i in range(self._length))
