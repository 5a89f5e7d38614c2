"""What a TT lookup costs on the planning device: a model fitted to a short run of the real op.

One step of one TT table (or shard) on one rank looks up ``n`` ids (``n`` = batch x pooling
factor, the rank's own batch for data-parallel, all ranks' for table-wise). The CPU kernel
(csrc/cpu/tt_lookup_cpu.cpp) and the CUDA kernel walk a trie over the *distinct* rows, so a
prefix ``(i_1..i_k)`` shared by several ids is multiplied out once per batch. With ids drawn
uniformly over the table's N rows, level k (prefix of k digits) has

    M_k = min(p_1...p_k, ceil(N / (p_{k+1}...p_d)))      reachable prefixes,
    u_k(n) = M_k * (1 - (1 - 1/M_k)^n)                     expected distinct ones,

and the work of a batch is (``TTShape`` symbols, e = element size)

    rows(n)  = u_d(n)                                   distinct rows (the trie's leaves)
    bytes(n) = e * D * rows(n)                          the rows built (backward: their gradients)
    flops(n) = sum_{k=2..d} u_k(n) * 2 * (q_1...q_{k-1}) * r_{k-1} * q_k * r_k

``flops(n) / n`` is ``TTShape.flops_per_row()`` when no prefix repeats. On the CPU the backward
of a three-core table takes the middle-out order when it needs fewer multiply-adds (q_1 > q_3,
few shared prefixes): its ``flops`` are scaled by ``cpu_backward_share``. The time of a batch is

    t_dir(n) = a_dir * n + b_dir * rows(n) + c_dir * bytes(n) + f_dir * flops(n)    dir = fwd | bwd

``bwd`` being the backward with the fused optimizer update (the path every table-wise table
takes). Cores that several ranks hold (G_2..G_d of row-/column-wise shards, every core of a
data-parallel table) are instead reduced as dense gradients and updated whole once per step:

    t_update = u * (parameters of those cores).

(a: per id — sorting, pooling into bags; b: per distinct row — trie bookkeeping, the fused update
of its slices; c, f: the row's width and the products). The coefficients per direction and ``u`` are a ``TTKernelCalibration``:
``measure_calibration(device)`` times ``ttdist.ops.tt_lookup`` (forward; backward with a fused
row-wise Adagrad step) on a handful of shapes that vary each term on its own, fits them by
non-negative least squares on relative error, and times ``ops.apply_updates`` for ``u`` (about
0.3 s on one CPU thread). ``calibration(device)`` caches one per process (and on disk,
keyed by the device, torch version, thread count and the op library's file, so a rebuilt kernel
is measured again); ``set_calibration`` injects one (tests, or a calibration measured
elsewhere). Ids are assumed uniform over rows: real (skewed) ids repeat more, so the model is an
upper bound on the work of a batch.

API (seconds throughout): ``TTCostModel(calibration).lookup_seconds(shape, ids, "fwd" | "bwd")``,
``.update_seconds(parameters)``, ``.shard_costs(shape, sharding_type, shards, B, pooling, W)``
(every shard of a table under a sharding: ids, fwd, bwd, replica update); ``cost_model(device)``
= ``TTCostModel(calibration(device))``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from ttdist.distributed.shard_layout import DATA_PARALLEL, ROW_WISE, TTShard, replicated_cores
from ttdist.modules.tt_shapes import TTShape, make_tt_shape

Direction = Literal["fwd", "bwd"]
DIRECTIONS: tuple[Direction, ...] = ("fwd", "bwd")
UNITS = ("id", "row", "byte", "flop")


# ------------------------------------------------------------------------------ work of a batch
def distinct_prefixes(shape: TTShape, ids: float) -> list[float]:
    """Expected distinct prefixes ``u_1..u_d`` among ``ids`` ids uniform over the rows (level k:
    the first k digits; ``u_d`` = distinct rows). Fractional ``ids`` (an expected count) allowed."""
    if ids <= 0:
        return [0.0] * shape.d
    out = []
    for k in range(1, shape.d + 1):
        reachable = min(math.prod(shape.p[:k]), math.ceil(shape.num_embeddings / math.prod(shape.p[k:])))
        # 1 - (1 - 1/M)^n without cancellation for large M
        out.append(reachable * -math.expm1(ids * math.log1p(-1.0 / reachable)) if reachable > 1 else 1.0)
    return out


def batch_work(shape: TTShape, ids: float, element_size: int = 4, direction: Direction = "fwd",
               device: str = "cpu") -> tuple[float, float, float, float]:
    """``(ids, rows, bytes, flops)`` of one lookup batch of ``ids`` ids (module docstring); the
    CPU backward of a three-core table scales ``flops`` by ``cpu_backward_share``."""
    distinct = distinct_prefixes(shape, ids)
    flops = sum(distinct[k] * 2 * math.prod(shape.q[:k]) * shape.ranks[k] * shape.q[k] * shape.ranks[k + 1]
                for k in range(1, shape.d))
    if direction == "bwd" and device == "cpu" and shape.d == 3:
        flops *= cpu_backward_share(shape, distinct)
    rows = distinct[-1]
    return float(ids), rows, float(element_size * shape.embedding_dim * rows), float(flops)


def cpu_backward_share(shape: TTShape, distinct: Sequence[float]) -> float:
    """The CPU backward of a three-core table takes the cheaper of the trie walk and the middle-out
    order (csrc/cpu/tt_lookup_cpu.cpp, ``middle_out_is_cheaper``): its multiply-adds over the trie
    walk's, given the distinct prefixes (i_1, i_2) and rows of the batch."""
    (q0, q1, q2), r1, r2 = shape.q, shape.ranks[1], shape.ranks[2]
    prefixes, rows = distinct[1], distinct[2]
    trie = prefixes * 3 * q0 * r1 * q1 * r2 + rows * 2 * q0 * q1 * r2 * q2
    middle_out = rows * (2 * q0 * r1 * q1 * q2 + 3 * r1 * q1 * r2 * q2)
    return min(trie, middle_out) / trie


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class TTKernelCalibration:
    """Coefficients of the cost model on one device (seconds per unit; module docstring)."""

    device: str
    """"cpu" or "cuda": where the op ran."""
    fwd_per_id: float
    fwd_per_row: float
    fwd_per_byte: float
    fwd_per_flop: float
    bwd_per_id: float
    bwd_per_row: float
    bwd_per_byte: float
    bwd_per_flop: float
    update_per_param: float
    """Reduce-and-update of a replicated core, per parameter."""
    source: str = "injected"
    """How it was obtained: "measured: <key>" or "injected"."""
    fit_error: float = 0.0
    """Largest relative error of the fit over the calibration runs."""

    def coefficients(self, direction: Direction) -> tuple[float, float, float, float]:
        """``(per id, per row, per byte, per flop)``: the order of ``batch_work``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return tuple(getattr(self, f"{direction}_per_{unit}") for unit in UNITS)

    def scaled(self, fwd: float, bwd: float, update: float, **changes) -> TTKernelCalibration:
        """Every forward coefficient times ``fwd``, backward one times ``bwd``, ``update_per_param``
        times ``update``; ``changes``: other fields to replace (device, source)."""
        factors = {"fwd": fwd, "bwd": bwd}
        return replace(self, **{f"{d}_per_{u}": getattr(self, f"{d}_per_{u}") * factors[d] for d in DIRECTIONS
                                for u in UNITS}, update_per_param=self.update_per_param * update, **changes)


class TTCostModel:
    """Seconds a TT table's lookups cost on one rank, from a ``TTKernelCalibration``."""

    def __init__(self, calibration: TTKernelCalibration) -> None:
        self.calibration = calibration

    def lookup_seconds(self, shape: TTShape, ids: float, direction: Direction) -> float:
        """Time of one batch of ``ids`` lookups of ``shape`` (a whole table or one shard's local
        shape), forward or backward (+ fused update)."""
        work = batch_work(shape, ids, direction=direction, device=self.calibration.device)
        return sum(c * w for c, w in zip(self.calibration.coefficients(direction), work))

    def update_seconds(self, parameters: int) -> float:
        """Time of the whole-core update of ``parameters`` replicated core parameters."""
        return self.calibration.update_per_param * parameters

    def shard_costs(self, shape: TTShape, sharding_type: str, shards: Sequence[TTShard], batch_per_rank: float,
                    pooling: float, world_size: int) -> list[ShardCost]:
        """One step's lookup work of each shard (``shard_layout.table_shards``) of a table.

        ``batch_per_rank`` samples per rank, ``pooling`` ids per sample summed over the table's
        features (``ids`` = B * pooling for a data-parallel replica, W * B * pooling for a
        table-/column-wise shard, and that times ``rows of the shard / num_embeddings`` for a
        row-wise one, ids being uniform over rows). ``update_seconds`` is the whole-core update
        of the cores the shard shares with other ranks (``replicated_cores``).
        """
        replicated = replicated_cores(sharding_type, shape.d)
        shared_params = sum(math.prod(shape.core_shapes[k]) for k in replicated if k > 0)
        out = []
        for shard, ids in zip(shards, shard_ids(shape, sharding_type, shards, batch_per_rank, pooling, world_size)):
            local = shard.local_shape(shape)
            params = shared_params + (math.prod(local.core_shapes[0]) if 0 in replicated else 0)
            busy = ids > 0 and local.num_embeddings > 0
            out.append(ShardCost(shard.rank, ids, self.lookup_seconds(local, ids, "fwd") if busy else 0.0,
                                 self.lookup_seconds(local, ids, "bwd") if busy else 0.0,
                                 self.update_seconds(params), params))
        return out


