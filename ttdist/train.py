"""Train a DLRM with TT embedding tables under TorchRec's DistributedModelParallel.

    torchrun --nproc_per_node=2 -m ttdist.train --config configs/demo.yaml [key.sub=value ...]
    (or launch/local.sh 2 configs/demo.yaml)

One training loop, top to bottom: config -> process group -> model -> plan -> DMP -> optimizer
-> resume -> [train step, eval, log, checkpoint]* -> summary. Outputs go to
``<train.output_dir>/<train.name>/``: ``config.yaml``, ``plan.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from ttdist.checkpoint import Checkpointer, rng_state, set_rng_state
from ttdist.config import Config, OptimConfig, load_config, to_dict, validate
from ttdist.data import make_dataset
from ttdist.distributed import make_planner
from ttdist.metrics import MetricsLog, evaluate
from ttdist.model import build_model, build_sharders, embedding_bytes, plan_constraints
from ttdist.modules.optim import OptimType


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg)
    validate(cfg, env.world_size)
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model = build_model(cfg, env.device)
    plan = build_plan(model, cfg, env)
    if env.rank == 0:
        save_and_print_plan(plan, model, cfg, run_dir)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=env.device,
                                   plan=plan, sharders=build_sharders(cfg))
    optimizer = build_optimizer(dmp, cfg.optim)
    schedule = LearningRateSchedule(cfg.optim, optimizer)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last_n)
    step = resume(checkpointer, dmp, optimizer, env) if cfg.checkpoint.resume else 0

    log = MetricsLog(run_dir / "metrics.jsonl", env.rank == 0)
    train_batches = iter(make_dataset(cfg.data, "train", env.rank, env.world_size, start_batch=step))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    stats = RunStats()
    bar = tqdm(total=cfg.train.steps, initial=step, disable=env.rank != 0 or not cfg.train.progress_bar,
               desc=cfg.train.name, dynamic_ncols=True)
    while step < cfg.train.steps:
        schedule.apply(step)
        batch = next(train_batches).to(env.device)
        t0 = time.perf_counter()
        loss = train_step(dmp, optimizer, loss_fn, batch, step, cfg, stats)
        stats.add_step(time.perf_counter() - t0, cfg.data.batch_size)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every_steps == 0 or step == cfg.train.steps:
            bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{stats.samples_per_s:.0f}")
            log.write(step=step, loss=loss, lr=schedule.factor(step - 1), samples_per_s=stats.samples_per_s)
        if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 and step < cfg.train.steps:
            log.write(step=step, split="eval", **run_eval(dmp, cfg, env))
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or (
                step == cfg.train.steps and cfg.checkpoint.at_end):
            save_checkpoint(checkpointer, dmp, optimizer, step, env)
    bar.close()

    final = run_eval(dmp, cfg, env)
    log.write(step=step, split="eval", **final)
    summary = {**final, **stats.summary(env), **embedding_bytes(cfg), "steps": step, "world_size": env.world_size}
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------
# The pieces, in the order main() uses them.
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ttdist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/ and README's config reference)")
    p.add_argument("--resume", dest="overrides", action="append_const", const="checkpoint.resume=true",
                   help="continue from the run's newest complete checkpoint (the default)")
    p.add_argument("--no-resume", dest="overrides", action="append_const", const="checkpoint.resume=false",
                   help="start from scratch even if the run has checkpoints")
    p.add_argument("rest", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_args(argv)
    args.overrides = (args.overrides or []) + args.rest
    return args


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device


def init_distributed(cfg: Config) -> DistEnv:
    """Process group from torchrun's environment (one local rank when run without torchrun).

    Every collective fails after ``train.collective_timeout_s`` instead of hanging.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.train.backend in ("auto", "nccl")
    backend = cfg.train.backend if cfg.train.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def build_plan(model: torch.nn.Module, cfg: Config, env: DistEnv) -> ShardingPlan:
    """TorchRec's planner (with the TT estimators), or the hand-editable plan file ``train.plan_path``."""
    if cfg.train.plan_path:
        from ttdist.plan import load_plan

        return load_plan(cfg.train.plan_path, world_size=env.world_size)
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = make_planner(topology, batch_size=cfg.data.batch_size // env.world_size,
                           constraints=plan_constraints(cfg, env.device.type),
                           optimizer=OptimType.parse(cfg.optim.embedding_optimizer))
    return planner.collective_plan(model, build_sharders(cfg), dist.group.WORLD)


def save_and_print_plan(plan: ShardingPlan, model: torch.nn.Module, cfg: Config, run_dir: Path) -> None:
    (run_dir / "plan.txt").write_text(str(plan))
    print(plan, flush=True)


def build_optimizer(model: DistributedModelParallel, cfg: OptimConfig) -> KeyedOptimizer:
    """Fused optimizers of the tables (in backward) + any torch optimizer for the MLPs."""
    cls = next(getattr(torch.optim, n) for n in dir(torch.optim) if n.lower() == cfg.dense_optimizer.lower())
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: cls(params, lr=cfg.dense_lr))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    optimizer.init_state()  # materialise lazy state, so checkpoints load in place
    return optimizer


