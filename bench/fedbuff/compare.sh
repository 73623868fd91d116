#!/usr/bin/env bash
# FedBuff against synchronous FedAvg at the same concurrency, in virtual time: the FedAvg
# paper's 2NN on IID MNIST over 1,000 devices (60 images each), E = 1, B = 10, client lr 0.1,
# device training times drawn from a log-normal distribution (sigma 1.5, median 1 virtual
# second: a heavy tail of slow devices). Synchronous FedAvg samples 100 devices per round and
# waits for the slowest (the deadline, 600 virtual s, is long enough that practically nobody
# misses it); FedBuff (Nguyen et al. 2022) keeps 100 devices training at all times and steps
# the model after every K = 10 updates, each discounted by 1/sqrt(1 + staleness). Both
# evaluate the 10,000 test images after every round (step) and stop at the target accuracy;
# the table gives the virtual seconds each needed, per seed, and the speed-up.
#
# Usage: bench/fedbuff/compare.sh [--data DIR]
#   --data DIR   the MNIST folder (four IDX files, gzip or not); default ../shared/data/mnist where it exists, else the folder `starling data fetch mnist` fills
# Environment:
#   SEEDS="1 2 3"      the seeds (each seeds the partition, the sampling and the latencies)
#   TARGET=acc         the target test accuracy (default 0.95)
#   LATENCY=spec       the training-time distribution (default lognormal:1.5)
#   DEVICES=N          the population (default 1000)
#   CONCURRENCY=C      devices per synchronous round and FedBuff's concurrency (default 100)
#   BUFFER=K           FedBuff's updates per server step (default 10)
#   ROUNDS=N           at most this many synchronous rounds (default 1000)
#   STEPS=N            at most this many FedBuff steps (default 5000)
#   EVAL_EVERY=N       FedBuff evaluates every N steps (default 1; a larger N only delays
#                      the step at which the target is seen, which counts against FedBuff)
#   STARLING_BIN       the starling binary (default: cargo build --release, then target/release/starling)
# Output: the table on stdout; each run's JSON summary and results under target/fedbuff/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source bench/lib.sh
mnist_args "$0" "$@"
SEEDS="${SEEDS:-1 2 3}"
TARGET="${TARGET:-0.95}"
LATENCY="${LATENCY:-lognormal:1.5}"
DEVICES="${DEVICES:-1000}"
CONCURRENCY="${CONCURRENCY:-100}"
BUFFER="${BUFFER:-10}"
ROUNDS="${ROUNDS:-1000}"
STEPS="${STEPS:-5000}"
EVAL_EVERY="${EVAL_EVERY:-1}"
starling_bin
require_mnist "$0"
OUT=target/fedbuff
mkdir -p "$OUT"
common=(simulate --dataset mnist --data "$DATA" --model mlp --partition iid
    --devices "$DEVICES" --epochs 1 --batch-size 10 --lr 0.1
    --latency "$LATENCY" --target-accuracy "$TARGET")
for seed in $SEEDS; do
    "$STARLING_BIN" "${common[@]}" --seed "$seed" \
        --per-round "$CONCURRENCY" --rounds "$ROUNDS" \
        --out "$OUT/sync-$seed" --json > "$OUT/sync-$seed.json"
    "$STARLING_BIN" "${common[@]}" --seed "$seed" \
        --buffer "$BUFFER" --concurrency "$CONCURRENCY" --rounds "$STEPS" \
        --eval-every "$EVAL_EVERY" \
        --out "$OUT/fedbuff-$seed" --json > "$OUT/fedbuff-$seed.json"
done
python3 - "$OUT" "$TARGET" "$CONCURRENCY" "$BUFFER" "$LATENCY" $SEEDS <<'PY'
import json, sys
out, target, c, k, latency, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
pct = f"{float(target) * 100:g}%"
print(f"MNIST 2NN, IID; latency {latency}; synchronous FedAvg, {c} devices per round, vs "
      f"FedBuff, K = {k}, concurrency {c}; virtual seconds to {pct} test accuracy")
head = (f"{'seed':>4} {'sync s':>10} {'rounds':>7} {'FedBuff s':>10} {'steps':>6} "
        f"{'speed-up':>9} {'stale refused':>14} {'sync wall s':>12} {'FedBuff wall s':>15}")
print(head)
sync_all, buff_all = [], []
def fmt(v, n):
    return ("-" if v is None else f"{v:.1f}").rjust(n)
for seed in seeds:
    s = json.load(open(f"{out}/sync-{seed}.json"))
    b = json.load(open(f"{out}/fedbuff-{seed}.json"))
    ss, bs = s["virtual_secs_to_target"], b["virtual_secs_to_target"]
    if ss is not None and bs is not None:
        sync_all.append(ss)
        buff_all.append(bs)
    speed = "-" if ss is None or bs is None else f"{ss / bs:.2f}x"
    rounds = s["rounds_to_target"] if s["rounds_to_target"] is not None else f">{s['rounds']}"
    steps = b["rounds_to_target"] if b["rounds_to_target"] is not None else f">{b['rounds']}"
    print(f"{seed:>4} {fmt(ss, 10)} {rounds!s:>7} {fmt(bs, 10)} {steps!s:>6} {speed:>9} "
          f"{b['refused_stale']:>14} {s['wall_secs']:>12.1f} {b['wall_secs']:>15.1f}")
if sync_all:
    ms, mb = sum(sync_all) / len(sync_all), sum(buff_all) / len(buff_all)
    print(f"{'mean':>4} {ms:>10.1f} {'':>7} {mb:>10.1f} {'':>6} {ms / mb:>8.2f}x")
m = json.load(open(f"{out}/sync-{seeds[0]}.json")).get("machine") or {}
print(f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
      f"{m.get('memory_gib', 0):.1f} GiB, {m.get('os', '?')}")
PY
