#!/usr/bin/env bash
# Side-by-side training speed of two `starling` binaries: which of two builds trains faster,
# on a machine whose speed drifts (shared cores, other tenants) by more than the change.
#
# Both binaries run `starling bench train` at the same time, one pinned to each of the first
# two cores, then again with the cores swapped; a pair's ratio is the geometric mean of the two
# B/A ratios, so whatever slows the machine during a pair slows both sides, and a faster core
# favours neither. The same binary against itself gives the noise (0.96-1.05 on the 2-core VMs
# this project is built on). Needs two cores and `taskset`.
#
# Usage: bench/trainer-ab.sh A B [PAIRS] [MODEL]
#   A, B     the two binaries (e.g. a copy of target/release/starling before and after)
#   PAIRS    pairs to run (default 5); MODEL: mlp, cnn (default) or lstm
# Environment: SECONDS_EACH=s (default 3) per run, BATCH=b (default 10).
# Output: one line per pair (A and B examples/s on cores 0 and 1, then swapped, and the
# ratio), then the median ratio; above 1, B is faster.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -ge 2 ] || { usage >&2; exit 2; }
A=$1
B=$2
PAIRS=${3:-5}
MODEL=${4:-cnn}
SECS=${SECONDS_EACH:-3}
BATCH=${BATCH:-10}
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "trainer-ab.sh: $bin is not an executable" >&2; exit 1; }
done
command -v taskset >/dev/null || { echo "trainer-ab.sh: needs taskset (util-linux)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "trainer-ab.sh: needs two cores" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Examples/s of binary $1 pinned to core $2, written to file $3.
run() {
    taskset -c "$2" "$1" bench train --model "$MODEL" --batch "$BATCH" --threads 1 \
        --seconds "$SECS" --json >"$3.json"
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["train"]["examples_per_sec"])' \
        "$3.json" >"$3"
}
ratios=()
for i in $(seq "$PAIRS"); do
    run "$A" 0 "$out/a1" & run "$B" 1 "$out/b1" & wait
    run "$A" 1 "$out/a2" & run "$B" 0 "$out/b2" & wait
    line=$(python3 - "$out" <<'EOF'
import math, sys
d = sys.argv[1]
a1, b1, a2, b2 = (float(open(f"{d}/{n}").read()) for n in ("a1", "b1", "a2", "b2"))
print(f"{a1:.1f} {b1:.1f} | {a2:.1f} {b2:.1f} -> {math.sqrt(b1 / a1 * b2 / a2):.3f}")
EOF
)
    echo "pair $i: $line"
    ratios+=("${line##* }")
done
python3 -c 'import statistics, sys; print(f"median B/A: {statistics.median(map(float, sys.argv[1:])):.3f}")' \
    "${ratios[@]}"
