"""End-to-end DLRM training step: TT tables vs dense TorchRec tables, same run, same data.

One DLRM config (default: configs/demo.yaml's model, synthetic Criteo-shaped data at a chosen
cardinality scale) is trained for N steps twice, on the same batches:
  tt    : the config as is (the largest ``model.tt_tables`` tables TT, the rest TorchRec/fbgemm TBE)
  dense : ``model.dense_baseline=true`` (every table a TorchRec EmbeddingBagCollection table,
          fbgemm's fused TBE with the same fused optimizer)
Both use the app's own pieces (ttdist.session.build_session: model, TorchRec's planner,
DistributedModelParallel, optimizer; ttdist.train.train_step). The timing job holds both models in
the same ranks and alternates their steps (tt, dense, dense, tt, ...), so the load of a shared
machine falls on both alike; each variant then gets a short job of its own for its peak RSS.
The instrumentation below makes every collective synchronous, so the timing job's step times
are for attributing the step, not for its length: a third job ("natural") trains both variants
as the app builds them, nothing instrumented, steps alternating the same way, and times each
ttdist.train.train_step between two barriers (median over the measured steps of the slowest
rank's time): the step time training sees, where the TT cores' all-reduce and DDP's run
asynchronously.

Reported per variant (mean over the measured steps, warm-up excluded, then over ranks):
  step time split into input all-to-all, lookup fwd, output all-to-all (fwd, bwd), dense fwd,
  dense bwd, lookup bwd + fused update, allreduce (DDP + TT replicated cores), dense optimizer,
  other; samples/s; bytes each collective moved; embedding memory per rank MEASURED (storages of
  the sharded embedding modules' parameters, optimizer state and buffers on that rank) and peak
  RSS per rank; and the TT/dense ratios.

How the time is attributed (benchmarks/_common.py): wall-clock, exclusive, per label. Forward:
the sharded modules' input_dist / compute / output_dist are wrapped (awaitables waited on inside
the wrapper). Backward: identity autograd nodes placed on the pooled outputs (after the
all-to-all) and on the lookup outputs (before it) switch the label when the gradient reaches
them, so "output a2a bwd" is from the gradient reaching the all-to-all's output to it reaching
the lookup's output, and "lookup bwd + update" is from there to the next switch (TT: the fused
backward, whose core-gradient, replica all-reduce and update calls are timed apart; TBE: its
fused backward-update kernel). The bottom MLP's output carries a switch back to dense bwd.
DDP's all-reduce is timed by a communication hook (DDP's default semantics, made synchronous),
so it is not hidden under the backward. On CPU with gloo every op runs on the calling thread
and collectives are waited on where issued, so wall-clock splits are the work of each piece;
a collective's time includes waiting for the slowest rank.

  .venv/bin/python benchmarks/e2e_bench.py [--quick] [--ranks 2] [--steps N] [--batch B] [--scale S]
It re-executes itself four times (timing; natural; memory of tt; memory of dense) as
  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=NPROC \\
      benchmarks/e2e_bench.py --worker --phase {timing,natural,memory} [--variant {tt,dense}] ...
(the exact commands are in the JSON's worker_commands).
Writes benchmarks/results/e2e_<device>.json and e2e_<device>_breakdown.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {"tt": [], "dense": ["model.dense_baseline=true"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: smaller tables, fewer steps (~2 min on 2 cores)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--ranks", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 30; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from the timing (default 5; quick 3)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's; quick 1024)")
    p.add_argument("--scale", type=float, default=None,
                   help="data.cardinality_scale (default: the config's, demo 0.05; quick 0.02)")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="key.sub=value", help="more config overrides")
    p.add_argument("--tt-sharding", choices=["table_wise", "row_wise", "column_wise", "data_parallel"],
                   help="the tt variant's TT tables all of this sharding type (default: the planner's choice)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/e2e_<device>.json)")
    p.add_argument("--report", metavar="JSON", help="print the tables of a saved result, redraw its chart, exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-steps", type=int, default=None,
                   help="steps of each variant's own job that measures its peak RSS (default 5; quick 2)")
    p.add_argument("--phase", choices=["timing", "natural", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--rank-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.memory_steps = args.memory_steps or (2 if args.quick else 5)
    if args.quick:
        args.batch = args.batch or 1024
        args.scale = args.scale or 0.02
    return args


def tt_sharding_overrides(args) -> list[str]:
    """train.sharding_types for every TT table of the config (--tt-sharding), tt variant only."""
    if not args.tt_sharding:
        return []
    from ttdist.config import load_config

    cfg = load_config(args.config, overrides(args))
    return [f"train.sharding_types.t_cat_{t}={args.tt_sharding}" for t in cfg.tt_table_indices()]


def overrides(args) -> list[str]:
    out = ["train.progress_bar=false", "checkpoint.resume=false", f"train.world_size={args.ranks}"]
    if args.batch:
        out.append(f"data.batch_size={args.batch}")
    if args.scale:
        out.append(f"data.cardinality_scale={args.scale}")
    return out + list(args.set)


# ---------------------------------------------------------------------------------------------
# torchrun worker
# ---------------------------------------------------------------------------------------------


def _config_record(cfg) -> dict:
    return {"batch_size": cfg.data.batch_size, "cardinality_scale": cfg.data.cardinality_scale,
            "embedding_dim": cfg.model.embedding_dim, "tt_tables": len(cfg.tt_table_indices()),
            "tt_ranks": list(cfg.model.tt_ranks), "table_rows": cfg.table_rows(),
            "tt_table_indices": cfg.tt_table_indices(),
            "dense_arch_layer_sizes": list(cfg.model.dense_arch_layer_sizes),
            "over_arch_layer_sizes": list(cfg.model.over_arch_layer_sizes),
            "embedding_optimizer": cfg.optim.embedding_optimizer}


def variant_configs(args: argparse.Namespace, variants) -> dict:
    """Each variant's config: the run's overrides, the variant's, and (TT) the forced sharding."""
    from ttdist.config import load_config

    return {v: load_config(args.config, overrides(args) + VARIANTS[v] + (tt_sharding_overrides(args) if v == "tt" else []))
            for v in variants}


