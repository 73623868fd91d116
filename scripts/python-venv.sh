#!/usr/bin/env bash
# The Python SDK's test environment: a virtual environment in <target>/py-venv (<target> is
# $CARGO_TARGET_DIR, or target/) with pinned maturin and NumPy, and the `starling` package
# built from crates/starling-py and installed into it (`maturin develop`, in its own cargo
# target dir, <target>/py-build, so it never waits on the lock of a cargo command that is
# running it: the SDK's integration test runs this script to test the current source).
# Idempotent: the venv and the pins are made once; the build is cargo's incremental one, a
# few seconds when nothing changed. scripts/setup.sh runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

maturin_version=1.16.0
numpy_version=2.4.6
target=${CARGO_TARGET_DIR:-target}
case "$target" in
/*) ;;
*) target="$PWD/$target" ;;
esac
venv="$target/py-venv"
python="$venv/bin/python"

if [ -x "$python" ] && "$python" -c "
import sys
from importlib.metadata import version
sys.exit(version('maturin') != '$maturin_version' or version('numpy') != '$numpy_version')
" 2>/dev/null; then
    echo "maturin $maturin_version, numpy $numpy_version: installed ($venv)"
else
    if ! command -v python3 >/dev/null 2>&1; then
        echo "error: python3 not found; the Python SDK needs Python 3.11 or later" >&2
        exit 1
    fi
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: $(python3 --version) is too old; the Python SDK needs 3.11 or later" >&2
        exit 1
    fi
    mkdir -p "$target"
    python3 -m venv "$venv"
    "$python" -m pip install --quiet --disable-pip-version-check \
        "maturin==$maturin_version" "numpy==$numpy_version"
    echo "maturin $maturin_version, numpy $numpy_version: installed ($venv)"
fi

# Build and install the package from this source (quiet unless it fails).
log="$target/py-build.log"
if ! VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" CARGO_TARGET_DIR="$target/py-build" \
    "$venv/bin/maturin" develop --locked --manifest-path crates/starling-py/Cargo.toml \
    >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: building the Python package failed (log above, also in $log)" >&2
    exit 1
fi
echo "starling (Python SDK): built and installed ($venv)"
