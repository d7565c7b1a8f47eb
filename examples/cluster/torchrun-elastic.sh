#!/bin/bash
# myopia under plain torchrun with elastic restarts: a worker stopped by SIGTERM/SIGUSR1 (it saves and
# exits 75) or one that fails makes torchrun restart the whole group, up to MAX_RESTARTS times, and
# --resume continues from the last checkpoint. Usage:
#   OUT=runs/x NPROC=8 examples/cluster/torchrun-elastic.sh train --config experiment.yaml
# On several machines run it on each with NNODES, HEAD (node 0's address) and one RDZV_ID.
#
# Exit code (torchrun's own is 1 for a preemption and for a crash alike): 0 finished, 75 stopped by
# SIGTERM/SIGUSR1 with its checkpoint saved (restart the container: it resumes), anything else a
# failure (do not restart blindly). It is read from the run's attempts.jsonl, where the workers record
# how this attempt ended. A Kubernetes Job tells them apart with a pod failure policy (docs/cluster.md),
# and its terminationGracePeriodSeconds must exceed SHUTDOWN_TIMEOUT (Kubernetes' default is 30 s).
set -u
OUT=${OUT:-runs/myopia-torchrun}
NNODES=${NNODES:-1}
export MYOPIA_ATTEMPT=${MYOPIA_ATTEMPT:-torchrun-$(date +%s)-$$}
if [ "$NNODES" -eq 1 ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "${HEAD:?set HEAD to the address of node 0}:${PORT:-29500}"
          --rdzv-id "${RDZV_ID:-myopia}")
fi
torchrun "${RDZV[@]}" --nproc-per-node "${NPROC:-8}" --max-restarts "${MAX_RESTARTS:-3}" \
    --signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
    -m myopia.cli "$@" --out "$OUT" --resume &
child=$!
# The orchestrator signals this script (the container's first process): pass the signal on to torchrun,
# which forwards it to the workers, and wait until torchrun has finished.
for sig in TERM INT USR1; do
    trap "kill -s $sig $child 2>/dev/null" "$sig"
done
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
rc=$?

outcome=$(python3 -m myopia.runs.attempts "$OUT" "$MYOPIA_ATTEMPT" 2>/dev/null || true)
case "$outcome" in
    completed) exit 0 ;;
    preempted) echo "myopia: attempt $MYOPIA_ATTEMPT preempted, checkpoint saved (exit 75: restart to resume)"; exit 75 ;;
    *) echo "myopia: attempt $MYOPIA_ATTEMPT ended ${outcome:-without a record} (torchrun exit $rc): a failure"
       [ "$rc" -eq 0 ] || [ "$rc" -eq 75 ] && exit 1
       exit "$rc" ;;
esac
