"""Train a DLRM with TT embedding tables under TorchRec's DistributedModelParallel.

    torchrun --nproc_per_node=2 -m ttdist.train --config configs/demo.yaml [key.sub=value ...]
    (or launch/local.sh 2 configs/demo.yaml)

config -> process group -> run directory -> session (model, plan, DMP, optimizer, checkpointer:
ttdist/session.py) -> resume -> [train step, eval, log, checkpoint]* -> summary. Outputs go to
``<train.output_dir>/<train.name>/``: ``config.yaml``, ``plan.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``summary.json``.

Failures (docs/reliability.md, ttdist/failures.py): every collective runs under
``train.collective_timeout_s`` and a failed one names the phase, the collective and the ranks that
never reached it (CollectiveError); non-finite inputs/losses stop every rank with the same
NonFiniteError (or are skipped); a torchrun restart resumes from the job's newest complete
checkpoint. The TTDIST_FAULT_* test hooks live in ttdist/faults.py, loaded only when one is set.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record
from torchrec.optim.keyed import KeyedOptimizer
from tqdm import tqdm

from ttdist.config import Config, load_config, to_dict, validate
from ttdist.data import EndOfData, check_files, make_dataset, train_stream
from ttdist.failures import (CollectiveTrace, NonFiniteError, Progress, agree_step_health, first_nonfinite_dense,
                             first_nonfinite_parameter, gather, say)
from ttdist.metrics import MetricsLog, evaluate
from ttdist.model import embedding_bytes
from ttdist.ops import check_errors
from ttdist.process_group import DistEnv, init_distributed, restart_count
from ttdist.run_dir import claim_run_dir, release_run_dir, restarted
from ttdist.session import Session, build_session


@record  # torchelastic: a failing rank's error and traceback go to torchrun's error file and summary
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
    """The whole run on an initialised process group: set-up, resume, the loop, final evaluation."""
    validate(cfg, env.world_size)
    check_files(cfg.data)  # data files exist and hold a batch: fail now, not after training (every rank)
    faults = fault_hooks(env.rank)
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
    session = build_session(cfg, env, run_dir, progress, checkpoint_fault=faults and faults.in_checkpoint_save)
    step = 0
    # A torchrun restart (attempt > 0) always continues from the job's own checkpoints; with
    # checkpoint.resume=false it ignores those of other jobs in the run directory (job: see
    # claim_run_dir; checkpoint.resume=true resumes from any job's).
    if cfg.checkpoint.resume or again:
        with progress.phase("resume (loading the newest complete checkpoint)"):
            step = session.resume(job=None if cfg.checkpoint.resume else job)
    log = MetricsLog(run_dir / "metrics.jsonl", env.rank == 0)
    log.write = functools.partial(log.write, job=job)  # every record names its job (run dirs are reused)
    stats = RunStats()
    step = train_loop(session, cfg, step, log, stats, progress, faults, job)

    with progress.phase("final evaluation"):
        final = run_eval(session.model, cfg, env)
        log.write(step=step, split="eval", **final)
        summary = {**final, **stats.summary(env), **embedding_bytes(cfg), "steps": step,
                   "world_size": env.world_size}
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary


def train_loop(session: Session, cfg: Config, step: int, log: MetricsLog, stats: RunStats, progress: Progress,
               faults, job: str) -> int:
    """Steps ``step + 1 .. train.steps``, with their logs, evaluations and checkpoints; returns the last step."""
    env, model, optimizer = session.env, session.model, session.optimizer
    train_batches = iter(train_stream(cfg.data, env.rank, env.world_size, start_batch=step))  # data.epochs passes
    first_step = step
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bar = tqdm(total=cfg.train.steps, initial=step, disable=env.rank != 0 or not cfg.train.progress_bar,
               desc=cfg.train.name, dynamic_ncols=True)
    while step < cfg.train.steps:
        n = step + 1  # the 1-based step number of metrics.jsonl, messages and fault hooks
        if faults is not None:
            faults.at_step_start(n)
        lr = optimizer.factor  # the LR schedule's multiplier for this step
        try:
            batch = next(train_batches).to(env.device)
        except EndOfData as e:  # every rank reads the same files, so all run out at this step
            saved = None
            if step > first_step and not _due(step, cfg.checkpoint.every_steps):  # keep what was trained
                with progress.phase(f"checkpoint save of step {step} (the train data ran out)"):
                    saved = session.save(step, job=job)
            raise e.at_step(n, cfg.train.steps, step, saved and str(saved)) from None
        if faults is not None:
            batch = faults.poison_batch(batch, n, cfg)
            faults.poison_parameters(model, n)
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, loss_fn, batch, step, cfg, stats, progress, faults)
        stats.add_step(time.perf_counter() - t0, cfg.data.batch_size)
        step = n
        bar.update(1)
        if loss is None:  # a non-finite loss skipped under train.nonfinite=skip: always recorded
            optimizer.skip_step()  # the schedule follows the step count, as the data does
            log.write(step=step, skipped="nonfinite_loss", lr=lr, attempt=progress.attempt)
        elif _due(step, cfg.train.log_every_steps) or step == cfg.train.steps:
            bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{stats.samples_per_s:.0f}")
            log.write(step=step, loss=loss, lr=lr, samples_per_s=stats.samples_per_s, attempt=progress.attempt)
        if _due(step, cfg.train.eval_every_steps) and step < cfg.train.steps:
            with progress.phase(f"evaluation after step {step}"):
                log.write(step=step, split="eval", **run_eval(model, cfg, env))
        if _due(step, cfg.checkpoint.every_steps) or (step == cfg.train.steps and cfg.checkpoint.at_end):
            with progress.phase(f"checkpoint save of step {step}"):
                session.save(step, job=job)
    bar.close()
    return step


def _due(step: int, every: int) -> bool:
    """Whether an every-N-steps action runs after ``step`` (N = 0: never)."""
    return every > 0 and step % every == 0


def fault_hooks(rank: int):
    """The TTDIST_FAULT_* test hooks (ttdist.faults.Faults), imported only when one is set; else None."""
    if not any(name.startswith("TTDIST_FAULT_") for name in os.environ):
        return None
    from ttdist.faults import Faults

    return Faults.from_env(rank)


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


def train_step(model, optimizer: KeyedOptimizer, loss_fn, batch, step: int, cfg: Config, stats: RunStats,
               progress: Optional[Progress] = None, faults=None) -> Optional[float]:
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
            found = [d for d in gather(local) if d]
        raise NonFiniteError(f"step {n}: non-finite dense input on rank(s) {bad_inputs}: " + "; ".join(found))
    if bad_losses:
        if cfg.train.nonfinite == "skip":
            stats.skipped += 1
            return None
        with progress.phase(f"step {n} report of non-finite parameters"):
            culprits = gather(first_nonfinite_parameter(model))
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