def natural_worker(args) -> None:
    """--phase natural: both variants built as the app builds them (ttdist.session.build_session),
    nothing instrumented; each ttdist.train.train_step timed between two barriers, the variants'
    steps interleaved as in --phase timing. Writes each rank's step times per variant."""
    import time

    import torch
    import torch.distributed as dist

    from ttdist.session import build_session
    from ttdist.train import RunStats, train_step

    cfgs = variant_configs(args, VARIANTS)
    env = C.init_worker(cfgs["tt"])
    sessions = {v: build_session(cfgs[v], env) for v in VARIANTS}
    batches = C.make_batches(cfgs["tt"].data, env.rank, env.world_size, args.warmup + args.steps, env.device)
    loss_fn, stats = torch.nn.BCEWithLogitsLoss(), RunStats()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i, batch in enumerate(batches):
        for v in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
            if env.world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            train_step(sessions[v].model, sessions[v].optimizer, loss_fn, batch, i, cfgs[v], stats)
            if env.world_size > 1:
                dist.barrier()  # the step ends when its slowest rank's does
            if i >= args.warmup:
                times[v].append(time.perf_counter() - start)
    C.dump(Path(args.rank_dir) / f"rank{env.rank}.json", {"rank": env.rank, "step_times_s": times})
    dist.destroy_process_group()


def natural_step_times(ranks: list[dict]) -> dict[str, float]:
    """Per variant: the median over measured steps of the slowest rank's step time."""
    out = {}
    for v in VARIANTS:
        steps = zip(*(r["step_times_s"][v] for r in ranks))
        out[v] = statistics.median(max(step) for step in steps)
    return out


