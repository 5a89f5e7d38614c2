"""TT lookup kernel benchmark: fwd, bwd and fwd+bwd time per looked-up row.

Compares, in the same run and on the same indices:
  ttdist            TTEmbeddingBag (input validation + op), dense core gradients in backward
  ttdist_op         the op alone (``ttdist.ops.tt_lookup`` on validated inputs), dense core gradients
  ttdist_fused_sgd  TTEmbeddingBag(sparse=True): backward = fused EXACT_SGD step on the cores
  reference         the plain-PyTorch reference (``ttdist.ops.tt_forward_reference`` + autograd)
  dense_embedding_bag  ``nn.EmbeddingBag`` of the same size, sparse gradients (if it fits)
  fbtt              FBTT-Embedding's TTEmbeddingBag (CUDA only; sparse=True, SGD, no cache), when
                    its source is present (see --fbtt) and builds against the installed torch

Formulas (per looked-up row, d cores, Q_k = q_1..q_k, ranks r_0..r_d):
  FLOPs = 2 * sum_{k=2..d} Q_{k-1} * r_{k-1} * q_k * r_k          (forward chain, no reuse)
  bytes = element size * (sum_k r_{k-1} q_k r_k  + D)              (core slices read + row written)
Timing: medians over --repeat rounds; each round times one fwd and one fwd+bwd of every variant in
turn, so the load of a shared machine falls on all of them alike and the ratios are side by side.
Achieved GFLOP/s = forward FLOPs * rows / forward time; on CUDA also as a fraction of the
device's plain fp32 peak (--peak-tflops; H200 SXM datasheet: 67).

  python benchmarks/tt_kernel_bench.py --device cpu [--quick] [--threads N] [--no-dense] [--shapes fbtt]
  python benchmarks/tt_kernel_bench.py --device cuda --batches 512,65536 --dtypes float32,bfloat16 --shapes fbtt
Writes benchmarks/results/tt_kernel_<device>[_<gpu model>].json and prints ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import ttdist
from fbtt_build import DEFAULT_FBTT, load_fbtt
from ttdist.ops import tt_forward_reference, tt_lookup

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    # FBTT-Embedding's own benchmark shape (tt_embeddings_benchmark.py).
    "fbtt": dict(p=[200, 220, 250], q=[4, 4, 4], ranks=[32, 32]),
    "small_rank": dict(p=[200, 220, 250], q=[4, 4, 4], ranks=[8, 8]),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Plain (non-tensor-core) fp32 peak in TFLOP/s, by device name; datasheet figures.
FP32_PEAK_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5}


def measure_interleaved(variants: dict[str, Callable[[], torch.Tensor]], device: str, rounds: int,
                        warmup: int = 2) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """fwd, bwd and fwd+bwd seconds of every variant (bwd = fwd+bwd - fwd), each the median over
    ``rounds`` rounds; a round times one fwd and one fwd+bwd of every variant in turn (the order
    reversed every other round), so a change of a shared machine's load falls on all of them alike.
    A variant that raises is left out and reported in the second dict. CUDA: synchronised per call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = {name: (forward, lambda f=forward: f().float().sum().backward()) for name, forward in variants.items()}
    errors: dict[str, str] = {}

    def run(name: str, fn: Callable[[], object]) -> Optional[float]:
        try:
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0
        except Exception as e:  # a baseline that fails is reported; the others' figures stay
            errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{name} failed: {errors[name]}", flush=True)
            return None

    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for r in range(warmup + rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            if name in errors:
                continue
            fwd, both = run(name, calls[name][0]), run(name, calls[name][1])
            if r >= warmup and fwd is not None and both is not None:
                times[name][0].append(fwd)
                times[name][1].append(both)
    out = {}
    for name, (fwd, both) in times.items():
        if name not in errors:
            f, b = statistics.median(fwd), statistics.median(both)
            out[name] = {"fwd_s": f, "bwd_s": max(b - f, 0.0), "fwd_bwd_s": b}
    return out, errors


def dense_fits(rows: int, dim: int, element_size: int, device: str) -> bool:
    need = rows * dim * element_size * 2.5  # weight + sparse grad + slack
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] > need
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > need


