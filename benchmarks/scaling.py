"""Weak and strong scaling of the ttdist DLRM step over 1, 2, 4, 8 ranks (torchrun per world size).

Per world size W, one torchrun job with W ranks:
  1. a gloo micro-benchmark of all_to_all_single and all_reduce at a few sizes, fitted to
     t = alpha + bytes/beta (a link model of ttdist.tools.perf_model for CPU step times);
  2. for each TT placement (tw: every TT table table_wise; rw: every TT table row_wise; dp: every
     TT table data_parallel; plan: every table where ttdist's planner puts it; the TorchRec tables
     wherever the planner puts them), one DMP, trained
       weak:   B samples per rank (global batch W*B)
       strong: a fixed global batch B_g (B_g/W per rank)
     for warm-up + N steps, with the step-time breakdown of e2e_bench.py (same instrumentation,
     benchmarks/_common.py), and the bytes every collective moved per step COUNTED (wrappers
     around torch.distributed's collectives and a DDP comm hook) next to the PREDICTED bytes of
     ttdist.tools.perf_model.collective_bytes (TT tables: ttdist.tools.comm_volume's formula;
     TorchRec tables: the same table/column-wise formula; DDP: the MLP parameter bytes). They
     must be equal, on every rank.
Efficiency: throughput(W) / (W * throughput(1)) for the same placement and mode (weak: T(1)/T(W);
strong: T(1, B_g) / (W T(W, B_g/W))).

WARNING (CPU): the ranks share this machine's cores (8 ranks on 2 cores are oversubscribed 4x),
so timings beyond W = cores measure the machine, not the method; byte counts and correctness
hold at any W. The JSON carries the warning, the core count and the load average.

  .venv/bin/python benchmarks/scaling.py [--quick] [--worlds 1,2,4,8] [--placements tw,rw,dp,plan] [--modes weak]
It re-executes itself per world size as
  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=W benchmarks/scaling.py --worker ...
Writes benchmarks/results/scaling_<device>.json and scaling_<device>.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# placement -> the sharding type forced on every TT table (None: the planner's choice)
PLACEMENTS = {"tw": "table_wise", "rw": "row_wise", "dp": "data_parallel", "plan": None}
MODES = ("weak", "strong")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny tables and batches, few steps")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--worlds", default="1,2,4,8")
    p.add_argument("--placements", default="tw,rw")
    p.add_argument("--modes", default=",".join(MODES), help="weak and/or strong")
    p.add_argument("--batch-per-rank", type=int, default=None, help="weak scaling B (default 1024; quick 256)")
    p.add_argument("--global-batch", type=int, default=None, help="strong scaling B_g (default 4096; quick 1024)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 8; quick 3)")
    p.add_argument("--repeat", type=int, default=1, help="run the worlds this many times, interleaved "
                   "(1, 2, .., 1, 2, ..); keep each entry's fastest repeat")
    p.add_argument("--warmup", type=int, default=None, help="excluded steps (default 2; quick 1)")
    p.add_argument("--scale", type=float, default=None, help="data.cardinality_scale (default 0.05; quick 0.01)")
    p.add_argument("--set", action="append", default=[], metavar="key.sub=value")
    p.add_argument("--out", default=None)
    p.add_argument("--report", metavar="JSON", help="print the tables of a saved result and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.batch_per_rank = args.batch_per_rank or (256 if q else 1024)
    args.global_batch = args.global_batch or (1024 if q else 4096)
    args.steps = args.steps or (3 if q else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.scale = args.scale or (0.01 if q else 0.05)
    return args


def base_overrides(args) -> list[str]:
    return ["train.progress_bar=false", "checkpoint.resume=false", "train.world_size=0",
            f"data.cardinality_scale={args.scale}"] + list(args.set)


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


def microbenchmark(world: int, quick: bool) -> dict:
    """Median time of all_to_all_single / all_reduce at a few sizes and their alpha/beta fit.

    Each timed call follows the same ~1 ms of compute on every rank and no barrier, as
    collectives do inside a step.
    """
    import torch
    import torch.distributed as dist

    from ttdist.tools.perf_model import fit_alpha_beta

    sizes = [4096, 65536, 262144, 1048576]
    repeat = 5 if quick else 9
    a, b = torch.randn(96, 96), torch.randn(96, 96)

    def busy() -> None:
        for _ in range(40):
            a @ b
    a2a = getattr(dist.all_to_all_single, "__wrapped__", dist.all_to_all_single)
    ar = getattr(dist.all_reduce, "__wrapped__", dist.all_reduce)
    out = {}
    dist.barrier()
    for kind in ("all_to_all_single", "all_reduce"):
        medians = []
        for nbytes in sizes:
            n = max(nbytes // 4 // world * world, world)
            x, y = torch.ones(n), torch.empty(n)
            times = []
            for i in range(repeat + 2):
                busy()
                t0 = time.perf_counter()
                if kind == "all_to_all_single":
                    a2a(y, x)
                else:
                    ar(x)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        out[kind] = {"bytes": [max(s // 4 // world * world, world) * 4 for s in sizes], "median_s": medians,
                     **fit_alpha_beta([max(s // 4 // world * world, world) * 4 for s in sizes], medians)}
    return out


def worker(args) -> None:
    import torch.distributed as dist

    from ttdist.config import load_config
    from ttdist.tools.comm_volume import comm_volume
    from ttdist.tools.perf_model import compare_bytes, counted_bytes

    base = load_config(args.config, base_overrides(args))
    env = C.init_worker(base)
    w, rank = env.world_size, env.rank
    links = microbenchmark(w, args.quick)
    tt_names = [f"t_cat_{i}" for i in base.tt_table_indices()]
    entries = []
    for placement in args.placements.split(","):
        kind = PLACEMENTS[placement]
        forced = ([f"train.sharding_types={{{', '.join(f'{n}: {kind}' for n in tt_names)}}}"] if kind else [])
        cfg = load_config(args.config, base_overrides(args) + forced + [f"data.batch_size={args.batch_per_rank * w}"])
        session = C.Session(cfg, env)
        memory = C.embedding_memory(session.dmp)
        batches_of = {"weak": args.batch_per_rank * w, "strong": args.global_batch}
        for mode in args.modes.split(","):
            global_batch = batches_of[mode]
            data = dataclasses.replace(cfg.data, batch_size=global_batch)
            batches = C.make_batches(data, rank, w, args.warmup + args.steps, env.device)
            summary = session.run(batches, args.warmup, global_batch)
            local = global_batch // w
            counted = counted_bytes(summary["collectives"])
            predicted = C.predicted_bytes_or_none(session.dmp, cfg, local)
            check = compare_bytes(counted, predicted) if predicted is not None else {
                "equal": None, "by_collective": {k: {"counted": b, "predicted": None} for k, b in counted.items()}}
            entries.append({"placement": placement, "mode": mode, "world_size": w, "rank": rank,
                            "summary": summary, "bytes": {"counted": counted, "predicted": predicted, **check},
                            "comm_volume": comm_volume(session.dmp, local, 1.0),
                            "embedding_memory": memory, "plan": C.plan_summary(session.plan)})
        # the next placement's steps must not pay for collecting this model's reference cycles (a
        # full collection at some step of the next placement cost one rank ~200 ms: its mean +10 ms)
        del session
        gc.collect()
    C.dump(Path(args.rank_dir) / f"rank{rank}.json",
           {"rank": rank, "world_size": w, "links": links, "entries": entries, "peak_rss_bytes": C.peak_rss_bytes()})
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def collect(rank_files: list[dict]) -> list[dict]:
    """One entry per (placement, mode) of this world size, ranks merged."""
    out = []
    for i, e0 in enumerate(rank_files[0]["entries"]):
        per_rank = [rf["entries"][i] for rf in rank_files]
        summaries = [e["summary"] for e in per_rank]
        step = sum(s["step_time_s"] for s in summaries) / len(summaries)
        out.append({
            "placement": e0["placement"], "mode": e0["mode"], "world_size": e0["world_size"],
            "global_batch": summaries[0]["global_batch"], "batch_per_rank": summaries[0]["batch_per_rank"],
            "steps": summaries[0]["steps"], "warmup_steps": summaries[0]["warmup_steps"],
            "step_time_s": step, "samples_per_s": summaries[0]["global_batch"] / step,
            "breakdown_s": C.mean_over_ranks(summaries),
            "breakdown_in_collectives_s": C.mean_over_ranks(summaries, "categories_in_collectives_s"),
            "bytes_equal": (None if any(e["bytes"]["equal"] is None for e in per_rank)
                            else all(e["bytes"]["equal"] for e in per_rank)),
            "bytes_per_rank": [e["bytes"]["by_collective"] for e in per_rank],
            "comm_volume_rank0": per_rank[0]["comm_volume"],
            "embedding_bytes_per_rank": [e["embedding_memory"]["total"]["total"] for e in per_rank],
            "peak_rss_bytes_per_rank": [rf["peak_rss_bytes"] for rf in rank_files],
            "links": rank_files[0]["links"],
            "plan": e0["plan"],
            "rank_summaries": summaries,
        })
    return out


def fastest_repeat(runs: list[dict]) -> list[dict]:
    """Per (placement, mode, W), the repeat with the shortest step (the least disturbed on a shared
    machine), with every repeat's step time beside it."""
    best: dict[tuple, dict] = {}
    for e in runs:
        key = (e["placement"], e["mode"], e["world_size"])
        times = best[key]["repeat_step_times_s"] if key in best else []
        if key not in best or e["step_time_s"] < best[key]["step_time_s"]:
            best[key] = e
        best[key]["repeat_step_times_s"] = times + [e["step_time_s"]]
    return list(best.values())