def worker(args) -> None:
    """--phase timing: both variants in the same processes, steps interleaved (tt, dense, dense,
    tt, ...), so both see the same machine; --phase memory: one variant alone, for its peak RSS;
    --phase natural: ``natural_worker``."""
    if args.phase == "natural":
        natural_worker(args)
        return
    import torch
    import torch.distributed as dist

    from ttdist.config import validate
    from ttdist.model import embedding_bytes
    from ttdist.tools.perf_model import compare_bytes, counted_bytes

    variants = list(VARIANTS) if args.phase == "timing" else [args.variant]
    cfgs = variant_configs(args, variants)
    env = C.init_worker(cfgs[variants[0]])
    out = {"rank": env.rank, "world_size": env.world_size, "threads": torch.get_num_threads(), "variants": {}}
    sessions, memory, rss_growth = {}, {}, {}
    for v in variants:
        validate(cfgs[v], env.world_size)
        before = C.current_rss_bytes()
        sessions[v] = C.Session(cfgs[v], env)
        memory[v] = C.embedding_memory(sessions[v].dmp)
        rss_growth[v] = C.current_rss_bytes() - before
    data = cfgs[variants[0]].data  # the variants differ in the model only: the same batches
    if args.phase == "memory":
        batches = C.make_batches(data, env.rank, env.world_size, args.memory_steps, env.device)
        sessions[args.variant].run(batches, 0, data.batch_size)
        out["variants"][args.variant] = {"peak_rss_bytes": C.peak_rss_bytes(), "embedding_memory": memory[args.variant],
                                         "rss_model_build_bytes": rss_growth[args.variant]}
    else:
        batches = C.make_batches(data, env.rank, env.world_size, args.warmup + args.steps, env.device)
        snaps = {v: [] for v in variants}
        times = {v: [] for v in variants}
        for i, batch in enumerate(batches):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                trace = bool(os.environ.get("TTDIST_BENCH_TRACE")) and i == args.warmup and env.rank == 0
                snap, dt = sessions[v].train_one(batch, trace)
                if i >= args.warmup:
                    snaps[v].append(snap)
                    times[v].append(dt)
        for v in variants:
            summary = C.finish_summary(snaps[v], times[v], batches[0], args.warmup, data.batch_size)
            counted = counted_bytes(summary["collectives"])
            predicted = C.predicted_bytes_or_none(sessions[v].dmp, cfgs[v], data.batch_size // env.world_size)
            check = compare_bytes(counted, predicted) if predicted is not None else {
                "equal": None, "by_collective": {k: {"counted": b, "predicted": None} for k, b in counted.items()}}
            out["variants"][v] = {
                "summary": summary, "embedding_memory": memory[v], "bytes": check,
                "rss_model_build_bytes": rss_growth[v], "plan": C.plan_summary(sessions[v].plan),
                "instrumented": sessions[v].found, "analytic_embedding_bytes": embedding_bytes(cfgs[v]),
                "config": _config_record(cfgs[v])}
        out["peak_rss_bytes_both_variants"] = C.peak_rss_bytes()
    C.dump(Path(args.rank_dir) / f"rank{env.rank}.json", out)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Parent: launch both variants, aggregate, write JSON and the chart
# ---------------------------------------------------------------------------------------------


def aggregate(timing: list[dict], memory: list[dict], variant: str) -> dict:
    ranks = [r["variants"][variant] for r in timing]
    for r, m in zip(ranks, memory):
        r["peak_rss_bytes"] = m["variants"][variant]["peak_rss_bytes"]
    summaries = [r["summary"] for r in ranks]
    step = sum(s["step_time_s"] for s in summaries) / len(summaries)
    categories = C.mean_over_ranks(summaries)
    comm = C.mean_over_ranks(summaries, "categories_in_collectives_s")
    global_batch = summaries[0]["global_batch"]
    per_rank_mem = [r["embedding_memory"]["total"] for r in ranks]
    return {
        "step_time_s": step,
        "samples_per_s": global_batch / step,
        "breakdown_s": categories,
        "breakdown_in_collectives_s": comm,
        "breakdown_fraction": {k: v / step for k, v in categories.items()},
        "recorded_over_step": sum(categories.values()) / step,
        "per_rank_step_time_s": [s["step_time_s"] for s in summaries],
        "per_rank_breakdown_s": [s["categories_s"] for s in summaries],
        "embedding_memory_per_rank": [r["embedding_memory"] for r in ranks],
        "embedding_bytes_per_rank": [m["total"] for m in per_rank_mem],
        "embedding_bytes_max_rank": max(m["total"] for m in per_rank_mem),
        "embedding_bytes_all_ranks": sum(m["total"] for m in per_rank_mem),
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
        "collectives_rank0": summaries[0]["collectives"],
        "bytes_counted_equal_predicted": (None if any(r["bytes"]["equal"] is None for r in ranks)
                                          else all(r["bytes"]["equal"] for r in ranks)),
        "bytes_per_rank": [r["bytes"]["by_collective"] for r in ranks],
        "ids_per_rank": [s["counts"] for s in summaries],
        "profile": profile(ranks),
        "rank_summaries": summaries,
        "plan": ranks[0]["plan"],
        "config": ranks[0]["config"],
        "analytic_embedding_bytes": ranks[0]["analytic_embedding_bytes"],
        "steps": summaries[0]["steps"], "warmup_steps": summaries[0]["warmup_steps"],
        "batch_per_rank": summaries[0]["batch_per_rank"], "global_batch": global_batch,
    }


def profile(ranks: list[dict]) -> dict:
    """Per-id lookup and per-sample dense times over all ranks (ttdist.tools.perf_model.Profile's inputs)."""
    from dataclasses import asdict

    from ttdist.tools.perf_model import Profile

    out = asdict(Profile.from_summaries([r["summary"] for r in ranks]))
    out.pop("source")
    return out


def ratios(tt: dict, dense: dict) -> dict:
    out = {"step_time_tt_over_dense": tt["step_time_s"] / dense["step_time_s"],
           "natural_step_time_tt_over_dense": tt["natural_step_time_s"] / dense["natural_step_time_s"],
           "samples_per_s_tt_over_dense": tt["samples_per_s"] / dense["samples_per_s"],
           "embedding_bytes_max_rank_tt_over_dense": tt["embedding_bytes_max_rank"] / dense["embedding_bytes_max_rank"],
           "embedding_bytes_all_ranks_tt_over_dense": tt["embedding_bytes_all_ranks"] / dense["embedding_bytes_all_ranks"],
           "peak_rss_max_rank_tt_over_dense": max(tt["peak_rss_bytes_per_rank"]) / max(dense["peak_rss_bytes_per_rank"])}
    out["breakdown_tt_over_dense"] = {k: (tt["breakdown_s"][k] / dense["breakdown_s"][k])
                                      if dense["breakdown_s"][k] else None
                                      for k in C.CATEGORIES}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["runs"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(variants)
    tab20 = plt.get_cmap("tab20").colors
    colors = [tab20[i] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]  # 20 distinct, dark ones first
    for i, cat in enumerate(C.CATEGORIES):
        vals = [result["runs"][v]["breakdown_s"][cat] * 1e3 for v in variants]
        ax.bar(variants, vals, bottom=bottom, label=cat, color=colors[i % 20])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, v in enumerate(variants):
        r = result["runs"][v]
        ax.text(x, bottom[x], f"{r['step_time_s'] * 1e3:.1f} ms\n{r['samples_per_s']:.0f} samples/s", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("ms per step (rank mean)")
    ax.set_ylim(0, max(bottom) * 1.25)
    m = result["setup"]
    ax.set_title(f"DLRM step, {m['world_size']} {m['device']} ranks, global batch {m['global_batch']}: TT vs dense tables",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.report:
        result = json.loads(Path(args.report).read_text())
        report(result)
        plot(result, Path(args.report).with_name(Path(args.report).stem + "_breakdown.png"))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    script = str(Path(__file__).resolve())
    runs = {}
    commands = []
    common = ["--config", args.config, "--ranks", str(args.ranks), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    common += (["--batch", str(args.batch)] if args.batch else []) + (["--scale", str(args.scale)] if args.scale else [])
    for s in args.set:
        common += ["--set", s]
    common += ["--tt-sharding", args.tt_sharding] if args.tt_sharding else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("timing", None), ("natural", None)] + [("memory", v) for v in VARIANTS]
        for phase, variant in jobs:
            wargs = ["--phase", phase, "--rank-dir", str(Path(tmp) / f"{phase}_{variant}")] + common
            wargs += ["--variant", variant, "--memory-steps", str(args.memory_steps)] if variant else []
            commands.append(C.torchrun_command("benchmarks/e2e_bench.py", args.ranks, wargs))
            C.relaunch(script, args.ranks, wargs, threads_per_rank=args.threads_per_rank)
        timing = C.read_rank_files(Path(tmp) / "timing_None", args.ranks)
        natural = natural_step_times(C.read_rank_files(Path(tmp) / "natural_None", args.ranks))
        for variant in VARIANTS:
            runs[variant] = aggregate(timing, C.read_rank_files(Path(tmp) / f"memory_{variant}", args.ranks), variant)
            runs[variant]["natural_step_time_s"] = natural[variant]
    tt, dense = runs["tt"], runs["dense"]
    result = {
        "benchmark": "e2e", "quick": args.quick,
        "setup": {"device": device, "backend": "nccl" if device == "cuda" else "gloo", "world_size": args.ranks,
                  "threads_per_rank": args.threads_per_rank, "cpu_cores": os.cpu_count(),
                  "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "config": args.config, "overrides": overrides(args), "tt_overrides": tt_sharding_overrides(args), "global_batch": tt["global_batch"],
                  "steps": args.steps, "warmup_steps": args.warmup, "memory_steps": args.memory_steps,
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "command": f".venv/bin/python benchmarks/e2e_bench.py {' '.join(a for a in (argv or sys.argv[1:]))}".strip(),
        "worker_commands": commands,
        "timing_note": ("Wall-clock, exclusive per label, mean over measured steps then over ranks. CPU/gloo: ops run "
                        "on the calling thread and every collective is waited on where issued (synchronous), so the "
                        "splits are the time of each piece; a collective's time includes waiting for the slowest rank. "
                        "Backward pieces are delimited by identity autograd nodes on the pooled outputs and lookup "
                        "outputs (see the script's docstring); DDP's all-reduce runs in a synchronous comm hook."),
        "categories": C.CATEGORY_TEXT,
        "memory_note": ("embedding_bytes_per_rank: storages of the rank's sharded embedding modules (TT cores or "
                        "TBE weights, optimizer state, other buffers), each storage once; peak RSS: ru_maxrss of "
                        "the rank's process in a job that builds and trains only that variant (memory_steps steps; "
                        "includes Python, torch, TorchRec, the data and the MLPs)."),
        "natural_note": ("natural_step_time_s: a job of its own with both variants built as the app builds them, "
                         "nothing instrumented (the TT cores' and DDP's all-reduces asynchronous), steps alternating "
                         "as in the timing job; each ttdist.train.train_step timed between two barriers; the median "
                         "over the measured steps of the slowest rank's time. step_time_s (the timing job) makes "
                         "every collective synchronous to attribute the step."),
        "design_note": ("Timing: one torchrun job holds both variants (same processes, same batches) and alternates "
                        "their steps (tt, dense, dense, tt, ...), so a shared machine's load falls on both alike. "
                        "Peak RSS: one extra short job per variant."),
        "runs": runs,
        "ratios": ratios(tt, dense),
    }
    out = Path(args.out) if args.out else C.RESULTS / f"e2e_{device}.json"
    C.dump(out, result)
    png = out.with_name(out.stem + "_breakdown.png")
    plot(result, png)
    report(result)
    print(f"wrote {out} and {png}")


def report(result: dict) -> None:
    runs = result["runs"]
    print(f"\n{result['timing_note']}\n")
    print(f"{'ms/step (rank mean)':<22}" + "".join(f"{v:>12}" for v in runs) + f"{'TT/dense':>12}")
    for cat in C.CATEGORIES + ["step"]:
        vals = [(r["step_time_s"] if cat == "step" else r["breakdown_s"][cat]) * 1e3 for r in runs.values()]
        ratio = vals[0] / vals[1] if vals[1] else float("nan")
        print(f"{cat:<22}" + "".join(f"{v:>12.2f}" for v in vals) + f"{ratio:>12.2f}")
    print(f"{'samples/s':<22}" + "".join(f"{r['samples_per_s']:>12.0f}" for r in runs.values())
          + f"{result['ratios']['samples_per_s_tt_over_dense']:>12.2f}")
    if "natural_step_time_tt_over_dense" in result["ratios"]:
        print(f"{'step, uninstrumented':<22}" + "".join(f"{r['natural_step_time_s'] * 1e3:>12.2f}" for r in runs.values())
              + f"{result['ratios']['natural_step_time_tt_over_dense']:>12.2f}   (natural_note)")
    for v, r in runs.items():
        mem = ", ".join(f"{b / 2**20:.2f}" for b in r["embedding_bytes_per_rank"])
        rss = ", ".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes_per_rank"])
        print(f"{v:>6}: embedding MiB per rank [{mem}], peak RSS MiB per rank [{rss}]")
    for v, r in runs.items():
        print(f"{v:>6}: collective bytes counted == ttdist.tools.perf_model.collective_bytes on every rank: "
              f"{r['bytes_counted_equal_predicted']}")
    print(f"embedding bytes (max rank) TT/dense = {result['ratios']['embedding_bytes_max_rank_tt_over_dense']:.4f}, "
          f"peak RSS (max rank) TT/dense = {result['ratios']['peak_rss_max_rank_tt_over_dense']:.3f}")


if __name__ == "__main__":
    main()