def shard_ids(shape: TTShape, sharding_type: str, shards: Sequence[TTShard], batch_per_rank: float, pooling: float,
              world_size: int) -> list[float]:
    """Ids each shard looks up per step (``TTCostModel.shard_costs``)."""
    local_ids = batch_per_rank * pooling
    if sharding_type == DATA_PARALLEL:
        return [local_ids] * len(shards)
    if sharding_type == ROW_WISE:
        return [world_size * local_ids * s.local_shape(shape).num_embeddings / shape.num_embeddings for s in shards]
    return [world_size * local_ids] * len(shards)


@dataclass(frozen=True)
class ShardCost:
    """One step of one TT shard on its rank (seconds)."""

    rank: int
    ids: float
    """Ids it looks up per step (an expectation for row-wise shards)."""
    fwd_seconds: float
    bwd_seconds: float
    """Backward with the fused update of its own slices."""
    update_seconds: float
    """Reduce-and-update of the cores it shares with other ranks."""
    replicated_parameters: int
    """Parameters of those shared cores (their gradient is all-reduced)."""


# ------------------------------------------------------------------------------ measuring
# (num_embeddings, embedding_dim, tt_rank, ids): ids-bound (rank 4), bytes-bound (D 64, 128),
# flops-bound (rank 32, 64), small tables whose ids repeat (prefix sharing, few distinct rows).
CALIBRATION_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (100_000, 16, 4, 8192),
    (100_000, 128, 4, 2048),
    (1_000_000, 16, 32, 2048),
    (1_000_000, 64, 64, 512),
    (2_000, 16, 16, 8192),
    (2_000, 64, 16, 4096),
    (100_000, 32, 16, 2048),
    (100_000, 64, 32, 1024),
    (1_000_000, 16, 16, 8192),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_lookup(shape: TTShape, ids: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of ``tt_lookup`` forward and backward (+ fused row-wise Adagrad)
    of ``ids`` random ids, one per bag."""
    from ttdist.modules.optim import OptimType, optimizer_state_like
    from ttdist.modules.tt_init import init_tt_cores
    from ttdist.ops import FusedUpdate, LookupSpec, tt_lookup

    generator = torch.Generator().manual_seed(0)
    cores = [c.to(device) for c in init_tt_cores(shape, "approx-normal", generator, torch.float32)]
    states = tuple(optimizer_state_like(c, OptimType.EXACT_ROWWISE_ADAGRAD) for c in cores)
    fused = FusedUpdate(optimizer=OptimType.EXACT_ROWWISE_ADAGRAD.code, learning_rate=1e-3, eps=1e-8, states=states)
    spec = LookupSpec((shape.d,), (0,), (0,), (shape.num_embeddings,))
    indices = torch.randint(0, shape.num_embeddings, (ids,), generator=generator).to(device)
    offsets = torch.arange(ids + 1, device=device)  # one id per bag, as Criteo features
    anchor = torch.zeros(0, device=device, requires_grad=True)
    grad = torch.ones(ids, shape.embedding_dim, device=device)
    fwd = bwd = math.inf
    for _ in range(repeats + 1):  # the first run warms up
        _sync(device)
        t0 = time.perf_counter()
        out = tt_lookup(cores, spec, indices, offsets, None, fused, anchor)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad)
        _sync(device)
        t2 = time.perf_counter()
        fwd, bwd = min(fwd, t1 - t0), min(bwd, t2 - t1)
    return fwd, bwd


def _time_update(parameters: int, device: torch.device, repeats: int) -> float:
    """Best-of seconds per parameter of ``ops.apply_updates`` (row-wise Adagrad) on a dense gradient."""
    from ttdist.ops import apply_updates

    core = torch.zeros(parameters // 256, 4, 16, 4, device=device)
    state, grad = torch.zeros(core.shape[0], device=device), torch.full_like(core, 1e-3)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        reduced = grad.clone()  # the gradient buffer the all-reduce fills
        apply_updates([core], [state], [reduced], 2, 1e-3, 1e-8)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best / core.numel()


def nonnegative_fit(features: Sequence[Sequence[float]], times: Sequence[float]) -> tuple[list[float], float]:
    """Non-negative ``x`` minimising the relative error ``sum_i ((features_i . x - t_i) / t_i)^2``
    (every subset of the columns, least squares on each; few columns). Returns ``(x, largest
    relative error)``."""
    a = torch.tensor(features, dtype=torch.float64) / torch.tensor(times, dtype=torch.float64)[:, None]
    ones = torch.ones(len(times), 1, dtype=torch.float64)
    columns = a.shape[1]
    best: Optional[tuple[float, list[float]]] = None
    for size in range(1, columns + 1):
        for subset in itertools.combinations(range(columns), size):
            sub = a[:, list(subset)]
            scale = sub.abs().amax(0).clamp_min(1e-300)  # columns differ by many orders of magnitude
            x = torch.linalg.lstsq(sub / scale, ones).solution.flatten() / scale
            if (x < 0).any():
                continue
            residual = float(((sub @ x)[:, None] - ones).square().sum())
            if best is None or residual < best[0]:
                full = [0.0] * columns
                for j, v in zip(subset, x.tolist()):
                    full[j] = v
                best = (residual, full)
    assert best is not None  # a single column always fits non-negatively (positive features and times)
    x = torch.tensor(best[1], dtype=torch.float64)
    return best[1], float(((a @ x) - 1).abs().max())


def measure_calibration(device: str = "cpu", repeats: int = 3, passes: int = 2) -> TTKernelCalibration:
    """Times the op on ``CALIBRATION_SHAPES`` and fits the coefficients (uncached)."""
    dev = torch.device(device)
    shapes = [(make_tt_shape(rows, dim, [rank, rank]), ids) for rows, dim, rank, ids in CALIBRATION_SHAPES]
    best = [[math.inf, math.inf] for _ in shapes]
    update = math.inf
    for _ in range(passes):  # whole passes, so that a burst of load on a shared host spoils one pass only
        for times, (shape, ids) in zip(best, shapes):
            times[:] = [min(a, b) for a, b in zip(times, _time_lookup(shape, ids, dev, repeats))]
        update = min(update, _time_update(1 << 20, dev, repeats))
    (fwd_x, fwd_err), (bwd_x, bwd_err) = (
        nonnegative_fit([batch_work(shape, ids, direction=direction, device=dev.type) for shape, ids in shapes],
                        [t[j] for t in best]) for j, direction in enumerate(DIRECTIONS))
    return TTKernelCalibration(dev.type, *fwd_x, *bwd_x, update_per_param=update,
                               source=f"measured: {calibration_key(dev.type)}", fit_error=max(fwd_err, bwd_err))


# ------------------------------------------------------------------------------ caching
_CALIBRATIONS: dict[str, TTKernelCalibration] = {}


def calibration_key(device: str) -> str:
    """What a calibration depends on: device model, torch version, threads, the op library."""
    import ttdist._C as library

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{torch.backends.cpu.get_cpu_capability()}-{os.cpu_count()}"
    lib = Path(library.__file__).stat()
    return f"{name}|torch {torch.__version__}|threads {torch.get_num_threads()}|_C {lib.st_size}-{lib.st_mtime_ns}"


def _cache_file(key: str) -> Optional[Path]:
    root = os.environ.get("TTDIST_CACHE_DIR", str(Path.home() / ".cache" / "ttdist"))
    if not root:
        return None
    return Path(root) / "tt_costs" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")


def calibration(device: str = "cpu") -> TTKernelCalibration:
    """The calibration of ``device`` ("cpu" | "cuda"): set or measured once per process, else
    read from the disk cache (``$TTDIST_CACHE_DIR``, default ~/.cache/ttdist; empty: no disk
    cache), else measured (``measure_calibration``) and stored there."""
    device = torch.device(device).type
    if device in _CALIBRATIONS:
        return _CALIBRATIONS[device]
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("calibrating the TT kernel on cuda needs a GPU; plan on a GPU host or inject a "
                           "calibration with ttdist.distributed.tt_costs.set_calibration(...)")
    key = calibration_key(device)
    path = _cache_file(key)
    if path is not None and path.is_file():
        try:
            stored = TTKernelCalibration(**json.loads(path.read_text()))
        except (TypeError, ValueError):  # written by another version of this module: measure again
            stored = None
        if stored is not None and stored.source == f"measured: {key}":
            _CALIBRATIONS[device] = stored
            return stored
    measured = measure_calibration(device)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(measured), indent=1))
            tmp.replace(path)
        except OSError:  # a read-only home: the process cache still holds it
            pass
    _CALIBRATIONS[device] = measured
    return measured


def set_calibration(value: Optional[TTKernelCalibration], device: Optional[str] = None) -> None:
    """Use ``value`` for its device in this process (``None``: forget ``device``'s, so the next
    ``calibration(device)`` reads the disk cache or measures)."""
    if value is None:
        _CALIBRATIONS.pop(torch.device(device or "cpu").type, None)
    else:
        _CALIBRATIONS[value.device] = value


def cost_model(device: str = "cpu") -> TTCostModel:
    """``TTCostModel(calibration(device))``."""
    return TTCostModel(calibration(device))