class LearningRateSchedule:
    """DLRM's schedule: linear warm-up, constant, then quadratic decay to ~0, on every group."""

    def __init__(self, cfg: OptimConfig, optimizer: KeyedOptimizer) -> None:
        self.cfg, self.groups = cfg, optimizer.param_groups
        self.base = [g["lr"] for g in self.groups]

    def factor(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.decay_steps and step >= c.decay_start_step:
            remaining = max(c.decay_start_step + c.decay_steps - step, 0)
            return max((remaining / c.decay_steps) ** 2, 1e-7)
        return 1.0

    def apply(self, step: int) -> None:
        scale = self.factor(step)
        for group, base in zip(self.groups, self.base):
            group["lr"] = base * scale


def training_state(model: torch.nn.Module, optimizer: KeyedOptimizer, step: int, env: DistEnv) -> dict:
    """What a checkpoint holds: model (sharded cores), optimizer, step (= data position), RNG."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "train": {"step": torch.tensor(step)}, f"rng_rank{env.rank}": rng_state()}


def save_checkpoint(checkpointer: Checkpointer, model, optimizer, step: int, env: DistEnv) -> None:
    checkpointer.save(step, training_state(model, optimizer, step, env))


def resume(checkpointer: Checkpointer, model, optimizer: KeyedOptimizer, env: DistEnv) -> int:
    """Loads the newest complete checkpoint (any world size) and returns its step; 0 when none."""
    path = checkpointer.latest()
    if path is None:
        return 0
    state = training_state(model, optimizer, 0, env)
    if env.rank >= Checkpointer.meta(path)["world_size"]:
        state.pop(f"rng_rank{env.rank}")  # a rank the checkpoint did not have keeps its own RNG
    Checkpointer.load(path, state)
    optimizer.load_state_dict(state["optimizer"])
    if f"rng_rank{env.rank}" in state:
        set_rng_state(state[f"rng_rank{env.rank}"])
    if env.rank == 0:
        print(f"resumed from {path} at step {state['train']['step']}", flush=True)
    return int(state["train"]["step"])


class NonFiniteError(FloatingPointError):
    """A non-finite loss (or input) stopped the run; the message names the step and the culprit."""


def train_step(model, optimizer: KeyedOptimizer, loss_fn, batch, step: int, cfg: Config, stats: "RunStats") -> float:
    """One step: forward, agree across ranks that inputs and loss are finite, backward, step."""
    optimizer.zero_grad()
    bad_input = first_nonfinite_dense(batch.dense_features)
    loss = loss_fn(model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels)
    flags = torch.tensor([bad_input is not None, not bool(torch.isfinite(loss))], dtype=torch.int64)
    if dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0]:
        where = (f"dense feature {bad_input[1]} of local sample {bad_input[0]} is {bad_input[2]}" if bad_input
                 else "another rank's dense features are not finite (see its error)")
        raise NonFiniteError(f"step {step}: {where}")
    if flags[1]:
        if cfg.train.nonfinite == "skip":
            stats.skipped += 1
            return float("nan")
        raise NonFiniteError(f"step {step}: the loss is not finite; {first_nonfinite_parameter(model)}")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def first_nonfinite_dense(dense: torch.Tensor) -> Optional[tuple[int, int, str]]:
    """(sample, feature, 'NaN'|'Inf') of the first non-finite dense input, or None."""
    bad = ~torch.isfinite(dense)
    if not bool(bad.any()):
        return None
    sample, feature = (int(x) for x in torch.nonzero(bad)[0])
    return sample, feature, "NaN" if torch.isnan(dense[sample, feature]) else "Inf"


def first_nonfinite_parameter(model: torch.nn.Module) -> str:
    for name, value in model.state_dict().items():
        tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor)):
            return f"first non-finite parameter on this rank: {name}"
    return "all parameters on this rank are finite (the non-finite value came from the inputs or another rank)"


def run_eval(model, cfg: Config, env: DistEnv) -> dict:
    return evaluate(model, make_dataset(cfg.data, "eval", env.rank, env.world_size), env.device)


class RunStats:
    """Training throughput (excluding eval and checkpoints) and resource peaks."""

    def __init__(self) -> None:
        self.train_time, self.samples, self.skipped = 0.0, 0, 0

    def add_step(self, seconds: float, samples: int) -> None:
        self.train_time += seconds
        self.samples += samples

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_time if self.train_time else 0.0

    def summary(self, env: DistEnv) -> dict:
        peaks = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                              torch.cuda.max_memory_allocated() if env.device.type == "cuda" else 0], dtype=torch.int64)
        if env.world_size > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out = {"samples_per_s": self.samples_per_s, "train_time_s": self.train_time, "peak_rss_bytes": int(peaks[0]),
               "nonfinite_steps_skipped": self.skipped}
        if env.device.type == "cuda":
            out["peak_gpu_bytes"] = int(peaks[1])
        return out


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a rank that fails says why and exits non-zero; torchrun stops the others
        print(f"[rank {os.environ.get('RANK', '0')}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
