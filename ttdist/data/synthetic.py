"""Criteo-shaped synthetic click data, generated on the fly from a seed, with a learnable label.

Per sample (global sample id n of stream s; every draw hashes (seed, s, n, slot)):
  * sparse feature f (F = 26): popularity rank k ~ truncated power law P(k) ~ (k+1)^-alpha over
    the (scaled) cardinality N_f, scrambled to row (a_f * k + c_f) mod N_f with a_f coprime to
    N_f, so the hot rows are spread over the table (a bijection of [0, N_f));
  * dense feature j (13): log(1 + floor(Y_j)), Y_j heavy-tailed (Lomax), like Criteo counts;
  * label ~ Bernoulli(sigmoid(logit)) from a hidden teacher shared by the train and eval streams:
        logit = bias + w . (dense - E[dense])
                + sum_f effect_f(row_f)                    (first order)
                + sum_{f<g in PAIR_FEATURES} <v_f(row_f), v_g(row_g)>   (pairwise, low rank)
    effect_f(row) and v_f(row) are hashes of (seed, f, row) damped by 1/sqrt(1 + k/HOT_RANKS),
    so most of the signal sits in the frequent rows, which a model sees often enough to learn.
The scales are set so the teacher's own AUC (the ceiling, `teacher_auc`) is about 0.80 and the
click rate about 0.25 at the default config.
"""

from __future__ import annotations

import math

import numpy as np

from ttdist.data.config import (
    NUM_DENSE_FEATURES,
    NUM_SPARSE_FEATURES,
    DataConfig,
    cap_ids,
    scaled_cardinalities,
)
from ttdist.data.generated import GeneratedDataset, derive_key, mix64, salts, sample_hashes, to_unit

TRAIN_STREAM, EVAL_STREAM = 0, 1
_TEACHER_TAG = 0x7EAC4E5  # key of the teacher's hidden parameters, distinct from the streams

# Hidden teacher (calibrated at the default config: AUC ~0.80, click rate ~0.25).
BIAS = -1.45
SPARSE_SCALE = 0.24  # std of a hot row's first-order effect (times U(0.5, 1.5) per feature)
DENSE_STD = 0.7  # std of the dense part of the logit
PAIR_SCALE = 0.59  # scale of the latent components of v_f (U(-1, 1) before scaling)
LATENT_DIM = 4
PAIR_FEATURES = (0, 1, 4, 7, 10, 13)  # features whose rows interact pairwise
HOT_RANKS = 100.0  # effects of rank k rows are damped by 1/sqrt(1 + k/HOT_RANKS)
_CENTRING_RANKS = 4096  # top ranks over which the sparse terms are centred
_CHUNK = 8192  # samples generated at once by teacher_auc (bigger arrays run slower)

# Dense features: Y_j ~ Lomax(scale_j, shape_j), P(Y >= y) = (1 + y/scale)^-shape.
DENSE_LOMAX_SCALE = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 3, 30, 300], np.float64)
DENSE_LOMAX_SHAPE = np.array([1.5, 1.2, 2.0, 1.0, 1.8, 0.9, 1.3, 1.6, 1.1, 2.2, 0.8, 1.4, 1.0])

# Slots of the per-sample hash matrix.
_SPARSE = slice(0, NUM_SPARSE_FEATURES)
_DENSE = slice(NUM_SPARSE_FEATURES, NUM_SPARSE_FEATURES + NUM_DENSE_FEATURES)
_LABEL = NUM_SPARSE_FEATURES + NUM_DENSE_FEATURES
_NUM_SLOTS = _LABEL + 1


