"""Run every benchmark, then regenerate benchmarks/README.md from the result files.

    python benchmarks/run_all.py --quick     # `make bench`: the quick CPU versions (< 15 min on 2 cores)
    python benchmarks/run_all.py             # the full versions (the compression sweep alone ~1 h+)
    python benchmarks/run_all.py --readme    # only regenerate benchmarks/README.md from benchmarks/results/
    python benchmarks/run_all.py --quick --only compression,kernel

Each benchmark runs as its own process, in order (the perf model reads the scaling results).
A script that does not exist yet is skipped with a message; one that fails does not stop the
others, but the run ends with a non-zero exit and names it. The README is regenerated at the
end (unless --no-readme) from whatever results exist, so it never drifts from them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
QUICK_BUDGET_S = 15 * 60


@dataclass
class Bench:
    name: str
    requires: str  # the file whose absence means "not written yet": skip
    quick: list[str]
    full: list[str]
    outputs: list[str] = field(default_factory=list)


PERF_CONFIGS = ("criteo_kaggle", "criteo_terabyte")
SCALING_PLACEMENTS = ["--worlds", "1,2", "--placements", "plan,dp,tw,rw"]


def perf_profile_bench(config: str) -> Bench:
    """One CPU rank of a config's model (synthetic data, full size): the perf model's compute profile.
    The synthetic ids are drawn over the model's table rows (model.max_rows applied)."""
    sys.path.insert(0, str(ROOT))
    from ttdist.config import load_config

    rows = load_config(ROOT / "configs" / f"{config}.yaml", ["data.cardinality_scale=1.0"]).table_rows()
    out = f"perf_model_profile_{config}.json"
    cmd = ["benchmarks/scaling.py", "--config", f"configs/{config}.yaml", "--worlds", "1", "--placements", "tw,rw,dp",
           "--modes", "weak", "--scale", "1.0", "--set", "data.name=synthetic",
           "--set", f"data.num_embeddings_per_feature=[{', '.join(map(str, rows))}]", "--out", f"benchmarks/results/{out}"]
    return Bench(f"perf_profile_{config}", "benchmarks/scaling.py", cmd + ["--steps", "3", "--warmup", "1"], cmd,
                 [out, out.replace(".json", ".png")])


def benches() -> list[Bench]:
    scaling = "benchmarks/results/scaling_cpu.json"
    perf = ["-m", "ttdist.tools.perf_model", "--validate", scaling, "--validation-out",
            "benchmarks/results/perf_model_validation.json", "--predict", "--what-if-speedup", "100",
            *(a for c in PERF_CONFIGS for a in ("--profile", f"benchmarks/results/perf_model_profile_{c}.json"))]
    return [
        Bench("kernel", "benchmarks/tt_kernel_bench.py", ["benchmarks/tt_kernel_bench.py", "--device", "cpu", "--quick"],
              ["benchmarks/tt_kernel_bench.py", "--device", "cpu"], ["tt_kernel_cpu.json"]),
        Bench("e2e", "benchmarks/e2e_bench.py", ["benchmarks/e2e_bench.py", "--quick"], ["benchmarks/e2e_bench.py"],
              ["e2e_cpu.json", "e2e_cpu_breakdown.png"]),
        Bench("app", "benchmarks/app_throughput.py", ["benchmarks/app_throughput.py", "--quick"],
              ["benchmarks/app_throughput.py"], ["app_throughput_cpu.json"]),
        Bench("scaling", "benchmarks/scaling.py", ["benchmarks/scaling.py", "--quick", *SCALING_PLACEMENTS],
              ["benchmarks/scaling.py", *SCALING_PLACEMENTS, "--repeat", "5", "--steps", "12"], ["scaling_cpu.json", "scaling_cpu.png"]),
        *(perf_profile_bench(c) for c in PERF_CONFIGS),
        Bench("perf_model", "ttdist/tools/perf_model.py", perf, perf,
              ["perf_model_validation.json", "perf_model_predictions.json", "perf_model_predictions.png"]),
        Bench("compression", "benchmarks/compression_sweep.py", ["benchmarks/compression_sweep.py", "--quick"],
              ["benchmarks/compression_sweep.py"], ["compression_sweep_quick.json", "compression_sweep_quick.png"]),
    ]


