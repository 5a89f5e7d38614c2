"""Issue 16: a finished run must exit 0 every time.

Cause of the rare SIGABRT after a finished run ("terminate called without an active exception"):
the process group outlived destroy_process_group (DMP's ShardingEnv, DDP and the sharded
modules still held it, partly in reference cycles), so its gloo worker threads were alive when
the interpreter shut down; one that needed the GIL then was forced to exit inside a noexcept
destructor (pytorch/pytorch#190489). train.main() now lets everything that holds the group die
with train()'s frame and collects the cycles before destroying it, so no gloo thread is left.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """\
import os, sys
import ttdist.train
ttdist.train.main(sys.argv[1:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} gloo threads after main: {sorted(n for n in names if 'gloo' in n)}", flush=True)
"""


@pytest.mark.multiprocess
def test_no_gloo_thread_outlives_a_finished_run(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
         "--config", "configs/demo.yaml", "train.steps=6", "checkpoint.every_steps=3", "data.eval_batches=2",
         f"train.output_dir={tmp_path}", "train.progress_bar=false", "checkpoint.resume=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    found = re.findall(r"rank (\d) gloo threads after main: (\[[^\]]*\])", proc.stdout)  # ranks share stdout
    assert proc.returncode == 0 and sorted(r for r, _ in found) == ["0", "1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert all(threads == "[]" for _, threads in found), found
