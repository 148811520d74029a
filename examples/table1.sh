#!/usr/bin/env bash
# The paper's Table 1, end to end: train every pair with every method, evaluate every run
# under one protocol, and put them side by side.
#
#   examples/table1.sh submit pairs.txt runs/ [TASKS]   # Slurm: three jobs, chained
#   examples/table1.sh local  pairs.txt runs/           # one machine, one stage after another
#
# `submit` queues a training array (TASKS tasks, default 23, each a shard of the
# method x pair grid with one model load), an evaluation array (one task per run folder,
# after training ends) and the comparison (after evaluation ends). Every stage is safe to
# re-run: finished runs are skipped, interrupted ones resume, drawn images are reused.
# The result: ROOT/table1/compare.md (the table), compare.html (the images), compare.json.
#
# Break-A-Scene fine-tunes every U-Net and text-encoder weight in its phase 2: about 20 GB
# of GPU memory for weights, gradients and AdamW state on SD 2.1-base, plus its 100 class
# images per run (drawn once per run folder).
set -euo pipefail

METHODS=${METHODS:-ti,dreambooth,custom-diffusion,break-a-scene,clic,magictailor}
EVAL_SEEDS=${EVAL_SEEDS:-0..31}   # the paper's 32 seeds per prompt
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
# More flags for `batch`, every `eval` and `compare` (e.g. --model, local --clip-model
# copies; an `eval --segment none` needs `compare --segment none`).
read -r -a TRAIN_ARGS <<<"${TRAIN_ARGS:-}"
read -r -a EVAL_ARGS <<<"${EVAL_ARGS:-}"
read -r -a COMPARE_ARGS <<<"${COMPARE_ARGS:-}"

stage=${1:?submit, local, or (inside a job) train, eval, compare}
pairs=${2:?a pairs file (one pair folder per line) or a folder of pair folders}
root=${3:-runs}
self=$(readlink -f "$0")

# Every trained run folder of the grid: ROOT/METHOD/PAIR/.
runs() { find "$root" -mindepth 3 -maxdepth 3 -name magictailor.json -printf '%h\n' | sort; }

train() {
  exec magictailor batch --pairs "$pairs" --out-dir "$root" --methods "$METHODS" \
    --device "$DEVICE" --dtype "$DTYPE" --checkpoint-every 50 --quiet "${TRAIN_ARGS[@]}"
}

# Evaluates run number $1 of `runs` (a Slurm array index), or every run without one.
evaluate() {
  local i=0
  while read -r run; do
    if [[ -z ${1:-} || $i == "$1" ]]; then
      magictailor eval --model-dir "$run" --seeds "$EVAL_SEEDS" --device "$DEVICE" --dtype "$DTYPE" \
        --quiet "${EVAL_ARGS[@]}"
    fi
    i=$((i + 1))
  done < <(runs)
}

compare() {
  # shellcheck disable=SC2046  # one argument per run folder
  magictailor compare $(runs) --out-dir "$root/table1" "${COMPARE_ARGS[@]}"
}

case $stage in
  local)
    magictailor batch --pairs "$pairs" --out-dir "$root" --methods "$METHODS" \
      --device "$DEVICE" --dtype "$DTYPE" --checkpoint-every 50 "${TRAIN_ARGS[@]}"
    evaluate
    compare
    ;;
  submit)
    tasks=${4:-23}
    n_pairs=$(if [[ -d $pairs ]]; then find "$pairs" -mindepth 1 -maxdepth 1 -type d | wc -l; else grep -cv '^\s*\(#\|$\)' "$pairs"; fi)
    n_runs=$((n_pairs * $(tr ',' '\n' <<<"$METHODS" | wc -l)))
    common=(--parsable --gres=gpu:1 --cpus-per-task=8 --requeue --signal=B:TERM@120)
    t=$(sbatch "${common[@]}" --job-name=table1-train --time=04:00:00 --array=0-$((tasks - 1)) \
      "$self" train "$pairs" "$root")
    e=$(sbatch "${common[@]}" --job-name=table1-eval --time=02:00:00 --array=0-$((n_runs - 1)) \
      --dependency=afterany:"$t" "$self" eval "$pairs" "$root")
    c=$(sbatch --parsable --job-name=table1-compare --time=00:10:00 --dependency=afterany:"$e" \
      "$self" compare "$pairs" "$root")
    echo "queued: train $t ($tasks tasks), eval $e ($n_runs tasks), compare $c -> $root/table1/"
    ;;
  train) train ;;
  eval) evaluate "${SLURM_ARRAY_TASK_ID:-}" ;;
  compare) compare ;;
  *)
    echo "unknown stage $stage: submit, local, train, eval or compare" >&2
    exit 2
    ;;
esac
