"""Helpers shared by the tests that run the training app under torchrun (launch/local.sh).

``launch`` runs one job on a tiny config (``TINY``: 26 tables at 0.2 % of the Kaggle rows, TT
ranks 4, 16-wide MLPs, 256-sample batches) and returns its exit code, output and duration;
``reference_run`` is one uninterrupted 2-rank run of 12 steps, made once per pytest session and
shared (read-only) by every test that compares against it; ``load_checkpoint`` reads a DCP
checkpoint directory into a flat ``{key: tensor}`` dict in this (single) process.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.cardinality_scale=0.002", "data.batch_size=256", "data.eval_batches=4", "model.tt_ranks=[4, 4]",
        "model.dense_arch_layer_sizes=[16, 16]", "model.over_arch_layer_sizes=[16, 1]", "train.progress_bar=false",
        "train.log_every_steps=1", "train.eval_every_steps=0", "train.world_size=0"]
REFERENCE = ("train.steps=12", "checkpoint.every_steps=6", "checkpoint.resume=false")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    out: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.out / self.name

    def tail(self, n: int = 4000) -> str:
        return (f"exit {self.returncode} after {self.seconds:.0f} s\n--- stdout\n{self.stdout[-n:]}\n"
                f"--- stderr\n{self.stderr[-n:]}")


def launch(nproc: int, out: Path, name: str, *overrides: str, env: Optional[dict] = None, check: bool = True,
           timeout: float = 600) -> Run:
    """``launch/local.sh nproc configs/demo.yaml`` with TINY and ``overrides``; outputs in out/name.

    ``env`` adds environment variables (fault hooks, TTDIST_MAX_RESTARTS); inherited TTDIST_*
    variables are dropped so that a job never sees another's hooks. ``check``: assert exit 0.
    A job still running after ``timeout`` seconds raises subprocess.TimeoutExpired (a hang).
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTDIST_")}
    full_env.update(env or {})
    cmd = ["bash", str(ROOT / "launch/local.sh"), str(nproc), str(ROOT / "configs/demo.yaml"),
           f"train.output_dir={out}", f"train.name={name}", *TINY, *overrides]
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    run = Run(res.returncode, res.stdout, res.stderr, time.monotonic() - start, Path(out), name)
    if check:
        assert run.returncode == 0, run.tail()
    return run


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def train_records(run_dir: Path) -> list[dict]:
    """Every training record of metrics.jsonl in file order (a restarted job repeats steps)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") != "eval"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; where a restarted job logged a step twice, the later record (the attempt
    whose state the run continued from) wins."""
    return {r["step"]: r["loss"] for r in train_records(run_dir) if "loss" in r}


_REFERENCE: dict[tuple, Path] = {}


def reference_run(*overrides: str) -> Path:
    """The run directory of an uninterrupted 2-rank job (REFERENCE + overrides), launched once per
    session and shared: callers must not write into it."""
    key = REFERENCE + tuple(overrides)
    if key not in _REFERENCE:
        out = Path(tempfile.mkdtemp(prefix="ttdist-reference-"))
        atexit.register(shutil.rmtree, out, True)
        launch(2, out, "full", *key)
        _REFERENCE[key] = out / "full"
    return _REFERENCE[key]


def load_checkpoint(path: Path) -> dict:
    """A DCP checkpoint directory as a flat {dotted key: value} dict, read in this process
    (torch.distributed.checkpoint.format_utils.dcp_to_torch_save, no process group needed)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(target))
        state = torch.load(target, weights_only=False)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(state)


def assert_same_state(a: dict, b: dict, keys_prefix: tuple[str, ...] = ("model.", "optimizer.")) -> int:
    """Asserts bitwise equality of every entry under ``keys_prefix``; returns how many were compared."""
    import torch

    sel = {k for k in a if k.startswith(keys_prefix)}
    assert sel == {k for k in b if k.startswith(keys_prefix)}, sorted(sel ^ {k for k in b if k.startswith(keys_prefix)})
    differ = [k for k in sorted(sel) if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    assert not differ, f"{len(differ)} of {len(sel)} entries differ, e.g. {differ[:5]}"
    return len(sel)