def bench_shape(name: str, shape: dict, bags: int, pooling: int, device: str, dtype: torch.dtype, repeat: int,
                with_reference: bool, with_dense: bool = True, fbtt=None) -> dict:
    p, q, ranks = shape["p"], shape["q"], shape["ranks"]
    rows, dim = math.prod(p), math.prod(q)
    gen = torch.Generator().manual_seed(0)
    tt = ttdist.TTEmbeddingBag(rows, dim, ranks, tt_p_shapes=p, tt_q_shapes=q, device=device, dtype=dtype,
                               generator=gen)
    fused = ttdist.TTEmbeddingBag(rows, dim, ranks, tt_p_shapes=p, tt_q_shapes=q, device=device, dtype=dtype,
                                  sparse=True, optimizer="exact_sgd", learning_rate=1e-9)
    fused.load_state_dict(tt.state_dict(), strict=False)
    indices = torch.randint(0, rows, (bags * pooling,), generator=gen).to(device)
    offsets = torch.arange(0, bags * pooling, pooling).to(device)
    full_offsets = torch.cat([offsets, offsets.new_tensor([indices.numel()])])
    n = indices.numel()
    result = {"shape": name, "dtype": str(dtype).replace("torch.", ""), "p": p, "q": q, "ranks": ranks,
              "bags": bags, "pooling": pooling, "lookups": n}
    op_cores = [c.detach().clone().requires_grad_(True) for c in tt.tt_cores]
    ref_cores = [c.detach().clone().requires_grad_(True) for c in tt.tt_cores]
    variants = {"ttdist": lambda: tt(indices, offsets),
                "ttdist_op": lambda: tt_lookup(op_cores, tt._spec(), indices, full_offsets),
                "ttdist_fused_sgd": lambda: fused(indices, offsets)}
    if with_reference:
        variants["reference"] = lambda: tt_forward_reference(ref_cores, tt._spec(), indices, full_offsets)
    if with_dense and dense_fits(rows, dim, tt.tt_cores[0].element_size(), device):
        dense = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device, dtype=dtype)
        variants["dense_embedding_bag"] = lambda: dense(indices, offsets)
    if fbtt is not None and dtype == torch.float32:
        try:  # weight_dist="normal": FBTT's default "approx-normal" init fails under NumPy 2.
            module = fbtt.TTEmbeddingBag(rows, dim, ranks, tt_p_shapes=p, tt_q_shapes=q, optimizer=fbtt.OptimType.SGD,
                                         learning_rate=1e-9, sparse=True, use_cache=False,
                                         weight_dist="normal").to(device)
            variants["fbtt"] = lambda: module(indices, full_offsets)
        except Exception as e:
            result.setdefault("errors", {})["fbtt"] = f"{type(e).__name__}: {str(e)[:500]}"
    runs, errors = measure_interleaved(variants, device, repeat)
    if errors:
        result.setdefault("errors", {}).update(errors)
    for name in ("ttdist", "ttdist_op", "ttdist_fused_sgd"):
        if name not in runs:
            raise RuntimeError(f"{name} failed at {bags} bags, {dtype}: {errors[name]}")
    f, b = tt.shapes[0].flops_per_row(), tt.shapes[0].bytes_per_row(tt.tt_cores[0].element_size())
    for run in runs.values():
        for key in ("fwd", "bwd", "fwd_bwd"):
            run[f"{key}_us_per_row"] = run[f"{key}_s"] * 1e6 / n
        run["fwd_gflops"] = f * n / run["fwd_s"] / 1e9
        run["fwd_gbytes_per_s"] = b * n / run["fwd_s"] / 1e9
    result["runs"] = runs
    result["ratios"] = {}
    for base in ("ttdist", "ttdist_fused_sgd"):
        for other, run in runs.items():
            if other not in ("ttdist", "ttdist_fused_sgd"):
                result["ratios"][f"{other}_over_{base}_fwd_bwd"] = run["fwd_bwd_s"] / runs[base]["fwd_bwd_s"]
    result["flops_per_row"], result["bytes_per_row"] = f, b
    return result


