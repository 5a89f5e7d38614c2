"""TT lookup kernel benchmark: fwd, bwd and fwd+bwd time per looked-up row.

Compares, in the same run and on the same indices, ttdist's kernel with the plain-PyTorch
reference (``ttdist.ops.tt_forward_reference`` + autograd) and a dense ``nn.EmbeddingBag`` of
the same size (sparse gradients; skipped when it does not fit in memory).

Formulas (per looked-up row, d cores, Q_k = q_1..q_k, ranks r_0..r_d):
  FLOPs = 2 * sum_{k=2..d} Q_{k-1} * r_{k-1} * q_k * r_k          (forward chain, no reuse)
  bytes = 4 * (sum_k r_{k-1} q_k r_k  + D)                         (core slices read + row written)
Backward is counted as 2x the forward FLOPs. Achieved GFLOP/s = FLOPs * rows / time.

  python benchmarks/tt_kernel_bench.py --device cpu [--quick] [--threads N] [--no-dense] [--shapes fbtt]
Writes benchmarks/results/tt_kernel_<device>[_<gpu model>].json and prints ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import ttdist
from ttdist.ops import tt_forward_reference

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # FBTT-Embedding's own benchmark shape (tt_embeddings_benchmark.py).
    "fbtt": dict(p=[200, 220, 250], q=[4, 4, 4], ranks=[32, 32]),
    "small_rank": dict(p=[200, 220, 250], q=[4, 4, 4], ranks=[8, 8]),
}


def timeit(fn: Callable[[], None], device: str, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(forward: Callable[[], torch.Tensor], device: str, repeat: int) -> dict[str, float]:
    """fwd, bwd, fwd+bwd seconds; bwd = fwd+bwd - fwd."""
    fwd = timeit(lambda: forward(), device, repeat)
    both = timeit(lambda: forward().sum().backward(), device, repeat)
    return {"fwd_s": fwd, "bwd_s": max(both - fwd, 0.0), "fwd_bwd_s": both}


def dense_fits(rows: int, dim: int, device: str) -> bool:
    need = rows * dim * 4 * 2.5  # weight + sparse grad + slack
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] > need
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > need


def bench_shape(name: str, shape: dict, bags: int, pooling: int, device: str, repeat: int, with_reference: bool,
                with_dense: bool = True) -> dict:
    p, q, ranks = shape["p"], shape["q"], shape["ranks"]
    rows, dim = math.prod(p), math.prod(q)
    tt = ttdist.TTEmbeddingBag(rows, dim, ranks, tt_p_shapes=p, tt_q_shapes=q, device=device)
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, rows, (bags * pooling,), generator=gen).to(device)
    offsets = torch.arange(0, bags * pooling, pooling).to(device)
    n = indices.numel()
    result = {"shape": name, "p": p, "q": q, "ranks": ranks, "bags": bags, "pooling": pooling, "lookups": n}
    runs = {"ttdist": measure(lambda: tt(indices, offsets), device, repeat)}
    if with_reference:
        cores = [c.detach().clone().requires_grad_(True) for c in tt.tt_cores]
        full_offsets = torch.cat([offsets, offsets.new_tensor([n])])
        runs["reference"] = measure(lambda: tt_forward_reference(cores, tt._spec(), indices, full_offsets), device,
                                    max(2, repeat // 3))
    if with_dense and dense_fits(rows, dim, device):
        dense = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
        runs["dense_embedding_bag"] = measure(lambda: dense(indices, offsets), device, repeat)
        del dense
    f, b = tt.shapes[0].flops_per_row(), tt.shapes[0].bytes_per_row()
    for run in runs.values():
        for key in ("fwd", "bwd", "fwd_bwd"):
            run[f"{key}_us_per_row"] = run[f"{key}_s"] * 1e6 / n
        run["fwd_gflops"] = f * n / run["fwd_s"] / 1e9
        run["fwd_gbytes_per_s"] = b * n / run["fwd_s"] / 1e9
    result["runs"] = runs
    tt_time = runs["ttdist"]["fwd_bwd_s"]
    result["ratios"] = {f"{other}_over_ttdist_fwd_bwd": run["fwd_bwd_s"] / tt_time
                        for other, run in runs.items() if other != "ttdist"}
    result["flops_per_row"], result["bytes_per_row"] = f, b
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and batches")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense nn.EmbeddingBag baseline")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = args.repeat or (3 if args.quick else 10)
    batches = [512] if args.device == "cpu" else ([512, 4096] if args.quick else [512, 4096, 16384, 65536])
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for bags in batches:
            r = bench_shape(name, shape, bags, 20, args.device, repeat, with_reference=bags <= 16384,
                            with_dense=not args.no_dense)
            results.append(r)
            runs = r["runs"]
            line = (f"{name:>10} bags={bags:>6}: ttdist fwd {runs['ttdist']['fwd_us_per_row']:.3f} "
                    f"bwd {runs['ttdist']['bwd_us_per_row']:.3f} fwd+bwd {runs['ttdist']['fwd_bwd_us_per_row']:.3f} us/row, "
                    f"{runs['ttdist']['fwd_gflops']:.1f} GFLOP/s")
            for k, v in r["ratios"].items():
                line += f" | {k} = {v:.2f}x"
            print(line, flush=True)
    device_name = torch.cuda.get_device_name().replace(" ", "_") if args.device == "cuda" else platform.processor() or "cpu"
    out = {
        "device": args.device, "device_name": device_name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"_{device_name}" if args.device == "cuda" else ""
    path = RESULTS / f"tt_kernel_{args.device}{suffix}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
