"""ttdist.compat.fbtt: FBTT-Embedding's API on ttdist's kernels.

FBTT's own suite (tt_embeddings_test.py of facebookresearch/FBTT-Embedding) runs against it with
only its import line changed and "cuda" -> "cpu", when a checkout is in third_party/FBTT-Embedding
(git-ignored; `git clone https://github.com/facebookresearch/FBTT-Embedding third_party/FBTT-Embedding`).
"""
from __future__ import annotations

import inspect
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttdist.compat import fbtt
from ttdist.ops import LookupSpec, tt_forward_reference

REPO = Path(__file__).resolve().parents[2]
FBTT_SUITE = REPO / "third_party" / "FBTT-Embedding" / "tt_embeddings_test.py"
P, Q, RANKS = [7, 9, 11], [3, 4, 5], [13, 12]


def bags(num_tables: int, batch: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FBTT's input: indices and table-major offsets with the last one (num_tables * B + 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (num_tables * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.randint(0, rows, (int(offsets[-1]),), generator=g), offsets


def test_signatures_are_fbtts():
    """Names, defaults and positional order of FBTT-Embedding's constructors."""
    tb = list(inspect.signature(fbtt.TableBatchedTTEmbeddingBag.__init__).parameters.items())[1:]
    assert [(n, p.default) for n, p in tb] == [
        ("num_tables", inspect._empty), ("num_embeddings", inspect._empty), ("embedding_dim", inspect._empty),
        ("tt_ranks", inspect._empty), ("tt_p_shapes", None), ("tt_q_shapes", None), ("optimizer", fbtt.OptimType.SGD),
        ("learning_rate", 0.1), ("eps", 1.0e-10), ("sparse", True), ("use_cache", False), ("cache_size", 0),
        ("hashtbl_size", 0), ("weight_dist", "approx-normal"), ("enforce_embedding_dim", False)]
    one = list(inspect.signature(fbtt.TTEmbeddingBag.__init__).parameters.items())[1:]
    assert [n for n, _ in one] == [n for n, _ in tb[1:]] and dict(one)["use_cache"].default is True
    assert [o.value for o in fbtt.OptimType] == ["sgd", "exact_sgd", "lamb", "adam", "exact_adagrad",
                                                 "exact_row_wise_adagrad", "lars_sgd", "partial_row_wise_adam",
                                                 "partial_row_wise_lamb"]


def test_layout_output_and_full_weight():
    T, B = 3, 6
    tt = fbtt.TableBatchedTTEmbeddingBag(T, math.prod(P), math.prod(Q), RANKS, P, Q, sparse=False, weight_dist="normal")
    r = [1, *RANKS, 1]
    assert tt.tt_ranks == r
    assert [tuple(c.shape) for c in tt.tt_cores] == [(T, P[k], r[k] * Q[k] * r[k + 1]) for k in range(3)]
    indices, offsets = bags(T, B, math.prod(P))
    out = tt(indices, offsets)
    assert out.shape == (T, B, math.prod(Q))
    for t in range(T):
        cores = [tt.tt_cores[k][t].detach().view(P[k], r[k], Q[k], r[k + 1]).double() for k in range(3)]
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        expected = tt_forward_reference(cores, LookupSpec((3,), (0,), (0,)), indices[lo:hi], offsets[t * B:(t + 1) * B + 1] - lo)
        torch.testing.assert_close(out[t].double(), expected, rtol=1e-5, atol=1e-6)
    one = fbtt.TTEmbeddingBag(math.prod(P), math.prod(Q), RANKS, P, Q, sparse=False, use_cache=False)
    weight = one.full_weight()
    assert weight.shape == (math.prod(P), math.prod(Q))
    rows = torch.tensor([0, 5, math.prod(P) - 1])
    torch.testing.assert_close(one(rows, torch.arange(4)), weight[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD"])
def test_fbtt_adagrads_are_element_wise(name):
    """FBTT runs element-wise Adagrad for both names (state shaped like the cores)."""
    lr, eps = 0.1, 1e-4
    tt = fbtt.TTEmbeddingBag(math.prod(P), math.prod(Q), RANKS, P, Q, getattr(fbtt.OptimType, name), lr, eps,
                             use_cache=False, weight_dist="uniform")
    before = [c.detach().clone().requires_grad_(True) for c in tt.tt_cores]
    indices, offsets = bags(1, 8, math.prod(P), seed=1)
    go = torch.rand(8, math.prod(Q))
    tt(indices, offsets).backward(go)
    weight = fbtt.tt_matrix_to_full(P, Q, RANKS, before, [1, 0, 2, 3])
    torch.nn.functional.embedding_bag(indices, weight, offsets, mode="sum", include_last_offset=True).backward(go)
    for k, core in enumerate(before):
        assert tt.optimizer_state[k].shape == core.shape
        torch.testing.assert_close(tt.optimizer_state[k], core.grad ** 2, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(tt.tt_cores[k].detach(), core - lr * core.grad / (core.grad.abs() + eps),
                                   rtol=1e-4, atol=1e-6)


def test_unsupported_optimizers_raise_instead_of_fbtts_silent_adagrad():
    for name in ("LAMB", "ADAM", "LARS_SGD", "PARTIAL_ROWWISE_ADAM", "PARTIAL_ROWWISE_LAMB"):
        with pytest.raises(ValueError, match=f"OptimType.{name} is not supported with sparse=True"):
            fbtt.TTEmbeddingBag(100, 8, [2], optimizer=getattr(fbtt.OptimType, name))
        fbtt.TTEmbeddingBag(100, 8, [2], optimizer=getattr(fbtt.OptimType, name), sparse=False)  # unused: accepted


def test_state_dict_keys_cache_methods_and_errors():
    tt = fbtt.TTEmbeddingBag(math.prod(P), math.prod(Q), RANKS, P, Q, fbtt.OptimType.EXACT_ADAGRAD)
    keys = set(tt.state_dict())
    assert {"tt_cores.0", "tt_cores.2", "optimizer_state.optimizer_state0", "optimizer_state.optimizer_state2",
            "L"} <= keys
    assert tt.L.tolist() == [9 * 11, 11, 1]
    indices, offsets = bags(1, 16, math.prod(P), seed=2)
    tt.update_cache(indices)
    tt.cache_populate()
    assert tt.warmup is False and tt.cache_weight is not None
    tt.reset_cache()
    assert len(tt.get_params()) == 4
    with pytest.raises(ValueError, match="num_tables != 1"):
        fbtt.TableBatchedTTEmbeddingBag(2, 100, 8, [2], use_cache=True)
    with pytest.raises(ValueError, match="only supported for num_tables == 1"):
        fbtt.TableBatchedTTEmbeddingBag(2, 100, 8, [2]).full_weight()


@pytest.mark.slow
@pytest.mark.skipif(not FBTT_SUITE.exists(), reason=f"FBTT-Embedding's source is not in {FBTT_SUITE.parent}")
def test_fbtt_own_suite_passes_with_only_the_import_changed(tmp_path):
    source = FBTT_SUITE.read_text()
    changed = source.replace("from tt_embeddings_ops import (", "from ttdist.compat.fbtt import (").replace("cuda", "cpu")
    assert changed.count("ttdist.compat.fbtt") == 1
    (tmp_path / FBTT_SUITE.name).write_text(changed)
    shutil.copy(REPO / "pytest.ini", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::FutureWarning",
                           FBTT_SUITE.name], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "6 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
