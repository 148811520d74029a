#!/usr/bin/env bash
# Sets up a pinned CUDA 13.0 toolchain from PyPI wheels, enough to *compile*
# `cargo build --features cuda` on a machine with no GPU and no system CUDA
# (docs/candle.md §5). Prints the environment to export; idempotent.
#
#   eval "$(scripts/cuda_toolchain.sh [DIR])"      # DIR defaults to ~/.cache/magictailor-cuda
#   cargo build --release --features cuda
#
# nvcc is pinned to 13.0: its PTX (ISA 9.0) loads on any CUDA 13 driver. Kernels are built for
# compute capability ${CUDA_COMPUTE_CAP:-90} (H100/H200); set CUDA_COMPUTE_CAP for other GPUs.
set -euo pipefail
root=${1:-${HOME}/.cache/magictailor-cuda}
venv="$root/venv"
if [ ! -x "$venv/bin/nvcc-ok" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-curand" "nvidia-cublas==13.0.*" >&2
  touch "$venv/bin/nvcc-ok"
fi
cuda=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cuda/bin/nvcc" ] || { echo "no nvcc in $cuda" >&2; exit 1; }
# Stand-in for the driver library (the real libcuda.so.1 comes with the driver): one
# function per driver symbol cudarc declares, each answering CUDA_ERROR_NO_DEVICE (100),
# and error strings that say so. Enough to link, and to run a CUDA build as on a machine
# with a driver but no GPU (scripts/cuda_doctor_smoke.sh).
if [ ! -f "$cuda/lib/stubs/libcuda.stub-v2" ]; then
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -1)
  [ -n "$sys" ] || { echo "cudarc sources not found: run 'cargo fetch' first" >&2; exit 1; }
  { grep -ohP '^\s+fn \Kcu\w+(?=\()' "$sys" | sort -u | grep -v '^cuGetError' |
      awk '{print "int " $1 "(void) { return 100; }"}'
    echo 'int cuGetErrorString(int e, const char **s) { *s = "no CUDA device (stub driver)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }'
  } > "$root/libcuda_stub.c"
  mkdir -p "$cuda/lib/stubs"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$root/libcuda_stub.c"
  touch "$cuda/lib/stubs/libcuda.stub-v2"
fi
# The wheels ship only versioned sonames; the linker wants the plain names.
(cd "$cuda/lib" && for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done && ln -sf libcurand.so.10 libcurand.so)
cat <<ENV
export PATH="$cuda/bin:\$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
ENV
