"""The demo's whole life cycle, many times: does every finished run exit 0 (issue 16)?

Runs ``launch/local.sh 2 configs/demo.yaml`` (training, checkpoints, final evaluation, teardown)
``--runs`` times, each in a fresh run directory, and counts non-zero exits and aborts at shutdown
("terminate called without an active exception"). Writes benchmarks/results/demo_stress.json.

  python benchmarks/demo_stress.py [--runs 30] [--ranks 2] [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_stress.json")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = ap.parse_args()
    runs, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run(["bash", "launch/local.sh", str(args.ranks), "configs/demo.yaml",
                                   f"train.output_dir={tmp}", f"train.name=stress_{i}", "train.progress_bar=false",
                                   "checkpoint.resume=false", *args.overrides],
                                  cwd=REPO, capture_output=True, text=True)
            out = proc.stdout + proc.stderr
            summary = Path(tmp) / f"stress_{i}" / "summary.json"
            run = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                   "finished": summary.exists(), "abort_at_shutdown": "terminate called without an active exception" in out}
            runs.append(run)
            print(f"run {i + 1}/{args.runs}: exit {run['exit']}, {run['seconds']} s"
                  + (", summary written" if run["finished"] else "")
                  + (", ABORT at shutdown" if run["abort_at_shutdown"] else ""), flush=True)
            if proc.returncode != 0:
                print(out[-3000:], file=sys.stderr)
    failed = sum(r["exit"] != 0 for r in runs)
    result = {"command": "python benchmarks/demo_stress.py " + " ".join(sys.argv[1:]), "runs": len(runs),
              "ranks": args.ranks, "nonzero_exits": failed, "aborts_at_shutdown": sum(r["abort_at_shutdown"] for r in runs),
              "wall_s": round(time.perf_counter() - t_start, 1), "per_run": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"demo_stress: {failed} of {len(runs)} runs exited non-zero ({result['aborts_at_shutdown']} aborts at "
          f"shutdown); {result['wall_s']} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
