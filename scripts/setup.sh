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

# starling-web: the wasm32 target and the wasm-bindgen CLI at exactly the version of the
# wasm-bindgen crate in Cargo.lock (the JS glue and the module's imports must match).
if rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    echo "wasm32-unknown-unknown: installed"
else
    rustup target add wasm32-unknown-unknown
fi
wasm_bindgen=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }')" = "$wasm_bindgen" ]; then
    echo "wasm-bindgen CLI $wasm_bindgen: installed"
else
    cargo install wasm-bindgen-cli --version "$wasm_bindgen" --locked
fi

# The device app's browser tests: Debian's Chromium and ChromeDriver (headless).
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver: installed"
elif command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver
else
    echo "error: install Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver)," \
        "or point STARLING_CHROMIUM and STARLING_CHROMEDRIVER at them" >&2
    exit 1
fi

# starling-ffi's tests compile a C program (cc); starling-jni's compile and run Java (a JDK:
# javac and java, 17 or newer).
if command -v cc >/dev/null 2>&1 && { [ -n "${JAVA_HOME:-}" ] || command -v javac >/dev/null 2>&1; }; then
    echo "cc and a JDK: installed"
elif command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc default-jdk-headless
else
    echo "error: install a C compiler (cc) and a JDK (javac, java), or set JAVA_HOME" >&2
    exit 1
fi

# The TensorBoard tests read Starling's event files with TensorBoard's own reader: a pinned
# tensorboard in a virtual environment under target/.
bash scripts/tensorboard-venv.sh

# The Python SDK (crates/starling-py): a virtual environment under target/ with pinned maturin
# and NumPy, and the package built from this source and installed into it.
bash scripts/python-venv.sh
