#!/usr/bin/env bash
# Run HERE (no GPU needed) before a GPU session: builds the CUDA binary (for `doctor`), the
# bench binary, the unit tests (with the GPU kernel tests) and examples/step_grads, and
# packs them, xz-compressed, with the wheels the GPU machine lacks (diffusers and
# importlib_metadata; its image has compute-sanitizer) into gpu-pack/ (git-ignored), which
# the device tool carries for scripts/gpu_session.sh.
# Nothing can be downloaded on the GPU machine, so everything it needs comes from here.
#
#   scripts/gpu_pack.sh            # cold CUDA build: ~20 min on 2 cores; warm: a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
ci=${MAGICTAILOR_CI_CACHE:-$HOME/.cache/magictailor-ci}
pack=gpu-pack
# The toolchain script reads cudarc's sources; a failure must stop here (inside `eval
# "$(...)"` it would not), not as a missing nvcc deep in the build.
cargo fetch --locked
toolchain=$(scripts/cuda_toolchain.sh "$ci/cuda")
eval "$toolchain"
# A target dir of its own: the cuda feature would otherwise rebuild candle in ./target.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ci/target-cuda}
# The executable cargo built for target $1 (cargo's JSON messages on stdin).
executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
json=--message-format=json-render-diagnostics
bench=$(cargo bench --features cuda --bench model --no-run $json | executable model)
# The unit tests with the GPU ones (`*_on_gpu_*`, skipped without a GPU), for gpu_session.sh.
tests=$(cargo test --release --features cuda --lib --no-run $json | executable magictailor)
grads=$(cargo build --release --features cuda --example step_grads $json | executable step_grads)
main=$(cargo build --release --features cuda --bin magictailor $json | executable magictailor)
for b in "$bench" "$tests" "$grads" "$main"; do
  [ -x "$b" ] || { echo "an executable is missing from cargo's output" >&2; exit 1; }
done
rm -rf "$pack" && mkdir -p "$pack/wheels"
# Stripped each is ~64 MB, too big to carry together; xz makes each ~9 MB.
strip -o "$pack/model-bench" "$bench"
strip -o "$pack/lib-tests" "$tests"
strip -o "$pack/step-grads" "$grads"
strip -o "$pack/magictailor" "$main"
# -9e: the pack, the wheels and the tree must fit the 64 MiB a device call carries.
xz -T0 -9e -f "$pack/model-bench" "$pack/lib-tests" "$pack/step-grads" "$pack/magictailor"
# diffusers is pure Python; its other needs (torch, transformers, huggingface_hub,
# safetensors, zipp, ...) are already on the GPU machine (device KINDS.md).
python3 -m pip download -q --no-deps --only-binary=:all: -d "$pack/wheels" \
  "diffusers${DIFFUSERS_VERSION:+==$DIFFUSERS_VERSION}" importlib_metadata
git rev-parse --short HEAD >"$pack/commit"
git diff --quiet HEAD -- src benches Cargo.toml Cargo.lock || echo "+uncommitted" >>"$pack/commit"
du -sh "$pack"/* "$pack/wheels"/*
