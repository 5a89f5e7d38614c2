"""Train a DLRM with TT embedding tables under TorchRec's DistributedModelParallel.

    torchrun --nproc_per_node=2 -m ttdist.train --config configs/demo.yaml [key.sub=value ...]
    (or launch/local.sh 2 configs/demo.yaml)

One training loop, top to bottom: config -> process group -> model -> plan -> DMP -> optimizer
-> resume -> [train step, eval, log, checkpoint]* -> summary. Outputs go to
``<train.output_dir>/<train.name>/``: ``config.yaml``, ``plan.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``summary.json``.

Failures (docs/reliability.md): every collective runs under ``train.collective_timeout_s`` and a
failed one names the phase, the collective and the ranks that never reached it
(CollectiveError); non-finite inputs/losses stop every rank with the same NonFiniteError (or are
skipped); a torchrun restart resumes from the job's newest complete checkpoint. ``Faults`` holds
the TTDIST_FAULT_* test hooks.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import gc
import json
import os
import re
import resource
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
# Before any process group exists (issue 16): torch.distributed.nn's functions take
# `group=group.WORLD` as a default argument, evaluated at its first import. Imported later (torch's
# ShardedTensor ops import it lazily, e.g. at the first checkpoint), the defaults hold the job's
# process group past destroy_process_group; its gloo threads then die with the interpreter:
# "terminate called without an active exception", SIGABRT, after a finished run.
import torch.distributed.nn  # noqa: F401
import yaml
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from ttdist.checkpoint import Checkpointer, rng_state, set_rng_state
from ttdist.config import Config, OptimConfig, dense_optimizer_class, load_config, to_dict, validate
from ttdist.data import EndOfData, check_files, make_dataset, train_stream
from ttdist.distributed import make_planner
from ttdist.metrics import MetricsLog, evaluate
from ttdist.model import build_model, build_sharders, embedding_bytes, plan_constraints, table_configs
from ttdist.modules.collection import TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType
from ttdist.ops import check_errors


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg)
    summary = train(cfg, env)
    # Issue 16: the process group must die inside destroy_process_group, with nothing in flight,
    # not with the interpreter (its gloo threads then abort: "terminate called without an active
    # exception"). What holds it (DMP's ShardingEnv, DDP, the sharded modules) lived in train()'s
    # frame, partly in reference cycles: collect them first.
    gc.collect()
    dist.destroy_process_group()
    release_run_dir(Path(cfg.train.output_dir) / cfg.train.name)
    return summary


def train(cfg: Config, env: DistEnv) -> dict:
    """The whole run on an initialised process group: model, plan, DMP, loop, checkpoints, eval."""
    validate(cfg, env.world_size)
    check_files(cfg.data)  # data files exist and hold a batch: fail now, not after training (every rank)
    faults = Faults.from_env(env.rank)
    CollectiveTrace.install()
    progress = Progress(env, cfg.train.collective_timeout_s, restart_count())
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    # The run directory's lock (one job at a time) and this job's identity, before anything is
    # written there. The ranks agree first whether this is a torchrun restart: torchrun agents
    # on different nodes may count restarts differently.
    again = restarted(progress, env)
    job = claim_run_dir(run_dir, env, again, progress)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model = build_model(cfg, env.device)
    with progress.phase("planning (the planner's broadcast of the plan)"):
        plan = build_plan(model, cfg, env)
    if env.rank == 0:
        save_and_print_plan(plan, model, cfg, run_dir)
    with progress.phase("model sharding (DistributedModelParallel / DDP set-up)"):
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=env.device, plan=plan, sharders=build_sharders(cfg))
    apply_collective_timeout(cfg.train.collective_timeout_s)  # also the groups DMP and the sharders created
    optimizer = build_optimizer(dmp, cfg.optim)
    schedule = LearningRateSchedule(cfg.optim, optimizer)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last_n, fault=faults.in_checkpoint_save)
    step = 0
    # A torchrun restart (attempt > 0) always continues from the job's own checkpoints; with
    # checkpoint.resume=false it ignores those of other jobs in the run directory (job: see
    # claim_run_dir; checkpoint.resume=true resumes from any job's).
    if cfg.checkpoint.resume or again:
        with progress.phase("resume (loading the newest complete checkpoint)"):
            step = resume(checkpointer, dmp, optimizer, env, job=None if cfg.checkpoint.resume else job)

    log = MetricsLog(run_dir / "metrics.jsonl", env.rank == 0)
    log.write = functools.partial(log.write, job=job)  # every record names its job (run dirs are reused)
    train_batches = iter(train_stream(cfg.data, env.rank, env.world_size, start_batch=step))  # data.epochs passes
    first_step = step
    loss_fn = torch.nn.BCEWithLogitsLoss()
    stats = RunStats()
    bar = tqdm(total=cfg.train.steps, initial=step, disable=env.rank != 0 or not cfg.train.progress_bar,
               desc=cfg.train.name, dynamic_ncols=True)
    while step < cfg.train.steps:
        n = step + 1  # the 1-based step number of metrics.jsonl, messages and fault hooks
        faults.at_step_start(n)
        schedule.apply(step)
        try:
            raw = next(train_batches)
        except EndOfData as e:  # every rank reads the same files, so all run out at this step
            saved = None
            if step > first_step and not _due(step, cfg.checkpoint.every_steps):  # keep what was trained
                with progress.phase(f"checkpoint save of step {step} (the train data ran out)"):
                    saved = save_checkpoint(checkpointer, dmp, optimizer, step, env, job=job)
            raise e.at_step(n, cfg.train.steps, step, saved and str(saved)) from None
        batch = faults.poison_batch(raw.to(env.device), n, cfg)
        faults.poison_parameters(dmp, n)
        t0 = time.perf_counter()
        loss = train_step(dmp, optimizer, loss_fn, batch, step, cfg, stats, progress, faults)
        stats.add_step(time.perf_counter() - t0, cfg.data.batch_size)
        step = n
        bar.update(1)
        if loss is None:  # a non-finite loss skipped under train.nonfinite=skip: always recorded
            log.write(step=step, skipped="nonfinite_loss", lr=schedule.factor(step - 1), attempt=progress.attempt)
        elif _due(step, cfg.train.log_every_steps) or step == cfg.train.steps:
            bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{stats.samples_per_s:.0f}")
            log.write(step=step, loss=loss, lr=schedule.factor(step - 1), samples_per_s=stats.samples_per_s,
                      attempt=progress.attempt)
        if _due(step, cfg.train.eval_every_steps) and step < cfg.train.steps:
            with progress.phase(f"evaluation after step {step}"):
                log.write(step=step, split="eval", **run_eval(dmp, cfg, env))
        if _due(step, cfg.checkpoint.every_steps) or (step == cfg.train.steps and cfg.checkpoint.at_end):
            with progress.phase(f"checkpoint save of step {step}"):
                save_checkpoint(checkpointer, dmp, optimizer, step, env, job=job)
    bar.close()

    with progress.phase("final evaluation"):
        final = run_eval(dmp, cfg, env)
        log.write(step=step, split="eval", **final)
        summary = {**final, **stats.summary(env), **embedding_bytes(cfg), "steps": step,
                   "world_size": env.world_size}
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary


def _due(step: int, every: int) -> bool:
    """Whether an every-N-steps action runs after ``step`` (N = 0: never)."""
    return every > 0 and step % every == 0


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
    warn_shared_store_restart(int(os.environ["RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    apply_collective_timeout(cfg.train.collective_timeout_s)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def apply_collective_timeout(seconds: float) -> None:
    """Puts every existing process group, and those created later without an explicit timeout,
    under ``seconds`` (init_process_group's timeout covers only the default group: a
    ``dist.new_group()`` would otherwise wait 30 minutes on gloo, 10 on NCCL)."""
    timeout = timedelta(seconds=seconds)
    c10d = dist.distributed_c10d
    # _get_default_timeout() reads these module globals when a group is created without a timeout.
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if set_timeout is None or not dist.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        set_timeout(timeout, group)


def restart_count() -> int:
    """torchrun's attempt number (TORCHELASTIC_RESTART_COUNT): 0 for the first run, 0 without torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted(progress: "Progress", env: DistEnv) -> bool:
    """Whether any rank is in a torchrun restart (a collective, so that every rank agrees).

    Like every collective of the app, on a tensor of the job's device: NCCL rejects CPU tensors.
    """
    flag = torch.tensor([progress.attempt], dtype=torch.int64, device=env.device)
    if env.world_size > 1:
        with progress.phase("start-up (do the ranks resume a restarted job?)"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) > 0


