"""Every collective of the training app gets tensors of the job's device.

NCCL (the GPU backend) rejects CPU tensors ("No backend type associated with device type cpu"),
and CI has no GPU. So, on 2 gloo ranks, the app's collective helpers run with torch's default
device set to "meta" and the collectives wrapped: a tensor made on the job's device (CPU here)
passes, one made without naming a device lands on "meta" and is refused, as NCCL would refuse a
CPU tensor on a GPU job.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.multiprocess

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "broadcast",
               "reduce_scatter_tensor")


@contextlib.contextmanager
def job_device_only(device: torch.device):
    """Collectives refuse tensors off ``device``; tensors made without a device land on "meta"."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def guard(name, fn):
        def checked(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device != device:
                    raise RuntimeError(f"dist.{name} got a tensor on {t.device}; the job's device is {device} "
                                       "(NCCL: 'No backend type associated with device type')")
            return fn(*args, **kwargs)
        return checked

    for name, fn in originals.items():
        setattr(dist, name, guard(name, fn))
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _app_collectives(rank: int, world_size: int) -> dict:
    from ttdist import train

    env = train.DistEnv(rank, world_size, torch.device("cpu"))
    progress = train.Progress.disabled()
    with job_device_only(env.device):
        restart = train.restarted(progress, env)
        loss = torch.tensor(float("nan") if rank == 1 else 0.5, device=env.device)
        health = train.agree_step_health(bad_input=rank == 0, loss=loss)
        summary = train.RunStats().summary(env)
    return {"restarted": restart, "health": health, "peak_rss_bytes": summary["peak_rss_bytes"]}


def test_app_collectives_use_the_job_device():
    results = run_ranks(_app_collectives, 2)
    for r in results:
        assert r["restarted"] is False
        assert r["health"] == ([0], [1])  # rank 0's input and rank 1's loss, agreed by both ranks
        assert r["peak_rss_bytes"] > 0


def _sharded_collection_step(rank: int, world_size: int) -> float:
    """One forward + backward of the sharded TT collection under the same guard (row-wise: the
    KJT all-to-alls, the pooled all-to-alls forward and backward, the one all-reduce of the
    replicated cores' gradients; and the input range check, which issues no collective but must
    build its tensors on the input's device)."""
    from tests.distributed import workers

    tables = workers.make_tables()
    module = workers.dlrm(tables, {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1, "eps": 1e-8})
    sharding = {t.name: "row_wise" for t in tables}
    model, _ = workers.shard(module, world_size, sharding, {"optimizer": "exact_row_wise_adagrad"}, 4)
    dense, ids, labels = workers.global_batch(0, 4 * world_size)
    local = list(range(rank * 4, rank * 4 + 4))
    features = workers.kjt_of(ids, local)
    with job_device_only(torch.device("cpu")):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense[local], features).squeeze(1),
                                                                    labels[local])
        loss.backward()
    return float(loss)


def test_sharded_collection_collectives_use_the_job_device():
    losses = run_ranks(_sharded_collection_step, 2)
    assert all(0 < loss < 10 for loss in losses)
