#!/usr/bin/env bash
# FedProx with partial work against FedAvg that drops stragglers (Li et al. 2020's setting):
# the FedAvg paper's 2NN on pathological non-IID MNIST (2 shards of 300 per device, 100
# devices, 10% per round, E = 1, B = 10, client lr 0.1), 90% of the sampled devices
# stragglers (10x slower than the deadline allows). FedProx (mu = 1) lets them report the
# share of their data they had time for; FedAvg drops them. Prints both accuracy curves.
#
# Usage: bench/strategies/fedprox.sh [--data DIR]
#   --data DIR   the MNIST folder (four IDX files, gzip or not); default ../shared/data/mnist where it exists, else the folder `starling data fetch mnist` fills
# Environment: ROUNDS (default 100), EVERY (print every Nth round, default 10), SEED (1),
#   MU (1.0), STRAGGLERS (0.9), STARLING_BIN (default: cargo build --release).
# Output: the table on stdout, both runs' results (CSV, JSON, plot) under target/fedprox/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source bench/lib.sh
mnist_args "$0" "$@"
ROUNDS="${ROUNDS:-100}"; EVERY="${EVERY:-10}"; SEED="${SEED:-1}"
MU="${MU:-1.0}"; STRAGGLERS="${STRAGGLERS:-0.9}"
starling_bin
require_mnist "$0"
OUT=target/fedprox
mkdir -p "$OUT"
common=(simulate --dataset mnist --data "$DATA" --model mlp --partition shards --devices 100
        --fraction 0.1 --epochs 1 --batch-size 10 --lr 0.1 --rounds "$ROUNDS" --seed "$SEED"
        --stragglers "$STRAGGLERS" --json)
"$STARLING_BIN" "${common[@]}" --out "$OUT/fedavg-drop" > "$OUT/fedavg-drop.json"
"$STARLING_BIN" "${common[@]}" --mu "$MU" --partial-work --out "$OUT/fedprox-partial" \
    > "$OUT/fedprox-partial.json"
python3 - "$OUT" "$EVERY" "$MU" "$STRAGGLERS" <<'PY'
import csv, sys
out, every, mu, stragglers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def curve(name):
    with open(f"{out}/{name}/results.csv") as f:
        return {int(r["round"]): r for r in csv.DictReader(f)}
a, b = curve("fedavg-drop"), curve("fedprox-partial")
print(f"{float(stragglers):.0%} stragglers; test accuracy by round")
print(f"{'round':>5} {'FedAvg, stragglers dropped':>27} {'FedProx mu=' + mu + ', partial work':>30}"
      f" {'reported (drop / partial)':>26}")
last = max(a)
for r in sorted(a):
    if r % every == 0 or r == 1 or r == last:
        print(f"{r:>5} {float(a[r]['test_accuracy']):>27.4f} {float(b[r]['test_accuracy']):>30.4f}"
              f" {a[r]['reported'] + ' / ' + b[r]['reported']:>26}")
PY