def job_id() -> Optional[str]:
    """torchrun's run id (the same in every attempt of one job; random per ``--standalone`` job,
    but whatever the user chose with ``--rdzv_id``: not unique per job, see claim_run_dir)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


class RunDirInUse(RuntimeError):
    """Another job holds the run directory's lock; the message names that job, its host and pid."""


LOCK_FILE, JOB_FILE = ".lock", "job.json"
_HELD_LOCKS: dict[str, int] = {}  # run directory -> open lock file of this process (rank 0), held until exit


def claim_run_dir(run_dir: Path, env: DistEnv, again: bool, progress: "Progress") -> str:
    """Collective: locks the run directory for this job and returns the job's id.

    The id is torchrun's run id plus a random part drawn at the job's first attempt and written
    to ``<run>/job.json`` with the job's torchrun agents (host, pid): the agents outlive torchrun
    restarts and are new for every launch, so a restarted attempt (``again``) takes its job's id
    back from the file, while an earlier job launched with the same run id (a fixed
    ``RDZV_ID``/``--rdzv_id``) is a different job. Checkpoints record it (``ttdist_meta.json``),
    as does every metrics.jsonl record.

    Rank 0 holds an exclusive ``flock`` on ``<run>/.lock`` as long as its process lives (the
    kernel releases it when the process dies, SIGKILL included: no stale lock; on NFS it is a
    lock of the server, so it works across nodes). A second job in the directory stops at start-up
    on every rank with RunDirInUse naming the holder (from its job.json). A restarted attempt
    waits up to 120 s for its own dead attempt's lock (a lost node's lock on NFS lasts a lease)."""
    with progress.phase("start-up (the run directory's lock and the job id)"):
        agents = sorted({(str(h), int(p)) for h, p in _gather([socket.gethostname(), os.getppid()])})
        outcome = None
        if env.rank == 0:
            try:
                outcome = ("ok", _claim(run_dir, [list(a) for a in agents], again))
            except RunDirInUse as e:
                outcome = ("in use", str(e))
        if env.world_size > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
    if outcome[0] != "ok":
        raise RunDirInUse(outcome[1])
    return outcome[1]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _claim(run_dir: Path, agents: list[list], again: bool) -> str:
    """Rank 0's part of claim_run_dir: the job id, the lock, then ``job.json`` (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = job_id() or "local"
    record = _read_json(run_dir / JOB_FILE)
    ours = (again and record.get("run_id") == run_id and isinstance(record.get("job"), str)
            and any(a in record.get("agents", []) for a in agents))
    job = record["job"] if ours else f"{run_id}-{uuid.uuid4().hex[:12]}"
    key = str(run_dir.resolve())
    if key not in _HELD_LOCKS:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + (120 if ours else 0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_json(run_dir / JOB_FILE)
                if holder.get("job") == job and time.monotonic() < deadline:
                    time.sleep(1)  # this job's previous attempt: its rank 0 is still exiting
                    continue
                os.close(fd)
                raise RunDirInUse(_holder_message(run_dir, holder)) from None
        _HELD_LOCKS[key] = fd
    now = time.time()
    info = {"job": job, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "attempt": restart_count(), "started": record.get("started", now) if ours else now,
            "attempt_started": now,
            "agents": sorted({tuple(a) for a in agents + (record.get("agents", []) if ours else [])})}
    tmp = run_dir / f".{JOB_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / JOB_FILE)
    return job


def _holder_message(run_dir: Path, holder: dict) -> str:
    lock = run_dir / LOCK_FILE
    if not holder.get("job"):
        who = f"another job (its {JOB_FILE} is not written yet: it is starting)"
    else:
        started = holder.get("attempt_started", holder.get("started"))
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        who = (f"job {holder['job']} (rank 0 on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
               f"attempt {holder.get('attempt', '?')} started {when})")
    return (f"run directory {run_dir} is in use by {who}; two jobs in one run directory would overwrite each "
            f"other's checkpoints and metrics. Wait for it to end or use another train.name (lock: {lock})")


def release_run_dir(run_dir: Path) -> None:
    """Releases this process's lock of ``run_dir`` (process exit does it too)."""
    fd = _HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


