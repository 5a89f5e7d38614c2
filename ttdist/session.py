"""One training session, built once for the app, the benchmarks and the compression sweep alike.

``build_session(cfg, env)`` on an initialised process group: the model, its sharding plan
(TorchRec's planner or ``train.plan_path``), DistributedModelParallel, the optimizers (fused
table optimizers + the MLPs', under DLRM's LR schedule) and, given a run directory, the
checkpointer. ``Session.save`` / ``Session.resume`` write and read its checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ttdist.checkpoint import Checkpointer, rng_state, set_rng_state
from ttdist.config import Config, OptimConfig, dense_optimizer_class
from ttdist.distributed import make_planner
from ttdist.distributed.links import measure_links
from ttdist.failures import Progress, say
from ttdist.model import build_model, build_sharders, plan_constraints, replicated_plain_tables
from ttdist.modules.optim import OptimType, TableOptimizer
from ttdist.process_group import DistEnv, apply_collective_timeout, job_id
from ttdist.schedule import LRSchedule


@dataclass
class Session:
    """The sharded model, its plan, its optimizer (``optimizer.factor``: the LR schedule's
    multiplier) and, for the app, its checkpointer."""

    env: DistEnv
    model: DistributedModelParallel
    plan: ShardingPlan
    optimizer: LRSchedule
    checkpointer: Optional[Checkpointer] = None

    def save(self, step: int, job: Optional[str] = None) -> Path:
        """``job``: the id claim_run_dir gave this job (torchrun's run id when not given). Returns the
        complete checkpoint's directory."""
        return save_checkpoint(self.checkpointer, self.model, self.optimizer, step, self.env, job=job)

    def resume(self, job: Optional[str] = None) -> int:
        return resume(self.checkpointer, self.model, self.optimizer, self.env, job=job)


def build_session(cfg: Config, env: DistEnv, run_dir: Optional[Path] = None, progress: Optional[Progress] = None,
                  checkpoint_fault: Optional[Callable[[int], None]] = None) -> Session:
    """Model -> plan -> DMP -> optimizer (+ checkpointer under ``run_dir``, where rank 0 also
    writes plan.yaml and prints the plan). ``progress`` names the phases of a failed collective."""
    progress = progress or Progress.disabled()
    model = build_model(cfg, env.device)
    with progress.phase("planning (the planner's broadcast of the plan)"):
        plan = build_plan(model, cfg, env)
    if run_dir is not None and env.rank == 0:
        save_and_print_plan(plan, model, cfg, run_dir, env.device.type)
    with progress.phase("model sharding (DistributedModelParallel / DDP set-up)"):
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=env.device, plan=plan, sharders=build_sharders(cfg))
    apply_collective_timeout(cfg.train.collective_timeout_s)  # also the groups DMP and the sharders created
    optimizer = LRSchedule(build_optimizer(dmp, cfg.optim), cfg.optim)
    checkpointer = (Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last_n, fault=checkpoint_fault)
                    if run_dir is not None else None)
    return Session(env, dmp, plan, optimizer, checkpointer)


def build_plan(model: torch.nn.Module, cfg: Config, env: DistEnv) -> ShardingPlan:
    """TorchRec's planner (with the TT estimators), or the hand-editable plan file ``train.plan_path``."""
    if cfg.train.plan_path:
        from ttdist.plan import load_plan

        return load_plan(cfg.train.plan_path, world_size=env.world_size, tables=model)
    links = measure_links(env.device)  # the job's own links: TorchRec's defaults are GPU figures
    if env.rank == 0:
        say(f"links measured for the planner: {links.latency_ms:.3f} ms per collective, "
            f"{links.bytes_per_ms / 1e3:.0f} MB/s per rank")
    planner = make_planner(links.topology(env.world_size, env.device.type),
                           batch_size=cfg.data.batch_size // env.world_size,
                           constraints=plan_constraints(cfg, env.device.type),
                           optimizer=OptimType.parse(cfg.optim.embedding_optimizer),
                           collective_latency_ms=links.latency_ms)
    return planner.collective_plan(model, build_sharders(cfg), dist.group.WORLD)