def run_benchmarks(quick: bool, only: Optional[set[str]]) -> int:
    python = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rows, failed = [], []
    t_all = time.perf_counter()
    for b in benches():
        if only and b.name not in only:
            continue
        if not (ROOT / b.requires).exists():
            msg = f"SKIPPED: {b.requires} does not exist (yet)"
            print(f"\n=== {b.name}: {msg}", flush=True)
            rows.append((b.name, msg, 0.0))
            continue
        cmd = [python, *(b.quick if quick else b.full)]
        print(f"\n=== {b.name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        dt = time.perf_counter() - t0
        if rc != 0:
            failed.append(b.name)
            print(f"\n!!! {b.name} FAILED with exit status {rc} after {dt:.0f} s: {' '.join(cmd)}", file=sys.stderr,
                  flush=True)
        rows.append((b.name, "ok" if rc == 0 else f"FAILED (exit {rc})", dt))
    total = time.perf_counter() - t_all
    print("\n=== summary")
    for name, status, dt in rows:
        print(f"  {name:<12} {status:<40} {dt:7.0f} s")
    print(f"  {'total':<12} {'':<40} {total:7.0f} s (load average now {os.getloadavg()[0]:.1f})")
    if quick and total > QUICK_BUDGET_S:
        print(f"WARNING: the quick benchmarks took {total / 60:.1f} min, over the {QUICK_BUDGET_S // 60} min budget "
              f"(a shared machine's load stretches them)", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# README generation.
# ---------------------------------------------------------------------------------------------
def load(name: str) -> Optional[dict]:
    path = RESULTS / name
    if not path.exists():
        return None
    return json.loads(path.read_text())


def num(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for ordinary magnitudes)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 10 ** digits:
        return f"{x:,.0f}"
    if ax < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(digits - 1 - math.floor(math.log10(ax)), 0)}f}"


def ms(seconds: Optional[float]) -> str:
    return "–" if seconds is None else num(seconds * 1e3)


def mib(n: Optional[float]) -> str:
    return "–" if n is None else num(n / 2 ** 20)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def load_text(load_avg: Any) -> str:
    if not load_avg:
        return "not recorded"
    if isinstance(load_avg[0], (list, tuple)):
        return " → ".join(f"{a[0]:.1f}" for a in load_avg)
    return f"{load_avg[0]:.1f}"


def host() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def section_kernel(name: str, d: dict) -> str:
    rows = []
    for r in d["results"]:
        runs = r["runs"]
        t = runs["ttdist"]
        ratios = r.get("ratios", {})
        rows.append([r["shape"], f"p={r['p']} q={r['q']} ranks={r['ranks']}", f"{r['bags']} x {r['pooling']}",
                     num(t["fwd_us_per_row"]), num(t["bwd_us_per_row"]), num(t["fwd_bwd_us_per_row"]),
                     num(t["fwd_gflops"]),
                     num(ratios.get("reference_over_ttdist_fwd_bwd")) + "x" if "reference_over_ttdist_fwd_bwd" in ratios else "–",
                     num(ratios.get("dense_embedding_bag_over_ttdist_fwd_bwd")) + "x"
                     if "dense_embedding_bag_over_ttdist_fwd_bwd" in ratios else "not run"])
    return "\n".join([
        f"Device `{d.get('device')}` ({d.get('device_name')}), {d.get('threads')} thread(s), torch {d.get('torch')}; "
        f"from `{name}`.", "",
        table(["shape", "TT shape", "bags x pooling", "fwd µs/row", "bwd µs/row", "fwd+bwd µs/row", "fwd GFLOP/s",
               "reference / ttdist (fwd+bwd)", "dense EmbeddingBag / ttdist (fwd+bwd)"], rows)])


KERNEL_RUNS = {"ttdist": "ttdist (module: checks + op, dense core grads)", "ttdist_op": "ttdist op alone",
               "ttdist_fused_sgd": "ttdist, fused SGD in backward", "reference": "plain-PyTorch reference",
               "dense_embedding_bag": "dense nn.EmbeddingBag (sparse grad)", "fbtt": "FBTT-Embedding (fused SGD)"}


def section_kernel_cuda(name: str, d: dict) -> str:
    """Per dtype and batch: every run's µs per looked-up row, GFLOP/s and the ratios to ttdist."""
    out = [f"TT lookup kernel on {d.get('device_name')} (torch {d.get('torch')}, CUDA {d.get('cuda')}), FBTT's shape "
           f"p=[200, 220, 250], q=[4, 4, 4], ranks [32, 32] (11M x 64), bags x 20 lookups, uniform ids; median of "
           f"10 synchronised runs; fp32 peak taken as {num(d.get('fp32_peak_tflops'))} TFLOP/s (datasheet); "
           f"FBTT-Embedding: {d.get('fbtt', '–')[:60]}; `{d.get('command', '').replace(str(ROOT) + '/', '')}`; "
           f"from `{name}`.", ""]
    for r in d["results"]:
        runs, base = r["runs"], r["runs"]["ttdist"]["fwd_bwd_s"]
        tt_like = lambda k: k != "dense_embedding_bag"  # noqa: E731  (a dense lookup does no chain FLOPs)
        rows = [[KERNEL_RUNS.get(k, k), num(v["fwd_us_per_row"]), num(v["bwd_us_per_row"]), num(v["fwd_bwd_us_per_row"]),
                 num(v["fwd_gflops"]) if tt_like(k) else "–",
                 f"{100 * v['fwd_fraction_of_fp32_peak']:.1f} %" if tt_like(k) and "fwd_fraction_of_fp32_peak" in v
                 else "–", num(v["fwd_bwd_s"] / base) + "x"] for k, v in runs.items()]
        out += [f"**{r['dtype']}, {r['bags']:,} bags x {r['pooling']}** ({r['lookups']:,} lookups)"
                + (f"; failed: {r['errors']}" if r.get("errors") else ""), "",
                table(["run", "fwd µs/row", "bwd µs/row", "fwd+bwd µs/row", "fwd GFLOP/s (chain FLOPs)", "of fp32 peak",
                       "fwd+bwd time / ttdist"], rows), ""]
    return "\n".join(out).rstrip()