def warn_shared_store_restart(rank: int) -> None:
    """On a torchrun restart, a rendezvous store shared with the agent still holds the dead
    attempt's keys, and process-group set-up can connect to the dead ranks' addresses
    (pytorch/pytorch#135712): launch/*.sh set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    if (rank == 0 and restart_count() > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        print("warning: torchrun restarted this job with a rendezvous store shared across attempts; if the process "
              "group set-up fails to connect, launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/*.sh do)",
              file=sys.stderr, flush=True)


def build_plan(model: torch.nn.Module, cfg: Config, env: DistEnv) -> ShardingPlan:
    """TorchRec's planner (with the TT estimators), or the hand-editable plan file ``train.plan_path``."""
    if cfg.train.plan_path:
        from ttdist.plan import load_plan

        return load_plan(cfg.train.plan_path, world_size=env.world_size, tables=model)
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = make_planner(topology, batch_size=cfg.data.batch_size // env.world_size,
                           constraints=plan_constraints(cfg, env.device.type),
                           optimizer=OptimType.parse(cfg.optim.embedding_optimizer))
    return planner.collective_plan(model, build_sharders(cfg), dist.group.WORLD)


def save_and_print_plan(plan: ShardingPlan, model: torch.nn.Module, cfg: Config, run_dir: Path) -> None:
    """plan.yaml (hand-editable, reloadable with train.plan_path) and a table on stdout."""
    from ttdist.plan import format_plan, save_plan

    save_plan(plan, run_dir / "plan.yaml")
    print(format_plan(plan, model, dist.get_world_size(), OptimType.parse(cfg.optim.embedding_optimizer)), flush=True)