def profile_kernels(shape: dict, bags: int, pooling: int) -> None:
    """Prints the CUDA kernels of one forward + backward of TTEmbeddingBag (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    rows, dim = math.prod(shape["p"]), math.prod(shape["q"])
    tt = ttdist.TTEmbeddingBag(rows, dim, shape["ranks"], tt_p_shapes=shape["p"], tt_q_shapes=shape["q"], device="cuda")
    indices = torch.randint(0, rows, (bags * pooling,), device="cuda")
    offsets = torch.arange(0, bags * pooling, pooling, device="cuda")
    for _ in range(2):
        tt(indices, offsets).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tt(indices, offsets).sum().backward()
        torch.cuda.synchronize()
    print(f"profile, {bags} bags x {pooling}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)


def fp32_peak_tflops(device_name: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    return next((v for k, v in FP32_PEAK_TFLOPS.items() if k in device_name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and batches")
    ap.add_argument("--repeat", type=int, default=None, help="measured rounds (default 10; quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense nn.EmbeddingBag baseline")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--batches", default=None, help="comma-separated bag counts (default: 512 on CPU; "
                                                     "512,4096,16384,65536 on CUDA)")
    ap.add_argument("--dtypes", default="float32", help="comma-separated subset of " + ",".join(DTYPES))
    ap.add_argument("--fbtt", type=Path, default=DEFAULT_FBTT,
                    help="FBTT-Embedding source checkout (CUDA only; skipped when absent)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's plain fp32 peak")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: also print the kernels of one ttdist fwd+bwd per batch size (torch.profiler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = args.repeat or (3 if args.quick else 10)
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    else:
        batches = [512] if args.device == "cpu" else ([512, 4096] if args.quick else [512, 4096, 16384, 65536])
    fbtt, fbtt_status = None, "not run (CPU)" if args.device == "cpu" else f"not present at {args.fbtt}"
    if args.device == "cuda" and (args.fbtt / "tt_embeddings_cuda.cu").exists():
        try:
            t0 = time.perf_counter()
            fbtt = load_fbtt(args.fbtt, REPO / "build" / "fbtt")
            fbtt_status = f"built in {time.perf_counter() - t0:.0f} s"
        except Exception as e:  # a build failure must not hide ttdist's own figures
            fbtt_status = f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
        print(f"FBTT-Embedding: {fbtt_status}", flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    peak = fp32_peak_tflops(device_name, args.peak_tflops) if args.device == "cuda" else None
    results = []
    for dtype_name in args.dtypes.split(","):
        for name in args.shapes.split(","):
            for bags in batches:
                r = bench_shape(name, SHAPES[name], bags, 20, args.device, DTYPES[dtype_name], repeat,
                                with_reference=bags <= 65536, with_dense=not args.no_dense, fbtt=fbtt)
                results.append(r)
                t = r["runs"]["ttdist"]
                if peak:
                    for run in r["runs"].values():
                        run["fwd_fraction_of_fp32_peak"] = run["fwd_gflops"] / (peak * 1e3)
                line = (f"{name:>10} {dtype_name:>8} bags={bags:>6}: ttdist fwd {t['fwd_us_per_row']:.4f} "
                        f"bwd {t['bwd_us_per_row']:.4f} fwd+bwd {t['fwd_bwd_us_per_row']:.4f} us/row, "
                        f"{t['fwd_gflops']:.1f} GFLOP/s")
                for k, v in r["ratios"].items():
                    line += f" | {k} = {v:.2f}x"
                print(line, flush=True)
                if args.profile and args.device == "cuda" and dtype_name == "float32":
                    profile_kernels(SHAPES[name], bags, 20)
    out = {
        "device": args.device, "device_name": device_name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "fp32_peak_tflops": peak, "fbtt": fbtt_status,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": results,
    }
    suffix = f"_{device_name.replace(' ', '_')}" if args.device == "cuda" else ""
    path = args.out or RESULTS / f"tt_kernel_{args.device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
