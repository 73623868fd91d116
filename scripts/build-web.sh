#!/usr/bin/env bash
# Builds the browser device app's generated files into crates/starling-web/dist/: the
# WebAssembly modules (for wasm32-unknown-unknown, profile wasm-release) and their JS glue from
# wasm-bindgen --target web: the main module (starling-web), and the secure aggregation module
# (starling-web-secure) that the page imports only for a secure round, which keeps SecAgg+
# out of the main module's 100 KB gzip. Prints each module's raw and gzip sizes. `starling serve`
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

# One build per module: each resolves its own features, so the secure module's dependencies
# never change the main module.
for pkg in starling-web starling-web-secure; do
    cargo build --locked -p "$pkg" --lib --target wasm32-unknown-unknown --profile wasm-release
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for module in starling_web starling_web_secure; do
    wasm-bindgen --target web --no-typescript --out-dir "$out" \
        "$target_dir/wasm32-unknown-unknown/wasm-release/$module.wasm"
done
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
secure=$dist/starling_web_secure_bg.wasm
raw=$(wc -c <"$secure")
sgz=$(gzip -9 -c "$secure" | wc -c)
printf 'starling-web-secure: %s raw, %s gzip (%d KB gzip; loaded only for secure rounds)\n' \
    "$raw" "$sgz" $(((sgz + 1023) / 1024))
if [ "$gz" -ge 100000 ]; then
    echo "error: the main module is $gz bytes gzip, over the 100,000 goal" >&2
    exit 1
fi
