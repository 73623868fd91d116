#!/usr/bin/env bash
# Installs what the checks and tests need. Idempotent: every step skips what is already in
# place, so scripts/check.sh runs it every time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust (https://rustup.rs) and try again" >&2
    exit 1
fi
cargo --version
rustc --version

# Later steps go here, each one idempotent: the wasm32-unknown-unknown target (for
# starling-web and the core's wasm build), the wasm-bindgen CLI at the version Cargo.lock
# pins, and a headless Chromium for the browser tests.
