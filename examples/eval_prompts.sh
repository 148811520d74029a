#!/usr/bin/env bash
# The paper's evaluation images (Table 5): 20 prompts "<placeholder>, X", 32 seeds each, for
# one trained folder, in one process (the model loads once; existing images are skipped,
# so an interrupted run continues) into TRAINED_DIR/eval/k0/, where `magictailor eval`
# finds and scores them. The prompt file also holds the two decoupled prompts,
# "<v0>" and "<v1>" alone.
#   examples/eval_prompts.sh TRAINED_DIR [PLACEHOLDER] [SEEDS]
#   examples/eval_prompts.sh outputs/magictailor "<v0> with <v1>" 0..31
set -euo pipefail
dir=${1:?trained output folder}
placeholder=${2:-"<v0> with <v1>"}
seeds=${3:-0..31}
here=$(cd "$(dirname "$0")" && pwd)
magictailor infer --model-dir "$dir" --prompts-file "$here/../assets/eval_prompts.txt" \
  --placeholder "$placeholder" --seeds "$seeds" --batch-size 8 --grid --out-dir "$dir/eval/k0"
