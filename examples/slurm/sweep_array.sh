#!/bin/bash
# Run a sweep as a SLURM job array, one shard per array task, results on shared storage
# (run from the repository on a shared filesystem; the sweep's `output` folder is written there).
#   mkdir -p logs
#   jid=$(sbatch --parsable --array=1-8 examples/slurm/sweep_array.sh configs/sweeps/deep_ignorance.yaml)
#   sbatch --dependency=afterany:$jid --wrap "python -m attack report runs/deep_ignorance --out runs/deep_ignorance/report"
# Re-submitting the same array resumes interrupted cells and skips finished ones; the report
# reads whatever cells exist, so it can also run on a partial sweep.
# Preemption and time limits: SLURM sends SIGTERM (5 min before the limit, via --signal, or at
# preemption); the attack ends its cell as `interrupted` (exit 143) and this script requeues the
# task, which resumes the cell from its last checkpoint. A second job on the same cell (an old
# one still running) is refused by the run directory's lock, never doubled: the sweep then exits
# 75 ("try again later": a cell it could not finish) and the task is requeued too.
#SBATCH --job-name=finetune-attack
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
set -euo pipefail
SWEEP=${1:?usage: sweep_array.sh SWEEP_YAML}
SHARDS=${SLURM_ARRAY_TASK_COUNT:?run me as a job array (sbatch --array=1-N)}
# array ids may start at 0 or 1; shards are 1-based
SHARD=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))
export HF_HOME=${HF_HOME:-$PWD/.hf}   # on shared storage, so every node reuses downloads
# The batch shell receives the signal: pass it on to the attack and wait for it to save.
python -m attack sweep "$SWEEP" --shard "$SHARD/$SHARDS" --quiet &
child=$!
trap 'kill -TERM "$child"' TERM
status=0
wait "$child" || status=$?
if [ "$status" -gt 128 ]; then  # the trap interrupted wait: let the attack finish writing
    wait "$child" || status=$?
fi
if [ "$status" -eq 143 ] || [ "$status" -eq 75 ]; then
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit "$status"