def section_kernel_before_after(name: str, before: dict, after: dict) -> str:
    """Every run of an earlier GPU benchmark (ops that waited for the GPU once per call) beside the latest."""
    rows = []
    for b, a in zip(before["results"], after["results"]):
        for run, x in b["runs"].items():
            y = a["runs"].get(run)
            if y:
                rows.append([f"{b['dtype']}, {b['bags']:,} bags", KERNEL_RUNS.get(run, run), num(x["fwd_bwd_us_per_row"]),
                             num(y["fwd_bwd_us_per_row"]), num(y["fwd_bwd_s"] / x["fwd_bwd_s"]) + "x"])
    return "\n".join([
        f"An earlier run (`{name}`, another start of the same machine kind, the same day) with ops that waited for "
        "the GPU once per call and modules that checked index values on the host. The unchanged baselines moved "
        "between the two runs too (the last column), so only ratios within one run compare implementations. What "
        "the rework removed (a host wait per op) matters where work overlaps, in TorchRec's pipeline, which this "
        "synchronised micro-benchmark does not model; its large-batch ttdist rows are slower in the latest run by "
        "more than the reference's and less than FBTT's, cause not established (candidates: the extra hot-row "
        "kernels, the dynamic shared-memory limit now raised to the opt-in maximum, the launch bounds).", "",
        table(["case", "run", "fwd+bwd µs/row, earlier run", "fwd+bwd µs/row, latest run", "latest / earlier"], rows)])


def section_gpu_check(name: str, d: dict) -> str:
    facts = d.get("facts", {})
    steps = [[k, v["status"], num(v["seconds"]), v.get("note") or ""] for k, v in d["steps"].items()]
    out = [f"`make gpu-check` on {d.get('device_name')} ({facts.get('sm_count')} SMs, compute capability "
           f"{facts.get('capability')}), Python {facts.get('python')}, torch {facts.get('torch')}: {num(d['wall_s'])} s "
           f"wall of a {num(d['budget_s'])} s budget (parallel steps overlap); from `{name}`.", "",
           table(["step", "status", "seconds", "note"], steps)]
    for line in [d.get("figures", {}).get("kernel_checks")]:
        if line:
            out += ["", f"On-device kernel checks: `{line}`."]
    train = d.get("figures", {}).get("train")
    if train:
        rows = [[dt, num(r["loss_cpu"][0]), num(r["loss_cpu"][-1], 6), num(r["loss_cuda"][-1], 6),
                 f"{r['max_abs_loss_diff_checked']:.2e} ({r['checked_steps']} steps; tol {r['loss_atol']:g})",
                 f"{r['max_abs_loss_diff_all']:.2e}", f"{r['max_rel_core_diff']:.2e}", num(r["ms_per_step_cpu"]),
                 num(r["ms_per_step_cuda"])] for dt, r in train["runs"].items()]
        out += ["", f"Training check (`benchmarks/gpu_train_check.py`): {train['steps']} steps, batch {train['batch']}, "
                f"a DLRM of ttdist modules only ({len(train['tables'])} TT tables {train['tables']}, dim {train['dim']}, "
                f"ranks {train['tt_ranks']}; {train['optimizer']}), the same weights and batches on CPU and CUDA:", "",
                table(["dtype", "first loss", "last loss CPU", "last loss CUDA", "max abs loss diff, checked steps",
                       "max abs loss diff, all steps", "max rel core diff", "CPU ms/step", "CUDA ms/step"], rows)]
    return "\n".join(out)


