"""TT-compressed EmbeddingBags: ``TableBatchedTTEmbeddingBag`` (T tables, one op call) and
``TTEmbeddingBag`` (one table; a drop-in for ``nn.EmbeddingBag``, API-compatible with
FBTT-Embedding).

Layout: ``tt_cores`` is a ParameterList of every table's cores, table after table; core k of a
table has shape ``(p_k, r_{k-1}, q_k, r_k)``, ``r_0 = r_d = 1`` (see ``ttdist.ops``).
Input: ``indices`` [N] and ``offsets`` per feature block — F * B bag starts, or F * B + 1
entries with ``include_last_offset`` — where feature f reads table ``feature_table_map[f]``
(default: one feature per table). Output: [B, sum_f D_t(f)], the pooled rows of the features
side by side, like fbgemm's table-batched EmbeddingBag.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ttdist.modules.lookup_inputs import normalize_lookup_inputs
from ttdist.modules.optim import OptimType, optimizer_state_like
from ttdist.modules.tt_cache import TTRowCache, cache_lookup
from ttdist.modules.tt_init import init_tt_cores, tt_svd
from ttdist.modules.tt_shapes import TTShape, make_tt_shape
from ttdist.ops import (POOLING_CODES, POOLING_SUM, FusedUpdate, LookupSpec, bag_scales, tt_full_reference,
                        tt_lookup)

PerTable = Union[Any, Sequence[Any]]


def per_table(value: PerTable, num_tables: int, name: str, nested: bool = False) -> list:
    """Broadcasts a scalar (or, with ``nested``, a flat list) to one entry per table."""
    is_single = value is None or not isinstance(value, (list, tuple)) or (
        nested and (len(value) == 0 or not isinstance(value[0], (list, tuple))))
    if is_single:
        return [value] * num_tables
    if len(value) != num_tables:
        raise ValueError(f"{name} has {len(value)} entries but there are {num_tables} tables")
    return list(value)


class TableBatchedTTEmbeddingBag(nn.Module):
    """T TT tables looked up in one op call; tables may differ in rows, dim, d and ranks.

    Every per-table argument (``num_embeddings``, ``embedding_dim``, ``tt_ranks``, shapes,
    ``mode``, cache settings, ``weight_dist``) takes one value for all tables or a list.
    ``sparse=True`` fuses ``optimizer`` into backward (no core gradients are returned).
    """

    def __init__(
        self,
        num_tables: int,
        num_embeddings: PerTable,
        embedding_dim: PerTable,
        tt_ranks: PerTable,
        tt_p_shapes: PerTable = None,
        tt_q_shapes: PerTable = None,
        mode: PerTable = "sum",
        sparse: bool = False,
        optimizer: OptimType = OptimType.SGD,
        learning_rate: float = 0.01,
        eps: float = 1e-10,
        use_cache: PerTable = False,
        cache_size: PerTable = 0,
        hashtbl_size: PerTable = 0,
        weight_dist: PerTable = "approx-normal",
        include_last_offset: bool = False,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
        feature_table_map: Optional[Sequence[int]] = None,
        table_names: Optional[Sequence[str]] = None,
        generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    ) -> None:
        super().__init__()
        if num_tables <= 0:
            raise ValueError(f"num_tables must be positive, got {num_tables}")
        T = num_tables
        self.table_names = list(table_names) if table_names is not None else [f"table_{t}" for t in range(T)]
        self.shapes: list[TTShape] = [
            make_tt_shape(n, dim, ranks, p, q, table_name=name)
            for n, dim, ranks, p, q, name in zip(
                per_table(num_embeddings, T, "num_embeddings"), per_table(embedding_dim, T, "embedding_dim"),
                per_table(tt_ranks, T, "tt_ranks", nested=True), per_table(tt_p_shapes, T, "tt_p_shapes", nested=True),
                per_table(tt_q_shapes, T, "tt_q_shapes", nested=True), self.table_names)
        ]
        modes = per_table(mode, T, "mode")
        for name, m in zip(self.table_names, modes):
            if m not in POOLING_CODES:
                raise ValueError(f"table '{name}': mode must be 'sum' or 'mean', got {m!r}")
        self.modes = modes
        self.feature_table_map = list(feature_table_map) if feature_table_map is not None else list(range(T))
        for f, t in enumerate(self.feature_table_map):
            if not 0 <= t < T:
                raise ValueError(f"feature_table_map[{f}] = {t} is not a table index in [0, {T})")
        self.sparse = sparse
        self.optimizer = OptimType.parse(optimizer)
        self.learning_rate, self.eps = float(learning_rate), float(eps)
        self.include_last_offset = include_last_offset
        self.dtype = dtype
        self._create_cores(per_table(weight_dist, T, "weight_dist"), generators or [None] * T, device, dtype)
        self._create_caches(per_table(use_cache, T, "use_cache"), per_table(cache_size, T, "cache_size"),
                            per_table(hashtbl_size, T, "hashtbl_size"), device, dtype)
        self._register_load_state_dict_pre_hook(self._load_cache_state, with_module=False)

    def _create_cores(self, weight_dists: list[str], generators: Sequence[Optional[torch.Generator]],
                      device: Optional[torch.device], dtype: torch.dtype) -> None:
        self.tt_cores = nn.ParameterList()
        for shape, dist, gen in zip(self.shapes, weight_dists, generators):
            for core in init_tt_cores(shape, dist, gen, dtype):
                self.tt_cores.append(nn.Parameter(core.to(device), requires_grad=not self.sparse))
        self.table_num_cores = [s.d for s in self.shapes]
        for k, core in enumerate(self.tt_cores):
            self.register_buffer(f"optimizer_state_{k}", optimizer_state_like(core, self.optimizer))
        # fbgemm's placeholder: with fused updates no core requires grad, so this makes autograd
        # reach the lookup's backward.
        self._anchor = nn.Parameter(torch.zeros(0, device=device, dtype=dtype)) if self.sparse else None

    def _create_caches(self, use_cache: list[bool], cache_size: list[int], hashtbl_size: list[int],
                       device: Optional[torch.device], dtype: torch.dtype) -> None:
        self.caches = nn.ModuleDict({
            str(t): TTRowCache(self.shapes[t].num_embeddings, self.shapes[t].embedding_dim, int(cache_size[t]),
                               int(hashtbl_size[t]), self.optimizer, device, dtype)
            for t in range(len(self.shapes)) if use_cache[t]
        })

    # ------------------------------------------------------------------------------------------
    @property
    def num_tables(self) -> int:
        return len(self.shapes)

    def lookup_cores(self) -> list[Tensor]:
        """Every table's cores ``(p_k, r_{k-1}, q_k, r_k)``, table after table (what the ops take).

        The storage behind them is ``tt_cores`` here; a subclass may lay it out differently
        (``ttdist.compat.fbtt`` stacks the tables of each core position)."""
        return list(self.tt_cores)

    @property
    def optimizer_states(self) -> list[Tensor]:
        """One fused-optimizer state per core of ``lookup_cores()`` (a view when stored stacked)."""
        return [getattr(self, f"optimizer_state_{k}") for k in range(len(self.tt_cores))]

    @property
    def feature_dims(self) -> list[int]:
        return [self.shapes[t].embedding_dim for t in self.feature_table_map]

    def table_cores(self, t: int) -> list[Tensor]:
        """The cores of table t, ``(p_k, r_{k-1}, q_k, r_k)``."""
        begin = sum(self.table_num_cores[:t])
        return self.lookup_cores()[begin : begin + self.table_num_cores[t]]

    def set_learning_rate(self, lr: float) -> None:
        """Sets the fused optimizer's learning rate (used by the next backward)."""
        self.learning_rate = float(lr)

    def _spec(self, pooling_modes: Optional[Sequence[int]] = None) -> LookupSpec:
        modes = pooling_modes or [POOLING_CODES[self.modes[t]] for t in self.feature_table_map]
        return LookupSpec(tuple(self.table_num_cores), tuple(self.feature_table_map), tuple(modes),
                          tuple(s.num_embeddings for s in self.shapes))

    def _fused(self) -> Optional[FusedUpdate]:
        if not self.sparse:
            return None
        return FusedUpdate(self.optimizer.code, self.learning_rate, self.eps, tuple(self.optimizer_states))

    # ------------------------------------------------------------------------------------------
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None) -> Tensor:
        """Pooled lookup -> [B, sum_f D_t(f)] (see the module docstring for the layout)."""
        if per_sample_weights is not None and any(self.modes[t] != "sum" for t in self.feature_table_map):
            raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        names = [self.table_names[t] for t in self.feature_table_map]
        rows = [self.shapes[t].num_embeddings for t in self.feature_table_map]
        cores = self.lookup_cores()
        given = (indices, offsets, per_sample_weights)
        # Without caches the op checks the values before it reads a core (tt_prepare); the caches
        # read the indices first, so they need them checked here.
        indices, offsets, per_sample_weights = normalize_lookup_inputs(
            *given, names, rows, self.include_last_offset, self.dtype, cores[0].device,
            check_values=bool(self.caches))
        if self.caches and self.training:
            self._count_cache_rows(indices, offsets)
        if any(c.populated for c in self.caches.values()):
            return self._forward_with_cache(indices, offsets, per_sample_weights)
        try:
            return tt_lookup(cores, self._spec(), indices, offsets, per_sample_weights, self._fused(), self._anchor)
        except (IndexError, ValueError):
            # the op names the table by its index: name it, the value and the range as the user knows them
            normalize_lookup_inputs(*given, names, rows, self.include_last_offset, self.dtype, cores[0].device)
            raise

    def _feature_segments(self, offsets: Tensor) -> list[tuple[int, int]]:
        batch = (offsets.numel() - 1) // len(self.feature_table_map)
        return [(int(offsets[f * batch]), int(offsets[(f + 1) * batch])) for f in range(len(self.feature_table_map))]

    def _count_cache_rows(self, indices: Tensor, offsets: Tensor) -> None:
        for f, (lo, hi) in enumerate(self._feature_segments(offsets)):
            cache = self.caches[str(self.feature_table_map[f])] if str(self.feature_table_map[f]) in self.caches else None
            if cache is not None and hi > lo:
                cache.count(indices[lo:hi])

    def _forward_with_cache(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor]) -> Tensor:
        """Cached rows from the caches, the rest from the cores; mean bags become weighted sums."""
        F = len(self.feature_table_map)
        batch = (offsets.numel() - 1) // F
        spec = self._spec()
        scale = bag_scales(offsets, spec.pooling_modes, indices.numel(), per_sample_weights, self.dtype)
        slots = torch.full_like(indices, -1)
        for f, (lo, hi) in enumerate(self._feature_segments(offsets)):
            key = str(self.feature_table_map[f])
            if key in self.caches and hi > lo:
                slots[lo:hi] = self.caches[key].slots(indices[lo:hi])
        hit = slots >= 0
        bag_of = torch.arange(F * batch, device=offsets.device).repeat_interleave(
            offsets[1:] - offsets[:-1], output_size=indices.numel())
        kept = torch.zeros(F * batch + 1, dtype=torch.int64, device=offsets.device)
        kept[1:] = torch.bincount(bag_of[~hit], minlength=F * batch).cumsum(0)
        out = tt_lookup(self.lookup_cores(), self._spec([POOLING_SUM] * F), indices[~hit], kept, scale[~hit],
                        self._fused(), self._anchor)
        fused = (self.optimizer, self.learning_rate, self.eps) if self.sparse else None
        blocks = []
        for f, dim in enumerate(self.feature_dims):
            key = str(self.feature_table_map[f])
            sel = hit & (bag_of // batch == f) if key in self.caches else None
            if sel is None or not bool(sel.any()):
                blocks.append(out.new_zeros(batch, dim))
                continue
            blocks.append(cache_lookup(self.caches[key], slots[sel], bag_of[sel] - f * batch, scale[sel], batch,
                                       fused, self._anchor))
        return out + torch.cat(blocks, dim=1)

    # ------------------------------------------------------------------------------------------
    def _populated_cache(self, t: int) -> Optional[TTRowCache]:
        cache = self.caches[str(t)] if str(t) in self.caches else None
        return cache if cache is not None and cache.populated else None

    @torch.no_grad()
    def rows(self, t: int, rows: Tensor) -> Tensor:
        """Decompressed rows [n, D_t] of table t as the module looks them up: rows held in the row
        cache from the cache, the others from the cores (never the whole table)."""
        out = self.core_rows(t, rows)
        cache = self._populated_cache(t)
        if cache is not None and rows.numel():
            slots = cache.slots(rows.long())
            cached = cache.cache_weight.detach()[slots.clamp(min=0)].to(out.dtype)
            out = torch.where((slots >= 0)[:, None], cached, out)
        return out

    @torch.no_grad()
    def core_rows(self, t: int, rows: Tensor) -> Tensor:
        """Rows [n, D_t] of table t as its cores alone give them (ignoring the row cache)."""
        d = self.table_num_cores[t]
        offsets = torch.arange(rows.numel() + 1, device=rows.device)
        return torch.ops.ttdist.tt_forward(self.table_cores(t), [d], [0], [POOLING_SUM], rows.long(), offsets, None)

    @torch.no_grad()
    def full_weight(self, t: int = 0) -> Tensor:
        """The dense table t [num_embeddings, D] as the module looks it up (rows held in the row
        cache come from the cache; tests and export; materialises the table)."""
        weight = tt_full_reference([c.detach() for c in self.table_cores(t)])[: self.shapes[t].num_embeddings]
        cache = self._populated_cache(t)
        if cache is not None:
            weight = weight.clone()
            cached = cache.cache_rows < self.shapes[t].num_embeddings
            weight[cache.cache_rows[cached]] = cache.cache_weight.detach()[cached].to(weight.dtype)
        return weight

    def cache_populate(self) -> dict[str, dict]:
        """Folds trained cached rows into the cores, then caches each table's most frequent rows."""
        return {self.table_names[int(t)]: cache.populate(lambda r, t=int(t): self.core_rows(t, r),
                                                         lambda r, v, t=int(t): self._fold_into_cores(t, r, v))
                for t, cache in self.caches.items()}

    def cache_flush(self) -> dict[str, dict]:
        """Folds each row cache into the cores and empties it (the row counts stay; the next
        ``cache_populate()`` refills it). Afterwards every row is read from the cores, so the
        state_dict loads into a module without a cache. The fold is the least-squares fit of
        ``cache_populate()``: what the cores cannot represent at their ranks is lost (reported per
        table as ``fold_residual``), so the module's output changes by that much."""
        return {self.table_names[int(t)]: cache.flush(lambda r, v, t=int(t): self._fold_into_cores(t, r, v))
                for t, cache in self.caches.items()}

    def _load_cache_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
        """The row cache in a state_dict is never dropped silently: its rows trained apart from the
        cores. Cached rows for a table this module does not cache raise (before anything loads),
        even with strict=False; a cached table whose cores are loaded without its cache keys
        empties its cache, whose rows came from the old cores."""
        for t, name in enumerate(self.table_names):
            key = f"{prefix}caches.{t}."
            rows = state_dict.get(key + "cache_rows")
            if str(t) not in self.caches:
                num_cached = int((rows < self.shapes[t].num_embeddings).sum()) if isinstance(rows, Tensor) else 0
                if num_cached:
                    keys = ", ".join(k for k in state_dict if k.startswith(key))
                    raise ValueError(
                        f"the state_dict holds {num_cached} trained row(s) of table '{name}' in its row cache ({keys}) "
                        "but this module has no row cache for that table, so loading would silently drop their "
                        "training. Call cache_flush() on the source module before state_dict() (folds the cached rows "
                        "into the cores), or load into a module with use_cache=True for this table")
            elif key + "cache_rows" not in state_dict:
                begin = sum(self.table_num_cores[:t])
                if any(f"{prefix}tt_cores.{i}" in state_dict for i in range(begin, begin + self.table_num_cores[t])):
                    self.caches[str(t)].clear()

    def _fold_into_cores(self, t: int, rows: Tensor, target: Tensor, iterations: int = 25) -> float:
        """Least-squares fit of table t's cores to ``target`` at ``rows``; returns the relative residual."""
        cores = [c.detach().clone().requires_grad_(True) for c in self.table_cores(t)]
        spec = LookupSpec((len(cores),), (0,), (POOLING_SUM,))
        offsets = torch.arange(rows.numel() + 1, device=rows.device)
        opt = torch.optim.LBFGS(cores, max_iter=iterations, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = 0.5 * (tt_lookup(cores, spec, rows, offsets) - target).pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            for dst, src in zip(self.table_cores(t), cores):
                dst.copy_(src)
            fitted = tt_lookup(cores, spec, rows, offsets)
        return float((fitted - target).norm() / target.norm().clamp(min=1e-30))

    @torch.no_grad()
    def load_dense(self, t: int, weight: Tensor) -> None:
        """Sets table t's cores to the TT-SVD of the dense table ``weight`` [N, D_t]."""
        for dst, src in zip(self.table_cores(t), tt_svd(weight, self.shapes[t])):
            dst.copy_(src)


class TTEmbeddingBag(TableBatchedTTEmbeddingBag):
    """One TT table: a drop-in for ``nn.EmbeddingBag`` with FBTT-Embedding's constructor.

    ``forward(indices, offsets, per_sample_weights=None) -> (B, embedding_dim)`` with
    nn.EmbeddingBag's bag semantics: offsets of length B, or B + 1 with include_last_offset;
    empty bags give zeros; mode "sum" or "mean"; per-sample weights with "sum".
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: Sequence[int],
        tt_p_shapes: Optional[Sequence[int]] = None,
        tt_q_shapes: Optional[Sequence[int]] = None,
        mode: str = "sum",
        sparse: bool = False,
        optimizer: OptimType = OptimType.SGD,
        learning_rate: float = 0.01,
        eps: float = 1e-10,
        use_cache: bool = False,
        cache_size: int = 0,
        hashtbl_size: int = 0,
        weight_dist: str = "approx-normal",
        include_last_offset: bool = False,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(
            1, num_embeddings, embedding_dim, [list(tt_ranks)],
            [list(tt_p_shapes)] if tt_p_shapes is not None else None,
            [list(tt_q_shapes)] if tt_q_shapes is not None else None,
            mode, sparse, optimizer, learning_rate, eps, use_cache, cache_size, hashtbl_size, weight_dist,
            include_last_offset, device, dtype, generators=[generator],
        )

    @property
    def num_embeddings(self) -> int:
        return self.shapes[0].num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.shapes[0].embedding_dim

    @property
    def tt_p_shapes(self) -> list[int]:
        return list(self.shapes[0].p)

    @property
    def tt_q_shapes(self) -> list[int]:
        return list(self.shapes[0].q)

    @property
    def tt_ranks(self) -> list[int]:
        """``[1] + tt_ranks + [1]``, as in FBTT."""
        return list(self.shapes[0].ranks)

    @classmethod
    def from_dense(cls, weight: Tensor, tt_ranks: Sequence[int], tt_p_shapes: Optional[Sequence[int]] = None,
                   tt_q_shapes: Optional[Sequence[int]] = None, **kwargs: Any) -> "TTEmbeddingBag":
        """A TT table from a trained dense table [N, D] by TT-SVD (e.g. to convert a model)."""
        kwargs.setdefault("dtype", weight.dtype)
        module = cls(weight.shape[0], weight.shape[1], tt_ranks, tt_p_shapes, tt_q_shapes, **kwargs)
        module.load_dense(0, weight)
        return module

    def extra_repr(self) -> str:
        s = self.shapes[0]
        return (f"{s.num_embeddings}, {s.embedding_dim}, p={list(s.p)}, q={list(s.q)}, ranks={list(s.ranks)}, "
                f"mode={self.modes[0]!r}, sparse={self.sparse}, compression={s.num_embeddings * s.embedding_dim / s.num_parameters:.1f}x")
