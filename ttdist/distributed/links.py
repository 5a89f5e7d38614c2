"""The job's own links, measured for the planner: the price of a collective call and bandwidth per rank.

TorchRec's ``Topology`` carries bandwidths only, and its defaults are GPU figures (hundreds of
GB/s within a host); a CPU job on gloo moves a few hundred MB/s and pays about half a millisecond
per collective, whatever its size. At that price the number of collectives decides a plan, so the
app measures them on the process group it is about to plan for (every rank takes part, ~0.1 s) and
hands both to the planner: the bandwidth through TorchRec's ``Topology``, the price of a call to
the rating of whole plans (``planner.TTCollectivesPerfModel``).

A call is priced as TorchRec's dists make it, not as a bare collective: one step of a sharding
group's dists on the smallest input (``KJTAllToAll`` of one id per rank, then
``PooledEmbeddingsAllToAll`` forward and backward), divided by its ``CALLS_PER_SHARDED_GROUP``
calls. The host work around each call (the KJT's splits and permutes, awaitables, autograd) is
paid once per call in every training step; on 2 gloo ranks of a 2-core machine it is most of the
price (a bare ``all_to_all_single`` took 0.12 ms, a call in that step 0.5 ms), and priced at the
bare figure the planner chose an extra table-wise group that measured slower than none.

Bandwidth: from ``all_to_all_single`` of 8 bytes and of a large size per rank,
``t = latency + S / bandwidth``. Each figure is rounded to a half-octave (a factor of sqrt 2) so
that timing noise rarely changes a plan from one run to the next.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.planner import Topology
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ttdist.distributed.planner import CALLS_PER_SHARDED_GROUP, bus_topology


@dataclass(frozen=True)
class LinkModel:
    """``latency_ms`` per collective call of a sharding group's dists; ``bytes_per_ms`` per rank
    (TorchRec's bandwidth unit)."""

    latency_ms: float
    bytes_per_ms: float

    def topology(self, world_size: int, compute_device: str) -> Topology:
        """TorchRec's Topology with these links as its intra- and inter-host bandwidth (all-reduces
        priced by ``planner.BusBandwidths``)."""
        return bus_topology(world_size, compute_device, self.bytes_per_ms, self.bytes_per_ms)


def _half_octave(x: float) -> float:
    return 2.0 ** (round(2 * math.log2(x)) / 2) if x > 0 else 0.0


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: connections, buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _sharded_group_step(device: torch.device, group: dist.ProcessGroup) -> Callable[[], None]:
    """One step of a table-wise sharding group's dists, TorchRec's own, on the smallest input (every
    rank owns one feature; one sample per rank, one id each): the ids' ``KJTAllToAll`` (splits,
    lengths, values) and the pooled embeddings' ``PooledEmbeddingsAllToAll`` forward and backward."""
    world = dist.get_world_size(group)
    keys = [f"feature_{r}" for r in range(world)]
    index_dist = KJTAllToAll(group, [1] * world)
    pooled_dist = PooledEmbeddingsAllToAll(group, [1] * world, device=device)

    def step() -> None:
        ids = KeyedJaggedTensor(keys=keys, values=torch.zeros(world, dtype=torch.int64, device=device),
                                lengths=torch.ones(world, dtype=torch.int64, device=device))
        index_dist(ids).wait().wait()
        pooled = torch.zeros(world, 1, device=device, requires_grad=True)  # this rank's feature, every rank's sample
        pooled_dist(pooled, batch_size_per_rank=[1] * world).wait().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def measure_links(device: torch.device, group: Optional[dist.ProcessGroup] = None, large_bytes: int = 1 << 20,
                  repeats: int = 5) -> LinkModel:
    """Times a sharding group's dists (the price of a call, see the module docstring) and
    ``all_to_all_single`` of 8 bytes and of ``large_bytes`` per rank (the bandwidth) on ``group``
    (a collective: every rank calls it; None: the default group) and fits ``LinkModel``; the ranks
    agree on the slowest figures."""
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    per_peer = max(1, large_bytes // (4 * world))
    small = torch.zeros(2 * world, dtype=torch.float32, device=device)
    large = torch.zeros(per_peer * world, dtype=torch.float32, device=device)

    def all_to_all(t: torch.Tensor):
        def call() -> None:
            dist.all_to_all_single(torch.empty_like(t), t, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return call

    per_call = _median_ms(_sharded_group_step(device, group), repeats) / CALLS_PER_SHARDED_GROUP
    t_small = _median_ms(all_to_all(small), repeats)
    t_large = _median_ms(all_to_all(large), repeats)
    figures = torch.tensor([per_call, (t_large - t_small) / (4 * per_peer * world)], dtype=torch.float64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
    latency, ms_per_byte = figures.tolist()
    return LinkModel(latency_ms=_half_octave(latency), bytes_per_ms=_half_octave(1.0 / max(ms_per_byte, 1e-12)))
