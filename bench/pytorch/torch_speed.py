#!/usr/bin/env python3
"""PyTorch's side of `starling bench train`: examples/s of the 2NN or the CNN at a batch size.

Usage: python torch_speed.py --model cnn [--batch 10 --threads 1 --procs 1 --seconds 5
                                          --lr 0.05]

The loop is the bare optimiser step, as Starling's: take the next batch of 10 from 1,000
random MNIST-shaped examples (pixels uniform in [0, 1), labels uniform over 10 classes),
forward, softmax cross-entropy (mean over the batch), backward, plain SGD step (lr 0.05,
no momentum, no weight decay), on the CPU in float32. After a warm-up of 20 steps it runs
for --seconds and counts examples.

--threads T is torch.set_num_threads(T): one trainer whose operators use T threads (how
PyTorch uses T cores for one model). --procs P runs P such trainers at once in separate
processes (each with its own T threads), started together, and reports their total: that
is the layout Starling uses with T cores (one independent trainer per core).

Prints one JSON object: {"framework":"pytorch","model","parameters","batch","threads",
"procs","examples_per_sec","per_proc":[...],"secs","steps","torch":version}.
"""

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def trainer(args, rank, barrier, out):
    import torch
    import torch.nn.functional as F

    import models

    torch.set_num_threads(args.threads)
    net = models.build(args.model, seed=rank)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)
    n = max(1000, args.batch)
    x = torch.rand((n, *models.input_shape(args.model)), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    starts = list(range(0, n - args.batch + 1, args.batch))

    def step(i):
        s = starts[i % len(starts)]
        xb, yb = x[s : s + args.batch], y[s : s + args.batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()

    for i in range(20):
        step(i)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    steps = 0
    budget = args.seconds
    while time.perf_counter() - t0 < budget:
        for _ in range(10):
            step(steps)
            steps += 1
    secs = time.perf_counter() - t0
    res = {"steps": steps, "secs": secs, "parameters": models.count(net),
           "torch": torch.__version__, "num_threads": torch.get_num_threads()}
    if out is None:
        return res
    out.put((rank, res))
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], required=True)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    if args.procs == 1:
        runs = [trainer(args, 0, None, None)]
    else:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(args.procs), ctx.Queue()
        procs = [ctx.Process(target=trainer, args=(args, r, barrier, out))
                 for r in range(args.procs)]
        for pr in procs:
            pr.start()
        runs = [r for _, r in sorted(out.get() for _ in procs)]
        for pr in procs:
            pr.join()
    steps = sum(r["steps"] for r in runs)
    secs = max(r["secs"] for r in runs)
    print(json.dumps({
        "framework": "pytorch",
        "model": args.model,
        "parameters": runs[0]["parameters"],
        "batch": args.batch,
        "threads": args.threads,
        "procs": args.procs,
        "learning_rate": args.lr,
        "steps": steps,
        "secs": round(secs, 4),
        "examples_per_sec": round(steps * args.batch / secs, 2),
        "per_proc": [round(r["steps"] * args.batch / r["secs"], 2) for r in runs],
        "torch_num_threads": runs[0]["num_threads"],
        "torch": runs[0]["torch"],
    }), flush=True)


if __name__ == "__main__":
    main()
