#!/usr/bin/env bash
# One node, CPU or GPU: launch/local.sh NPROC CONFIG [key.sub=value ...]
#   NPROC   ranks on this node (GPUs when CUDA is present: one rank per GPU)
#   CONFIG  a YAML file under configs/
# Env: TTDIST_MAX_RESTARTS (default 0) restarts all ranks after a failure (torchrun elastic);
#      a restarted attempt resumes from the job's newest complete checkpoint (--standalone: a
#      fresh run id per launch; a second job in the same run dir stops at start-up).
#      TTDIST_FAULT_* inject faults for the reliability tests (docs/reliability.md).
#      TTDIST_SHOW_WARNINGS=1 keeps the third-party warnings filtered below.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [key.sub=value ...]" >&2
  exit 2
fi
NPROC=$1; CONFIG=$2; shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# A restart must not share the rendezvous store with the dead attempt: its stale keys make the
# new process group connect to dead ranks (pytorch/pytorch#135712; docs/reliability.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# Known third-party noise, filtered by name (message, category, module / logger); everything
# else, errors included, stays visible. Filters set by the caller come after ours and win.
if [ "${TTDIST_SHOW_WARNINGS:-0}" != 1 ]; then
  # TorchRec 1.8's own deprecations, about arguments TorchRec itself passes:
  NOISE="ignore:HeuristicalStorageReservation is known to cause issues:FutureWarning:torchrec.distributed.planner.planners"
  NOISE+=",ignore:\`broadcast_buffers\` is deprecated:FutureWarning:torchrec.distributed.model_parallel"
  NOISE+=",ignore:Please use DTensor instead:FutureWarning:torchrec.optim.keyed"
  export PYTHONWARNINGS="$NOISE${PYTHONWARNINGS:+,$PYTHONWARNINGS}"
  # Loggers down to ERROR (torch's TORCH_LOGS accepts module names): TorchRec's planner advice
  # ("use TopologyFactory", "dense tensor size in dry run") and torch.fx's is_fx_tracing notice,
  # which TorchRec's modules trigger.
  NOISE="-torchrec.distributed.planner.types,-torchrec.distributed.planner.storage_reservations"
  NOISE+=",-torch.fx._symbolic_trace"
  export TORCH_LOGS="$NOISE${TORCH_LOGS:+,$TORCH_LOGS}"
fi
exec "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  --max-restarts="${TTDIST_MAX_RESTARTS:-0}" -m ttdist.train --config "$CONFIG" "$@"
