#!/usr/bin/env bash
# Runs a CUDA build's `magictailor doctor --json` on a machine without a GPU (CI): with the
# toolchain's CUDA libraries and a stub driver library it must start, say there is no GPU,
# check the CPU and pass. Needs the environment of scripts/cuda_toolchain.sh.
#
#   eval "$(scripts/cuda_toolchain.sh)"; scripts/cuda_doctor_smoke.sh target/release/magictailor
set -euo pipefail
bin=$1
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
# The loader wants the driver library by its soname; the toolchain has only the stub.
ln -s "$CUDA_ROOT/lib/stubs/libcuda.so" "$stub/libcuda.so.1"
LD_LIBRARY_PATH="$CUDA_ROOT/lib:$stub" "$bin" doctor --json >"$stub/doctor.json"
python3 - "$stub/doctor.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["ok"], r["problems"]
assert r["build"]["features"] == ["cuda"], r["build"]
assert r["build"]["kernels"], "no kernel report compiled in"
assert r["device"]["name"] == "cpu" and r["device"]["no_gpu"], r["device"]
assert all(k["state"] == "checked" for k in r["kernels"]), r["kernels"]
print("CUDA build's doctor without a GPU:", r["device"]["no_gpu"])
PY