def section_e2e(name: str, d: dict) -> str:
    s, runs, ratios = d["setup"], d["runs"], d["ratios"]
    rows = [[v, ms(r["step_time_s"]), num(r["samples_per_s"]), mib(r["embedding_bytes_max_rank"]),
             mib(r["embedding_bytes_all_ranks"]), mib(max(r["peak_rss_bytes_per_rank"]))] for v, r in runs.items()]
    rows.append(["TT / dense", num(ratios["step_time_tt_over_dense"]), num(ratios["samples_per_s_tt_over_dense"]),
                 num(ratios["embedding_bytes_max_rank_tt_over_dense"]),
                 num(ratios["embedding_bytes_all_ranks_tt_over_dense"]), num(ratios["peak_rss_max_rank_tt_over_dense"])])
    cats = list(next(iter(runs.values()))["breakdown_s"])
    brk = [[c, *(ms(runs[v]["breakdown_s"][c]) for v in runs),
            num(ratios["breakdown_tt_over_dense"].get(c)) if ratios["breakdown_tt_over_dense"].get(c) else "–"]
           for c in cats]
    return "\n".join([
        f"{s['world_size']} {s['device']} ranks ({s['backend']}, {s.get('threads_per_rank')} thread/rank), global batch "
        f"{s['global_batch']}, {s['steps']} measured steps after {s['warmup_steps']} warm-up, `{s['config']}` with "
        f"{' '.join(f'`{o}`' for o in s['overrides'])}; quick: {num(d.get('quick'))}; load average "
        f"{load_text([s.get('load_average_before'), s.get('load_average_after')])}; from `{name}`.", "",
        table(["variant", "step ms", "samples/s", "embedding MiB (max rank)", "embedding MiB (all ranks)",
               "peak RSS MiB (max rank)"], rows), "",
        "Step-time breakdown (ms per step, mean over ranks):", "",
        table(["piece", *runs, "TT / dense"], brk)]
        + ([] if "natural_step_time_tt_over_dense" not in ratios else [
            "", f"Uninstrumented step (a job of its own, the all-reduces asynchronous; median of the slowest rank's "
            f"step between barriers): " + ", ".join(f"{v} {ms(r['natural_step_time_s'])} ms" for v, r in runs.items())
            + f"; TT / dense **{num(ratios['natural_step_time_tt_over_dense'])}**. The step times above make every "
            "collective synchronous, to attribute the step."]))


def section_app(name: str, d: dict) -> str:
    s = d["setup"]
    rows = [[r["variant"], r["pair"], num(r["samples_per_s"]), load_text([r.get("load_average_before")])]
            for r in d["runs"]]
    return "\n".join([
        f"The app itself (`launch/local.sh {s['ranks']} {s['config']}`, {s['steps']} steps, no eval or checkpoint "
        f"during training), TT vs `model.dense_baseline=true`, {s['pairs']} run(s) each, alternating; the app's "
        f"`samples_per_s` (training time only); from `{name}`.", "",
        table(["variant", "pair", "samples/s", "load average before"], rows), "",
        f"TT / dense, medians: **{num(d['tt_over_dense_median'])}** (per pair: "
        f"{', '.join(num(r) for r in d['tt_over_dense_per_pair'])})."])


def section_scaling(name: str, d: dict) -> str:
    s = d["setup"]
    rows = [[e["placement"], e["mode"], e["world_size"], e["global_batch"], e["batch_per_rank"], ms(e["step_time_s"]),
             num(e["samples_per_s"]), num(e["efficiency"]), num(e["bytes_equal"])]
            for e in sorted(d["entries"], key=lambda e: (e["placement"], e["mode"], e["world_size"]))]
    return "\n".join([
        f"{s['device']} ({s['backend']}, {s['cpu_cores']} cores, {s['threads_per_rank']} thread/rank), `{s['config']}` "
        f"with {' '.join(f'`{o}`' for o in s['overrides'])}, {s['steps']} measured steps after {s['warmup_steps']}; "
        f"quick: {num(d.get('quick'))}; load average "
        f"{load_text([s.get('load_average_before'), s.get('load_average_after')])}; from `{name}`.", "",
        f"> {d['warning']}" if d.get("warning") else "", "",
        table(["placement", "mode", "ranks", "global batch", "batch/rank", "step ms", "samples/s", "efficiency",
               "bytes counted == predicted"], rows)])


def planner_shortfalls(predictions: dict, worlds: list) -> str:
    """How the planner's plan compares with the plans that put every TT table on one sharding type,
    per preset and W > 1, by step time (E would compare against each plan's own W = 1 step): the
    cases where one of those is faster, and by how much."""
    slower = []
    for key, planner in predictions.items():
        preset, kind = key.split("/")
        if kind != "planner":
            continue
        for i, w in enumerate(worlds):
            best, t = min(((k.split("/")[1], pts[i]["step_time_s"]) for k, pts in predictions.items()
                           if k.startswith(preset + "/") and k != key), key=lambda x: x[1])
            if w > 1 and planner[i]["step_time_s"] > t:
                slower.append(f"{preset} W={w} ({best}, {100 * (planner[i]['step_time_s'] / t - 1):.2f} % faster)")
    return ("The planner's plan is as fast as every all-one-kind TT plan at each preset and W > 1"
            + (f", except: {'; '.join(slower)}." if slower else "."))


