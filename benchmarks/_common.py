"""Shared pieces of the distributed benchmark scripts (e2e_bench.py, scaling.py).

* ``relaunch``: a script re-executes itself under ``torch.distributed.run`` (torchrun) with
  ``--worker``; every rank writes ``rank<r>.json`` into an output folder that the parent reads.
* ``Recorder``: a wall-clock timeline of one training step, split into labelled phases.
  Time is *exclusive*: at any moment exactly one label (the top of a stack) is charged.
  Forward labels are pushed/popped around the pipeline steps of the sharded modules; backward
  labels are switched by identity autograd nodes (``_Mark``) placed on the tensors where a
  backward piece starts (its backward runs when the gradient reaches that tensor).
* ``patch_collectives``: wraps ``torch.distributed.all_to_all_single`` / ``all_reduce`` (and
  a few others, to notice them) so that every call is counted (bytes of the tensor this rank
  hands in, as ``ttdist.tools.comm_volume`` counts) and timed; the call is made
  synchronous (waited on at once). DDP's C++ reducer does not go through Python, so its
  all-reduce is wrapped by a DDP communication hook (``instrument``), same semantics as DDP's
  default hook (divide by W, all-reduce SUM).
* ``instrument``: wraps the pipeline steps of ``ShardedTTEmbeddingBagCollection`` (per
  sharding-type group) and of TorchRec's ``ShardedEmbeddingBagCollection``.
* ``embedding_memory``: bytes actually allocated by the sharded embedding modules of a rank.

Why wall-clock splits mean something here: on CPU with gloo there is no device stream, every
op runs on the calling thread, and collectives are awaited where they are issued (made
synchronous by ``patch_collectives``), so the time between two labels is the time of the work
between them. A collective's time includes waiting for the slowest rank to arrive.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def relaunch(script: str, nproc: int, args: Sequence[str], threads_per_rank: int = 1, timeout: float = 900) -> None:
    """Runs ``script --worker args`` under torchrun with ``nproc`` local ranks; raises on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc_per_node={nproc}", script, "--worker", *args]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} ranks failed (exit {proc.returncode})")


def torchrun_command(script: str, nproc: int, args: Sequence[str]) -> str:
    return (f"OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nnodes=1 "
            f"--nproc_per_node={nproc} {script} --worker {' '.join(args)}")


