#!/usr/bin/env bash
# Every check the project has, in one command: the same locally and in CI (.ci/run calls it).
# Set-up first, then the cheap checks, so a formatting slip fails in seconds, not minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

step "set-up: bash scripts/setup.sh"
bash scripts/setup.sh
# The build needs about 5 GB under target/; say what there is, so a full disk is plain to see.
df -h . | tail -n 1

step "format: cargo fmt --all --check"
cargo fmt --all --check

step "device app: bash scripts/build-web.sh (the tests serve this fresh build)"
bash scripts/build-web.sh
# The committed dist/ is what a fresh clone serves without the wasm toolchain: it must be the
# build of this very source (the build is reproducible), or the app runs stale code.
if ! git diff --quiet -- crates/starling-web/dist; then
    git --no-pager diff --stat -- crates/starling-web/dist
    echo "error: crates/starling-web/dist is stale; commit the output of scripts/build-web.sh" >&2
    exit 1
fi

step "lint: cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs: cargo doc --workspace --no-deps --locked (warnings denied: broken links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "tests: cargo test --workspace --locked"
cargo test --workspace --locked

step "all checks passed"
