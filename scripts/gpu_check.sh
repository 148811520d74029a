#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), in the repo root, with gpu-pack/ carried
# (scripts/gpu_pack.sh): everything a GPU session must check before timing anything.
#  0. `magictailor doctor --json`: the GPU, driver, libraries, and each kernel family's
#     first-use check and timing (doctor.json; its exit status counts);
#  1. every CUDA kernel through its public op against candle's composed op on the GPU
#     (the unit tests named *on_gpu*, f32 and bf16), then again under compute-sanitizer's
#     memcheck, racecheck and synccheck (from the packed wheel);
#  2. step-1 gradients and 8 trained steps, CPU against CUDA, at 64 px (where two tiny-model
#     tensors have a zero true gradient) and 128 px (where none has): docs/candle.md §7;
#  3. the full-size training step with our kernels (flash attention at 128 and at 256
#     threads per block) and with candle's composed ops (MAGICTAILOR_CUDA_KERNELS=0),
#     each with its profile table.
#
#   scripts/gpu_check.sh [bf16|f16|f32]        # dtype of step 3; logs land in $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_common.sh
for b in magictailor lib-tests step-grads model-bench; do unpack "$b"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
failed=()

"$work/magictailor" doctor --json >"$out/doctor.json" 2>"$out/doctor.log" || failed+=(doctor)
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print("doctor:", "ok" if r["ok"] else r["problems"])' \
  "$out/doctor.json" || true

"$work/lib-tests" on_gpu --test-threads=1 2>&1 | tee "$out/kernel-tests.log" || failed+=(kernel-tests)
sanitizer=$(ls "$pack"/wheels/nvidia_cuda_sanitizer_api-*.whl 2>/dev/null | head -1)
if [ -n "$sanitizer" ]; then
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$sanitizer" "$work/san"
  cs="$work/san/nvidia/cu13/bin/compute-sanitizer"
  chmod +x "$cs"
  for tool in memcheck racecheck synccheck; do
    "$cs" --tool "$tool" --error-exitcode 9 "$work/lib-tests" on_gpu --test-threads=1 \
      >"$out/sanitizer-$tool.log" 2>&1 || failed+=("sanitizer-$tool")
    tail -3 "$out/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer: not packed (scripts/gpu_pack.sh), skipped" >&2
fi
MAGICTAILOR_FLASH_THREADS=256 "$work/lib-tests" flash_on_gpu --test-threads=1 2>&1 |
  tee "$out/kernel-tests-256.log" || failed+=(kernel-tests-256)

for res in 64 128; do
  for dev in cpu cuda; do
    "$work/step-grads" run --device "$dev" --resolution "$res" --out "$work/$dev-$res.st" \
      >"$out/grads-$dev-$res.log" 2>&1 || failed+=("grads-$dev-$res")
  done
  "$work/step-grads" compare "$work/cpu-$res.st" "$work/cuda-$res.st" 2>&1 |
    tee "$out/grads-compare-$res.log" || failed+=("grads-compare-$res")
done

export MAGICTAILOR_BENCH_DIR=$work MAGICTAILOR_BENCH_DEVICE=cuda MAGICTAILOR_BENCH_DTYPE=${1:-bf16}
"$work/model-bench" full-model >"$out/model.log" 2>&1
"$work/model-bench" full-train 2>&1 | tee "$out/train-kernels.log" || failed+=(train-kernels)
MAGICTAILOR_FLASH_THREADS=256 "$work/model-bench" full-train 2>&1 |
  tee "$out/train-kernels-256.log" || failed+=(train-kernels-256)
MAGICTAILOR_CUDA_KERNELS=0 "$work/model-bench" full-train 2>&1 |
  tee "$out/train-composed.log" || failed+=(train-composed)

[ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}" >&2; exit 1; }
echo "all checks ran"
