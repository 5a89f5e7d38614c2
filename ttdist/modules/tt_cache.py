"""A software cache of decompressed rows for one TT table (FBTT's ``use_cache``).

During training forward, row frequencies are counted in a table of ``hashtbl_size`` buckets
(bucket = row % hashtbl_size; exact when hashtbl_size >= num_embeddings, the default).
``populate()`` keeps the ``cache_size`` most frequent rows decompressed in ``cache_weight``;
those rows are then read from the cache and trained there (by autograd, or by the fused
optimizer with ``sparse=True``), the other rows from the cores.

How cached rows flow back into the cores: FBTT overwrites the trained cached rows at its next
``cache_populate`` and so loses their training. Here ``populate()`` first *folds* the cached
rows into the cores — a least-squares fit of the cores to the trained rows (L-BFGS, a few
iterations) — and only then refills the cache from the updated cores. What the cores can
represent at their ranks is kept; the remainder is reported as ``fold_residual``. Right after
``populate()`` the cache equals the cores, so the module's output equals the uncached module's.

Export and checkpoints: ``rows()`` and ``full_weight()`` of the module read through the cache (a
cached row comes from the cache, as in the forward). The state_dict carries the cache exactly
(``caches.<t>.cache_weight``, ``cache_rows``, ...), so a module with the same cache restores it
bit for bit; loading it into a module without that table's cache raises (naming the keys) rather
than dropping the cached rows' training, even with ``strict=False``. ``cache_flush()`` folds the
cache into the cores and empties it (``flush()`` here); its state_dict then loads anywhere.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ttdist.modules.optim import OptimType, optimizer_state_like


class TTRowCache(nn.Module):
    """Cache of ``cache_size`` rows of one table; ``cache_rows`` is sorted, padded with N."""

    def __init__(self, num_embeddings: int, embedding_dim: int, cache_size: int, hashtbl_size: int,
                 optimizer: OptimType, device: Optional[torch.device], dtype: torch.dtype) -> None:
        super().__init__()
        if cache_size <= 0:
            cache_size = max(1, num_embeddings // 10)  # FBTT's default: 10 % of the rows
        if hashtbl_size <= 0:
            hashtbl_size = num_embeddings
        if hashtbl_size < cache_size:
            raise ValueError(f"hashtbl_size ({hashtbl_size}) must be >= cache_size ({cache_size})")
        self.num_embeddings = num_embeddings
        self.cache_size = min(cache_size, num_embeddings)
        self.register_buffer("cache_freq", torch.zeros(hashtbl_size, dtype=torch.int64, device=device))
        self.register_buffer("cache_freq_rows", torch.full((hashtbl_size,), -1, dtype=torch.int64, device=device))
        self.register_buffer("cache_rows", torch.full((self.cache_size,), num_embeddings, dtype=torch.int64, device=device))
        self.cache_weight = nn.Parameter(torch.zeros(self.cache_size, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("cache_optimizer_state", optimizer_state_like(self.cache_weight, optimizer))

    @property
    def populated(self) -> bool:
        return bool((self.cache_rows < self.num_embeddings).any())

    def count(self, rows: Tensor) -> None:
        """Adds one to the frequency of every looked-up row (duplicates count)."""
        uniq, counts = torch.unique(rows, return_counts=True)
        bucket = uniq % self.cache_freq.numel()
        self.cache_freq.index_add_(0, bucket, counts)
        self.cache_freq_rows[bucket] = uniq

    def slots(self, rows: Tensor) -> Tensor:
        """Cache slot of each row, or -1 where the row is not cached."""
        pos = torch.searchsorted(self.cache_rows, rows).clamp(max=self.cache_size - 1)
        return torch.where(self.cache_rows[pos] == rows, pos, torch.full_like(pos, -1))

    @torch.no_grad()
    def flush(self, fold: Callable[[Tensor, Tensor], float]) -> dict:
        """Folds the cached rows into the cores (``fold(rows, values)``) and empties the cache;
        the frequency counts stay for the next ``populate()``."""
        residual, cached = 0.0, self.cache_rows < self.num_embeddings
        num_cached = int(cached.sum())
        if num_cached:
            residual = fold(self.cache_rows[cached], self.cache_weight[cached].detach().clone())
        self.clear()
        return {"rows_flushed": num_cached, "fold_residual": residual}

    @torch.no_grad()
    def clear(self) -> None:
        """Empties the cache without folding (every row is read from the cores again)."""
        self.cache_rows.fill_(self.num_embeddings)
        self.cache_weight.zero_()
        self.cache_optimizer_state.zero_()

    @torch.no_grad()
    def populate(self, decompress: Callable[[Tensor], Tensor], fold: Callable[[Tensor, Tensor], float]) -> dict:
        """Folds trained rows into the cores (``fold(rows, values)``), then caches the most frequent.

        ``decompress(rows) -> [n, D]`` reads rows from the (updated) cores.
        """
        residual = self.flush(fold)["fold_residual"]
        seen = self.cache_freq > 0
        k = min(self.cache_size, int(seen.sum()))
        top = torch.topk(torch.where(seen, self.cache_freq, torch.full_like(self.cache_freq, -1)), k).indices
        rows = torch.unique(self.cache_freq_rows[top])  # sorted; bucket collisions may merge rows
        self.cache_rows.fill_(self.num_embeddings)
        self.cache_rows[: rows.numel()] = rows
        self.cache_weight.zero_()
        if rows.numel():
            self.cache_weight[: rows.numel()] = decompress(rows).to(self.cache_weight.dtype)
        self.cache_optimizer_state.zero_()
        return {"rows_cached": int(rows.numel()), "fold_residual": residual}


class _FusedCacheLookup(torch.autograd.Function):
    """Pooled cache lookup whose backward applies the fused optimizer to the touched cache rows."""

    @staticmethod
    def forward(ctx, cache: TTRowCache, optimizer: OptimType, lr: float, eps: float,
                slots: Tensor, bag_of: Tensor, weights: Tensor, num_bags: int, anchor: Tensor) -> Tensor:
        ctx.cache, ctx.hparams = cache, (optimizer, lr, eps)
        ctx.save_for_backward(slots, bag_of, weights)
        rows = cache.cache_weight.detach()[slots] * weights[:, None]
        return torch.zeros(num_bags, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, bag_of, rows)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        slots, bag_of, weights = ctx.saved_tensors
        optimizer, lr, eps = ctx.hparams
        cache = ctx.cache
        grad_rows = grad_output[bag_of]
        # the weights' gradient (nn.EmbeddingBag's), from the cached rows before they move
        grad_weights = ((grad_rows * cache.cache_weight.detach()[slots]).sum(1)
                        if ctx.needs_input_grad[6] else None)
        uniq, inverse = torch.unique(slots, return_inverse=True)
        grads = torch.zeros(uniq.numel(), grad_output.shape[1], dtype=grad_output.dtype, device=grad_output.device)
        grads.index_add_(0, inverse, grad_rows * weights[:, None])
        torch.ops.ttdist.sparse_row_update_(cache.cache_weight.data, cache.cache_optimizer_state, uniq, grads,
                                            optimizer.code, lr, eps)
        return (None,) * 6 + (grad_weights, None, None)


def cache_lookup(cache: TTRowCache, slots: Tensor, bag_of: Tensor, weights: Tensor, num_bags: int,
                 fused: Optional[tuple[OptimType, float, float]], anchor: Optional[Tensor]) -> Tensor:
    """Pooled sum of cached rows [num_bags, D]: ``sum weights[j] * cache_weight[slots[j]]`` per bag."""
    if fused is None:
        rows = cache.cache_weight[slots] * weights[:, None]
        return torch.zeros(num_bags, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add(0, bag_of, rows)
    return _FusedCacheLookup.apply(cache, *fused, slots, bag_of, weights, num_bags, anchor)
