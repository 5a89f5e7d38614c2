#!/usr/bin/env bash
# One node, CPU or GPU: launch/local.sh NPROC CONFIG [key.sub=value ...]
#   NPROC   ranks on this node (GPUs when CUDA is present: one rank per GPU)
#   CONFIG  a YAML file under configs/
# Env: TTDIST_MAX_RESTARTS (default 0) restarts all ranks after a failure (torchrun elastic);
#      a restarted attempt resumes from the job's newest complete checkpoint (--standalone: a
#      fresh run id per launch; a second job in the same run dir stops at start-up).
#      TTDIST_FAULT_* inject faults for the reliability tests (docs/reliability.md).
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
exec "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  --max-restarts="${TTDIST_MAX_RESTARTS:-0}" -m ttdist.train --config "$CONFIG" "$@"
