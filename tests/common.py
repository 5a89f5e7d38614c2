"""Helpers shared by the tests: random bags (with empty bags and duplicates) and tolerances."""
from __future__ import annotations

import torch

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def random_bags(num_rows: int, batch: int, max_len: int = 6, generator: torch.Generator | None = None,
                duplicates: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N], offsets [B + 1]) with some empty bags and repeated rows."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=generator)
    lengths[0] = 0  # always one empty bag
    n = int(lengths.sum())
    indices = torch.randint(0, num_rows, (n,), generator=generator)
    if duplicates and n > 4:
        indices[n // 2 : n // 2 + 3] = indices[0]  # duplicates inside and across bags
        indices[-1] = num_rows - 1  # the last row (padding boundary)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return indices, offsets


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected, **TOL[dtype])