def section_perf(name_v: str, v: Optional[dict], name_p: str, p: Optional[dict]) -> str:
    def plan_text(by_w: dict) -> str:
        return ", ".join(f"{w}: {', '.join(f'{k} {n}' for k, n in plan['tt'].items())}" for w, plan in by_w.items())

    out = []
    if v:
        rows = [[r["placement"], r["mode"], r["world_size"], ", ".join(f"{k} {n}" for k, n in r["plan"]["tt"].items()),
                 ms(r["measured_step_s"]), ms(r["predicted_step_s"]), f"{100 * r['relative_error']:+.1f} %",
                 num(r["bytes_equal"])]
                for r in sorted(v["rows"], key=lambda r: (r["placement"], r["mode"], r["world_size"]))]
        worst = v.get("max_abs_relative_error_w2")
        out += [f"Validation against `{v['scaling_json']}` (from `{name_v}`; measured by `{v.get('command')}`): bytes "
                f"counted == predicted on every rank of every row: {num(v['bytes_all_equal'])}; largest |relative "
                f"error| of the step time at 2 ranks: " + (f"{100 * worst:.1f} %." if worst is not None else "-"),
                "", f"> {v['note']}" if v.get("note") else "", "",
                table(["placement", "mode", "ranks", "TT plan", "measured step ms", "predicted step ms", "error",
                       "bytes equal"], rows), ""]
    if p and "configs" in p:
        out += [f"Predictions (from `{name_p}`): weak scaling at {p['batch_per_gpu']} samples per GPU. These are model "
                "outputs, not measurements. Assumptions:", ""] + [f"- {a}" for a in p["assumptions"]] + [""]
        worlds = p["worlds"]
        for name, c in p["configs"].items():
            out += [f"**{name}** (`{c['config']}`; TT cores {c['model']['tt_core_bytes'] / 2**20:.1f} MiB; compute "
                    f"profile `{c['profile_json']}`).", ""]
            for label, part in (("measured CPU compute", c),
                                (f"what-if: compute / {p['what_if_speedup']:g} (ASSUMED GPU speed)", c.get("what_if"))):
                if part:
                    rows = [[k, *(f"{ms(x['step_time_s'])} ms, E={num(x['efficiency'])}" for x in pts)]
                            for k, pts in part["predictions"].items()]
                    by_preset = part["planner_plans"]
                    if any("tt" in x for x in by_preset.values()):  # older files: {W: plan}, one for every preset
                        plans = f"the planner's TT plan per W, on TorchRec's default links: {plan_text(by_preset)}"
                    else:
                        plans = "the planner's TT plan per preset and W, planned on that preset's links: " + "; ".join(
                            f"{preset}: {plan_text(by_w)}" for preset, by_w in by_preset.items())
                    out += [f"{label} ({plans}):", "",
                            table(["preset / TT plan", *(f"W={w}" for w in worlds)], rows), "",
                            planner_shortfalls(part["predictions"], worlds), ""]
    return "\n".join(out)


