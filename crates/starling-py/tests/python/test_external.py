"""Bring your own model from Python: a task defined by a safetensors checkpoint alone
(`model = "external"`, written by tests/it/main.rs: a 2-8-1 tanh network, tensors
`dense1.weight` [8, 2], `dense1.bias` [8], `dense2.weight` [1, 8], `dense2.bias` [1], in
PyTorch's layout), which only a host's own training can train. Three devices run backprop in
NumPy on their own samples of y = tanh(2 x0 - x1) + 0.5 x1 for several rounds; the federated
model's error on held-out data falls below 0.002 (from about 1 at version 0). The built-in
trainer refuses the model.

Run by `cargo test -p starling-py` with the server's URL in STARLING_SERVER.
"""

import os
import tempfile
import time
import unittest

import numpy as np

import starling
from starling import StarlingError

SERVER = os.environ["STARLING_SERVER"]
ROUNDS = int(os.environ["STARLING_ROUNDS"])
TASK = "external"
SHAPES = {
    "dense1.weight": (8, 2),
    "dense1.bias": (8,),
    "dense2.weight": (1, 8),
    "dense2.bias": (1,),
}


def until_assigned(device):
    for _ in range(600):
        outcome = device.check_in()
        if outcome.kind == "assigned":
            return outcome
        assert outcome.kind == "wait", outcome
        time.sleep(min(max(outcome.secs, 0.05), 0.5))
    raise AssertionError(f"{device} was never assigned")


def target(x):
    return np.tanh(2.0 * x[:, :1] - x[:, 1:]) + 0.5 * x[:, 1:]


def samples(seed, n=64):
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, 2))
    return x, target(x)


def forward(p, x):
    h = np.tanh(x @ p["dense1.weight"].T + p["dense1.bias"])
    return h, h @ p["dense2.weight"].T + p["dense2.bias"]


def mse(p, x, y):
    return float(((forward(p, x)[1] - y) ** 2).mean())


def backprop(weights, x, y, lr=0.2, steps=100):
    """Full-batch gradient descent on the mean squared error."""
    p = {k: v.astype(np.float64) for k, v in weights.items()}
    for _ in range(steps):
        h, out = forward(p, x)
        g = 2.0 * (out - y) / len(x)
        gz = (g @ p["dense2.weight"]) * (1.0 - h**2)
        p["dense2.weight"] -= lr * g.T @ h
        p["dense2.bias"] -= lr * g.sum(axis=0)
        p["dense1.weight"] -= lr * gz.T @ x
        p["dense1.bias"] -= lr * gz.sum(axis=0)
    return p, mse(p, x, y)


class ExternalModel(unittest.TestCase):
    def test_three_devices_train_a_two_layer_network_of_their_own(self):
        held_out = samples(99, n=500)
        with tempfile.TemporaryDirectory() as tmp:
            devices = [
                starling.Device(SERVER, TASK, os.path.join(tmp, f"device-{i}")) for i in range(3)
            ]
            data = [samples(seed) for seed in range(3)]
            initial_error = None
            for r in range(1, ROUNDS + 1):
                for d in devices:
                    self.assertEqual(until_assigned(d).round, r)
                for i, d in enumerate(devices):
                    self.assertEqual(d.download().version, r - 1)
                    weights = d.model()
                    self.assertEqual({k: v.shape for k, v in weights.items()}, SHAPES)
                    if initial_error is None:
                        initial_error = mse(weights, *held_out)
                        # The built-in trainer cannot train a model it knows only as tensors.
                        csv = os.path.join(tmp, "local.csv")
                        x, y = data[i]
                        np.savetxt(csv, np.hstack([x, y]), delimiter=",")
                        with self.assertRaises(StarlingError) as cm:
                            d.train_csv(csv)
                        self.assertIn("SDK", str(cm.exception))
                        self.assertEqual(d.step, "downloaded")
                    new, loss = backprop(weights, *data[i])
                    o = d.submit(weights=new, examples=len(data[i][0]), loss=loss)
                    self.assertEqual(o.kind, "trained")
                for d in devices:
                    self.assertEqual(d.upload().kind, "delivered")

            d = devices[0]
            until_assigned(d)
            self.assertEqual(d.download().version, ROUNDS)
            error = mse(d.model(), *held_out)
            d.reset()
        self.assertGreater(initial_error, 0.5)
        self.assertLess(error, 0.002, f"held-out MSE {error} (version 0: {initial_error})")


if __name__ == "__main__":
    unittest.main(verbosity=2)
