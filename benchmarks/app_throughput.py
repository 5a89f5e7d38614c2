"""The training app's own throughput: TT tables vs the dense baseline, alternating whole runs.

Each run is the app as a user starts it (``launch/local.sh NPROC CONFIG``: torchrun, the
planner's plan, DistributedModelParallel, ``ttdist.train``), with no evaluation or checkpoint
during training. The figure is the app's ``samples_per_s`` (summary.json: training time only,
eval and checkpoints excluded). Runs alternate (tt, dense, dense, tt, tt, dense, ...) so a
shared machine's load falls on both; reported: every run, each variant's median, the ratio of
the medians and the ratio within each adjacent pair.

  .venv/bin/python benchmarks/app_throughput.py [--quick] [--config configs/demo.yaml] [--ranks 2]
      [--steps 200] [--pairs 3] [--out benchmarks/results/app_throughput_cpu.json]
(--quick: 50 steps, one run of each.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"tt": [], "dense": ["model.dense_baseline=true"]}


def run_app(config: str, ranks: int, steps: int, overrides: list[str], output_dir: Path, name: str) -> dict:
    """One app run; returns its summary.json."""
    args = [f"train.steps={steps}", "train.eval_every_steps=0", "checkpoint.every_steps=0",
            "checkpoint.at_end=false", "checkpoint.resume=false", "train.progress_bar=false",
            f"train.output_dir={output_dir}", f"train.name={name}", f"train.world_size={ranks}", *overrides]
    cmd = ["bash", str(REPO / "launch" / "local.sh"), str(ranks), config, *args]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the app run {name} failed (exit {proc.returncode})")
    return json.loads((output_dir / name / "summary.json").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="50 steps, one run of each variant")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; quick 50)")
    p.add_argument("--pairs", type=int, default=None, help="runs per variant (default 3; quick 1)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "app_throughput_cpu.json")
    args = p.parse_args(argv)
    args.steps = args.steps or (50 if args.quick else 200)
    args.pairs = args.pairs or (1 if args.quick else 3)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = ["tt", "dense"] if pair % 2 == 0 else ["dense", "tt"]
            for variant in order:
                load = os.getloadavg()
                summary = run_app(args.config, args.ranks, args.steps, VARIANTS[variant], Path(tmp),
                                  f"{variant}_{pair}")
                runs.append({"variant": variant, "pair": pair, "samples_per_s": summary["samples_per_s"],
                             "train_time_s": summary["train_time_s"], "auc": summary.get("auc"),
                             "load_average_before": load})
                print(f"{variant:>5} run {pair}: {summary['samples_per_s']:.0f} samples/s", flush=True)
    median = {v: statistics.median(r["samples_per_s"] for r in runs if r["variant"] == v) for v in VARIANTS}
    pair_ratios = []
    for pair in range(args.pairs):
        by = {r["variant"]: r["samples_per_s"] for r in runs if r["pair"] == pair}
        pair_ratios.append(by["tt"] / by["dense"])
    result = {
        "benchmark": "app_throughput",
        "command": ".venv/bin/python benchmarks/app_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "setup": {"config": args.config, "ranks": args.ranks, "steps": args.steps, "pairs": args.pairs,
                  "cpu_cores": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")},
        "note": "samples_per_s: the app's summary.json (training time only; no eval or checkpoint during the run)",
        "runs": runs,
        "median_samples_per_s": median,
        "tt_over_dense_median": median["tt"] / median["dense"],
        "tt_over_dense_per_pair": pair_ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median samples/s: tt {median['tt']:.0f}, dense {median['dense']:.0f}; TT/dense "
          f"{result['tt_over_dense_median']:.3f} (per pair: {', '.join(f'{r:.3f}' for r in pair_ratios)})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
