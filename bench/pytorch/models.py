"""PyTorch twins of Starling's built-in MNIST models (crates/starling-core/src/trainer/builtin.rs).

* `mlp`, the FedAvg paper's "2NN": 784 -> dense 200 + ReLU -> dense 200 + ReLU -> dense 10,
  softmax cross-entropy; 199,210 parameters.
* `cnn`, the paper's CNN: 1x28x28 -> conv 5x5, 32 filters, `same` padding (2) + ReLU +
  2x2 max-pool -> conv 5x5, 64 filters, `same` + ReLU + 2x2 max-pool -> flatten (3,136)
  -> dense 512 + ReLU -> dense 10, softmax cross-entropy; 1,663,370 parameters.

As in Starling, weights are Glorot(Xavier)-uniform and biases zero. Pixels are floats in
[0, 1]; the loss is the softmax cross-entropy averaged over the batch.
"""

import gzip
import os
import struct

import numpy as np
import torch
from torch import nn

PARAMETERS = {"mlp": 199_210, "cnn": 1_663_370}  # Starling's counts (builtin.rs docs)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, 10),
        )
    elif name == "cnn":
        net = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )
    else:
        raise ValueError(f"unknown model {name!r} (mlp, cnn)")
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one example as the model takes it."""
    return (784,) if name == "mlp" else (1, 28, 28)


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------
# MNIST from the IDX files (gzip or raw), as Starling reads them: pixels / 255.
# ---------------------------------------------------------------------------------------

def _open(folder: str, stem: str):
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def _idx(folder: str, stem: str) -> np.ndarray:
    with _open(folder, stem) as f:
        raw = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", raw[:4])
    if dtype != 0x08:
        raise ValueError(f"{stem}: IDX type {dtype:#x}, expected unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [n, 1, 28, 28] in [0, 1], y int64 [n]) of `train` or `test` (t10k)."""
    prefix = "train" if split == "train" else "t10k"
    x = _idx(folder, f"{prefix}-images-idx3-ubyte").astype(np.float32) / 255.0
    y = _idx(folder, f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    return x.reshape(-1, 1, 28, 28), y
