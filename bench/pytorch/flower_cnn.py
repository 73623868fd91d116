#!/usr/bin/env python3
"""Flower + PyTorch's side of the simulated CNN round: FedAvg of the FedAvg paper's CNN on MNIST.

Usage (compare.sh runs it):

    python flower_cnn.py --data MNIST_DIR --devices 100 --per-round 10 --rounds 5 \
        [--epochs 1 --batch-size 10 --lr 0.05 --seed 1 --num-cpus 2 --cpus-per-client 1 \
         --torch-threads 1]

Workload (the same as `starling simulate --dataset mnist --model cnn --devices 100
--per-round 10 --epochs 1 --batch-size 10 --lr 0.05 --partition iid`):
  * model: models.build("cnn"), 1,663,370 parameters, Glorot-uniform weights, zero biases;
  * data: MNIST's 60,000 training images (IDX files of MNIST_DIR, pixels / 255) split IID
    into 100 parts of 600 by a seeded permutation; one part per virtual SuperNode;
  * client: 1 local epoch over its 600 images in mini-batches of 10 in a seeded shuffled
    order, plain SGD (lr 0.05, no momentum), softmax cross-entropy averaged over the batch,
    PyTorch on the CPU with --torch-threads intra-op threads (1: one client per core, as
    Starling trains one device per core);
  * server: Flower's FedAvg (Message API, flwr.serverapp.strategy.FedAvg) weighted by
    examples, 10 of the 100 nodes per round drawn by a seeded generator (see SeededFedAvg
    in bench/flower/flower_sim.py, the same change), no federated evaluation;
  * evaluation: centrally on the 10,000 test images after the last round only (so that no
    round's time includes an evaluation); its evaluate_fn records a timestamp after every
    round, which gives the time of each round.

Driven by flwr.simulation.run_simulation with the Ray backend; Ray gets --num-cpus CPUs and
each client --cpus-per-client, so 2 clients train at once on 2 cores.

The last stdout line is one JSON object with "round_secs" (the time of every round; round 1
includes Ray's actor start-up), "steady_round_secs" (mean of rounds 2..R), "accuracy",
"loss", "wall_secs" (the run_simulation call, Ray start and shut-down included).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType  # noqa: E402
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

import models  # noqa: E402

# One cache per process: each Ray actor reads MNIST once and keeps the partition.
_DATA: dict = {}


def partition(data_dir: str, num_parts: int, seed: int, pid: int):
    key = (data_dir, num_parts, seed)
    if key not in _DATA:
        x, y = models.load_mnist(data_dir, "train")
        parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), num_parts)
        _DATA[key] = (torch.from_numpy(x), torch.from_numpy(y), parts)
    x, y, parts = _DATA[key]
    idx = torch.from_numpy(parts[pid])
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------
# ClientApp (in the Ray actors)
# ---------------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg["torch-threads"]))
    net = models.build("cnn")
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    x, y = partition(str(cfg["data"]), int(context.node_config["num-partitions"]),
                     int(cfg["seed"]), pid)
    opt = torch.optim.SGD(net.parameters(), lr=float(cfg["lr"]))
    g = torch.Generator().manual_seed(hash((int(cfg["seed"]), pid, int(cfg["server-round"])))
                                      & 0x7FFF_FFFF)
    b = int(cfg["batch-size"])
    net.train()
    losses = []
    for _ in range(int(cfg["epochs"])):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), b):
            i = order[s : s + b]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x[i]), y[i])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"num-examples": len(y),
                                 "train-loss": float(np.mean(losses))}),
    })
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------------------
# ServerApp (a thread of this process)
# ---------------------------------------------------------------------------------------

class SeededFedAvg(FedAvg):
    """FedAvg with a reproducible sample of `per_round` nodes (as bench/flower/flower_sim.py)."""

    def __init__(self, *args, seed: int, per_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.per_round = per_round

    def _nodes_in_partition_order(self, grid: Grid) -> list[int]:
        while len(online := set(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(0.1)
        registered = getattr(getattr(grid, "state", None), "nodes", None)
        if isinstance(registered, dict):
            ordered = [nid for nid in registered if nid in online]
            if len(ordered) == len(online):
                return ordered
        return sorted(online)

    def configure_train(self, server_round, arrays, config, grid):
        nodes = self._nodes_in_partition_order(grid)
        rng = np.random.default_rng([self.seed, server_round])
        picked = sorted(rng.choice(len(nodes), size=self.per_round, replace=False).tolist())
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
    x_test, y_test = models.load_mnist(args.data, "test")
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ROUND_TIMES[server_round] = time.perf_counter()
        if server_round != args.rounds:
            return None
        net = models.build("cnn")
        net.load_state_dict(arrays.to_torch_state_dict())
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x_test[s : s + 1000]) for s in range(0, len(y_test), 1000)])
            loss = float(F.cross_entropy(logits, y_test))
            acc = float((logits.argmax(1) == y_test).float().mean())
        FINAL.update(accuracy=acc, loss=loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = SeededFedAvg(
        seed=args.seed,
        per_round=args.per_round,
        fraction_train=args.per_round / args.devices,
        fraction_evaluate=0.0,
        min_train_nodes=args.per_round,
        min_available_nodes=args.devices,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(models.build("cnn", seed=args.seed).state_dict()),
        num_rounds=args.rounds,
        train_config=ConfigRecord({
            "data": os.path.abspath(args.data),
            "epochs": args.epochs,
            "batch-size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "torch-threads": args.torch_threads,
        }),
        evaluate_fn=evaluate_fn,
    )


def main(argv: list[str]) -> None:
    global ARGS
    from flwr.simulation import run_simulation

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--torch-threads", type=int, default=1)
    ARGS = args = p.parse_args(argv)

    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.devices,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.num_cpus},
        },
    )
    t1 = time.perf_counter()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass
    t2 = time.perf_counter()
    r = args.rounds
    if "accuracy" not in FINAL or any(i not in ROUND_TIMES for i in range(r + 1)):
        print(json.dumps({"framework": "flower", "error": "simulation did not finish"}))
        sys.exit(1)
    round_secs = [ROUND_TIMES[i] - ROUND_TIMES[i - 1] for i in range(1, r + 1)]
    steady = (ROUND_TIMES[r] - ROUND_TIMES[1]) / (r - 1) if r >= 2 else None
    print(json.dumps({
        "framework": "flower",
        "devices": args.devices,
        "per_round": args.per_round,
        "rounds": r,
        "round_secs": [round(s, 4) for s in round_secs],
        "steady_round_secs": round(steady, 4) if steady else None,
        "startup_secs": round(ROUND_TIMES[0] - t0, 4),
        "wall_secs": round(t2 - t0, 4),
        "accuracy": round(FINAL["accuracy"], 6),
        "loss": round(FINAL["loss"], 6),
        "concurrent_clients": int(args.num_cpus // args.cpus_per_client),
        "torch_threads_per_client": args.torch_threads,
        "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    # Imported as `flower_cnn` (not `__main__`) so that the Ray actors import the ClientApp by
    # reference and keep their data cache across rounds (see bench/flower/flower_sim.py).
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import flower_cnn  # noqa: E402  pylint: disable=import-self

    flower_cnn.main(sys.argv[1:])