def read_rank_files(folder: Path, world_size: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# The timeline
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Exclusive wall-clock time per label and bytes/time per (label, collective)."""

    def __init__(self) -> None:
        import torch

        # On GPU, kernels and NCCL run asynchronously: synchronise at every label switch so that
        # the wall clock still charges each piece its own work (costs a sync per switch).
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.stack: list[str] = []
        self.t_last = time.perf_counter()
        self.times: dict[str, float] = defaultdict(float)
        self.colls: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])  # calls, bytes, seconds
        self.counts: dict[str, float] = defaultdict(float)
        self.transitions: Optional[list[str]] = None  # set to [] to log label changes (debugging)

    def _flush(self) -> None:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        if self.stack:
            self.times[self.stack[-1]] += now - self.t_last
        self.t_last = now

    def push(self, label: str) -> None:
        self._flush()
        self.stack.append(label)
        if self.transitions is not None:
            self.transitions.append("+" + label)

    def pop(self) -> None:
        self._flush()
        self.stack.pop()

    def switch(self, label: str) -> None:
        """Replace the current label (backward pieces follow each other, they do not nest)."""
        self._flush()
        if self.stack:
            self.stack[-1] = label
        else:
            self.stack.append(label)
        if self.transitions is not None:
            self.transitions.append("=" + label)

    @contextmanager
    def label(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "idle"

    def collective(self, kind: str, nbytes: int, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` (a collective, waited on) charging its time to (current label, kind)."""
        self._flush()
        owner = self.current
        t0 = time.perf_counter()
        out = fn()
        if self._sync is not None:
            self._sync()
        dt = time.perf_counter() - t0
        entry = self.colls[(owner, kind)]
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += dt
        self.t_last = time.perf_counter()
        return out

    def count(self, key: str, value: float) -> None:
        self.counts[key] += value

    def reset(self) -> None:
        self.stack = []
        self.times = defaultdict(float)
        self.colls = defaultdict(lambda: [0, 0, 0.0])
        self.counts = defaultdict(float)
        self.t_last = time.perf_counter()

    def snapshot(self) -> dict:
        self._flush()
        return {"times": dict(self.times),
                "colls": {f"{o}|{k}": list(v) for (o, k), v in self.colls.items()},
                "counts": dict(self.counts)}


REC: Optional[Recorder] = None  # the process's recorder (collective wrappers and marks use it)


def _mark_class():
    import torch

    class _Mark(torch.autograd.Function):
        """Identity; its backward switches the recorder's label (a backward piece starts here)."""

        @staticmethod
        def forward(ctx, x, label):
            ctx.label = label
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            if REC is not None:
                REC.switch(ctx.label)
            return grad, None

    return _Mark


_MARK = None


def mark(tensor, label: str):
    global _MARK
    if _MARK is None:
        _MARK = _mark_class()
    if not tensor.requires_grad:
        return tensor
    return _MARK.apply(tensor, label)


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------

_PATCHED = False


def patch_collectives(rec: Recorder) -> None:
    """Counts and times every Python-level collective of this process (see module docstring)."""
    global _PATCHED, REC
    import torch.distributed as dist

    REC = rec
    if _PATCHED:
        return
    _PATCHED = True

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def wrap(name: str, tensor_of: Callable[..., Any]):
        orig = getattr(dist, name)

        def wrapped(*args, **kwargs):
            t = tensor_of(*args, **kwargs)
            size = sum(nbytes(x) for x in t) if isinstance(t, (list, tuple)) else nbytes(t)

            def run():
                work = orig(*args, **kwargs)
                if work is not None and hasattr(work, "wait"):
                    work.wait()
                return work

            return REC.collective(name, size, run) if REC is not None else run()

        wrapped.__wrapped__ = orig
        setattr(dist, name, wrapped)

    def arg(pos: int, key: str):
        return lambda *a, **k: k[key] if key in k else a[pos]

    wrap("all_to_all_single", arg(1, "input"))
    wrap("all_reduce", arg(0, "tensor"))
    wrap("all_to_all", arg(1, "input_tensor_list"))
    wrap("all_gather", arg(1, "tensor"))
    wrap("all_gather_into_tensor", arg(1, "input_tensor"))
    wrap("reduce_scatter_tensor", arg(1, "input"))
    wrap("broadcast", arg(0, "tensor"))


# ---------------------------------------------------------------------------------------------
# Instrumenting a DistributedModelParallel DLRM
# ---------------------------------------------------------------------------------------------

TT_GROUP_NAMES = {"TwCwDist": "table_column_wise", "RwDist": "row_wise", "DpDist": "data_parallel"}


def _done(value):
    from torchrec.distributed.types import NoWait

    return NoWait(value)


def _lazy_done(value):
    from torchrec.distributed.types import LazyAwaitable

    class _Done(LazyAwaitable):
        def _wait_impl(self):
            return value

    return _Done()


def _mark_keyed_tensor(kt, label: str):
    from torchrec.sparse.jagged_tensor import KeyedTensor

    values = mark(kt.values(), label)
    if values is kt.values():
        return kt
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values, key_dim=kt.key_dim())


@contextmanager
def _relabel(fn_name: str, rec: Recorder, label: str):
    """While inside, ``torch.distributed.<fn_name>`` runs under ``label`` (its collective is filed there)."""
    import torch.distributed as dist

    current = getattr(dist, fn_name)

    def relabelled(*args, **kwargs):
        with rec.label(label):
            return current(*args, **kwargs)

    setattr(dist, fn_name, relabelled)
    try:
        yield
    finally:
        setattr(dist, fn_name, current)


