#!/usr/bin/env bash
# Starling vs PyTorch, and vs Flower + PyTorch, side by side on this machine, in one run.
#
# 1. Training speed: examples/s of the FedAvg paper's 2NN (`mlp`) and CNN (`cnn`) at batch 10,
#    SGD lr 0.05, on random MNIST-shaped data, on 1 and 2 threads: `starling bench train`
#    against torch_speed.py (PyTorch with torch.set_num_threads(T)). Starling's T threads are T
#    independent trainers (one device per core, how Starling uses cores); PyTorch's are one
#    trainer whose operators use T threads, and, as an extra row, T processes of 1 thread each.
# 2. The simulated CNN round: FedAvg on MNIST, 10 of 100 devices per round, 600 images each
#    (IID), E = 1, B = 10, lr 0.05: `starling simulate` against flower_cnn.py (Flower 1.42
#    simulation with Ray, a PyTorch CNN client, 2 clients at once on 2 cores). Time per round
#    after round 1 (start-up excluded), and test accuracy after the last round.
#
# Usage: bench/pytorch/compare.sh [--quick] [--no-build] [--data DIR] [--skip-sim | --sim-only]
#   --quick      a short run: 2 s per speed measurement, 3 rounds
#   --no-build   do not run `cargo build --release`; use STARLING_BIN or target/release/starling
#   --data DIR   the MNIST IDX folder (default: ../shared/data/mnist if it exists, else
#                `starling data fetch mnist`)
#   --skip-sim   only the training speed;  --sim-only  only the simulated round
# Environment:
#   TRAIN_SECONDS=s   seconds per speed measurement (default 10; --quick: 2)
#   ROUNDS=R          simulated rounds (default 5; --quick: 3); the first is not timed
#   PYTHON=python3.11 interpreter used to create the venv
#   STARLING_BIN=path the starling binary (implies --no-build)
#
# Output: the table on stdout, target/pytorch-compare.json, and every run's output under
# target/pytorch-compare/. The Python environment is target/pytorch-venv (see requirements.txt).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
HERE="$ROOT/bench/pytorch"
VENV="$ROOT/target/pytorch-venv"
RUNDIR="$ROOT/target/pytorch-compare"
JSON_OUT="$ROOT/target/pytorch-compare.json"
PYTHON="${PYTHON:-python3.11}"

QUICK=0
BUILD=1
DATA=
RUN_SPEED=1
RUN_SIM=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --data) shift; DATA="$1" ;;
        --skip-sim) RUN_SIM=0 ;;
        --sim-only) RUN_SPEED=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    TRAIN_SECONDS="${TRAIN_SECONDS:-2}"
    ROUNDS="${ROUNDS:-3}"
else
    TRAIN_SECONDS="${TRAIN_SECONDS:-10}"
    ROUNDS="${ROUNDS:-5}"
