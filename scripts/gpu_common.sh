# Sourced by gpu_check.sh and gpu_bench.sh on a lent GPU machine, in the repo root, with
# gpu-pack/ carried: the CUDA 13 libraries on LD_LIBRARY_PATH, and `unpack NAME` to get a
# packed executable into $work.
pack=gpu-pack
work=${GPU_BENCH_DIR:-/tmp/mtb}
out=${OUT:-$work/out}
mkdir -p "$work" "$out"

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
