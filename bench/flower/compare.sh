#!/usr/bin/env bash
# Starling vs Flower on the same workload, side by side, in one run.
#
# Softmax regression on scikit-learn's bundled digits (train.csv/test.csv written once by
# prepare_digits.py and read by both frameworks), 1 local epoch, batch 10, lr 0.1, IID
# partition, FedAvg weighted by examples, ROUNDS rounds (default 20), for
# (N, fraction) in (100, 0.1) (100, 1.0) (1000, 0.1) (1000, 1.0).
#
# Usage: bench/flower/compare.sh [--quick] [--flower-only | --starling-only] [--no-build]
#                                [--configs "N:F N:F ..."]
#   --quick          only N = 100 (both fractions)
#   --flower-only    run only Flower's side (e.g. while `starling simulate` is missing)
#   --starling-only  run only Starling's side (the venv is still needed for the data,
#                    the measuring wrapper and the report); Flower's results of an earlier
#                    run with the same ROUNDS are reused and marked "from an earlier run"
#   --no-build       do not run `cargo build --release`; use ./target/release/starling as is
#   --configs        an explicit list, e.g. --configs "100:0.1 1000:1.0"
# Environment:
#   ROUNDS=N                 number of rounds (default 20), e.g. ROUNDS=3 for a quick check
#   FLOWER_NUM_CPUS=N        CPUs given to Ray (default: all, nproc)
#   FLOWER_CPUS_PER_CLIENT=x client_resources num_cpus (default 1: one actor per CPU)
#   MEASURE_INTERVAL=s       memory sampling interval in seconds (default 0.2)
#   PYTHON=python3.11        interpreter used to create the venv
#   STARLING_BIN=path        the starling binary (default ./target/release/starling); with
#                            --no-build it is used as is
#
# Output: the table on stdout, target/flower-compare.json, and every run's stdout, stderr
# and measurements under target/flower-compare/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
HERE="$ROOT/bench/flower"
VENV="$ROOT/target/flower-venv"
RUNDIR="$ROOT/target/flower-compare"
JSON_OUT="$ROOT/target/flower-compare.json"
STARLING="${STARLING_BIN:-$ROOT/target/release/starling}"
ROUNDS="${ROUNDS:-20}"
PYTHON="${PYTHON:-python3.11}"
NUM_CPUS="${FLOWER_NUM_CPUS:-$(nproc)}"
CPUS_PER_CLIENT="${FLOWER_CPUS_PER_CLIENT:-1}"
INTERVAL="${MEASURE_INTERVAL:-0.2}"

CONFIGS="100:0.1 100:1.0 1000:0.1 1000:1.0"
RUN_FLOWER=1
RUN_STARLING=1
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) CONFIGS="100:0.1 100:1.0" ;;
        --flower-only) RUN_STARLING=0 ;;
        --starling-only) RUN_FLOWER=0 ;;
        --no-build) BUILD=0 ;;
        --configs) shift; CONFIGS="$1" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n==> %s\n' "$*" >&2; }

# 1. The Python environment: created once, reinstalled when requirements.txt changes.
step "venv: $VENV"
STAMP="$VENV/.requirements.sha256"
REQ_SUM=$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$REQ_SUM" ]; then
    command -v "$PYTHON" >/dev/null || { echo "compare.sh: $PYTHON not found" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$HERE/requirements.txt"
    echo "$REQ_SUM" >"$STAMP"
fi
PY="$VENV/bin/python"

# 2. The data, identical for both frameworks.
step "data: prepare_digits.py -> $RUNDIR/data"
mkdir -p "$RUNDIR"
"$PY" "$HERE/prepare_digits.py" "$RUNDIR/data"
TRAIN="$RUNDIR/data/train.csv"
TEST="$RUNDIR/data/test.csv"

# 3. Starling's binary (cargo is incremental: a no-op when it is up to date).
if [ "$RUN_STARLING" = 1 ]; then
    if [ "$BUILD" = 1 ] || [ ! -x "$STARLING" ]; then
        [ -z "${STARLING_BIN:-}" ] || { echo "compare.sh: STARLING_BIN needs --no-build" >&2; exit 2; }
        step "build: cargo build --release -p starling-cli --bin starling"
        cargo build --release -p starling-cli --bin starling
    fi
    if ! "$STARLING" simulate --help >/dev/null 2>&1; then
        echo "compare.sh: $STARLING has no 'simulate' subcommand; use --flower-only" >&2
        exit 1
    fi
fi

# 4. The runs. Each is wrapped by measure.py: wall time of the whole process and the peak
#    memory of its whole process tree (Ray's daemons and workers included).
measure() { # measure STEM CMD...
    local stem="$1"; shift
    "$PY" "$HERE/measure.py" --interval "$INTERVAL" \
        --stdout "$stem.stdout" --stderr "$stem.stderr" -- "$@" >"$stem.measure.json" || true
    local code
    code=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("exit_code"))' \
        "$stem.measure.json" 2>/dev/null || echo "?")
    if [ "$code" != 0 ]; then
        echo "    FAILED (exit $code); last lines of $stem.stderr:" >&2
        tail -n 15 "$stem.stderr" >&2 || true
    else
        echo "    $(cat "$stem.measure.json")" >&2
    fi
}

# Results of a framework not run this time (e.g. Flower's with --starling-only) are kept
# and reported, marked "from an earlier run".
START=$(date +%s)
[ "$RUN_FLOWER" = 0 ] || rm -f "$RUNDIR"/flower-*.{stdout,stderr,measure.json}
[ "$RUN_STARLING" = 0 ] || rm -f "$RUNDIR"/starling-*.{stdout,stderr,measure.json}
for cfg in $CONFIGS; do
    n="${cfg%%:*}"
    f="${cfg##*:}"
    if [ "$RUN_FLOWER" = 1 ]; then
        step "flower: N=$n fraction=$f rounds=$ROUNDS"
        measure "$RUNDIR/flower-$n-$f" "$PY" "$HERE/flower_sim.py" \
            --train "$TRAIN" --test "$TEST" --devices "$n" --fraction "$f" \
            --rounds "$ROUNDS" --epochs 1 --batch-size 10 --lr 0.1 --seed 1 \
            --num-cpus "$NUM_CPUS" --cpus-per-client "$CPUS_PER_CLIENT"
    fi
    if [ "$RUN_STARLING" = 1 ]; then
        step "starling: N=$n fraction=$f rounds=$ROUNDS"
        out="$RUNDIR/starling-out-$n-$f"
        rm -rf "$out"
        measure "$RUNDIR/starling-$n-$f" "$STARLING" simulate \
            --dataset csv --train "$TRAIN" --test "$TEST" --model logistic \
            --devices "$n" --fraction "$f" --rounds "$ROUNDS" --epochs 1 --batch-size 10 \
            --lr 0.1 --partition iid --seed 1 --out "$out" --json
    fi
done

# 5. The table and the JSON.
# shellcheck disable=SC2086
"$PY" "$HERE/report.py" "$RUNDIR" "$JSON_OUT" "$ROUNDS" "$START" $CONFIGS