fi
[ "$ROUNDS" -ge 2 ] || { echo "compare.sh: ROUNDS must be at least 2" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*" >&2; }

# 1. The Python environment: created once, reinstalled when requirements.txt changes. Every
#    package is pinned there, the resolved set included, so it installs with --no-deps (which
#    is what keeps torch's CUDA-only dependencies out; see the file's header).
step "venv: $VENV"
STAMP="$VENV/.requirements.sha256"
REQ_SUM=$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$REQ_SUM" ]; then
    command -v "$PYTHON" >/dev/null || { echo "compare.sh: $PYTHON not found" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        -r "$HERE/requirements.txt"
    "$VENV/bin/python" -c 'import torch, flwr; torch.nn.Conv2d(1, 1, 5)(torch.rand(1, 1, 8, 8))'
    echo "$REQ_SUM" >"$STAMP"
fi
PY="$VENV/bin/python"

# 2. Starling's binary (cargo is incremental: a no-op when it is up to date).
if [ -n "${STARLING_BIN:-}" ]; then
    STARLING="$STARLING_BIN"
elif [ "$BUILD" = 1 ]; then
    step "build: cargo build --release -p starling-cli --bin starling"
    cargo build --release -p starling-cli --bin starling
    STARLING="${CARGO_TARGET_DIR:-$ROOT/target}/release/starling"
else
    STARLING="${CARGO_TARGET_DIR:-$ROOT/target}/release/starling"
fi
[ -x "$STARLING" ] || { echo "compare.sh: no starling binary at $STARLING" >&2; exit 1; }

# 3. MNIST, located the way the other MNIST benches do (bench/lib.sh).
if [ "$RUN_SIM" = 1 ]; then
    # shellcheck source=bench/lib.sh
    . "$ROOT/bench/lib.sh"
    STARLING_BIN="$STARLING"
    require_mnist "$0"
    DATA=$(cd "$DATA" && pwd)
    step "data: $DATA"
fi

mkdir -p "$RUNDIR"
START=$(date +%s)
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
echo "$(loadavg)" >"$RUNDIR/load-start"
rm -rf "$RUNDIR"/speed-* "$RUNDIR"/sim-*

run_json() { # run_json OUT CMD...: the command's last stdout line that is JSON, into OUT
    local out="$1"; shift
    if "$@" >"$out.log" 2>"$out.err"; then
        grep '^{' "$out.log" | tail -n 1 >"$out"
        echo "    $(cut -c1-200 "$out")" >&2
    else
        echo "    FAILED: $*; last lines of $out.err:" >&2
        tail -n 15 "$out.err" >&2 || true
    fi
}

# 4. Training speed, Starling and PyTorch alternately so that a change of load hits both.
if [ "$RUN_SPEED" = 1 ]; then
    for model in mlp cnn; do
        for t in 1 2; do
            step "speed: $model, $t thread(s), ${TRAIN_SECONDS} s each"
            run_json "$RUNDIR/speed-starling-$model-$t.json" "$STARLING" bench train \
                --model "$model" --batch 10 --threads "$t" --seconds "$TRAIN_SECONDS" --json
            run_json "$RUNDIR/speed-pytorch-$model-$t.json" "$PY" "$HERE/torch_speed.py" \
                --model "$model" --batch 10 --threads "$t" --seconds "$TRAIN_SECONDS"
            if [ "$t" -gt 1 ]; then
                run_json "$RUNDIR/speed-pytorch-procs-$model-$t.json" "$PY" \
                    "$HERE/torch_speed.py" --model "$model" --batch 10 --threads 1 \
                    --procs "$t" --seconds "$TRAIN_SECONDS"
            fi
        done
    done
fi
echo "$(loadavg)" >"$RUNDIR/load-after-speed"

# 5. The simulated CNN round, each run wrapped by bench/flower/measure.py (wall time and peak
#    memory of the whole process tree).
measure() { # measure STEM CMD...
    local stem="$1"; shift
    "$PY" "$ROOT/bench/flower/measure.py" --stdout "$stem.stdout" --stderr "$stem.stderr" \
        -- "$@" >"$stem.measure.json" || true
    echo "    $(cat "$stem.measure.json")" >&2
}
if [ "$RUN_SIM" = 1 ]; then
    step "simulated round: flower + pytorch, $ROUNDS rounds"
    measure "$RUNDIR/sim-flower" "$PY" "$HERE/flower_cnn.py" --data "$DATA" \
        --devices 100 --per-round 10 --rounds "$ROUNDS" --epochs 1 --batch-size 10 \
        --lr 0.05 --seed 1 --num-cpus "$(nproc)" --cpus-per-client 1 --torch-threads 1
    step "simulated round: starling simulate, $ROUNDS rounds"
    rm -rf "$RUNDIR/sim-starling-out"
    measure "$RUNDIR/sim-starling" "$STARLING" simulate --dataset mnist --data "$DATA" \
        --model cnn --devices 100 --per-round 10 --rounds "$ROUNDS" --epochs 1 \
        --batch-size 10 --lr 0.05 --partition iid --seed 1 --eval-every "$ROUNDS" \
        --out "$RUNDIR/sim-starling-out" --json
fi
echo "$(loadavg)" >"$RUNDIR/load-end"

# 6. The table, the targets and the JSON.
"$PY" "$HERE/report.py" "$RUNDIR" "$JSON_OUT" "$TRAIN_SECONDS" "$ROUNDS" "$STARLING"