def save_and_print_plan(plan: ShardingPlan, model: torch.nn.Module, cfg: Config, run_dir: Path,
                        device_type: str = "cpu") -> None:
    """plan.yaml (hand-editable, reloadable with train.plan_path) and a table on stdout, with the
    lookup load per rank (the TT time from the kernel's calibration on ``device_type``)."""
    from ttdist.distributed.plan_bytes import format_plan
    from ttdist.distributed.tt_costs import cost_model
    from ttdist.plan import save_plan

    save_plan(plan, run_dir / "plan.yaml")
    world = dist.get_world_size()
    print(format_plan(plan, model, world, OptimType.parse(cfg.optim.embedding_optimizer), cfg.data.batch_size // world,
                      cost_model(device_type)), flush=True)


def build_optimizer(model: DistributedModelParallel, cfg: OptimConfig) -> KeyedOptimizer:
    """Fused optimizers of the sharded tables (in backward), the same update for the data-parallel
    plain tables (``TableOptimizer``, after DDP's all-reduce) and a torch optimizer for the MLPs."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    replicated = replicated_plain_tables(model.plan)
    missing = sorted(set(replicated) - set(params))
    if missing:  # they would train with the MLPs' optimizer
        raise RuntimeError(f"data-parallel tables {missing} of the plan are not parameters of the model; "
                           f"its trainable parameters: {sorted(params)[:8]} ...")
    tables = {name: params.pop(name) for name in replicated}
    cls = dense_optimizer_class(cfg.dense_optimizer)
    optimizers = [model.fused_optimizer]
    if tables:
        optimizers.append(KeyedOptimizerWrapper(tables, lambda weights: TableOptimizer(
            [(replicated[name], w) for name, w in zip(tables, weights)], cfg.embedding_optimizer, cfg.embedding_lr,
            cfg.eps)))
    optimizers.append(KeyedOptimizerWrapper(params, lambda params: cls(params, lr=cfg.dense_lr)))
    optimizer = CombinedOptimizer(optimizers)
    optimizer.init_state()  # materialise lazy state, so checkpoints load in place
    return optimizer


def training_state(model: torch.nn.Module, optimizer: KeyedOptimizer, step: int, env: DistEnv) -> dict:
    """What a checkpoint holds: model (sharded cores), optimizer, step (= data position), RNG."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "train": {"step": torch.tensor(step)}, f"rng_rank{env.rank}": rng_state()}


def save_checkpoint(checkpointer: Checkpointer, model, optimizer, step: int, env: DistEnv,
                    job: Optional[str] = None) -> Path:
    """``job``: the id claim_run_dir gave this job (torchrun's run id when not given). Returns the
    complete checkpoint's directory."""
    return checkpointer.save(step, training_state(model, optimizer, step, env), meta={"job": job or job_id()})


def resume(checkpointer: Checkpointer, model, optimizer: KeyedOptimizer, env: DistEnv,
           job: Optional[str] = None) -> int:
    """Loads the newest complete checkpoint (any world size) and returns its step; 0 when none.
    With ``job``, only checkpoints saved by that job (claim_run_dir) count. A damaged checkpoint is
    skipped with a warning naming it (rank 0, stderr) and the previous complete one is loaded."""
    if env.rank == 0 and checkpointer.incomplete():
        print(f"ignoring incomplete checkpoint(s) {[p.name for p in checkpointer.incomplete()]} "
              "(a save was interrupted; they are never loaded)", flush=True)

    def state_for(meta: dict) -> dict:
        state = training_state(model, optimizer, 0, env)
        if env.rank >= meta.get("world_size", env.world_size):
            state.pop(f"rng_rank{env.rank}")  # a rank the checkpoint did not have keeps its own RNG
        return state

    found = checkpointer.load_newest(state_for, job=job, warn=say if env.rank == 0 else (lambda line: None))
    if found is None:
        return 0
    path, state = found
    optimizer.load_state_dict(state["optimizer"])
    if f"rng_rank{env.rank}" in state:
        set_rng_state(state[f"rng_rank{env.rank}"])
    if env.rank == 0:
        print(f"resumed from {path} at step {state['train']['step']}", flush=True)
    return int(state["train"]["step"])

