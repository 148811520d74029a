#!/usr/bin/env bash
# Train a list of pairs on the GPUs of one machine: one worker per GPU, each with its own
# shard, so N pairs cost one model load per GPU plus N x (training time).
#
#   examples/batch_local.sh pairs.txt runs/          # all GPUs nvidia-smi lists
#   GPUS="0 2" examples/batch_local.sh pairs/ runs/  # only GPUs 0 and 2
#   GPUS="0 1" DEVICE=cpu examples/batch_local.sh ...  # two CPU workers (a dry run of the setup)
#
# Extra arguments go to every worker (e.g. --dsbal-steps 300). Ctrl-C stops every worker
# at its next step with a checkpoint; running the script again resumes.
set -euo pipefail
pairs=${1:?a pairs file or a folder of pair folders}
root=${2:?an output root}
shift 2
gpus=(${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader)})
n=${#gpus[@]}
pids=()
for i in "${!gpus[@]}"; do
  CUDA_VISIBLE_DEVICES=${gpus[$i]} magictailor batch --pairs "$pairs" --out-dir "$root" \
    --shard-index "$i" --shard-count "$n" --device "${DEVICE:-cuda}" --quiet "$@" &
  pids+=($!)
done
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT TERM
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
cat "$root/batch_summary.md"
exit "$status"