class SyntheticCriteo(GeneratedDataset):
    """Synthetic Criteo-like batches: dense [B_local, 13] float32, 26 sparse ids, labels [B_local].

    Train: endless stream TRAIN_STREAM; eval: the first cfg.eval_batches global batches of
    EVAL_STREAM. `batch(b)` returns this rank's slice of global batch b directly. The ids are the
    teacher's rows modulo cfg.max_rows (`cap_ids`); the labels come from the uncapped rows.
    """

    def __init__(
        self, cfg: DataConfig, split: str, rank: int, world_size: int, start_batch: int = 0
    ) -> None:
        super().__init__(
            cfg, split, rank, world_size, start_batch,
            streams={"train": TRAIN_STREAM, "eval": EVAL_STREAM},
        )  # fmt: skip
        self.teacher = Teacher(cfg)

    def _generate(
        self, stream: int, sample_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dense, sparse, labels, _ = self.teacher.samples(stream, sample_ids)
        return dense, cap_ids(sparse, self.cfg), labels


class Teacher:
    """The generator and its hidden labelling model, fixed by (seed, cardinalities, zipf_alpha)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.seed = cfg.seed
        rows = np.array(scaled_cardinalities(cfg), dtype=np.int64)[:, None]
        self.rows = rows
        self._slot_salts = salts(derive_key(cfg.seed, _TEACHER_TAG, 1), _NUM_SLOTS)
        self._row_salts = salts(derive_key(cfg.seed, _TEACHER_TAG, 2), NUM_SPARSE_FEATURES)[:, None]
        rng = np.random.default_rng([cfg.seed, _TEACHER_TAG])

        # Popularity: x = G(u), rank = floor(x) - 1 for u ~ U(0, 1), with x in [1, N + 1) and
        # density ~ x^-alpha: G(u) = (1 + u t)^(1 / (1 - alpha)), t = (N + 1)^(1 - alpha) - 1,
        # or (N + 1)^u when alpha = 1.
        self._alpha = cfg.zipf_alpha
        log_n1 = np.log(rows + 1.0)
        self._zipf_t = log_n1 if self._alpha == 1.0 else np.expm1((1.0 - self._alpha) * log_n1)

        # Scramble: row = (a * rank + c) mod N with gcd(a, N) = 1.
        mult = []
        for n in rows[:, 0].tolist():
            a = int(rng.integers(1, n)) | 1 if n > 2 else 1
            while math.gcd(a, n) != 1:
                a += 2
            mult.append(a % n)
        self._mult = np.array(mult, dtype=np.int64)[:, None]
        self._offset = (rng.random((NUM_SPARSE_FEATURES, 1)) * rows).astype(np.int64)

        self._effect_scale = SPARSE_SCALE * rng.uniform(0.5, 1.5, (NUM_SPARSE_FEATURES, 1))
        w = rng.standard_normal(NUM_DENSE_FEATURES)
        self._dense_w = DENSE_STD * w / np.linalg.norm(w) / _DENSE_STD
        self._pair = np.array(PAIR_FEATURES)

        # Centre the sparse terms under the popularity distribution (over the top ranks, which
        # hold their mean; the damped tail averages out), so the click rate barely depends on
        # the seed or the cardinalities (the means are zero while _row_terms computes them).
        self._effect_mean = np.zeros((NUM_SPARSE_FEATURES, 1))
        self._latent_mean = np.zeros((len(PAIR_FEATURES), LATENT_DIM, 1))
        top = np.minimum(np.arange(_CENTRING_RANKS), rows - 1)
        p = np.diff(self.rank_cdf(np.arange(_CENTRING_RANKS + 1) + np.zeros_like(rows)), axis=1)
        _, effect, latent = self._row_terms(top)
        self._effect_mean = (effect * p).sum(axis=1, keepdims=True)
        self._latent_mean = (latent * p[self._pair, None, :]).sum(axis=2, keepdims=True)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """Popularity ranks from uniforms u [F, n]: int64 [F, n], rank k in [0, N_f)."""
        if self._alpha == 1.0:
            x = np.exp(u * self._zipf_t)
        else:
            x = np.exp(np.log1p(u * self._zipf_t) / (1.0 - self._alpha))
        k = x.astype(np.int64)
        k -= 1
        return np.clip(k, 0, self.rows - 1, out=k)

    def rank_cdf(self, k: np.ndarray) -> np.ndarray:
        """P(rank < k) per feature for ints k [F, m] (broadcast): float64 [F, m], 1 for k >= N."""
        x = np.minimum(k, self.rows) + 1.0
        if self._alpha == 1.0:
            return np.log(x) / self._zipf_t
        return np.expm1((1.0 - self._alpha) * np.log(x)) / self._zipf_t

    def _row_terms(self, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ranks [F, n]: rows [F, n] int64, centred first-order effects [F, n] and centred
        latent vectors [len(PAIR_FEATURES), LATENT_DIM, n], damped for rare rows."""
        row = rank * self._mult
        row += self._offset
        row %= self.rows
        hr = mix64(row.view(np.uint64) ^ self._row_salts)
        damp = 1.0 / np.sqrt(1.0 + rank * (1.0 / HOT_RANKS))
        effect = _approx_normal(hr)
        effect *= self._effect_scale
        effect *= damp
        effect -= self._effect_mean
        latent = _latent(mix64(hr[self._pair]))
        latent *= (PAIR_SCALE * damp[self._pair])[:, None, :]
        latent -= self._latent_mean
        return row, effect, latent

    def samples(
        self, stream: int, sample_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Samples of `stream` with global ids [n]: dense [n, 13] float32, sparse [n, F] int64
        (a transposed feature-major array), labels [n] float32, click probability [n] float64."""
        h = sample_hashes(derive_key(self.seed, stream), sample_ids, self._slot_salts)

        row, effect, latent = self._row_terms(self.ranks(to_unit(h[_SPARSE])))
        logit = BIAS + effect.sum(axis=0)
        total = latent.sum(axis=0)  # sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2
        logit += 0.5 * (
            np.einsum("kn,kn->n", total, total) - np.einsum("fkn,fkn->n", latent, latent)
        )

        u = to_unit(h[_DENSE])
        y = DENSE_LOMAX_SCALE[:, None] * np.expm1(-np.log(u) / DENSE_LOMAX_SHAPE[:, None])
        dense = np.log1p(np.floor(y))
        logit += self._dense_w @ (dense - _DENSE_MEAN[:, None])

        prob = 1.0 / (1.0 + np.exp(-logit))
        labels = (to_unit(h[_LABEL]) < prob).astype(np.float32)
        return dense.T.astype(np.float32), row.T, labels, prob


def _approx_normal(h: np.ndarray) -> np.ndarray:
    """~N(0, 1) from uint64 hashes: standardised sum of their four 16-bit parts (Irwin-Hall)."""
    m = np.uint64(0xFFFF)
    s = (h & m) + ((h >> np.uint64(16)) & m) + ((h >> np.uint64(32)) & m) + (h >> np.uint64(48))
    return (s.astype(np.float64) - 4 * 65535 / 2) * (math.sqrt(3.0) / 65536)


def _latent(h: np.ndarray) -> np.ndarray:
    """LATENT_DIM uniforms in [-1, 1) from each uint64 hash: [..., LATENT_DIM, n] float64."""
    parts = [(h >> np.uint64(16 * i)) & np.uint64(0xFFFF) for i in range(LATENT_DIM)]
    return np.stack(parts, axis=-2).astype(np.float64) / 32768.0 - 1.0


def _log1p_floor_lomax_moments(
    scale: np.ndarray, shape: np.ndarray, terms: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of g = log(1 + floor(Y)), Y ~ Lomax(scale, shape), per feature, from
    E[g^p] = sum_{k>=1} (g(k)^p - g(k-1)^p) P(Y >= k); the tail beyond `terms` is integrated."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    g1, g0 = np.log1p(k), np.log(k)
    moments = []
    for sc, sh in zip(scale, shape):
        surv = (1.0 + k / sc) ** -sh
        tail = (terms / sc) ** -sh / sh  # int_K^inf P(Y >= k) dk / k
        lg = math.log(terms)
        moments.append((
            (g1 - g0) @ surv + tail,
            (g1**2 - g0**2) @ surv + 2 * tail * (lg + 1 / sh),
        ))  # fmt: skip
    m1, m2 = np.array(moments).T
    return m1, np.sqrt(m2 - m1**2)


_DENSE_MEAN, _DENSE_STD = _log1p_floor_lomax_moments(DENSE_LOMAX_SCALE, DENSE_LOMAX_SHAPE)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores [n] against 0/1 labels [n] (Mann-Whitney U, ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # average 1-based rank of each tie group
    rank_sum = mid_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def teacher_auc(cfg: DataConfig, num_samples: int | None = None) -> float:
    """AUC of the teacher's true click probabilities on the first `num_samples` samples of the
    eval stream (default: the whole eval split, eval_batches * batch_size): the known ceiling."""
    n = cfg.eval_batches * cfg.batch_size if num_samples is None else num_samples
    teacher = Teacher(cfg)
    chunks = [
        teacher.samples(EVAL_STREAM, np.arange(i, min(i + _CHUNK, n), dtype=np.int64))
        for i in range(0, n, _CHUNK)
    ]
    return binary_auc(
        np.concatenate([c[3] for c in chunks]), np.concatenate([c[2] for c in chunks])
    )
