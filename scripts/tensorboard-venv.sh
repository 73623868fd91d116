#!/usr/bin/env bash
# A Python virtual environment with TensorBoard, in target/tb-venv: the TensorBoard tests read
# the event files Starling writes with TensorBoard's own reader (EventAccumulator), so that
# "TensorBoard can read them" is checked by TensorBoard, not by a reader of ours.
# Idempotent and quick when the pinned version is already there; scripts/setup.sh runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=2.21.0
venv=target/tb-venv
python="$venv/bin/python"

if [ -x "$python" ] && "$python" -c "
import sys
import tensorboard
sys.exit(tensorboard.__version__ != '$version')
" 2>/dev/null; then
    echo "tensorboard $version: installed ($venv)"
    exit 0
fi

if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 not found; the TensorBoard tests need Python 3.9 or later" >&2
    exit 1
fi
mkdir -p target
python3 -m venv "$venv"
"$python" -m pip install --quiet --disable-pip-version-check "tensorboard==$version"
echo "tensorboard $version: installed ($venv)"
