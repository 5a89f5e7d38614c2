"""TT shapes of a table: factoring rows/dims into p and q, ranks, and validating requests.

A table of N rows and D columns with d cores has ``p = (p_1..p_d)``, ``prod(p) >= N`` (rows
past N are padding), ``q = (q_1..q_d)``, ``prod(q) == D``, and ``ranks = [1] + tt_ranks + [1]``.
Core k has shape ``(p_k, r_{k-1}, q_k, r_k)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence


@dataclass(frozen=True)
class TTShape:
    """The shape of one TT table; ``ranks`` includes the boundary ranks (d + 1 entries)."""

    num_embeddings: int
    p: tuple[int, ...]
    q: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def d(self) -> int:
        return len(self.p)

    @property
    def embedding_dim(self) -> int:
        return math.prod(self.q)

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        """``(p_k, r_{k-1}, q_k, r_k)`` for k = 1..d."""
        return [(self.p[k], self.ranks[k], self.q[k], self.ranks[k + 1]) for k in range(self.d)]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.core_shapes)

    def flops_per_row(self) -> int:
        """FLOPs to decompress one row: 2 * sum_{k=2..d} (q_1...q_{k-1}) * r_{k-1} * q_k * r_k."""
        return sum(2 * math.prod(self.q[:k]) * self.ranks[k] * self.q[k] * self.ranks[k + 1] for k in range(1, self.d))

    def bytes_per_row(self, element_size: int = 4) -> int:
        """Bytes a lookup moves: one slice of every core read, one row written."""
        return element_size * (sum(self.ranks[k] * self.q[k] * self.ranks[k + 1] for k in range(self.d)) + self.embedding_dim)

    @property
    def rows_per_p1(self) -> int:
        """Rows covered by one slice of core 1 (``prod(p_2..p_d)``): the row-wise shard granule."""
        return math.prod(self.p[1:])


def _balance_key(factors: Sequence[int]) -> tuple[int, int]:
    return (max(factors) - min(factors), max(factors))


@lru_cache(maxsize=None)
def factor_at_least(n: int, d: int) -> tuple[int, ...]:
    """d factors (descending) whose product is >= n with the least padding, then most balanced."""
    if d == 1:
        return (max(n, 1),)
    root = n ** (1.0 / d)
    best: Optional[tuple[int, ...]] = None
    for first in range(max(1, math.floor(root) - 2), math.ceil(root) + 3):
        rest = factor_at_least(math.ceil(n / first), d - 1)
        cand = tuple(sorted((first,) + rest, reverse=True))
        if best is None or (math.prod(cand), _balance_key(cand)) < (math.prod(best), _balance_key(best)):
            best = cand
    assert best is not None
    return best


@lru_cache(maxsize=None)
def factor_exact(n: int, d: int) -> tuple[int, ...]:
    """d factors (descending, 1 allowed) whose product is exactly n, as balanced as possible."""
    if d == 1:
        return (n,)
    best: Optional[tuple[int, ...]] = None
    for first in range(1, n + 1):
        if n % first:
            continue
        cand = tuple(sorted((first,) + factor_exact(n // first, d - 1), reverse=True))
        if best is None or _balance_key(cand) < _balance_key(best):
            best = cand
    assert best is not None
    return best


MAX_CORES = 32  # d: far beyond any useful factorisation, well below the factoring's recursion limit


def make_tt_shape(
    num_embeddings: int,
    embedding_dim: int,
    tt_ranks: Sequence[int],
    tt_p_shapes: Optional[Sequence[int]] = None,
    tt_q_shapes: Optional[Sequence[int]] = None,
    table_name: str = "table",
) -> TTShape:
    """Validated TT shape; factors p and q automatically when not given (d = len(tt_ranks) + 1)."""
    where = f"TT table '{table_name}'"
    if num_embeddings <= 0 or embedding_dim <= 0:
        raise ValueError(f"{where}: num_embeddings ({num_embeddings}) and embedding_dim ({embedding_dim}) must be positive")
    tt_ranks = [int(r) for r in tt_ranks]
    if len(tt_ranks) < 1:
        raise ValueError(f"{where}: tt_ranks needs at least one rank (d = len(tt_ranks) + 1 >= 2 cores)")
    if len(tt_ranks) + 1 > MAX_CORES:
        raise ValueError(f"{where}: {len(tt_ranks)} tt_ranks make d = {len(tt_ranks) + 1} cores; at most {MAX_CORES} "
                         "are supported")
    if any(r <= 0 for r in tt_ranks):
        raise ValueError(f"{where}: tt_ranks must be positive, got {tt_ranks}")
    d = len(tt_ranks) + 1
    p = tuple(int(x) for x in tt_p_shapes) if tt_p_shapes is not None else factor_at_least(num_embeddings, d)
    q = tuple(int(x) for x in tt_q_shapes) if tt_q_shapes is not None else factor_exact(embedding_dim, d)
    for name, shape in (("tt_p_shapes", p), ("tt_q_shapes", q)):
        if len(shape) != d:
            raise ValueError(f"{where}: {name} has {len(shape)} factors but tt_ranks {tt_ranks} implies d = {d}")
        if any(x <= 0 for x in shape):
            raise ValueError(f"{where}: {name} must be positive, got {list(shape)}")
    if math.prod(q) != embedding_dim:
        raise ValueError(f"{where}: prod(tt_q_shapes) = {math.prod(q)} must equal embedding_dim = {embedding_dim}; "
                         f"e.g. tt_q_shapes={list(factor_exact(embedding_dim, d))}")
    if math.prod(p) < num_embeddings:
        raise ValueError(f"{where}: prod(tt_p_shapes) = {math.prod(p)} < num_embeddings = {num_embeddings}; "
                         f"e.g. tt_p_shapes={list(factor_at_least(num_embeddings, d))}")
    ranks = (1, *tt_ranks, 1)
    for k in range(1, d):
        left = math.prod(p[:k]) * math.prod(q[:k])
        right = math.prod(p[k:]) * math.prod(q[k:])
        if ranks[k] > min(left, right):
            raise ValueError(f"{where}: tt_ranks[{k - 1}] = {ranks[k]} exceeds its unfolding's rank limit "
                             f"min({left}, {right}) = {min(left, right)}; use a rank <= {min(left, right)}")
    return TTShape(num_embeddings=num_embeddings, p=p, q=q, ranks=ranks)
