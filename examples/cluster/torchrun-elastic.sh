#!/bin/bash
# myopia under plain torchrun with elastic restarts: a worker stopped by SIGTERM/SIGUSR1 (it saves and
# exits 75) or one that fails makes torchrun restart the whole group, up to MAX_RESTARTS times, and
# --resume continues from the last checkpoint. Usage:
#   OUT=runs/x NPROC=8 examples/cluster/torchrun-elastic.sh train --config experiment.yaml
# On several machines run it on each with NNODES, HEAD (node 0's address) and one RDZV_ID.
set -u
OUT=${OUT:-runs/myopia-torchrun}
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "${HEAD:?set HEAD to the address of node 0}:${PORT:-29500}"
          --rdzv-id "${RDZV_ID:-myopia}")
fi
exec torchrun "${RDZV[@]}" --nproc-per-node "${NPROC:-8}" --max-restarts "${MAX_RESTARTS:-3}" \
    --signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
    -m myopia.cli "$@" --out "$OUT" --resume
