#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), in the repo root, with gpu-pack/ carried
# (made here by scripts/gpu_pack.sh): every GPU check and timing in one call, the most
# important first, each step under its own time limit inside one budget, so that a short
# lease still brings back what matters. Logs come back as $OUT/gpu-logs.tgz (steps.tsv: each
# step's exit status and seconds; NAME.log; NAME.peak: nvidia-smi's peak memory.used, MiB).
#  1. `magictailor doctor --json`: the GPU, driver, libraries, each kernel family's
#     first-use check and its time against the composed op;
#  2. every CUDA kernel through its public op against candle's composed op on the GPU (the
#     unit tests named *on_gpu*, f32 and bf16);
#  3. step-1 gradients and 8 trained steps, CPU against CUDA, at 64 px (where two tiny-model
#     tensors have a zero true gradient) and 128 px (where none has): docs/candle.md §7;
#  4. on a random full-size SD 2.1-base at 512 px: the training step with our kernels and
#     with candle's composed ops (MAGICTAILOR_CUDA_KERNELS=0), PyTorch fp16 + diffusers on
#     the same model and pair, a U-Net fwd+bwd, a DDIM step and a 50-step sampling; then
#     `infer --retouch` against the same computation in PyTorch (logs only); one markdown
#     table (table.md, printed);
#  5. Break-A-Scene's phase-2 step at 512 px, and SDXL-base's U-Net for a DDIM step at
#     1024 px, ours and PyTorch's;
#  6. what is left of the budget: the kernel tests under compute-sanitizer's memcheck,
#     8-warp flash blocks, racecheck and synccheck.
#
#   bash scripts/gpu_session.sh [bf16|f16|f32]    # our dtype on the full model; PyTorch runs fp16
#   GPU_BUDGET_S=450 bash scripts/gpu_session.sh  # the whole script's seconds (default 540)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_common.sh
dtype=${1:-bf16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/gpu.txt"
cp "$pack/commit" "$logs/commit" 2>/dev/null
for b in magictailor lib-tests step-grads model-bench; do unpack "$b" || exit 1; done
# The machine's compute-sanitizer (its image has one; a packed wheel would crowd the
# 64 MiB a call carries).
cs=$(command -v compute-sanitizer || find / -xdev -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -1)
echo "compute-sanitizer: ${cs:-none found}"

step doctor 120 bash -c "'$work/magictailor' doctor --json >'$logs/doctor.json'"
step kernel-tests 120 "$work/lib-tests" on_gpu --test-threads=1
for res in 64 128; do
  for dev in cpu cuda; do
    step "grads-$dev-$res" 90 "$work/step-grads" run --device "$dev" --resolution "$res" --out "$work/$dev-$res.st"
  done
  step "grads-compare-$res" 30 "$work/step-grads" compare "$work/cpu-$res.st" "$work/cuda-$res.st"
done

export MAGICTAILOR_BENCH_DIR=$work MAGICTAILOR_BENCH_DEVICE=cuda MAGICTAILOR_BENCH_DTYPE=$dtype
nvidia-smi --id=0 --query-gpu=memory.used --format=csv,noheader,nounits >"$logs/idle.peak"
# Writes the random model (5.2 GB f32) and the pair; the later processes reuse them. The
# first CUDA process JIT-compiles candle's PTX (~25 s, cached by the driver for the rest).
step model 180 "$work/model-bench" full-model
step ours-train 150 "$work/model-bench" full-train
step ours-train-composed 150 env MAGICTAILOR_CUDA_KERNELS=0 "$work/model-bench" full-train
# diffusers (pure Python) is not on the machine; its other needs are (--no-deps).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$work/site" "$pack"/wheels/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step torch 200 python3 scripts/bench_pytorch.py "$work" full --device cuda --dtype fp16 --rows unet,train,infer
step ours-ddim 90 "$work/model-bench" full-ddim
step ours-infer 120 "$work/model-bench" full-infer
step ours-retouch 150 "$work/model-bench" full-retouch
step torch-retouch 240 python3 scripts/bench_pytorch.py "$work" full --device cuda --dtype fp16 --rows retouch
python3 scripts/gpu_table.py "$logs" "$dtype" | tee "$logs/table.md"
[ -z "${OUT:-}" ] || cp "$logs/table.md" "$OUT/"
# Break-A-Scene's phase-2 step at 512 px: every weight (~27 GB expected in bf16) and LoRA.
step ours-bas-full 200 "$work/model-bench" full-break-a-scene-full
step ours-bas-lora 150 "$work/model-bench" full-break-a-scene-lora
step torch-bas 300 python3 scripts/bench_pytorch.py "$work" full --device cuda --dtype fp16 \
  --rows break-a-scene-full,break-a-scene-lora
# SDXL-base's U-Net at its real shape (written here: 10.3 GB of random f32), one DDIM step
# at 1024 px, ours and PyTorch's (benches/README.md has the CPU figures).
step ours-xl1024 240 "$work/model-bench" xl1024-ddim
step torch-xl1024 150 python3 scripts/bench_pytorch.py "$work" xl1024 --device cuda --dtype fp16 --rows ddim

[ -z "$cs" ] || step memcheck 90 "$cs" --tool memcheck --error-exitcode 9 "$work/lib-tests" on_gpu --test-threads=1

step flash-256-tests 60 env MAGICTAILOR_FLASH_THREADS=256 "$work/lib-tests" flash_on_gpu --test-threads=1
step ours-train-256 150 env MAGICTAILOR_FLASH_THREADS=256 "$work/model-bench" full-train
[ -z "$cs" ] || step racecheck 120 "$cs" --tool racecheck --error-exitcode 9 "$work/lib-tests" on_gpu --test-threads=1
[ -z "$cs" ] || step synccheck 90 "$cs" --tool synccheck --error-exitcode 9 "$work/lib-tests" on_gpu --test-threads=1
[ -z "${OUT:-}" ] || tar czf "$OUT/gpu-logs.tgz" -C "$work" logs
cat "$logs/steps.tsv"
[ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}" >&2; exit 1; }
echo "every step passed"