def section_compression(name: str, d: dict) -> str:
    s, dense = d["settings"], d["dense_baseline"]
    m = d["machine"]
    rows = [["dense", "–", num(1.0), num(1.0), num(dense["auc"], 4), "0 (reference)", num(dense["logloss"], 4),
             ms(dense["wall_s_per_step"]), ms(dense["cpu_s_per_step"]), "1"]]
    if d.get("dense_baseline_seed1"):
        r = d["dense_baseline_seed1"]
        rows.append(["dense, train.seed=1", "–", num(1.0), num(1.0), num(r["auc"], 4),
                     f"{100 * (dense['auc'] - r['auc']) / dense['auc']:+.3f} %", num(r["logloss"], 4),
                     ms(r["wall_s_per_step"]), ms(r["cpu_s_per_step"]), num(r["cpu_s_per_step"] / dense["cpu_s_per_step"])])
    for r in sorted(d["runs"], key=lambda r: (r["tt_tables"], r["tt_rank"])):
        rows.append([f"TT, {r['tt_tables']} largest", r["tt_rank"], num(r["compression_tt"]), num(r["compression_total"]),
                     num(r["auc"], 4), f"{r['auc_loss_pct']:+.3f} %", num(r["logloss"], 4), ms(r["wall_s_per_step"]),
                     ms(r["cpu_s_per_step"]), num(r["cpu_time_per_step_vs_dense"])])
    out = [
        f"Mode `{d['mode']}`: `{d['base_config']}` with {' '.join(f'`{o}`' for o in d['overrides'])}; every run "
        f"{s['steps']} steps of batch {s['batch_size']}, eval on {d['eval_samples']:,} samples; synthetic data at "
        f"{s['cardinality_scale']} x the Kaggle cardinalities (teacher AUC, the ceiling: {d['teacher_auc']:.4f}). "
        f"{d['how'][0].upper() + d['how'][1:]}. {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}; load "
        f"average {load_text([d['load_average_start'], d['load_average_end']])}; {d['total_seconds'] / 60:.1f} min; "
        f"from `{name}`.", "",
        "AUC loss = (AUC_dense - AUC) / AUC_dense (negative: better than dense). Compression: dense bytes / bytes, "
        "of the TT tables only and of all 26 tables.", "",
        table(["model", "TT rank", "compression (TT tables)", "compression (all tables)", "eval AUC", "AUC loss",
               "logloss", "wall ms/step", "CPU ms/step", "CPU time / dense"], rows)]
    if d.get("reused_from"):
        ru = d["reused_from"]
        out += ["", f"The TT runs and the seed-1 dense run come from the earlier `{ru['file']}` (its git history; same "
                f"settings, {ru['its_total_seconds'] / 60:.0f} min, load average "
                f"{load_text(ru['its_load_average'])}); the dense baseline was retrained here for the TT-SVD path: AUC "
                f"{dense['auc']:.4f} here vs {dense.get('reused_file_auc', float('nan')):.4f} in that file."]
    if d.get("skipped"):
        out += ["", "Not run (the rank exceeds a table's unfolding limit at this scale):", ""]
        out += [f"- {x['tt_tables']} tables, rank {x['tt_rank']}: {x['reason']}" for x in d["skipped"]]
    if d.get("tt_svd"):
        rows = [[x.get("variant", "TT-SVD"), x["tt_tables"], x["tt_rank"], f"{x['dense_steps']} + {x['finetune_steps']}",
                 num(x["dense_auc_at_conversion"], 4), num(x["converted_auc"], 4), num(x["finetuned_auc"], 4),
                 num(x["scratch_auc"], 4), f"{x['finetuned_minus_scratch_auc']:+.4f}",
                 num(min(x["tt_svd_relative_error"].values())) + "–" + num(max(x["tt_svd_relative_error"].values())),
                 num(x["tt_svd_seconds"])] for x in d["tt_svd"]]
        out += ["", "TT-SVD path: the dense baseline after `dense steps`, its largest tables converted by TT-SVD "
                "(`load_dense`; \"cores balanced\": then each table's cores rescaled to equal RMS entries, the "
                "table unchanged), fine-tuned for the remaining steps on the next batches (the MLPs' and dense "
                "tables' optimizer state carried over, the TT cores' starting at zero), vs TT trained from scratch "
                "for the same total steps:", "",
                table(["conversion", "TT tables", "rank", "dense + fine-tune steps", "dense AUC at conversion", "AUC right after TT-SVD",
                       "AUC after fine-tune", "TT from scratch AUC", "fine-tuned - scratch",
                       "TT-SVD relative error (per table)", "TT-SVD s"], rows)]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compression_sweep import claims  # recomputed from the raw numbers, whatever the file's version

    c = claims(dense, d["runs"], d.get("dense_baseline_seed1"))
    lines = []
    for key, label in (("compression_total", "all 26 tables"), ("compression_tt", "the TT tables only")):
        x = c.get(f"at_100x_{key}")
        if x is None:
            lines.append(f"- At >= 100x compression of {label}: no configuration in this sweep reaches it.")
            continue
        ref = x["conservative_reference"]
        per = "; ".join(
            f"{k['tt_tables']} tables r{k['tt_rank']} ({num(k[key])}x): {k['auc_loss_pct_vs_dense']:+.3f} %"
            + (f" / {k['auc_loss_pct_vs_dense_seed1']:+.3f} %" if "auc_loss_pct_vs_dense_seed1" in k else "")
            for k in x["configs"])
        versus = "vs dense seed 0 / seed 1" if ref == "best_dense_seed" else "vs dense"
        lines.append(f"- At >= 100x compression of {label}, AUC loss {versus}: {per}. Against the "
                     f"{'better dense seed' if ref == 'best_dense_seed' else 'dense baseline'}, the best is "
                     f"{x['best_auc_loss_pct']:+.3f} % ({x['best']['tt_tables']} tables, rank {x['best']['tt_rank']}); "
                     f"{x['configs_meeting_0.1pct']} of {len(x['configs'])} configurations meet the <= 0.1 % goal.")
    gap = d["teacher_auc"] - max(c["references_auc"].values())
    lines.append(f"- The dense baseline ends {gap:.4f} AUC below the teacher's ceiling ({d['teacher_auc']:.4f}): "
                 f"these are models after a fixed budget, not converged ones; a negative loss means TT ended above "
                 f"dense after the same steps.")
    if "dense_seed_to_seed_auc_delta_pct" in c:
        lines.append(f"- Noise floor: the dense baseline with `train.seed=1` differs from seed 0 by "
                     f"{c['dense_seed_to_seed_auc_delta_pct']:.3f} % AUC; differences below that are within the "
                     f"seed-to-seed spread of a single run.")
    out += ["", "Measured claims:", "", *lines]
    return "\n".join(out)


