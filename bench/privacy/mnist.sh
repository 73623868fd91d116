#!/usr/bin/env bash
# Differential privacy on MNIST: accuracy against the ε spent, for several noise multipliers.
# The FedAvg paper's 2NN on IID MNIST over 1,000 devices (60 images each), 100 devices per
# round (sampling rate q = 0.1), E = 1, B = 10, client lr 0.1, with DP-FedAvg: every update
# clipped to CLIP, Gaussian noise of z·CLIP on each round's sum, the Rényi-DP accountant at
# δ = 1e-5. One run per noise multiplier (and one without DP), the same seed for all; then
# the same with distributed DP (--secagg: every round secure, the devices adding Skellam
# noise in the ring) for the multipliers in ZS_DISTRIBUTED. Then a run with a small budget, to
# show the server refusing the round that would pass it.
#
# Usage: bench/privacy/mnist.sh [--data DIR]
#   --data DIR   the MNIST folder (four IDX files, gzip or not); default ../shared/data/mnist where it exists, else the folder `starling data fetch mnist` fills
# Environment:
#   ZS="0.5 1 2"     the noise multipliers
#   ZS_DISTRIBUTED="1"  the noise multipliers of the distributed-DP runs ("" for none)
#   CLIP=c           the clip bound (default 1)
#   ROUNDS=N         rounds per run (default 100)
#   BUDGET=eps       the small budget of the last run (default 1)
#   SEED=n           the seed (default 1)
#   STARLING_BIN     the starling binary (default: cargo build --release, then target/release/starling)
# Output: the table on stdout, target/privacy/accuracy-vs-epsilon.svg (the plot), and each
# run's JSON summary and results (results.csv has the ε after every round) under target/privacy/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source bench/lib.sh
mnist_args "$0" "$@"
ZS="${ZS:-0.5 1 2}"
ZS_DISTRIBUTED="${ZS_DISTRIBUTED-1}"
CLIP="${CLIP:-1}"
ROUNDS="${ROUNDS:-100}"
BUDGET="${BUDGET:-1}"
SEED="${SEED:-1}"
starling_bin
require_mnist "$0"
OUT=target/privacy
mkdir -p "$OUT"
common=(simulate --dataset mnist --data "$DATA" --model mlp --partition iid --devices 1000
        --per-round 100 --epochs 1 --batch-size 10 --lr 0.1 --seed "$SEED")
runs=()
"$STARLING_BIN" "${common[@]}" --rounds "$ROUNDS" --out "$OUT/none" --json > "$OUT/none.json"
runs+=(none)
for z in $ZS; do
    # A budget no run reaches: these runs show accuracy against ε.
    "$STARLING_BIN" "${common[@]}" --rounds "$ROUNDS" --dp-clip "$CLIP" --noise-multiplier "$z" \
        --epsilon 1000 --delta 1e-5 --out "$OUT/z$z" --json > "$OUT/z$z.json"
    runs+=("z$z")
done
for z in $ZS_DISTRIBUTED; do
    # Secure rounds with 20-bit inputs: the devices clip to CLIP and add the noise.
    "$STARLING_BIN" "${common[@]}" --rounds "$ROUNDS" --dp-clip "$CLIP" --noise-multiplier "$z" \
        --epsilon 1000 --delta 1e-5 --secagg --out "$OUT/d$z" --json > "$OUT/d$z.json"
    runs+=("d$z")
done
python3 - "$OUT" "${runs[@]}" <<'PY'
import csv, json, sys
out, runs = sys.argv[1], sys.argv[2:]
marks = [1, 2, 4, 8]
print(f"{'run':<18} {'rounds':>6} {'final acc':>9} {'ε spent':>9} " +
      " ".join(f"{'acc@ε≤' + str(m):>9}" for m in marks))
series = []
for r in runs:
    summary = json.load(open(f"{out}/{r}.json"))
    rows = list(csv.DictReader(open(f"{out}/{r}/results.csv")))
    pts = [(float(x["epsilon"]), float(x["test_accuracy"])) for x in rows
           if x["epsilon"] and x["test_accuracy"]]
    eps = summary.get("epsilon")
    at = []
    for m in marks:
        ok = [a for e, a in pts if e <= m]
        at.append(f"{ok[-1]:.4f}" if ok else "-")
    name = ("no DP" if r == "none" else "z = " + r[1:] if r[0] == "z"
            else "z = " + r[1:] + " distributed")
    print(f"{name:<18} {summary['rounds']:>6} {summary['final_accuracy']:>9.4f} "
          f"{('-' if eps is None else f'{eps:.3f}'):>9} " + " ".join(f"{a:>9}" for a in at))
    if pts:
        series.append((name, pts))
m = json.load(open(f"{out}/{runs[0]}.json"))["machine"]
print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB, {m['os']}")
# The plot: test accuracy against ε spent, one line per noise multiplier.
W, H, L, B = 640, 400, 60, 50
xmax = max(e for _, p in series for e, _ in p) if series else 1
def X(e): return L + (W - L - 20) * e / xmax
def Y(a): return H - B - (H - B - 20) * a
colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{W/2}" y="{H-12}" text-anchor="middle">ε spent (δ = 1e-5)</text>',
       f'<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">test accuracy</text>']
for a in [0, 0.25, 0.5, 0.75, 1.0]:
    svg.append(f'<text x="{L-6}" y="{Y(a)+4}" text-anchor="end">{a}</text>')
    svg.append(f'<line x1="{L}" y1="{Y(a)}" x2="{W-20}" y2="{Y(a)}" stroke="#ddd"/>')
for i in range(6):
    e = xmax * i / 5
    svg.append(f'<text x="{X(e)}" y="{H-B+16}" text-anchor="middle">{e:.1f}</text>')
for k, (name, pts) in enumerate(series):
    c = colors[k % len(colors)]
    path = " ".join(f"{X(e):.1f},{Y(a):.1f}" for e, a in pts)
    svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
    svg.append(f'<text x="{W-140}" y="{40 + 16*k}" fill="{c}">{name}</text>')
svg.append("</svg>")
open(f"{out}/accuracy-vs-epsilon.svg", "w").write("\n".join(svg))
print(f"plot: {out}/accuracy-vs-epsilon.svg")
PY
# The budget at work: the server releases rounds while the next stays within ε = BUDGET, then
# stops the task and refuses further check-ins.
z=$(echo "$ZS" | awk '{print $NF}')
echo
echo "budget ε = $BUDGET at δ = 1e-5, z = $z:"
"$STARLING_BIN" "${common[@]}" --rounds "$ROUNDS" --dp-clip "$CLIP" --noise-multiplier "$z" \
    --epsilon "$BUDGET" --delta 1e-5 --out "$OUT/budget" --json > "$OUT/budget.json"
python3 - "$OUT/budget.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
def f(x): return "-" if x is None else f"{x:.4f}"
print(f"  {d['rounds']} rounds released, ε spent {f(d['epsilon'])}, final accuracy {f(d['final_accuracy'])}")
print(f"  next round refused: {d['stopped']}")
PY
