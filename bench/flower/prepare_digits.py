#!/usr/bin/env python3
"""Write scikit-learn's bundled digits data as train.csv and test.csv for the Flower comparison.

Usage: python prepare_digits.py OUTDIR

Pixels (0..16) are scaled to [0, 1] by dividing by 16. The split is a fixed, stratified
80/20 split (random_state=0), so every run and both frameworks see exactly the same rows.
Each file has a header row `p0,...,p63,label`, then 64 feature columns and the label.
"""

import os
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE = 0.2
RANDOM_STATE = 0


def write_csv(path: str, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"p{i}" for i in range(x.shape[1])] + ["label"])
    with open(path, "w", encoding="ascii") as f:
        f.write(header + "\n")
        for row, label in zip(x, y):
            # repr-exact short decimals: k/16 is exact in binary, so "%.4f" loses nothing.
            f.write(",".join(f"{v:.4f}" for v in row) + f",{int(label)}\n")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: prepare_digits.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=RANDOM_STATE, stratify=y
    )
    write_csv(os.path.join(out, "train.csv"), x_tr, y_tr)
    write_csv(os.path.join(out, "test.csv"), x_te, y_te)
    print(f"wrote {len(y_tr)} train and {len(y_te)} test rows to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
