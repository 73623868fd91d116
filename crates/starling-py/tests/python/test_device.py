"""The Python SDK against a real server (started by tests/it/main.rs, which passes its URL in
STARLING_SERVER): three devices train the `linear` task with their own NumPy gradient steps
on their own data and submit weights (one of them a delta) for several rounds, and the model
converges to y = 2x + 1; an enrolled task refuses a device without a credential and takes it
with one from `enroll`; bad weights fail before anything is sent; steps out of order, an
unreachable server and a panic in Rust are `StarlingError`s.

Run by `cargo test -p starling-py`; plain unittest, no pytest.
"""

import os
import sys
import tempfile
import time
import unittest

import numpy as np

import starling
from starling import StarlingError

SERVER = os.environ["STARLING_SERVER"]
SECRET = os.environ["STARLING_SECRET"]
ROUNDS = int(os.environ["STARLING_ROUNDS"])
READY = dict(charging=True, idle=True, unmetered=True, battery=0.9)


def until_assigned(device, **conditions):
    """Checks in until assigned (the next round opens once the last one commits)."""
    for _ in range(600):
        outcome = device.check_in(**conditions)
        if outcome.kind == "assigned":
            return outcome
        assert outcome.kind == "wait", outcome
        time.sleep(min(max(outcome.secs, 0.05), 0.5))
    raise AssertionError(f"{device} was never assigned")


