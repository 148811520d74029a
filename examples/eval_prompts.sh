#!/usr/bin/env bash
# The paper's evaluation (Table 5): 20 prompts "<placeholder>, X", 32 seeds each, for one
# trained folder. Usage: examples/eval_prompts.sh TRAINED_DIR [PLACEHOLDER] [SEEDS]
#   examples/eval_prompts.sh outputs/magictailor "<v0> with <v1>" 32
set -euo pipefail
dir=${1:?trained output folder}
placeholder=${2:-"<v0> with <v1>"}
seeds=${3:-32}
here=$(cd "$(dirname "$0")" && pwd)
out="$dir/eval"
i=0
while IFS= read -r suffix; do
  for ((s = 0; s < seeds; s++)); do
    magictailor infer --model-dir "$dir" --prompt "$placeholder, $suffix" --seed "$s" --quiet \
      --out "$out/prompt$(printf %02d $i)/seed$(printf %02d $s).png"
  done
  i=$((i + 1))
done < "$here/../assets/eval_prompts.txt"
echo "images under $out"
