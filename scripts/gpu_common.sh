# Sourced by gpu_session.sh on a lent GPU machine, in the repo root, with gpu-pack/
# carried: the CUDA 13 libraries on LD_LIBRARY_PATH, `unpack NAME` to get a packed
# executable into $work, and `step` to run one check under a time limit with its log kept.
pack=gpu-pack
work=${GPU_BENCH_DIR:-/tmp/mtb}
# Logs gather in $logs; `step` packs them into one file under $OUT after every step, since
# the device tool brings back at most 8 files, and whatever is there when a call is cut off.
logs=$work/logs
mkdir -p "$work" "$logs"

# The CUDA 13 libraries the binaries link (docs/candle.md §7): PyTorch's wheels bring them.
libs=$(for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  f=$(find / -xdev -name "$l" -print -quit 2>/dev/null) && [ -n "$f" ] && dirname "$f"
done | sort -u | paste -sd:)
[ -n "$libs" ] || { echo "no CUDA 13 libraries found" >&2; exit 1; }
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# gpu-pack/NAME.xz -> $work/NAME (Python's lzma: the machine may lack xz).
unpack() {
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$pack/$1.xz" "$work/$1"
  chmod +x "$work/$1"
}

# The script's time budget: `step` gives each step at most what is left of it.
budget=${GPU_BUDGET_S:-540}
failed=()

# step NAME LIMIT CMD...: runs CMD for at most LIMIT seconds (less if the budget is nearly
# spent; skipped when under 20 s is left) while nvidia-smi polls memory.used every 50 ms.
# Its output is shown and kept in $logs/NAME.log, the polled peak (MiB, the whole GPU's:
# CUDA context and allocator caches included) in $logs/NAME.peak, its exit status and
# seconds in $logs/steps.tsv; a failure is remembered in `failed`.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >>"$logs/steps.tsv"
    echo "== $name: skipped, the budget is spent"
    return 0
  fi
  [ "$limit" -le "$((left - 10))" ] || limit=$((left - 10))
  echo "== $name (at most ${limit} s, $SECONDS s in)"
  nvidia-smi --id=0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$work/$name.smi" 2>/dev/null &
  local poll=$! t0=$SECONDS rc
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  sleep 0.2
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  sort -n "$work/$name.smi" | tail -1 >"$logs/$name.peak"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$logs/steps.tsv"
  [ "$rc" -eq 0 ] || failed+=("$name")
  [ -z "${OUT:-}" ] || tar czf "$OUT/gpu-logs.tgz" -C "$work" logs 2>/dev/null
  return 0
}
