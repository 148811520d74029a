#!/usr/bin/env bash
# Rebuilds vendor/candle-core: candle-core as published on crates.io plus
# vendor/candle-core.patch (see vendor/README.md). Run after changing the patch, or
# with a new version to move to (then refresh the patch: diff -ruN a b).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-0.11.1}
cargo fetch --locked >/dev/null 2>&1 || cargo fetch
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$version" | head -n1)
[ -d "$src" ] || { echo "candle-core $version is not in the cargo registry cache; unpack https://static.crates.io/crates/candle-core/candle-core-$version.crate there" >&2; exit 1; }
out=vendor/candle-core
rm -rf "$out.new" && mkdir -p "$out.new"
cp -r "$src"/src "$src"/Cargo.toml "$src"/LICENSE "$src"/README.md "$out.new"/
patch -d "$out.new" -p1 --no-backup-if-mismatch < vendor/candle-core.patch
rm -rf "$out" && mv "$out.new" "$out"
echo "vendor/candle-core: candle-core $version + vendor/candle-core.patch"