def build_optimizer(model: DistributedModelParallel, cfg: OptimConfig) -> KeyedOptimizer:
    """Fused optimizers of the tables (in backward) + any torch optimizer for the MLPs."""
    cls = dense_optimizer_class(cfg.dense_optimizer)
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


class NonFiniteError(FloatingPointError):
    """A non-finite loss (or input) stopped the run; the message names the step and the culprit."""


def train_step(model, optimizer: KeyedOptimizer, loss_fn, batch, step: int, cfg: Config, stats: "RunStats",
               progress: Optional["Progress"] = None, faults: Optional["Faults"] = None) -> Optional[float]:
    """One step: forward, agree across ranks that inputs and loss are finite, backward, step.

    Returns the loss, or None when a non-finite loss was skipped (``train.nonfinite=skip``).
    Non-finite dense inputs always stop the run (bad data, not a transient numerical fault).
    Every rank raises the same NonFiniteError, naming the 1-based step and the culprit.
    """
    n = step + 1
    progress = progress or Progress.disabled()
    rank = dist.get_rank()
    optimizer.zero_grad()
    with progress.phase(f"step {n} forward"):
        bad_input = first_nonfinite_dense(batch.dense_features)
        loss = loss_fn(model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels)
        if faults is not None:
            loss = faults.poison_loss(loss, n)
        bad_inputs, bad_losses = agree_step_health(bad_input is not None, loss)
    if bad_inputs:
        local = None
        if bad_input is not None:
            sample, feature, kind = bad_input
            b = batch.dense_features.shape[0]
            local = (f"dense feature {feature} of sample {sample} of rank {rank}'s local batch (sample "
                     f"{rank * b + sample} of the global batch of step {n}) is {kind}")
        with progress.phase(f"step {n} report of non-finite dense inputs"):
            found = [d for d in _gather(local) if d]
        raise NonFiniteError(f"step {n}: non-finite dense input on rank(s) {bad_inputs}: " + "; ".join(found))
    if bad_losses:
        if cfg.train.nonfinite == "skip":
            stats.skipped += 1
            return None
        with progress.phase(f"step {n} report of non-finite parameters"):
            culprits = _gather(first_nonfinite_parameter(model))
        where = [f"{c} on rank {r}" for r, c in enumerate(culprits) if c]
        raise NonFiniteError(
            f"step {n}: the loss is not finite on rank(s) {bad_losses}; "
            + (f"first non-finite parameter: {where[0]}" + (f" (also: {'; '.join(where[1:])})" if len(where) > 1 else "")
               if where else "every parameter is finite on every rank (the forward overflowed on finite inputs, "
                             "or the labels are not finite)"))
    with progress.phase(f"step {n} backward"):
        loss.backward()
    optimizer.step()
    value = float(loss.detach())
    if loss.is_cuda:  # the TT ops check index values on the GPU; the host has just waited anyway
        check_errors(loss.device)
    return value


