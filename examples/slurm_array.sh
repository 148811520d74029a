#!/usr/bin/env bash
# Train every pair of a list as a Slurm job array, one GPU per array task:
#
#   sbatch --array=0-22 examples/slurm_array.sh pairs.txt runs/
#
# Each task trains every N-th pair (N = the array's task count, read from
# SLURM_ARRAY_TASK_COUNT): 23 tasks give one pair each, fewer tasks several pairs each with
# one model load. Re-submitting the same array skips finished pairs and resumes
# interrupted ones; exit 75 marks a task worth retrying (e.g. a GPU out of memory).
#SBATCH --job-name=magictailor
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=%x-%A_%a.log
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
set -euo pipefail
pairs=${1:?a pairs file (one pair folder per line) or a folder of pair folders}
root=${2:-runs}
# `exec` hands SIGTERM (sent 120 s before the time limit) to magictailor, which saves a
# checkpoint and exits 143; the requeued task resumes from it.
exec magictailor batch --pairs "$pairs" --out-dir "$root" --device cuda --dtype bf16 \
  --checkpoint-every 50 --quiet
