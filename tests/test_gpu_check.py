"""`make gpu-check` (benchmarks/gpu_check.py) end to end here: without CUDA every GPU step is
skipped with its reason, the rest runs, and the result JSON names every step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STEPS = ["build", "ondevice_build", "fbtt_build", "kernel_checks", "memcheck", "racecheck", "pytest_gpu", "train",
         "bench"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run `make gpu-check` itself")
def test_gpu_check_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--no-build", "--log-dir", str(tmp_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert list(result["steps"]) == STEPS
    assert result["steps"]["build"]["status"] == "ok"
    for name in STEPS[1:]:
        step = result["steps"][name]
        assert step["status"] == "skipped" and step["note"], (name, step)
    assert result["facts"]["cuda_available"] is False
    assert "[gpu-check] OK" in proc.stdout