def _instrument_tt(module, rec: Recorder, name: str = "tt") -> None:
    """ShardedTTEmbeddingBagCollection: labels per pipeline step and per sharding-type group
    (``module._input_dists``: TwCwDist / RwDist / DpDist, each called for its input all-to-all
    and, through ``output_dist``, for its pooled all-to-all).

    Backward: the lookups' fused backward (owned cores updated in the kernel, the owned G_1
    slices of row-/column-wise tables by the gradient hook) runs under ``lookup_bwd``; the
    replicated cores' step (``_update_replicas`` after the last lookup's backward, and
    ``_apply_replicas`` which it queues for the end of backward) under ``fused_update``, its one
    all-reduce (waited on where issued, as every collective here) under ``replica_allreduce``."""
    orig_input_dist = module.input_dist

    def input_dist(ctx, features):
        rec.count(f"{name}/ids_in", features.values().numel())
        with rec.label(f"{name}/input_dist"):
            value = orig_input_dist(ctx, features).wait().wait()
        return _done(_done(value))

    module.input_dist = input_dist

    for group in module._input_dists:
        gname = TT_GROUP_NAMES[type(group).__name__]
        orig_g_in, orig_g_out = group.forward, group.output_dist

        def g_in(*args, _orig=orig_g_in, _g=gname, **kwargs):
            # KJTAllToAll: the splits all-to-all when called, the tensors' at the first wait
            with rec.label(f"{name}/input_dist@{_g}"):
                value = _orig(*args, **kwargs).wait().wait()
            return _done(_done(value))

        def g_out(local, batch, _orig=orig_g_out, _g=gname):
            local = mark(local, f"{name}/lookup_bwd")
            with rec.label(f"{name}/output_dist@{_g}"):
                value = _orig(local, batch).wait()
            return _done(mark(value, f"{name}/output_a2a_bwd@{_g}"))

        group.forward, group.output_dist = g_in, g_out

    orig_compute = module.compute

    def compute(ctx, dist_input):
        rec.count(f"{name}/ids", sum(k.values().numel() for k in dist_input))
        with rec.label(f"{name}/lookup_fwd"):
            return orig_compute(ctx, dist_input)

    module.compute = compute

    orig_output_dist = module.output_dist

    def output_dist(ctx, output):
        with rec.label(f"{name}/output_dist"):
            value = orig_output_dist(ctx, output).wait()
        return _lazy_done(value)

    module.output_dist = output_dist

    orig_update, orig_apply = module._update_replicas, module._apply_replicas

    def update_replicas(*args, **kwargs):
        with rec.label(f"{name}/fused_update"), _relabel("all_reduce", rec, f"{name}/replica_allreduce"):
            return orig_update(*args, **kwargs)

    def apply_replicas(*args, **kwargs):
        with rec.label(f"{name}/fused_update"):
            return orig_apply(*args, **kwargs)

    module._update_replicas, module._apply_replicas = update_replicas, apply_replicas


def _instrument_torchrec_ebc(module, rec: Recorder, name: str = "ebc") -> None:
    """TorchRec ShardedEmbeddingBagCollection (fbgemm TBE tables): input_dist / lookups / output_dist.

    Its ``compute_and_output_dist`` interleaves lookups and output dists per sharding type; here
    it runs ``compute`` then ``output_dist`` (TorchRec's own methods, the same ops) so that the
    two are timed apart.
    """
    orig_input_dist, orig_compute, orig_output_dist = module.input_dist, module.compute, module.output_dist

    def input_dist(ctx, features):
        rec.count(f"{name}/ids_in", features.values().numel())
        with rec.label(f"{name}/input_dist"):
            value = orig_input_dist(ctx, features).wait().wait()
        return _done(_done(value))

    def compute(ctx, dist_input):
        rec.count(f"{name}/ids", sum(k.values().numel() for k in dist_input))
        with rec.label(f"{name}/lookup_fwd"):
            out = orig_compute(ctx, dist_input)
        return [mark(t, f"{name}/lookup_bwd") for t in out]

    def output_dist(ctx, output):
        with rec.label(f"{name}/output_dist"):
            kt = orig_output_dist(ctx, output).wait()
        return _lazy_done(_mark_keyed_tensor(kt, f"{name}/output_a2a_bwd"))

    module.input_dist, module.compute, module.output_dist = input_dist, compute, output_dist
    module.compute_and_output_dist = lambda ctx, dist_input: module.output_dist(ctx, module.compute(ctx, dist_input))


def _ddp_hook(rec: Recorder, kind: str = "ddp_all_reduce"):
    import torch
    import torch.distributed as dist

    def hook(process_group, bucket):
        buffer = bucket.buffer()
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        buffer.div_(world)

        def run():  # the unwrapped all_reduce: counted once, as ``kind``
            getattr(dist.all_reduce, "__wrapped__", dist.all_reduce)(buffer, group=group, async_op=True).wait()

        rec.collective(kind, buffer.numel() * buffer.element_size(), run)
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    return hook