def generate_readme() -> tuple[str, list[str]]:
    h = host()
    found, missing, used_png = [], [], set()
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python benchmarks/run_all.py --readme` from benchmarks/results/; "
        "edit the generator, not this file. -->",
        "",
        "`make bench` runs the quick CPU version of every benchmark (`python benchmarks/run_all.py --quick`, "
        "under 15 min on 2 cores) and regenerates this file from the result files; "
        "`python benchmarks/run_all.py --readme` only regenerates it.",
        "",
        f"**Machine that regenerated this file:** {h['cpu']}, {h['cores']} cores, torch {h['torch']} (a result "
        "file made earlier may come from another machine of this pool: compare ratios within one file, not "
        "absolute times across files)"
        + (f", GPU {h['gpu']}." if h["gpu"] else ". The GPU results (last section) come from `make gpu-check` on a "
           "lent GPU machine, named there."),
        "The machine is shared with other jobs; each result records the load average during its run, and wall "
        "times under load are inflated. Byte counts, compression ratios and AUCs do not depend on the load.",
        "",
        "| benchmark | command | result files |",
        "|---|---|---|",
    ]
    quick_or_full = lambda d: " (quick)" if d and (d.get("quick") or d.get("mode") == "quick") else ""  # noqa: E731
    kernel = load("tt_kernel_cpu.json")
    e2e, scaling = load("e2e_cpu.json"), load("scaling_cpu.json")
    e2e_tw, app = load("e2e_cpu_table_wise.json"), load("app_throughput_cpu.json")
    pv, pp = load("perf_model_validation.json"), load("perf_model_predictions.json")
    comp_full, comp_quick = load("compression_sweep.json"), load("compression_sweep_quick.json")
    parts += [
        "| TT lookup kernel | `python benchmarks/tt_kernel_bench.py --device cpu [--quick]` | tt_kernel_cpu.json |",
        f"| end-to-end step, TT vs dense | `{(e2e or {}).get('command', '.venv/bin/python benchmarks/e2e_bench.py [--quick]')}` "
        "| e2e_cpu.json, e2e_cpu_breakdown.png |",
        "| end-to-end step, TT tables table-wise | `" + (e2e_tw or {}).get(
            "command", ".venv/bin/python benchmarks/e2e_bench.py --tt-sharding table_wise "
            "--out benchmarks/results/e2e_cpu_table_wise.json") + "` | e2e_cpu_table_wise.json |",
        f"| the training app, TT vs dense | `{(app or {}).get('command', '.venv/bin/python benchmarks/app_throughput.py')}` "
        "| app_throughput_cpu.json |",
        f"| scaling, CPU ranks | `{(scaling or {}).get('command', '.venv/bin/python benchmarks/scaling.py [--quick]')}` "
        "| scaling_cpu.json, scaling_cpu.png |",
        "| perf model: compute profiles | " + "; ".join(f"`{' '.join(perf_profile_bench(c).full)}`" for c in PERF_CONFIGS)
        + " | " + ", ".join(perf_profile_bench(c).outputs[0] for c in PERF_CONFIGS) + " |",
        f"| perf model | `python {' '.join(next(b for b in benches() if b.name == 'perf_model').full)}` "
        "| perf_model_validation.json, perf_model_predictions.json, .png |",
        "| compression sweep | `python benchmarks/compression_sweep.py [--quick]` "
        "| compression_sweep[_quick].json, .png |",
        "",
    ]

    def add(title: str, files: list[str], body: Optional[str], pngs: Sequence[str] = ()) -> None:
        parts.extend([f"## {title}", ""])
        if body is None:
            parts.extend([f"*No results yet: {', '.join(files)} missing.*", ""])
            missing.extend(files)
            return
        found.extend(f for f in files if (RESULTS / f).exists())
        parts.extend([body, ""])
        for png in pngs:
            if (RESULTS / png).exists():
                used_png.add(png)
                parts.extend([f"![{png}](results/{png})", ""])

    add("TT lookup kernel" + quick_or_full(kernel), ["tt_kernel_cpu.json"],
        section_kernel("tt_kernel_cpu.json", kernel) if kernel else None)
    add("End-to-end training step: TT vs dense tables" + quick_or_full(e2e), ["e2e_cpu.json"],
        section_e2e("e2e_cpu.json", e2e) if e2e else None, ["e2e_cpu_breakdown.png"])
    add("End-to-end training step, TT tables forced table-wise" + quick_or_full(e2e_tw), ["e2e_cpu_table_wise.json"],
        section_e2e("e2e_cpu_table_wise.json", e2e_tw) if e2e_tw else None)
    add("The training app: TT vs dense throughput" + quick_or_full(app), ["app_throughput_cpu.json"],
        section_app("app_throughput_cpu.json", app) if app else None)
    add("Scaling" + quick_or_full(scaling), ["scaling_cpu.json"],
        section_scaling("scaling_cpu.json", scaling) if scaling else None, ["scaling_cpu.png"])
    add("Performance model", ["perf_model_validation.json", "perf_model_predictions.json"],
        section_perf("perf_model_validation.json", pv, "perf_model_predictions.json", pp) if (pv or pp) else None,
        ["perf_model_predictions.png"])
    comp = comp_full or comp_quick
    comp_name = "compression_sweep.json" if comp_full or not comp_quick else "compression_sweep_quick.json"
    add("Compression sweep (quality vs memory)" + quick_or_full(comp), [comp_name],
        section_compression(comp_name, comp) if comp else None, [comp_name.replace(".json", ".png")])
    if comp_full and comp_quick:
        add("Compression sweep, quick mode (what `make bench` runs)", ["compression_sweep_quick.json"],
            section_compression("compression_sweep_quick.json", comp_quick), ["compression_sweep_quick.png"])
    parts += ["`tests/test_tt_vs_dense.py` (slow) checks issue 4's requirement in one test: TT (7 tables, rank 16) "
              "and dense tables, same 300 steps, eval AUC within 0.5 %.", ""]
    gpu = sorted(p.name for p in RESULTS.glob("*cuda*.json")) + sorted(p.name for p in RESULTS.glob("gpu_check_*.json"))
    parts += ["## GPU (`make gpu-check`)", ""]
    checks = sorted(RESULTS.glob("gpu_check_*.json"))
    if not checks:
        parts += ["Pending: no GPU result files exist.", ""]
    for check in checks:
        parts += [section_gpu_check(check.name, load(check.name)), ""]
        bench = load(f"tt_kernel_cuda_{check.stem[len('gpu_check_'):]}.json")
        if bench:
            parts += [section_kernel_cuda(f"tt_kernel_cuda_{check.stem[len('gpu_check_'):]}.json", bench), ""]
        profile = RESULTS / f"tt_kernel_cuda_{check.stem[len('gpu_check_'):]}_profile.txt"
        if profile.exists():
            parts += [f"Where the time goes: `{profile.name}` holds torch.profiler's kernel table of one fp32 "
                      "fwd+bwd at each batch size. The backward's chunk program (CoreGradProgram: slice gradients "
                      "summed into the cores with one atomic add per element of every trie node's outer product) "
                      "dominates; that is the next kernel to rework (group by slice before adding).", ""]
            used_png.add(profile.name)
        before = load(f"tt_kernel_cuda_{check.stem[len('gpu_check_'):]}_sync_ops.json")
        if bench and before:
            parts += [section_kernel_before_after(f"tt_kernel_cuda_{check.stem[len('gpu_check_'):]}_sync_ops.json",
                                                  before, bench), ""]
    other = sorted(p.name for p in RESULTS.glob("*") if p.suffix in (".json", ".png")
                   and p.name not in set(found) | used_png | set(gpu))
    if other:
        parts += ["Other result files: " + ", ".join(f"`{o}`" for o in other), ""]
    return "\n".join(parts).rstrip() + "\n", missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick CPU versions (make bench)")
    ap.add_argument("--readme", action="store_true", help="only regenerate benchmarks/README.md")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate the README after the runs")
    ap.add_argument("--only", help="comma-separated subset: kernel, e2e, app, scaling, perf_profile_criteo_kaggle, "
                    "perf_profile_criteo_terabyte, perf_model, compression")
    args = ap.parse_args(argv)
    rc = 0
    if not args.readme:
        only = set(args.only.split(",")) if args.only else None
        rc = run_benchmarks(args.quick, only)
    if args.readme or not args.no_readme:
        text, missing = generate_readme()
        README.write_text(text)
        print(f"wrote {README.relative_to(ROOT)}" + (f"; missing results: {', '.join(missing)}" if missing else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
