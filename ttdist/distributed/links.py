"""The job's own links, measured for the planner: latency per collective and bandwidth per rank.

TorchRec's ``Topology`` carries bandwidths only, and its defaults are GPU figures (hundreds of
GB/s within a host); a CPU job on gloo moves a few hundred MB/s and pays about a millisecond per
collective, whatever its size. At that price the number of collectives decides a plan, so the app
measures them on the process group it is about to plan for (every rank takes part, ~0.1 s) and
hands both to the planner: the bandwidth through TorchRec's ``Topology``, the latency to the
rating of whole plans (``planner.TTCollectivesPerfModel``).

Model of one all-to-all that hands S bytes per rank to the collective: ``t = latency + S / bandwidth``,
fitted from two sizes (``measure_links``), each figure rounded to a half-octave (a factor of
sqrt 2) so that timing noise rarely changes a plan from one run to the next.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.distributed.planner import Topology


@dataclass(frozen=True)
class LinkModel:
    """``latency_ms`` per collective call; ``bytes_per_ms`` per rank (TorchRec's bandwidth unit)."""

    latency_ms: float
    bytes_per_ms: float

    def topology(self, world_size: int, compute_device: str) -> Topology:
        """TorchRec's Topology with these links as its intra- and inter-host bandwidth."""
        return Topology(world_size=world_size, compute_device=compute_device, intra_host_bw=self.bytes_per_ms,
                        inter_host_bw=self.bytes_per_ms)


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


def measure_links(device: torch.device, group=None, large_bytes: int = 1 << 20, repeats: int = 5) -> LinkModel:
    """Times ``all_to_all_single`` of 8 bytes and of ``large_bytes`` per rank on ``group`` (a
    collective: every rank calls it) and fits ``LinkModel``; the ranks agree on the slowest figures."""
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

    t_small = _median_ms(all_to_all(small), repeats)
    t_large = _median_ms(all_to_all(large), repeats)
    figures = torch.tensor([t_small, (t_large - t_small) / (4 * per_peer * world)], dtype=torch.float64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
    latency, ms_per_byte = figures.tolist()
    return LinkModel(latency_ms=_half_octave(latency), bytes_per_ms=_half_octave(1.0 / max(ms_per_byte, 1e-12)))