def instrument(dmp, rec: Recorder) -> dict:
    """Wraps the sharded modules, DDP and the bottom MLP of a DMP-wrapped DLRM; returns what it found."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    from ttdist.distributed import ShardedTTEmbeddingBagCollection

    found = {"tt": [], "ebc": [], "ddp": 0}
    for fqn, m in dmp.named_modules():
        if isinstance(m, ShardedTTEmbeddingBagCollection):
            _instrument_tt(m, rec)
            found["tt"].append(fqn)
        elif isinstance(m, ShardedEmbeddingBagCollection):
            _instrument_torchrec_ebc(m, rec)
            found["ebc"].append(fqn)
            # a data-parallel sharding's lookup, in a DDP of its own (a plain list: not a submodule)
            for lookup in m._lookups:
                if isinstance(lookup, DistributedDataParallel):
                    lookup.register_comm_hook(dist.group.WORLD, _ddp_hook(rec, "ebc_dp_all_reduce"))
                    found["ddp"] += 1
        elif isinstance(m, DistributedDataParallel):
            m.register_comm_hook(dist.group.WORLD, _ddp_hook(rec))
            found["ddp"] += 1
    if len(found["tt"]) > 1 or len(found["ebc"]) > 1:
        raise RuntimeError(f"instrument expects at most one sharded module of each kind, found {found}")
    from ttdist.modules.collection import MixedEmbeddingBagCollection

    for m in dmp.modules():
        if isinstance(m, MixedEmbeddingBagCollection):  # its own glue: feature selection, KeyedTensor merge
            m.register_forward_pre_hook(lambda m, i: rec.push("emb_glue"))
            m.register_forward_hook(lambda m, i, o: rec.pop())
    dense_arch = next(m for n, m in dmp.named_modules() if n.endswith("dense_arch"))
    dense_arch.register_forward_hook(lambda m, i, out: mark(out, "dense_bwd"))
    dmp.register_forward_pre_hook(lambda m, i: rec.push("dense_fwd"))
    dmp.register_forward_hook(lambda m, i, o: rec.pop())
    return found


def wrap_loss(loss_fn: Callable, rec: Recorder) -> Callable:
    """The loss under label dense_fwd; its backward starts the dense_bwd label."""

    def f(*args, **kwargs):
        with rec.label("dense_fwd"):
            return mark(loss_fn(*args, **kwargs), "dense_bwd")

    return f


def wrap_optimizer(optimizer, rec: Recorder) -> None:
    for method in ("step", "zero_grad"):
        orig = getattr(optimizer, method)

        def wrapped(*args, _orig=orig, **kwargs):
            with rec.label("dense_optimizer"):
                return _orig(*args, **kwargs)

        setattr(optimizer, method, wrapped)


# ---------------------------------------------------------------------------------------------
# Step breakdown: labels -> the reported categories
# ---------------------------------------------------------------------------------------------

CATEGORIES = ["input_a2a", "lookup_fwd", "output_a2a_fwd", "emb_glue", "dense_fwd", "dense_bwd", "output_a2a_bwd",
              "lookup_bwd_update", "allreduce", "dense_optimizer", "other"]
CATEGORY_TEXT = {
    "input_a2a": "input (index) all-to-all: KJT permute/bucketise/range check + its all-to-alls (+ the error-code "
                 "all-reduce only with the sharder's raise_on_every_rank)",
    "lookup_fwd": "embedding lookup forward (TT kernel / fbgemm TBE)",
    "output_a2a_fwd": "pooled-embedding all-to-all, forward (+ KeyedTensor assembly)",
    "emb_glue": "MixedEmbeddingBagCollection forward glue: selecting each child's features from the KJT, "
                "merging the children's KeyedTensors (its backward is in dense_bwd)",
    "dense_fwd": "MLPs + interaction + loss forward (DDP forward, DLRM's sparse-arch glue)",
    "dense_bwd": "MLPs + interaction backward (excluding the DDP all-reduce)",
    "output_a2a_bwd": "pooled-embedding all-to-all, backward (gradients back to the owners)",
    "lookup_bwd_update": "embedding backward + fused optimizer update (TT: core grads + sparse row update; "
                         "TBE: fused backward-update kernel)",
    "allreduce": "DDP gradient all-reduce of the MLPs (and of data-parallel TorchRec tables, their own DDP) + TT "
                 "replicated-core gradient all-reduce",
    "dense_optimizer": "MLP optimizer step (+ data-parallel TorchRec tables: TableOptimizer) + zero_grad",
    "other": "train-loop checks (non-finite input/loss, their all-reduce), Python glue",
}


def category_of(label: str, kind: Optional[str] = None) -> str:
    """Category of an exclusive-time label, or of a collective (label, kind)."""
    if kind in ("ddp_all_reduce", "ebc_dp_all_reduce"):
        return "allreduce"
    base = label.split("@")[0]
    mod, _, step = base.partition("/")
    if not step:
        return {"dense_fwd": "dense_fwd", "dense_bwd": "dense_bwd", "dense_optimizer": "dense_optimizer",
                "emb_glue": "emb_glue"}.get(mod, "other")
    return {"input_dist": "input_a2a", "lookup_fwd": "lookup_fwd", "output_dist": "output_a2a_fwd",
            "output_a2a_bwd": "output_a2a_bwd", "lookup_bwd": "lookup_bwd_update", "fused_update": "lookup_bwd_update",
            "replica_allreduce": "allreduce"}[step]


def summarize_steps(snapshots: list[dict], step_times: list[float]) -> dict:
    """Mean per step over ``snapshots`` (one per measured step) of one rank."""
    n = len(snapshots)
    labels: dict[str, float] = defaultdict(float)
    colls: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    counts: dict[str, float] = defaultdict(float)
    per_step_bytes: dict[str, set] = defaultdict(set)
    for s in snapshots:  # sums first (integers stay exact), one division at the end
        for k, v in s["times"].items():
            labels[k] += v
        for k, (c, b, t) in s["colls"].items():
            e = colls[k]
            e[0] += c
            e[1] += b
            e[2] += t
            per_step_bytes[k].add(b)
        for k, v in s["counts"].items():
            counts[k] += v

    def mean(x):
        return x // n if isinstance(x, int) and x % n == 0 else x / n

    labels = {k: v / n for k, v in labels.items()}
    colls = {k: [mean(c), mean(b), t / n] for k, (c, b, t) in colls.items()}
    counts = {k: mean(v) if isinstance(v, int) else v / n for k, v in counts.items()}
    categories = {c: 0.0 for c in CATEGORIES}
    comm_seconds = {c: 0.0 for c in CATEGORIES}
    for label, t in labels.items():
        categories[category_of(label)] += t
    for key, (_, _, t) in colls.items():
        owner, kind = key.split("|")
        c = category_of(owner, kind)
        categories[c] += t
        comm_seconds[c] += t
    step = sum(step_times) / n
    return {"step_time_s": step, "step_time_median_s": sorted(step_times)[n // 2],
            "recorded_s": sum(categories.values()), "categories_s": categories,
            "categories_in_collectives_s": comm_seconds, "labels_s": dict(labels),
            "collectives": {k: {"calls": v[0], "bytes": v[1], "seconds": v[2],
                                "bytes_same_every_step": len(per_step_bytes[k]) == 1} for k, v in colls.items()},
            "counts": dict(counts)}


def mean_over_ranks(per_rank: list[dict], key: str = "categories_s") -> dict:
    keys = per_rank[0][key].keys()
    return {k: sum(r[key][k] for r in per_rank) / len(per_rank) for k in keys}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _storage_key(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def embedding_memory(dmp) -> dict:
    """Bytes allocated on this rank by the sharded embedding modules: weights (TT cores / TBE
    weights), optimizer state (the TT fused optimizer's state, i.e. ``_states``, / TBE momentum),
    other buffers (index metadata), each storage counted once (views of one flat TBE buffer share
    a storage)."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    from ttdist.distributed import ShardedTTEmbeddingBagCollection

    out: dict[str, dict[str, int]] = {}
    for fqn, m in dmp.named_modules():
        if not isinstance(m, (ShardedTTEmbeddingBagCollection, ShardedEmbeddingBagCollection)):
            continue
        name = "tt" if isinstance(m, ShardedTTEmbeddingBagCollection) else "ebc"
        seen: dict[tuple[int, int], str] = {}
        tensors = [(n, p, "weights") for n, p in m.named_parameters()]
        for n, b in m.named_buffers():
            is_state = "momentum" in n or "optimizer" in n
            tensors.append((n, b, "optimizer_state" if is_state else "other_buffers"))
        # TT: the optimizer state is no buffer; it is the fused optimizer's state (module._states)
        for v in getattr(m, "_states", {}).values():
            tensors.append(("tt_state", v, "optimizer_state"))
        for opt in _fused_optimizers(m):
            for state in opt.state.values():
                for v in (state.values() if isinstance(state, dict) else [state]):
                    if hasattr(v, "untyped_storage"):
                        tensors.append(("fused_state", v, "optimizer_state"))
        for n, value, kind in tensors:
            local = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
            for t in local:
                if t.device.type == "meta" or t.numel() == 0:
                    continue
                key = _storage_key(t)
                if key not in seen or (seen[key] == "other_buffers" and kind != "other_buffers"):
                    seen[key] = kind
        sizes = {"weights": 0, "optimizer_state": 0, "other_buffers": 0}
        for (_, nbytes), kind in seen.items():
            sizes[kind] += nbytes
        sizes["total"] = sum(sizes.values())
        out[name] = sizes
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("weights", "optimizer_state", "other_buffers", "total")}
    return out


