#!/usr/bin/env python3
"""Flower's side of the Starling comparison: FedAvg softmax regression on the digits CSVs.

Usage (see compare.sh, which runs this for every configuration):

    python flower_sim.py --train train.csv --test test.csv --devices 100 --fraction 0.1 \
        --rounds 20 [--epochs 1 --batch-size 10 --lr 0.1 --seed 1 --num-cpus 2 \
        --cpus-per-client 1]

Workload (the same one `starling simulate` runs):
  * model: softmax regression, W (64x10) and b (10), float32, both initialised to zeros;
  * data: train.csv split IID into N partitions (a seeded permutation cut into N pieces whose
    sizes differ by at most one), one partition per virtual SuperNode;
  * client: 1 local epoch over its partition in mini-batches of 10 in a seeded shuffled
    order, plain SGD with lr 0.1 on the softmax cross-entropy averaged over the batch;
  * server: FedAvg weighted by the number of examples, fraction_train = the fraction,
    fraction_evaluate = 0 (no federated evaluation), min_available_nodes = N, with the
    per-round client sample drawn from a seeded generator (SeededFedAvg below) so that
    runs are reproducible;
  * evaluation: centrally on test.csv through the strategy's evaluate_fn. By default it
    only computes metrics after the last round, but it records a timestamp after every
    round, which gives the per-round time after the first round (Ray start-up and actor
    creation land in round 1).

It uses the Message API of Flower 1.2x+ (ServerApp + ClientApp + flwr.serverapp.strategy.
FedAvg) driven by `flwr.simulation.run_simulation` with the Ray backend: that is the
Python entry point of the pinned version's Simulation Runtime (`flwr run` drives the
same runtime from a project directory).

The last line on stdout is one JSON object:
  {"framework":"flower","devices":N,"fraction":f,"rounds":R,"wall_secs":...,
   "accuracy":...,"loss":..., ...}
wall_secs is the time of the run_simulation call, Ray start-up and shut-down included
(Python's own start and the imports are not in it; compare.sh measures the whole process
separately).
"""

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord  # noqa: E402
from flwr.app import MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

NUM_FEATURES = 64
NUM_CLASSES = 10

# ---------------------------------------------------------------------------------------
# Data and model (shared by the server process and the Ray actor processes)
# ---------------------------------------------------------------------------------------

# One cache per process: each Ray actor reads train.csv once and keeps the partition index
# lists, so the per-round cost is the training, not CSV parsing.
_CSV_CACHE: dict = {}
_PART_CACHE: dict = {}


