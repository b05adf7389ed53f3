#!/bin/bash
# Workers of one adversary search as a SLURM job array: every task runs `python -m attack search`
# on the same file and the same study storage, asks the study for trials until the budget is
# spent, and takes over trials whose worker died (their runs resume from the last checkpoint).
#   mkdir -p logs
#   sbatch --array=1-8 examples/slurm/search_array.sh configs/sweeps/deep_ignorance_search.yaml [STORAGE]
# STORAGE: a database the nodes reach (postgresql://user@host/db) or journal:PATH on the shared
# file system; default: the SQLite file in the search's output folder (fine for a few workers).
#SBATCH --job-name=finetune-attack-search
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
set -euo pipefail
SEARCH=${1:?usage: search_array.sh SEARCH_YAML [STORAGE]}
STORAGE=${2:-}
export HF_HOME=${HF_HOME:-$PWD/.hf}
python -m attack search "$SEARCH" ${STORAGE:+--storage "$STORAGE"} &
child=$!
trap 'kill -TERM "$child"' TERM
status=0
wait "$child" || status=$?
if [ "$status" -gt 128 ]; then  # the trap interrupted wait: let the trial finish writing
    wait "$child" || status=$?
fi
if [ "$status" -eq 143 ]; then  # preempted: the requeued task takes its trial over
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit "$status"
