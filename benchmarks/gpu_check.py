"""`make gpu-check`: every check that needs a GPU, in one command, for a rarely lent GPU machine.

Made for a bare CUDA box (e.g. an H200 with torch 2.11+cu130, Python 3.12, nvcc 13; no torchrec,
no fbgemm, no package registry) and a budget of minutes: it uses the machine's own python3 and
torch, no virtual environment. Steps (each with a timeout; a failed step does not stop the others):

  build          ttdist._C built in place against the installed torch (CUDA kernels for this GPU)
  ondevice_build tests/gpu/emulate_kernels.cu built with -DTTDIST_ON_DEVICE (pure CUDA)
  fbtt_build     FBTT-Embedding's extension, when its source is in third_party/FBTT-Embedding
  kernel_checks  the emulator's cases on the GPU through the real kernels vs a double reference
  memcheck       compute-sanitizer --tool memcheck on a small subset of those cases
  racecheck      compute-sanitizer --tool racecheck (shared-memory races) on the same subset
  pytest_gpu     tests/gpu: the torch ops on CUDA vs the plain-PyTorch references
  train          benchmarks/gpu_train_check.py: 50 steps of a small DLRM, CUDA vs CPU losses
  bench          benchmarks/tt_kernel_bench.py: FBTT's shape at 512x20 and 65,536x20, fp32 and
                 bf16, vs dense nn.EmbeddingBag, the reference and FBTT (alone on the GPU)

Without a CUDA device the CUDA steps are skipped and the rest runs (CI runs it that way). Writes
benchmarks/results/gpu_check_<device>.json (steps, times, figures) plus the step logs under
--log-dir, and prints a summary. Exit status 1 if any step failed.

  python3 benchmarks/gpu_check.py [--budget-s 480] [--log-dir build/gpu_check]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FBTT_SOURCE = REPO / "third_party" / "FBTT-Embedding"
SANITIZER_CASES = "4"  # random cases per dtype under compute-sanitizer (slow: every access is checked)


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    env: dict = field(default_factory=dict)
    status: str = "pending"  # ok | failed | timeout | skipped
    returncode: Optional[int] = None
    seconds: float = 0.0
    note: str = ""
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    log: Optional[Path] = None


class Runner:
    """Runs steps as subprocesses (several at a time where they may share the GPU), with timeouts."""

    def __init__(self, log_dir: Path, budget_s: float) -> None:
        self.log_dir = log_dir
        self.deadline = time.monotonic() + budget_s
        self.steps: dict[str, Step] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def skip(self, name: str, why: str) -> None:
        self.steps[name] = Step(name, [], 0, status="skipped", note=why)
        print(f"[gpu-check] {name}: skipped ({why})", flush=True)

    def start(self, step: Step) -> Step:
        self.steps[step.name] = step
        left = self.deadline - time.monotonic()
        if left < 5:
            step.status, step.note = "skipped", "time budget spent"
            return step
        step.timeout_s = min(step.timeout_s, left)
        step.log = self.log_dir / f"{step.name}.log"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "PYTHONUNBUFFERED": "1", **step.env}
        print(f"[gpu-check] {step.name}: {' '.join(step.command)}", flush=True)
        step.started = time.monotonic()
        with open(step.log, "wb") as log:
            step.process = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return step

    def wait(self, *names: str) -> None:
        for name in names:
            step = self.steps[name]
            if step.process is None:
                continue
            try:
                rc = step.process.wait(timeout=max(step.timeout_s - (time.monotonic() - step.started), 1))
                step.returncode = rc
                step.status = "ok" if rc == 0 else "failed"
                step.note = step.note or ("" if rc == 0 else f"exit status {rc}")
            except subprocess.TimeoutExpired:
                os.killpg(step.process.pid, 9)
                step.process.wait()
                step.status, step.note = "timeout", f"killed after {step.timeout_s:.0f} s"
            step.seconds = time.monotonic() - step.started
            step.process = None
            tail = self.tail(name, 12)
            print(f"[gpu-check] {name}: {step.status} in {step.seconds:.1f} s {step.note}\n{tail}", flush=True)

    def tail(self, name: str, lines: int) -> str:
        log = self.steps[name].log
        if log is None or not log.exists():
            return ""
        text = log.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def ok(self, name: str) -> bool:
        return name in self.steps and self.steps[name].status == "ok"


def compilers() -> dict:
    """The host compilers a torch extension build would use (CC / CXX, else cc / c++), with versions.

    A compiler whose own libstdc++ ends up linked into the extension (a separately installed GCC
    with only a static libstdc++) gives the extension a second copy of the iostream machinery: the
    first error message that formats a number crashes (seen on one GPU image: CXX=/opt/gcc/bin/g++).
    The system compiler (/usr/bin/gcc, g++) links the libstdc++ that torch itself loads, so the
    build below prefers it when it exists.
    """
    out = {}
    for var, default in (("CC", "cc"), ("CXX", "c++")):
        path = os.environ.get(var) or shutil.which(default) or ""
        version = ""
        if path:
            try:
                version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                         timeout=20).stdout.splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                version = "unknown"
        out[var] = {"path": path, "version": version, "from_env": var in os.environ}
    system = all(Path(f"/usr/bin/{c}").exists() for c in ("gcc", "g++"))
    out["build_with"] = {"CC": "/usr/bin/gcc", "CXX": "/usr/bin/g++"} if system else {}
    return out


def stdlib_copies(extension_dir: Path) -> Optional[int]:
    """Number of libstdc++ ostream symbols the built extension defines itself (0 when it uses the shared one)."""
    built = sorted(extension_dir.glob("_C*.so"))
    if not built or shutil.which("nm") is None:
        return None
    symbols = subprocess.run(["nm", "-C", "--defined-only", str(built[0])], capture_output=True, text=True).stdout
    return sum("std::basic_ostream" in line and "_M_insert" in line for line in symbols.splitlines())


def cuda_facts() -> dict:
    """The torch, CUDA and device facts that decide which steps run."""
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc"),
             "compute_sanitizer": shutil.which("compute-sanitizer"), "cuda_gdb": shutil.which("cuda-gdb")}
    for tool in ("nvcc", "compute-sanitizer", "cuda-gdb"):
        key = tool.replace("-", "_")
        if facts[key] is None and Path(f"/usr/local/cuda/bin/{tool}").exists():
            facts[key] = f"/usr/local/cuda/bin/{tool}"
    facts["compilers"] = compilers()
    if facts["cuda_available"]:
        major, minor = torch.cuda.get_device_capability()
        facts.update(device_name=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                     sm=f"{major}{minor}", sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of all steps together")
    ap.add_argument("--log-dir", type=Path, default=REPO / "build" / "gpu_check")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    ap.add_argument("--no-build", action="store_true", help="use the ttdist._C already built")
    args = ap.parse_args()
    t_start = time.monotonic()
    facts = cuda_facts()
    print(f"[gpu-check] {json.dumps(facts)}", flush=True)
    cuda = facts["cuda_available"]
    py = sys.executable
    run = Runner(args.log_dir, args.budget_s)
    jobs = str(os.cpu_count() or 2)
    ondevice = args.log_dir / "tt_ondevice"

    # Phase A: builds, in parallel.
    build_env = {"MAX_JOBS": jobs, **facts["compilers"]["build_with"]}
    if cuda:
        build_env["TORCH_CUDA_ARCH_LIST"] = facts["capability"]
    if args.no_build:
        run.steps["build"] = Step("build", [], 0, status="ok", note="--no-build: the ttdist._C already built")
    else:
        run.start(Step("build", [py, "setup.py", "-q", "build_ext", "--inplace"], 300, build_env))
    if cuda and facts["nvcc"]:
        run.start(Step("ondevice_build", [facts["nvcc"], "-std=c++17", "-O2", f"-arch=sm_{facts['sm']}",
                                          "-DTTDIST_ON_DEVICE", "-o", str(ondevice), "tests/gpu/emulate_kernels.cu"],
                       180))
    else:
        run.skip("ondevice_build", "no CUDA device" if not cuda else "nvcc not found")
    if cuda and (FBTT_SOURCE / "tt_embeddings_cuda.cu").exists():
        run.start(Step("fbtt_build", [py, "benchmarks/fbtt_build.py"], 300,
                       {"MAX_JOBS": jobs, **facts["compilers"]["build_with"]}))
    else:
        run.skip("fbtt_build", "no CUDA device" if not cuda else f"no FBTT source at {FBTT_SOURCE}")
    run.wait("build", "ondevice_build")
    facts["extension_defines_ostream_symbols"] = stdlib_copies(REPO / "ttdist")

    # Phase B: correctness, in parallel (they share the GPU; none of them is timed).
    if run.ok("ondevice_build"):
        run.start(Step("kernel_checks", [str(ondevice), "12345", "40"], 120))
        if facts["compute_sanitizer"]:
            for tool in ("memcheck", "racecheck"):
                run.start(Step(tool, [facts["compute_sanitizer"], "--tool", tool, "--error-exitcode", "3",
                                      str(ondevice), "777", SANITIZER_CASES], 150))
        else:
            run.skip("memcheck", "compute-sanitizer not found")
            run.skip("racecheck", "compute-sanitizer not found")
    else:
        for name in ("kernel_checks", "memcheck", "racecheck"):
            run.skip(name, "no on-device build")
    if not cuda:
        run.skip("pytest_gpu", "no CUDA device")
    elif run.ok("build"):
        run.start(Step("pytest_gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], 200,
                       {"TORCH_SHOW_CPP_STACKTRACES": "1"}))
    else:
        run.skip("pytest_gpu", "the extension did not build")
    run.wait("kernel_checks", "memcheck", "racecheck", "pytest_gpu")
    crashed = re.findall(r'tests/gpu/\S+", line \d+ in (test_\w+)', run.tail("pytest_gpu", 400))
    if crashed and (run.steps["pytest_gpu"].returncode or 0) < 0 and facts["cuda_gdb"]:
        # A test killed the interpreter (a signal, not a failure): the native stack of that test.
        run.start(Step("crash_backtrace", [facts["cuda_gdb"], "-batch", "-ex", "run", "-ex", "bt", "--args", py, "-m",
                                           "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/gpu", "-k",
                                           crashed[0]], 150))
        run.wait("crash_backtrace")
        run.steps["crash_backtrace"].status = "info"

    # Phase C: timed work, one at a time.
    tag = facts.get("device_name", "cpu").replace(" ", "_")
    figures: dict = {}
    if cuda and run.ok("build"):
        train_json = args.log_dir / "train.json"
        run.start(Step("train", [py, "benchmarks/gpu_train_check.py", "--steps", "50", "--out", str(train_json)], 180))
        run.wait("train")
        if train_json.exists():
            figures["train"] = json.loads(train_json.read_text())
        run.wait("fbtt_build")
        bench_json = RESULTS / f"tt_kernel_cuda_{tag}.json"
        run.start(Step("bench", [py, "benchmarks/tt_kernel_bench.py", "--device", "cuda", "--shapes", "fbtt",
                                 "--batches", "512,65536", "--dtypes", "float32,bfloat16", "--repeat", "10", "--profile",
                                 "--out", str(bench_json)] + ([] if run.ok("fbtt_build") else ["--fbtt", "none"]), 200))
        run.wait("bench")
        if bench_json.exists():
            figures["bench"] = str(bench_json.relative_to(REPO))
    else:
        for name in ("train", "bench"):
            run.skip(name, "no CUDA device" if not cuda else "the extension did not build")
        if "fbtt_build" in run.steps:
            run.wait("fbtt_build")

    for name in ("kernel_checks",):
        if run.ok(name):
            figures[name] = run.tail(name, 1).strip()
    result = {
        "device_name": facts.get("device_name", "cpu"), "facts": facts,
        "wall_s": time.monotonic() - t_start, "budget_s": args.budget_s,
        "steps": {s.name: {"status": s.status, "seconds": round(s.seconds, 1), "note": s.note}
                  for s in run.steps.values()},
        "figures": figures,
    }
    out = args.out or RESULTS / f"gpu_check_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    failed = [s.name for s in run.steps.values() if s.status in ("failed", "timeout")]
    print("[gpu-check] summary (" + f"{result['wall_s']:.0f} s of {args.budget_s:.0f} s budget):")
    for s in run.steps.values():
        print(f"  {s.name:<15} {s.status:<8} {s.seconds:6.1f} s  {s.note}")
    print(f"[gpu-check] {'FAILED: ' + ', '.join(failed) if failed else 'OK'}; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