def agree_step_health(bad_input: bool, loss: torch.Tensor) -> tuple[list[int], list[int]]:
    """The ranks with a non-finite dense input and those with a non-finite loss, the same on every
    rank: one all-reduce of a (world, 2) flag tensor on the loss's device (NCCL rejects CPU tensors)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, 2, dtype=torch.int64, device=loss.device)  # [rank] = (input bad, loss bad)
    flags[rank, 0] = int(bad_input)
    flags[rank, 1] = (~torch.isfinite(loss.detach())).to(torch.int64)
    if world > 1:
        dist.all_reduce(flags)
    flags = flags.cpu()
    return torch.nonzero(flags[:, 0]).flatten().tolist(), torch.nonzero(flags[:, 1]).flatten().tolist()


def _gather(obj) -> list:
    """Every rank's ``obj`` (a collective; [obj] on one rank)."""
    if dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_nonfinite_dense(dense: torch.Tensor) -> Optional[tuple[int, int, str]]:
    """(sample, feature, 'NaN'|'Inf') of the first non-finite dense input, or None."""
    bad = ~torch.isfinite(dense)
    if not bool(bad.any()):
        return None
    sample, feature = (int(x) for x in torch.nonzero(bad)[0])
    return sample, feature, "NaN" if torch.isnan(dense[sample, feature]) else "Inf"


def first_nonfinite_parameter(model: torch.nn.Module) -> Optional[str]:
    """The first state_dict entry of this rank (weights and buffers; TT cores are named
    ``...embedding_bags.<table>.tt_cores.<k>``) holding a NaN or Inf; None when all are finite."""
    for name, value in model.state_dict().items():
        tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor)):
            return name
    return None


def run_eval(model, cfg: Config, env: DistEnv) -> dict:
    return evaluate(model, make_dataset(cfg.data, "eval", env.rank, env.world_size), env.device)


# ---------------------------------------------------------------------------------------------
# Hangs and dead peers: every collective runs under train.collective_timeout_s (set on every
# process group); a collective that fails is reported naming the operation and the ranks.
# ---------------------------------------------------------------------------------------------
class CollectiveError(RuntimeError):
    """A collective timed out or lost its peer; the message names the operation and the ranks."""


class PeerError(RuntimeError):
    """Another rank raised (e.g. a bad index in its batch) and this rank's next collective failed
    for it; the message is that rank's error."""


_COMM_ERROR = re.compile(r"gloo|nccl|timed out|timeout|connection (?:reset|closed|refused)|broken pipe|"
                         r"socket|peer|DistBackendError|ProcessGroup", re.IGNORECASE)


