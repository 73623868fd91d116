#!/usr/bin/env bash
# Builds the browser device app's generated files into crates/starling-web/dist/: the
# WebAssembly module (starling-web for wasm32-unknown-unknown, profile wasm-release) and its JS
# glue from wasm-bindgen --target web. Prints the module's raw and gzip sizes. `starling serve`
# embeds dist/ beside the page's own files in www/; dist/ is committed so that a
# fresh clone serves the app without the wasm toolchain; scripts/check.sh runs this first so
# the tests use a fresh build. Files whose content did not change are left untouched, so
# the server is not recompiled for nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

crate=crates/starling-web
dist=$crate/dist
target_dir=${CARGO_TARGET_DIR:-target}

# The CLI must be the version of the wasm-bindgen crate in Cargo.lock: the glue it writes
# and the module's imports are made for each other.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
    echo "error: wasm-bindgen CLI ${have:-missing}, Cargo.lock has wasm-bindgen $want; run scripts/setup.sh" >&2
    exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    echo "error: the wasm32-unknown-unknown target is missing; run scripts/setup.sh" >&2
    exit 1
fi

cargo build --locked -p starling-web --lib --target wasm32-unknown-unknown --profile wasm-release

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
wasm-bindgen --target web --no-typescript --out-dir "$out" \
    "$target_dir/wasm32-unknown-unknown/wasm-release/starling_web.wasm"
# dist/ holds only what the build generates; the server embeds the page's own files from
# www/ directly, so they are not committed twice.

mkdir -p "$dist"
for f in "$out"/*; do
    name=$(basename "$f")
    cmp -s "$f" "$dist/$name" || cp "$f" "$dist/$name"
done
for f in "$dist"/*; do
    [ -e "$out/$(basename "$f")" ] || rm -f "$f"
done

wasm=$dist/starling_web_bg.wasm
raw=$(wc -c <"$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)
total=$(cat "$dist"/* "$crate"/www/* | wc -c)
printf 'starling-web: %s raw, %s gzip (%d KB gzip; goal < 100 KB); the whole app %s bytes\n' \
    "$raw" "$gz" $(((gz + 1023) / 1024)) "$total"