def _fused_optimizers(module) -> Iterable:
    opt = getattr(module, "fused_optimizer", None)
    if opt is None:
        return []
    inner = getattr(opt, "optimizers", None)
    if inner:
        return [o for _, o in inner]
    return [opt]


def dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float))


# ---------------------------------------------------------------------------------------------
# A training session of the ttdist app, instrumented
# ---------------------------------------------------------------------------------------------


def init_worker(cfg):
    """torchrun worker: the app's process group (gloo on CPU), one thread per rank unless told."""
    import torch

    from ttdist.process_group import init_distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return init_distributed(cfg)


def plan_summary(plan) -> dict:
    from ttdist.tools.perf_model import summarize_plan

    return summarize_plan(plan)


def make_batches(cfg_data, rank: int, world_size: int, n: int, device=None) -> list:
    """``n`` batches of this rank, generated (and moved to ``device``) before any timing."""
    from itertools import islice

    from ttdist.data import make_dataset

    batches = list(islice(iter(make_dataset(cfg_data, "train", rank, world_size)), n))
    return [b.to(device) for b in batches] if device is not None else batches


def predicted_bytes_or_none(dmp, cfg, batch: int):
    """ttdist.tools.perf_model's bytes for this rank, or None when the plan holds what it does not model
    (TorchRec row-wise tables, which the planner may pick on GPU)."""
    from ttdist.tools.perf_model import predicted_bytes_for_dmp

    try:
        return predicted_bytes_for_dmp(dmp, cfg, batch)
    except NotImplementedError as e:
        print(f"[bytes not predicted: {e}]", flush=True)
        return None


