#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), in the repo root, with gpu-pack/ carried
# (made here by scripts/gpu_pack.sh): magictailor's CUDA bench and the PyTorch rows on
# the same random full-size SD 2.1-base at 512 px, then one markdown table.
#
#   scripts/gpu_bench.sh [bf16|f16|f32]        # magictailor's dtype; PyTorch runs fp16
#
# Peak GPU memory is nvidia-smi's memory.used polled every 50 ms while each row's process
# runs: the CUDA context (~0.5 GiB) and whatever an allocator holds are included. PyTorch
# also reports its own allocator's peak (torch.cuda.max_memory_allocated).
set -euo pipefail
cd "$(dirname "$0")/.."
dtype=${1:-bf16}
. scripts/gpu_common.sh
unpack model-bench
bin=$work/model-bench
# diffusers (pure Python) is not on the machine; its other needs are (--no-deps).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$work/site" "$pack"/wheels/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# Runs "$@" with its output in $out/$1.log while nvidia-smi polls; the peak goes to $work/$1.peak.
polled() {
  local name=$1; shift
  nvidia-smi --id=0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$work/$name.smi" 2>/dev/null &
  local poll=$!
  set +e
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  sleep 0.2
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null || true
  sort -n "$work/$name.smi" | tail -1 >"$work/$name.peak"
  return "$rc"
}

export MAGICTAILOR_BENCH_DIR=$work MAGICTAILOR_BENCH_DEVICE=cuda MAGICTAILOR_BENCH_DTYPE=$dtype
nvidia-smi --id=0 --query-gpu=memory.used --format=csv,noheader,nounits >"$work/idle.peak"
# Writes the random model (5.2 GB f32) once; later runs with the same GPU_BENCH_DIR reuse it.
"$bin" full-model 2>&1 | tee "$out/model.log"
# The first CUDA process JIT-compiles candle's PTX (~25 s); the first step of each phase
# is left out of the medians, and the driver caches the result for the later processes.
polled ours-train "$bin" full-train
polled ours-ddim "$bin" full-ddim
polled ours-infer "$bin" full-infer
polled torch python3 scripts/bench_pytorch.py "$work" full --device cuda --dtype fp16

python3 - "$work" "$out" "$dtype" "$(cat "$pack/commit" 2>/dev/null | paste -sd' ')" <<'PY'
import re, subprocess, sys, datetime
from pathlib import Path
work, out, dtype, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
def text(name): return (out / f"{name}.log").read_text()
def num(pattern, s):
    m = re.search(pattern, s)
    return float(m.group(1)) if m else float("nan")
def smi(name):
    try: return int((work / f"{name}.peak").read_text()) / 1024
    except (OSError, ValueError): return float("nan")
ours_t, ours_d, ours_i, torch_log = text("ours-train"), text("ours-ddim"), text("ours-infer"), text("torch")
torch_line = lambda what: next((l for l in torch_log.splitlines() if what in l), "")
tt, ti, tu = torch_line("MagicTailor step"), torch_line("infer at"), torch_line("U-Net fwd+bwd")
rows = [
    ("warm-up step, 3+3 pair, 512 px (s/step)", num(r"warm-up ([\d.]+)", ours_t), num(r"warm-up ([\d.]+)", tt)),
    ("DS-Bal step (s/step)", num(r"DS-Bal ([\d.]+)", ours_t), num(r"DS-Bal ([\d.]+)", tt)),
    ("peak GPU memory, training, nvidia-smi (GiB)", smi("ours-train"), num(r"nvidia-smi ([\d.]+)", tt)),
    ("peak allocated by PyTorch, training (GiB)", float("nan"), num(r"allocated ([\d.]+)", tt)),
    ("U-Net fwd+bwd, LoRA r32, batch 6 (s)", num(r"batch 6: ([\d.]+)", ours_d), num(r"batch 6: ([\d.]+)", tu)),
    ("DDIM step, CFG batch 2 (s)", num(r"CFG batch 2: ([\d.]+)", ours_d), num(r"CFG batch 2: ([\d.]+)", tu)),
    ("50-step DDIM, CFG 7.5, + VAE decode, 512 px (s)", num(r"VAE decode: ([\d.]+)", ours_i), num(r"VAE decode: ([\d.]+)", ti)),
    ("peak GPU memory, sampling, nvidia-smi (GiB)", smi("ours-infer"), num(r"nvidia-smi ([\d.]+)", ti)),
]
def q(*k):
    try:
        return subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={','.join(k)}", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "no nvidia-smi"
f = lambda v: "n/a" if v != v else f"{v:.3g}" if v < 10 else f"{v:.1f}"
lines = [
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {q('name', 'driver_version')}, "
    f"commit {commit}, idle memory.used {smi('idle'):.2f} GiB",
    "", f"| full-size SD 2.1-base, random weights | magictailor --dtype {dtype} | PyTorch fp16 (autocast) + diffusers | ratio |",
    "|---|---|---|---|",
] + [f"| {n} | {f(a)} | {f(b)} | {f(a / b) if a == a and b == b and b else 'n/a'} |" for n, a, b in rows]
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