def load_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a `p0,...,p63,label` CSV as (x float32 [n,64], y int64 [n])."""
    if path not in _CSV_CACHE:
        raw = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        x = raw[:, :NUM_FEATURES].astype(np.float32)
        y = raw[:, NUM_FEATURES].astype(np.int64)
        _CSV_CACHE[path] = (x, y)
    return _CSV_CACHE[path]


def iid_partitions(n: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Seeded IID split of range(n) into num_parts pieces whose sizes differ by at most 1."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.array_split(perm, num_parts)


def client_data(path: str, num_parts: int, seed: int, pid: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_csv(path)
    key = (path, num_parts, seed)
    if key not in _PART_CACHE:
        _PART_CACHE[key] = iid_partitions(len(y), num_parts, seed)
    idx = _PART_CACHE[key][pid]
    return x[idx], y[idx]


def softmax_xent(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray):
    """Return (probabilities, mean cross-entropy) of softmax(xW + b) against labels y."""
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    p = e / e.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))
    return p, loss


def sgd_epochs(x, y, w, b, *, epochs: int, batch_size: int, lr: float, rng) -> float:
    """Plain mini-batch SGD in place on (w, b); returns the mean batch loss."""
    n = len(y)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            p, loss = softmax_xent(xb, yb, w, b)
            losses.append(loss)
            g = p
            g[np.arange(len(yb)), yb] -= 1.0
            g /= len(yb)
            w -= lr * (xb.T @ g)
            b -= lr * g.sum(axis=0)
    return float(np.mean(losses)) if losses else 0.0


def evaluate(x, y, w, b) -> tuple[float, float]:
    p, loss = softmax_xent(x, y, w, b)
    acc = float(np.mean(np.argmax(p, axis=1) == y))
    return acc, loss


# ---------------------------------------------------------------------------------------
# ClientApp (runs inside the Ray actors)
# ---------------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    arrays = msg.content["arrays"]
    w = arrays["W"].numpy().copy()
    b = arrays["b"].numpy().copy()
    pid = int(context.node_config["partition-id"])
    num_parts = int(context.node_config["num-partitions"])
    seed = int(cfg["seed"])
    x, y = client_data(str(cfg["train-path"]), num_parts, seed, pid)
    # A distinct, reproducible shuffle for every (seed, client, round).
    rng = np.random.default_rng([seed, pid, int(cfg["server-round"])])
    loss = sgd_epochs(
        x,
        y,
        w,
        b,
        epochs=int(cfg["epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        rng=rng,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"W": Array(w), "b": Array(b)}),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------------------
# ServerApp (runs in a thread of this process)
# ---------------------------------------------------------------------------------------

class SeededFedAvg(FedAvg):
    """FedAvg whose client sample is reproducible.

    Flower's FedAvg samples with `random.sample` over `grid.get_node_ids()`, a set of
    random 64-bit node ids that change every run, so the clients picked (and with a
    fraction below 1 the final accuracy) differ from run to run. The simulation registers
    its nodes in partition order (node i holds partition i) and the in-memory link state
    keeps them in that order, so this samples partition indices with a seeded generator
    per round and maps them to node ids. Everything else is FedAvg's code path.
    """

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def _nodes_in_partition_order(self, grid: Grid) -> list[int]:
        while len(online := set(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(0.1)
        registered = getattr(getattr(grid, "state", None), "nodes", None)
        if isinstance(registered, dict):
            ordered = [nid for nid in registered if nid in online]
            if len(ordered) == len(online):
                return ordered
        return sorted(online)  # fallback: reproducible set, not partition order

    def configure_train(self, server_round, arrays, config, grid):
        if self.fraction_train == 0.0:
            return []
        nodes = self._nodes_in_partition_order(grid)
        k = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        rng = np.random.default_rng([self.seed, server_round])
        picked = sorted(rng.choice(len(nodes), size=k, replace=False).tolist())
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [nodes[i] for i in picked], MessageType.TRAIN)


server_app = ServerApp()
ARGS: argparse.Namespace | None = None
ROUND_TIMES: dict[int, float] = {}
FINAL: dict = {}


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    args = ARGS
    assert args is not None
    random.seed(args.seed)
    x_test, y_test = load_csv(args.test)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ROUND_TIMES[server_round] = time.perf_counter()
        if server_round == args.rounds or (args.eval_every_round and server_round > 0):
            acc, loss = evaluate(x_test, y_test, arrays["W"].numpy(), arrays["b"].numpy())
            if server_round == args.rounds:
                FINAL.update(accuracy=acc, loss=loss)
            return MetricRecord({"accuracy": acc, "loss": loss})
        return None

    strategy = SeededFedAvg(
        seed=args.seed,
        fraction_train=args.fraction,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=args.devices,
    )
    initial = ArrayRecord(
        {
            "W": Array(np.zeros((NUM_FEATURES, NUM_CLASSES), dtype=np.float32)),
            "b": Array(np.zeros(NUM_CLASSES, dtype=np.float32)),
        }
    )
    train_config = ConfigRecord(
        {
            "train-path": os.path.abspath(args.train),
            "epochs": args.epochs,
            "batch-size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
        }
    )
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=args.rounds,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--fraction", type=float, required=True)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                   help="CPUs Ray may use (default: all)")
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="client_resources num_cpus: num-cpus / this = concurrent actors")
    p.add_argument("--eval-every-round", action="store_true",
                   help="compute test accuracy after every round (timestamps are always kept)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    global ARGS
    from flwr.simulation import run_simulation

    ARGS = args = parse_args(argv)
    backend_config = {
        "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.num_cpus},
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.devices,
        backend_name="ray",
        backend_config=backend_config,
    )
    t1 = time.perf_counter()
    try:  # run_simulation leaves Ray running; its shut-down is part of the run
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass
    t2 = time.perf_counter()

    if "accuracy" not in FINAL or args.rounds not in ROUND_TIMES:
        print(json.dumps({"framework": "flower", "error": "simulation did not finish"}))
        sys.exit(1)
    rounds = args.rounds
    first_round = ROUND_TIMES[1] - ROUND_TIMES[0] if 1 in ROUND_TIMES else None
    steady = None
    if rounds >= 2 and 1 in ROUND_TIMES:
        steady = (ROUND_TIMES[rounds] - ROUND_TIMES[1]) / (rounds - 1)
    out = {
        "framework": "flower",
        "devices": args.devices,
        "fraction": args.fraction,
        "rounds": rounds,
        "wall_secs": round(t2 - t0, 4),
        "rounds_per_sec": round(rounds / (t2 - t0), 4),
        "startup_secs": round(ROUND_TIMES[0] - t0, 4) if 0 in ROUND_TIMES else None,
        "first_round_secs": round(first_round, 4) if first_round is not None else None,
        "steady_round_secs": round(steady, 4) if steady is not None else None,
        "steady_rounds_per_sec": round(1.0 / steady, 4) if steady else None,
        "after_last_round_secs": round(t1 - ROUND_TIMES[rounds], 4),
        "shutdown_secs": round(t2 - t1, 4),
        "accuracy": round(FINAL["accuracy"], 6),
        "loss": round(FINAL["loss"], 6),
        "clients_per_round": max(int(args.devices * args.fraction), 1),
        "concurrent_actors": int(args.num_cpus // args.cpus_per_client),
    }
    sys.stdout.flush()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    # Import this file as the module `flower_sim`, not `__main__`, so that cloudpickle sends
    # the ClientApp's functions to the Ray actors by reference (the actors import it from
    # PYTHONPATH, which Flower's Ray backend sets from sys.path) and each actor keeps its
    # own data cache across rounds.
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import flower_sim  # noqa: E402  pylint: disable=import-self

    flower_sim.main(sys.argv[1:])