def add_efficiency(entries: list[dict]) -> None:
    for e in entries:
        base = next((b for b in entries if b["world_size"] == 1 and b["placement"] == e["placement"]
                     and b["mode"] == e["mode"]), None)
        e["efficiency"] = e["samples_per_s"] / (e["world_size"] * base["samples_per_s"]) if base else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["entries"]
    modes = [m for m in MODES if any(e["mode"] == m for e in entries)]
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), sharex=True, squeeze=False)
    for col, mode in enumerate(modes):
        for placement in sorted({e["placement"] for e in entries}):
            es = sorted((e for e in entries if e["mode"] == mode and e["placement"] == placement),
                        key=lambda e: e["world_size"])
            ws = [e["world_size"] for e in es]
            label = f"TT {PLACEMENTS[placement] or 'planner'}"
            axes[0, col].plot(ws, [e["samples_per_s"] for e in es], "o-", label=label)
            axes[1, col].plot(ws, [e["efficiency"] for e in es], "o-", label=label)
        ws = sorted({e["world_size"] for e in entries})
        axes[1, col].plot(ws, [1.0] * len(ws), "k:", label="ideal")
        cores = result["setup"]["cpu_cores"]
        if result["setup"]["device"] == "cpu" and max(ws) > cores:
            for r in range(2):
                axes[r, col].axvspan(cores, max(ws), color="0.9", zorder=0,
                                     label="oversubscribed (ranks > cores)" if r == 1 else None)
        batch = (f"{result['setup']['batch_per_rank']} per rank" if mode == "weak"
                 else f"global {result['setup']['global_batch']}")
        axes[0, col].set_title(f"{mode} scaling ({batch})", fontsize=10)
        axes[0, col].set_ylabel("samples/s")
        axes[1, col].set_ylabel("efficiency")
        axes[1, col].set_xlabel("ranks")
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xticks(ws, [str(w) for w in ws])
        for r in range(2):
            axes[r, col].legend(fontsize=7)
            axes[r, col].grid(alpha=0.3)
    fig.suptitle(f"ttdist DLRM on {result['setup']['cpu_cores']} CPU cores (gloo, 1 thread/rank) - "
                 "ranks > cores are oversubscribed: timings there measure the machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.report:
        import json

        result = json.loads(Path(args.report).read_text())
        report(result)
        plot(result, Path(args.report).with_suffix(".png"))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    worlds = [int(x) for x in args.worlds.split(",")]
    cores = os.cpu_count()
    warning = (f"CPU timings with more ranks than cores ({cores}) are oversubscribed (up to {max(worlds) / cores:.0f}x "
               f"at W={max(worlds)}): they measure the machine, not the method. Byte counts and correctness hold at "
               "any W." if device == "cpu" else "")
    load = os.getloadavg()[0]
    if device == "cpu" and load > cores:
        warning += (f" The machine is shared (load average {load:.1f} on {cores} cores at the start): a job with "
                    "more ranks also takes a larger share of a contended CPU, so efficiencies can exceed 1.")
    if warning:
        print("WARNING: " + warning, flush=True)
    script = str(Path(__file__).resolve())
    entries, commands = [], []
    load_before = os.getloadavg()
    t_start = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep, w in ((rep, w) for rep in range(args.repeat) for w in worlds):
            rank_dir = Path(tmp) / f"r{rep}w{w}"
            wargs = ["--rank-dir", str(rank_dir), "--config", args.config, "--placements", args.placements,
                     "--modes", args.modes,
                     "--batch-per-rank", str(args.batch_per_rank), "--global-batch", str(args.global_batch),
                     "--steps", str(args.steps), "--warmup", str(args.warmup), "--scale", str(args.scale)]
            if args.quick:
                wargs.append("--quick")
            for s in args.set:
                wargs += ["--set", s]
            if rep == 0:
                commands.append(C.torchrun_command("benchmarks/scaling.py", w, wargs))
            C.relaunch(script, w, wargs)
            runs += collect(C.read_rank_files(rank_dir, w))
    entries = fastest_repeat(runs)
    add_efficiency(entries)
    result = {
        "benchmark": "scaling", "quick": args.quick,
        "setup": {"device": device, "backend": "gloo" if device == "cpu" else "nccl", "cpu_cores": cores,
                  "threads_per_rank": 1, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "config": args.config, "overrides": base_overrides(args), "worlds": worlds,
                  "placements": {p: PLACEMENTS[p] or "the planner's choice" for p in args.placements.split(",")},
                  "batch_per_rank": args.batch_per_rank, "global_batch": args.global_batch, "repeat": args.repeat,
                  "steps": args.steps, "warmup_steps": args.warmup,
                  "load_average_before": load_before, "load_average_after": os.getloadavg(),
                  "wall_s": time.time() - t_start},
        "warning": warning,
        "command": f".venv/bin/python benchmarks/scaling.py {' '.join(argv or sys.argv[1:])}".strip(),
        "worker_commands": commands,
        "timing_note": ("Breakdown as in e2e_bench.py (wall-clock, exclusive labels, collectives made synchronous), "
                        "mean over measured steps and ranks. Efficiency = samples/s(W) / (W samples/s(1)) per "
                        "placement and mode."),
        "bytes_note": ("counted: bytes each rank handed to each collective per step (torch.distributed wrappers, DDP "
                       "comm hook); predicted: ttdist.tools.perf_model.collective_bytes (TT: ttdist.tools.comm_volume)."),
        "bytes_all_equal": (None if any(e["bytes_equal"] is None for e in entries)
                            else all(e["bytes_equal"] for e in entries)),
        "entries": entries,
    }
    out = Path(args.out) if args.out else C.RESULTS / f"scaling_{device}.json"
    C.dump(out, result)
    png = out.with_suffix(".png")
    plot(result, png)
    report(result)
    print(f"wrote {out} and {png}")


def report(result: dict) -> None:
    if result["warning"]:
        print("\nWARNING: " + result["warning"])
    print(f"\n{'placement':<10}{'mode':<8}{'W':>3}{'batch/rank':>11}{'step ms':>10}{'samples/s':>11}{'eff':>7}"
          f"{'bytes counted == predicted':>28}")
    for e in sorted(result["entries"], key=lambda e: (e["placement"], e["mode"], e["world_size"])):
        eff = f"{e['efficiency']:.2f}" if e["efficiency"] is not None else "-"
        print(f"{e['placement']:<10}{e['mode']:<8}{e['world_size']:>3}{e['batch_per_rank']:>11}"
              f"{e['step_time_s'] * 1e3:>10.1f}{e['samples_per_s']:>11.0f}{eff:>7}{str(e['bytes_equal']):>28}")
    print("\nstep-time breakdown, ms (rank mean; collectives include waiting for the slowest rank):")
    cats = C.CATEGORIES
    print(f"{'':<22}" + "".join(f"{c[:11]:>12}" for c in cats))
    for e in sorted(result["entries"], key=lambda e: (e["placement"], e["mode"], e["world_size"])):
        print(f"{e['placement'] + ' ' + e['mode'] + ' W=' + str(e['world_size']):<22}"
              + "".join(f"{e['breakdown_s'].get(c, 0.0) * 1e3:>12.1f}" for c in cats))
    print("\nper-step bytes of rank 0 (counted / predicted):")
    for e in sorted(result["entries"], key=lambda e: (e["placement"], e["mode"], e["world_size"])):
        rows = e["bytes_per_rank"][0]
        parts = [f"{k}={int(v['counted'])}/" + ("-" if v["predicted"] is None else f"{int(v['predicted'])}")
                 for k, v in rows.items() if v["counted"] or v["predicted"]]
        print(f"  {e['placement']} {e['mode']} W={e['world_size']}: " + ", ".join(parts))
    print(f"all ranks, all entries equal: {result['bytes_all_equal']} (the training loop's own flag all-reduce, "
          "'-', is counted but not part of the model)")


if __name__ == "__main__":
    main()