def line_data(seed, n=40):
    """A device's own data: y = 2x + 1 with a little noise, x in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 1))
    y = 2.0 * x + 1.0 + rng.normal(0.0, 0.05, size=(n, 1))
    return x, y


def gradient_steps(weights, x, y, lr=0.1, steps=20):
    """Full-batch gradient descent on the mean squared error of y = x W + b."""
    w = weights["W"].astype(np.float64)
    b = weights["b"].astype(np.float64)
    for _ in range(steps):
        err = x @ w + b - y
        w -= lr * 2.0 * x.T @ err / len(x)
        b -= lr * 2.0 * err.mean(axis=0)
    loss = float(((x @ w + b - y) ** 2).mean())
    return {"W": w, "b": b}, loss


class LinearTask(unittest.TestCase):
    def test_three_devices_train_the_linear_task_to_w_2_b_1(self):
        with tempfile.TemporaryDirectory() as tmp:
            devices = [
                starling.Device(SERVER, "linear", os.path.join(tmp, f"device-{i}"))
                for i in range(3)
            ]
            data = [line_data(seed) for seed in range(3)]
            for r in range(1, ROUNDS + 1):
                for d in devices:
                    o = until_assigned(d, **READY)
                    self.assertEqual((o.round, o.round_kind), (r, "training"))
                    self.assertEqual(d.step, "assigned")
                for i, d in enumerate(devices):
                    o = d.download()
                    self.assertEqual((o.kind, o.version, d.version), ("downloaded", r - 1, r - 1))
                    weights = d.model()
                    self.assertEqual(sorted(weights), ["W", "b"])
                    self.assertEqual(weights["W"].dtype, np.float32)
                    self.assertEqual(weights["W"].shape, (1, 1))
                    self.assertEqual(weights["b"].shape, (1,))
                    if r == 1:
                        np.testing.assert_array_equal(weights["W"], [[5.0]])
                        np.testing.assert_array_equal(weights["b"], [3.0])
                    x, y = data[i]
                    new, loss = gradient_steps(weights, x, y)
                    if i == 0:
                        delta = {k: new[k] - weights[k] for k in weights}
                        o = d.submit(delta=delta, examples=len(x), loss=loss)
                    else:
                        o = d.submit(weights=new, examples=len(x), loss=loss)
                    self.assertEqual((o.kind, o.examples), ("trained", len(x)))
                    self.assertAlmostEqual(o.loss, loss, places=5)
                    self.assertEqual(d.step, "ready")
                for d in devices:
                    o = d.upload()
                    self.assertEqual((o.kind, o.round), ("delivered", r), o)
                    self.assertEqual(d.step, "idle")

            # The committed model, as the next round's download.
            d = devices[0]
            until_assigned(d, **READY)
            self.assertEqual(d.download().version, ROUNDS)
            model = d.model()
            self.assertAlmostEqual(float(model["W"][0, 0]), 2.0, delta=0.05)
            self.assertAlmostEqual(float(model["b"][0]), 1.0, delta=0.05)
            d.reset()
            self.assertEqual(d.step, "idle")


class EnrolledTask(unittest.TestCase):
    def test_credentials_bad_weights_and_the_built_in_trainer(self):
        with tempfile.TemporaryDirectory() as tmp:
            # No credential: refused by the server, with its code.
            anonymous = starling.Device(SERVER, "enrolled", os.path.join(tmp, "anonymous"))
            with self.assertRaises(StarlingError) as cm:
                anonymous.check_in(**READY)
            e = cm.exception
            self.assertEqual((e.kind, e.code, e.status), ("refused", "missing_credential", 401))
            self.assertEqual(anonymous.step, "idle")

            # A credential the server never issued.
            forged = starling.Device(
                SERVER, "enrolled", os.path.join(tmp, "forged"), credential="not-a-credential"
            )
            with self.assertRaises(StarlingError) as cm:
                forged.check_in(**READY)
            self.assertEqual(cm.exception.code, "invalid_credential")

            # The wrong enrollment secret.
            with self.assertRaises(StarlingError) as cm:
                starling.enroll(SERVER, "enrolled", "not-the-secret-at-all")
            self.assertEqual(cm.exception.kind, "refused")
            self.assertIsNotNone(cm.exception.code)

            credential = starling.enroll(SERVER, "enrolled", SECRET, label="python test")
            self.assertIsInstance(credential, str)
            d = starling.Device(
                SERVER, "enrolled", os.path.join(tmp, "enrolled"), credential=credential
            )
            self.assertEqual(until_assigned(d, **READY).kind, "assigned")
            self.assertIsNotNone(d.plan)
            self.assertIn("learning_rate", d.plan)

            # Out of order: nothing to upload yet.
            with self.assertRaises(StarlingError) as cm:
                d.upload()
            self.assertEqual(cm.exception.kind, "state")
            self.assertIsNone(cm.exception.code)

            self.assertEqual(d.download().kind, "downloaded")
            w = d.model()

            # Bad weights fail here, before anything is sent; the step stays `downloaded`.
            bad = {
                "a wrong shape": {"W": np.zeros((2, 1)), "b": w["b"]},
                "a missing tensor": {"W": w["W"]},
                "an extra tensor": {"W": w["W"], "b": w["b"], "c": w["b"]},
                "a value that is not finite": {"W": np.array([[np.nan]]), "b": w["b"]},
                "something that is no array": {"W": "two", "b": w["b"]},
            }
            for what, weights in bad.items():
                with self.subTest(what), self.assertRaises(StarlingError) as cm:
                    d.submit(weights=weights, examples=10)
                self.assertEqual((cm.exception.kind, cm.exception.code), ("data", None))
            with self.assertRaises(StarlingError) as cm:
                d.submit(weights=w, delta=w, examples=10)
            self.assertEqual(cm.exception.kind, "data")
            with self.assertRaises(StarlingError) as cm:
                d.submit(examples=10)
            self.assertEqual(cm.exception.kind, "data")
            with self.assertRaises(StarlingError) as cm:
                d.submit(weights={"W": np.zeros((1, 2)), "b": w["b"]}, examples=1)
            self.assertIn("shape", str(cm.exception))
            self.assertEqual(d.step, "downloaded")

            # The built-in trainer on a CSV file.
            csv = os.path.join(tmp, "local.csv")
            x, y = line_data(7, n=30)
            np.savetxt(csv, np.hstack([x, y]), delimiter=",", header="x,y", comments="")
            o = d.train_csv(csv)
            self.assertEqual((o.kind, o.examples), ("trained", 30))
            self.assertEqual(d.upload().kind, "delivered")


class Basics(unittest.TestCase):
    def test_importing_starling_does_not_import_torch(self):
        import starling.torch  # noqa: F401

        self.assertNotIn("torch", sys.modules)

    def test_a_panic_in_rust_is_a_starling_error(self):
        with self.assertRaises(StarlingError) as cm:
            starling._native._panic_for_tests()
        self.assertEqual(cm.exception.kind, "internal")
        self.assertIn("on purpose", str(cm.exception))

    def test_an_unreachable_server_is_a_starling_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            d = starling.Device("http://127.0.0.1:9", "linear", tmp)
            with self.assertRaises(StarlingError) as cm:
                d.check_in()
            self.assertEqual((cm.exception.kind, cm.exception.code), ("unreachable", None))

    def test_a_folder_of_another_task_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            starling.Device(SERVER, "linear", tmp)
            with self.assertRaises(StarlingError) as cm:
                starling.Device(SERVER, "enrolled", tmp)
            self.assertEqual(cm.exception.kind, "state")

    def test_the_torch_helpers_with_a_stand_in_for_torch(self):
        # PyTorch is not installed for the tests; a stand-in with the few calls the helpers
        # make checks that they convert both ways and keep names, shapes and float32.
        import types

        import starling.torch

        class Tensor:
            def __init__(self, a):
                self.a = a

            def clone(self):
                return Tensor(self.a.copy())

            def detach(self):
                return self

            def to(self, device):
                self.device = device
                return self

            def float(self):
                return Tensor(self.a.astype(np.float32))

            def numpy(self):
                return self.a

        sys.modules["torch"] = types.SimpleNamespace(from_numpy=Tensor)
        try:
            arrays = {"dense.weight": np.ones((2, 3)), "dense.bias": np.zeros(2)}
            state = starling.torch.to_state_dict(arrays)
            self.assertEqual(list(state), ["dense.weight", "dense.bias"])
            self.assertEqual(state["dense.weight"].a.dtype, np.float32)
            back = starling.torch.from_state_dict(state)
            shapes = {k: v.shape for k, v in arrays.items()}
            self.assertEqual({k: v.shape for k, v in back.items()}, shapes)
            np.testing.assert_array_equal(back["dense.weight"], arrays["dense.weight"])
        finally:
            del sys.modules["torch"]

    def test_starling_error_is_an_exception_with_empty_fields_by_default(self):
        e = StarlingError("x")
        self.assertIsInstance(e, Exception)
        self.assertEqual((e.kind, e.code, e.status), (None, None, None))


if __name__ == "__main__":
    unittest.main(verbosity=2)