def _is_comm_error(error: BaseException) -> bool:
    seen = 0
    e: Optional[BaseException] = error
    while e is not None and seen < 5:
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COMM_ERROR.search(str(e))):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class CollectiveTrace:
    """Remembers the last collective this process issued through ``torch.distributed`` (TorchRec's
    all-to-alls, ttdist's all-reduces, DCP's object collectives...) so that a failure can name it.
    ``install()`` wraps the module's collective functions once (a name assignment per call); DDP's
    gradient all-reduce is issued from C++ and is not seen."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
             "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "gather",
             "gather_object", "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor")
    last: Optional[str] = None
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        for name in cls.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_ttdist_traced", False):
                setattr(dist, name, cls._wrap(name, fn))
        cls.installed = True

    @classmethod
    def _wrap(cls, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            cls.last = name + (" (async)" if kwargs.get("async_op") else "")
            return fn(*args, **kwargs)

        traced._ttdist_traced = True
        return traced


class Progress:
    """Where each rank is: every rank publishes the phase it enters (e.g. ``step 5 forward``) in
    the process group's key-value store (torchrun's agent hosts it, so it outlives a dead rank).
    When a collective of a phase fails, ``phase`` re-raises it as a CollectiveError naming the
    phase, this rank, how long it waited, and every rank's last published phase — the ranks that
    never reached this phase are the dead or hung ones. Costs one store write per phase (two per
    training step)."""

    def __init__(self, env: DistEnv, timeout_s: float, attempt: int = 0) -> None:
        self.rank, self.world, self.timeout_s, self.attempt = env.rank, env.world_size, timeout_s, attempt
        self.seq = 0
        self.store = None
        if env.world_size > 1:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - reports lose the other ranks' phases, nothing else
                self.store = None
        self.prefix = f"ttdist/progress/attempt{attempt}/rank"

    @classmethod
    def disabled(cls) -> "Progress":
        return cls(DistEnv(dist.get_rank() if dist.is_initialized() else 0, 1, torch.device("cpu")), 0.0)

    @contextlib.contextmanager
    def phase(self, where: str) -> Iterator[None]:
        self.seq += 1
        seq, start = self.seq, time.monotonic()
        CollectiveTrace.last = None
        if self.store is not None:
            try:
                self.store.set(f"{self.prefix}{self.rank}", json.dumps([seq, where, time.time()]))
            except Exception:  # noqa: BLE001 - the store is gone: the collective below will say so
                pass
        try:
            yield
        except (NonFiniteError, CollectiveError, PeerError):
            raise
        except Exception as e:
            if self.world <= 1:
                raise
            if not _is_comm_error(e):
                self._publish_error(where, e)
                raise
            peer = self._peer_error()
            if peer is not None:
                raise PeerError(peer) from e
            raise CollectiveError(self.describe(where, seq, time.monotonic() - start, e)) from e

    def _error_key(self, rank: int) -> str:
        return f"ttdist/error/attempt{self.attempt}/rank{rank}"

    def _publish_error(self, where: str, error: BaseException) -> None:
        """This rank's own error, for the peers whose collectives fail when it stops (no
        collective is needed to tell them: bad input costs nothing on the steps that are fine)."""
        if self.store is not None:
            try:
                self.store.set(self._error_key(self.rank), json.dumps([type(error).__name__, str(error), where]))
            except Exception:  # noqa: BLE001 - the peers then report a lost connection instead
                pass

    def _peer_error(self) -> Optional[str]:
        for r in range(self.world):
            if r == self.rank or self.store is None:
                continue
            try:
                if not self.store.check([self._error_key(r)]):
                    continue
                name, message, where = json.loads(self.store.get(self._error_key(r)))
            except Exception:  # noqa: BLE001 - the store is gone too: report the collective
                return None
            return f"rank {r} stopped in '{where}' with {name}: {message}"
        return None

    def describe(self, where: str, seq: int, waited: float, error: BaseException) -> str:
        text = " ".join(str(error).split())
        cause = ("timed out" if re.search(r"timed? ?out", text, re.IGNORECASE)
                 else "lost its connection to a peer (a rank died?)")
        op = (f"collective {CollectiveTrace.last} (the last one this rank issued)" if CollectiveTrace.last
              else "collective (none issued from Python in this phase: DDP's gradient all-reduce)")
        return (f"rank {self.rank}: {op} in '{where}' {cause} after {waited:.1f} s "
                f"(train.collective_timeout_s = {self.timeout_s:g}); {self.peers(seq)}. "
                f"Underlying error: {text[:300]}")

    def peers(self, seq: int) -> str:
        if self.store is None:
            return "the other ranks' progress is unknown (no store)"
        parts, behind = [], []
        for r in range(self.world):
            key = f"{self.prefix}{r}"
            try:
                if not self.store.check([key]):
                    parts.append(f"rank {r}: nothing published")
                    behind.append(r)
                    continue
                their_seq, their_where, t = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001
                return "the other ranks' progress is unknown (the store is unreachable)"
            parts.append(f"rank {r}: '{their_where}' ({time.time() - t:.1f} s ago)")
            if their_seq < seq:
                behind.append(r)
        verdict = (f"rank(s) {behind} never reached this collective (hung or dead)" if behind
                   else "every rank reached this phase (a rank died or hung inside it)")
        return f"{verdict}; last phase per rank: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Fault injection for the reliability tests (docs/reliability.md).
# ---------------------------------------------------------------------------------------------
@dataclass
class Faults:
    """Test hooks, read once from the environment at start-up; all unset in normal runs.

    Steps are 1-based, as in metrics.jsonl. Every hook fires only on the first attempt
    (TORCHELASTIC_RESTART_COUNT unset or 0), so a job restarted by torchrun runs clean.

    ``TTDIST_FAULT_KILL_STEP=N``, ``TTDIST_FAULT_KILL_RANK=r`` (default 0): rank r SIGKILLs
        itself at the start of step N (steps 1..N-1 and their checkpoints are done).
    ``TTDIST_FAULT_KILL_IN_SAVE=N`` (rank ``TTDIST_FAULT_KILL_RANK``): SIGKILL inside the save of
        checkpoint step N, after every rank wrote its shards to ``step_N.partial``, before the
        COMPLETE marker and the rename.
    ``TTDIST_FAULT_HANG_STEP=N``, ``TTDIST_FAULT_HANG_RANK=r`` (default 0): rank r sleeps forever
        at the start of step N (it stops taking part in collectives).
    ``TTDIST_FAULT_NAN_STEP=N``, ``TTDIST_FAULT_NAN_RANK=r`` (default 0),
    ``TTDIST_FAULT_NAN_KIND`` (default ``input``): at step N on rank r, ``input`` sets dense
        feature 5 of local sample 3 to NaN; ``loss`` makes the loss NaN (finite inputs and
        parameters); ``param`` fills one TT core of rank r with NaN before the forward.
    ``TTDIST_FAULT_BAD_INDEX_STEP=N``, ``TTDIST_FAULT_BAD_INDEX_RANK=r`` (default 0): at step N,
        local sample 0 of the first TT table's feature on rank r gets the index ``num_embeddings``
        (one past the last row).
    """

    rank: int = 0
    kill_step: Optional[int] = None
    kill_in_save: Optional[int] = None
    kill_rank: int = 0
    hang_step: Optional[int] = None
    hang_rank: int = 0
    nan_step: Optional[int] = None
    nan_rank: int = 0
    nan_kind: str = "input"
    bad_index_step: Optional[int] = None
    bad_index_rank: int = 0

    NAN_KINDS = ("input", "loss", "param")
    NAN_SAMPLE, NAN_FEATURE = 3, 5

    @classmethod
    def from_env(cls, rank: int, environ: Optional[Mapping[str, str]] = None, attempt: Optional[int] = None) -> "Faults":
        environ = os.environ if environ is None else environ
        attempt = restart_count() if attempt is None else attempt

        def num(name: str, default: Optional[int], minimum: int) -> Optional[int]:
            raw = environ.get(f"TTDIST_FAULT_{name}")
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                value = minimum - 1
            if value < minimum:
                raise ValueError(f"TTDIST_FAULT_{name} must be an integer >= {minimum}, got {raw!r}")
            return value

        kind = environ.get("TTDIST_FAULT_NAN_KIND") or "input"
        if kind not in cls.NAN_KINDS:
            raise ValueError(f"TTDIST_FAULT_NAN_KIND must be one of {cls.NAN_KINDS}, got {kind!r}")
        faults = cls(rank=rank, kill_step=num("KILL_STEP", None, 1), kill_in_save=num("KILL_IN_SAVE", None, 1),
                     kill_rank=num("KILL_RANK", 0, 0), hang_step=num("HANG_STEP", None, 1),
                     hang_rank=num("HANG_RANK", 0, 0), nan_step=num("NAN_STEP", None, 1),
                     nan_rank=num("NAN_RANK", 0, 0), nan_kind=kind, bad_index_step=num("BAD_INDEX_STEP", None, 1),
                     bad_index_rank=num("BAD_INDEX_RANK", 0, 0))
        return faults if attempt == 0 else cls(rank=rank)

    def _say(self, what: str) -> None:
        sys.stdout.flush()
        say(f"[rank {self.rank}] fault injection: {what}")

    def at_step_start(self, step: int) -> None:
        if self.kill_step == step and self.rank == self.kill_rank:
            self._say(f"SIGKILL at the start of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_step == step and self.rank == self.hang_rank:
            self._say(f"hanging at the start of step {step}")
            while True:
                time.sleep(3600)

    def in_checkpoint_save(self, step: int) -> None:
        """Checkpointer's hook: called after every rank wrote step_N.partial, before it is marked complete."""
        if self.kill_in_save == step and self.rank == self.kill_rank:
            self._say(f"SIGKILL while saving checkpoint step {step} (shards written, not marked complete)")
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_batch(self, batch, step: int, cfg: Config):
        if self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "input":
            dense = batch.dense_features.clone()
            dense[min(self.NAN_SAMPLE, dense.shape[0] - 1), self.NAN_FEATURE] = float("nan")
            batch = type(batch)(dense_features=dense, sparse_features=batch.sparse_features, labels=batch.labels)
            self._say(f"NaN in dense feature {self.NAN_FEATURE} of local sample {self.NAN_SAMPLE} at step {step}")
        if self.bad_index_step == step and self.rank == self.bad_index_rank and cfg.tt_table_indices():
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

            kjt = batch.sparse_features
            t = cfg.tt_table_indices()[0]
            rows = cfg.table_rows()[t]
            values = kjt.values().clone()
            values[kjt.offset_per_key()[t]] = rows
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride())
            batch = type(batch)(dense_features=batch.dense_features, sparse_features=kjt, labels=batch.labels)
            self._say(f"index {rows} (out of range) for feature {kjt.keys()[t]} at step {step}")
        return batch

    def poison_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "loss":
            self._say(f"NaN loss at step {step}")
            return loss * float("nan")
        return loss

    def poison_parameters(self, model: torch.nn.Module, step: int) -> None:
        if not (self.nan_step == step and self.rank == self.nan_rank and self.nan_kind == "param"):
            return
        params = [(k, p) for k, p in model.named_parameters() if "._cores." in k and p.numel()]
        # a core G_k with k >= 1 takes part in every lookup of its table: the loss is surely NaN
        later = [(k, p) for k, p in params if not k.split("._cores.")[1].split("_c")[1].startswith("0")]
        name, param = (later or params or [(k, p) for k, p in model.named_parameters() if p.numel()])[0]
        with torch.no_grad():
            param.fill_(float("nan"))
        self._say(f"NaN in parameter {name} before step {step}")


def say(line: str) -> None:
    """One line on stderr in a single write, so that the ranks sharing torchrun's stderr do not
    split it (atomic on a pipe up to 4 KiB)."""
    sys.stderr.flush()
    data = (line.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(sys.stderr.fileno(), data):]


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
                              torch.cuda.max_memory_allocated() if env.device.type == "cuda" else 0], dtype=torch.int64,
                             device=env.device)
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
    except BaseException as e:  # a rank that fails says why and exits non-zero; torchrun stops the others
        # BaseException: DCP's CheckpointException is one; an exit or Ctrl-C is not a failure to explain
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            say(f"[rank {os.environ.get('RANK', '0')}] {type(e).__name__}: {e}")
        raise
