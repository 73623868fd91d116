#!/usr/bin/env bash
# Server optimisers side by side: rounds to a target test accuracy on the FedAvg paper's
# pathological non-IID MNIST (the 2NN, 200 shards of 300 images sorted by label, 2 per device,
# 100 devices, 10% per round, E = 1, B = 10, client lr 0.1), for FedAvg, FedAvgM, FedAdagrad,
# FedAdam and FedYogi (Reddi et al. 2021), each with its default server learning rate unless
# STRATEGIES says otherwise. One run, one machine, the same seed for all.
#
# Usage: bench/strategies/compare.sh [--data DIR]
#   --data DIR   the MNIST folder (four IDX files, gzip or not); default ../shared/data/mnist where it exists, else the folder `starling data fetch mnist` fills
# Environment:
#   ROUNDS=N       at most this many rounds per strategy (default 300)
#   TARGET=acc     the target test accuracy (default 0.97)
#   SEED=n         the seed (default 1)
#   STRATEGIES="name[:server_lr] ..."   default "fedavg fedavgm:0.3 fedadagrad:0.03 fedadam:0.01 fedyogi:0.01"
#   STARLING_BIN   the starling binary (default: cargo build --release, then target/release/starling)
# Output: the table on stdout; each run's JSON summary and results under target/strategies/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source bench/lib.sh
mnist_args "$0" "$@"
ROUNDS="${ROUNDS:-300}"
TARGET="${TARGET:-0.97}"
SEED="${SEED:-1}"
STRATEGIES="${STRATEGIES:-fedavg fedavgm:0.3 fedadagrad:0.03 fedadam:0.01 fedyogi:0.01}"
starling_bin
require_mnist "$0"
OUT=target/strategies
mkdir -p "$OUT"
printf '%-11s %10s %16s %14s %10s\n' strategy server_lr "rounds to $TARGET" "final accuracy" "wall s"
for spec in $STRATEGIES; do
    name="${spec%%:*}"
    lr_args=()
    lr="default"
    if [ "$spec" != "$name" ]; then
        lr="${spec#*:}"
        lr_args=(--server-lr "$lr")
    fi
    "$STARLING_BIN" simulate --dataset mnist --data "$DATA" --model mlp --partition shards \
        --devices 100 --fraction 0.1 --epochs 1 --batch-size 10 --lr 0.1 \
        --rounds "$ROUNDS" --target-accuracy "$TARGET" --seed "$SEED" \
        --strategy "$name" "${lr_args[@]}" --out "$OUT/$name" --json > "$OUT/$name.json"
    python3 - "$OUT/$name.json" "$name" "$lr" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d.get("rounds_to_target")
print(f"{sys.argv[2]:<11} {sys.argv[3]:>10} {('>' + str(d['rounds'])) if r is None else r:>16} "
      f"{d['final_accuracy']:>14.4f} {d['wall_secs']:>10.1f}")
PY
done