class Session:
    """An instrumented DMP training session: ``train_one`` times one step, ``run`` many."""

    def __init__(self, cfg, env) -> None:
        import torch

        from ttdist.session import build_session
        from ttdist.train import RunStats

        self.cfg, self.env = cfg, env
        session = build_session(cfg, env)  # the app's model, plan, DMP and optimizer
        self.dmp, self.optimizer, self.plan = session.model, session.optimizer, session.plan
        self.rec = Recorder()
        patch_collectives(self.rec)
        self.found = instrument(self.dmp, self.rec)
        wrap_optimizer(self.optimizer, self.rec)
        self.loss_fn = wrap_loss(torch.nn.BCEWithLogitsLoss(), self.rec)
        self.step = 0
        self.stats = RunStats()

    def train_one(self, batch, trace: bool = False) -> tuple[dict, float]:
        """One ttdist.train.train_step: (the recorder's snapshot, wall seconds)."""
        import torch.distributed as dist

        from ttdist.train import train_step

        global REC
        REC = self.rec  # collective wrappers and backward marks report to this session
        if self.env.world_size > 1:
            dist.barrier()
        self.rec.reset()
        self.rec.transitions = [] if trace else None
        self.rec.push("other")
        t0 = time.perf_counter()
        train_step(self.dmp, self.optimizer, self.loss_fn, batch, self.step, self.cfg, self.stats)
        dt = time.perf_counter() - t0
        snap = self.rec.snapshot()
        if trace:
            print("label transitions of one step (rank 0):", " ".join(self.rec.transitions), flush=True)
        self.rec.reset()
        self.step += 1
        return snap, dt

    def run(self, batches: list, warmup: int, global_batch: int) -> dict:
        snaps, times = [], []
        for i, batch in enumerate(batches):
            trace = bool(os.environ.get("TTDIST_BENCH_TRACE")) and i == warmup and self.env.rank == 0
            snap, dt = self.train_one(batch, trace)
            if i >= warmup:
                snaps.append(snap)
                times.append(dt)
        return finish_summary(snaps, times, batches[0], warmup, global_batch)


def finish_summary(snaps: list, times: list, batch, warmup: int, global_batch: int) -> dict:
    summary = summarize_steps(snaps, times)
    summary["batch_per_rank"] = int(batch.labels.numel())
    summary["global_batch"] = global_batch
    summary["steps"] = len(snaps)
    summary["warmup_steps"] = warmup
    return summary
