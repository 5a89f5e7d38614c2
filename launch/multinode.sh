#!/usr/bin/env bash
# Several nodes: run this script once on every node (or from a scheduler, see slurm.sbatch).
#   launch/multinode.sh CONFIG [key.sub=value ...]
# Environment (all nodes must agree):
#   NNODES          number of nodes                         (required)
#   NPROC_PER_NODE  ranks per node, e.g. GPUs per node      (default 8)
#   RDZV_HOST       host name/IP of the rendezvous node     (required; e.g. the first node)
#   RDZV_PORT       rendezvous TCP port                     (default 29500)
#   RDZV_ID         rendezvous id shared by all nodes       (default $SLURM_JOB_ID, else ttdist)
#                   It need not be unique per job: ttdist tells jobs apart by an id drawn at the
#                   job's first attempt (<run dir>/job.json), so a restarted job never resumes
#                   from an earlier job's checkpoints, and one job at a time may use a run dir.
#   TTDIST_MAX_RESTARTS  elastic restarts after a failure   (default 3)
# Checkpoints must be on a file system every node sees (train.output_dir).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=.. RDZV_HOST=.. $0 CONFIG [key.sub=value ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
CONFIG=$1; shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# A restart must not share the rendezvous store with the dead attempt: its stale keys make the
# new process group connect to dead ranks (pytorch/pytorch#135712; docs/reliability.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="${NPROC_PER_NODE:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-ttdist}}" \
  --max-restarts="${TTDIST_MAX_RESTARTS:-3}" -m ttdist.train --config "$CONFIG" "$@"
