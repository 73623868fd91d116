#!/usr/bin/env python3
"""Collect compare.sh's runs into the side-by-side tables, the targets, and a JSON file.

Usage: python report.py RUNDIR JSON_OUT TRAIN_SECONDS ROUNDS STARLING_BIN

Reads from RUNDIR:
  speed-starling-M-T.json          `starling bench train --json` ({"machine","train"})
  speed-pytorch-M-T.json           torch_speed.py, one trainer with T torch threads
  speed-pytorch-procs-M-T.json     torch_speed.py, T processes of 1 thread
  sim-flower.{stdout,measure.json} flower_cnn.py and measure.py
  sim-starling.{stdout,measure.json}, sim-starling-out/results.json   starling simulate
  load-start, load-after-speed, load-end                              /proc/loadavg
Exits 1 if a run that was asked for failed.
"""

import json
import os
import platform
import subprocess
import sys

# The targets of issue 11, item 4.
CNN_TARGET = 1.5   # CNN, batch 10, 1 thread: Starling / PyTorch examples/s
MLP_TARGET = 2.0   # 2NN (mlp), batch 10, 1 thread
SIM_TARGET = 2.0   # simulated CNN round: Flower + PyTorch time per round / Starling's


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_json(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def versions(starling_bin):
    out = {}
    for mod in ("torch", "flwr", "ray", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - report only
            out[mod] = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    out["starling_commit"] = (git + ("+dirty" if dirty else "")) or None
    out["starling_bin"] = starling_bin
    return out


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{format(v, spec):>{width}}"


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    rundir, json_out, train_secs, rounds, starling_bin = sys.argv[1:]
    rounds = int(rounds)
    failed = False
    m = machine()
    v = versions(starling_bin)
    loads = {k: read_text(os.path.join(rundir, k))
             for k in ("load-start", "load-after-speed", "load-end")}

    # --- training speed -----------------------------------------------------------------
    speed = []
    for model in ("mlp", "cnn"):
        for t in (1, 2):
            st = read_json(os.path.join(rundir, f"speed-starling-{model}-{t}.json"))
            pt = read_json(os.path.join(rundir, f"speed-pytorch-{model}-{t}.json"))
            pp = read_json(os.path.join(rundir, f"speed-pytorch-procs-{model}-{t}.json"))
            if st is None and pt is None:
                continue
            st = (st or {}).get("train") or {}
            row = {
                "model": model, "threads": t,
                "starling_examples_per_sec": st.get("examples_per_sec"),
                "starling_parameters": st.get("parameters"),
                "pytorch_examples_per_sec": (pt or {}).get("examples_per_sec"),
                "pytorch_parameters": (pt or {}).get("parameters"),
                "pytorch_procs_examples_per_sec": (pp or {}).get("examples_per_sec")
                if t > 1 else None,
            }
            row["ratio"] = ratio(row["starling_examples_per_sec"],
                                 row["pytorch_examples_per_sec"])
            row["ratio_vs_procs"] = ratio(row["starling_examples_per_sec"],
                                          row["pytorch_procs_examples_per_sec"])
            if row["starling_examples_per_sec"] is None or row["pytorch_examples_per_sec"] is None \
                    or (t > 1 and row["pytorch_procs_examples_per_sec"] is None):
                failed = True
            row["raw"] = {"starling": st or None, "pytorch": pt, "pytorch_procs": pp}
            speed.append(row)

    # --- simulated round ----------------------------------------------------------------
    sim = {}
    fl = last_json(os.path.join(rundir, "sim-flower.stdout"))
    flm = read_json(os.path.join(rundir, "sim-flower.measure.json"))
    if fl is not None or flm is not None:
        ok = bool(fl) and "error" not in fl and (flm or {}).get("exit_code") == 0
        failed |= not ok
        sim["flower"] = {
            "ok": ok,
            "round_secs": (fl or {}).get("round_secs"),
            "steady_round_secs": (fl or {}).get("steady_round_secs"),
            "accuracy": (fl or {}).get("accuracy"),
            "loss": (fl or {}).get("loss"),
            "process_wall_secs": (flm or {}).get("wall_secs"),
            "peak_pss_mib": (flm or {}).get("peak_pss_mib"),
            "program_result": fl, "measure": flm,
        }
    st = last_json(os.path.join(rundir, "sim-starling.stdout"))
    stm = read_json(os.path.join(rundir, "sim-starling.measure.json"))
    res = read_json(os.path.join(rundir, "sim-starling-out", "results.json"))
    if st is not None or stm is not None:
        walls = None
        if isinstance(res, dict):
            walls = [r.get("wall_secs") for r in res.get("rounds", [])]
        ok = bool(st) and (stm or {}).get("exit_code") == 0 and bool(walls) \
            and len(walls) == rounds
        failed |= not ok
        round_secs = steady = None
        if ok:
            round_secs = [round(walls[0], 4)] + [round(b - a, 4) for a, b in zip(walls, walls[1:])]
            steady = round((walls[-1] - walls[0]) / (rounds - 1), 4)
        sim["starling"] = {
            "ok": ok,
            "round_secs": round_secs,
            "steady_round_secs": steady,
            "accuracy": (st or {}).get("final_accuracy"),
            "loss": (st or {}).get("final_loss"),
            "process_wall_secs": (stm or {}).get("wall_secs"),
            "peak_pss_mib": (stm or {}).get("peak_pss_mib"),
            "cores_busy": (st or {}).get("cores_busy"),
            "program_result": st, "measure": stm,
        }
    sim_ratio = None
    if sim.get("flower", {}).get("ok") and sim.get("starling", {}).get("ok"):
        sim_ratio = ratio(sim["flower"]["steady_round_secs"], sim["starling"]["steady_round_secs"])

    # --- targets ------------------------------------------------------------------------
    def speed_ratio(model):
        return next((r["ratio"] for r in speed if r["model"] == model and r["threads"] == 1), None)

    targets = []
    for name, got, want in (
        ("CNN, batch 10, 1 thread: Starling / PyTorch examples/s", speed_ratio("cnn"), CNN_TARGET),
        ("2NN, batch 10, 1 thread: Starling / PyTorch examples/s", speed_ratio("mlp"), MLP_TARGET),
        ("simulated CNN round: Flower+PyTorch / Starling time per round", sim_ratio, SIM_TARGET),
    ):
        targets.append({"target": name, "at_least": want, "got": got,
                        "met": None if got is None else got >= want})

    # --- print --------------------------------------------------------------------------
    print()
    print("Starling vs PyTorch and Flower + PyTorch, one run on one machine")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
          f"Linux {m['kernel']}, Python {m['python']}")
    print(f"versions: torch {v['torch']}, flwr {v['flwr']}, ray {v['ray']}, "
          f"starling {v['starling_commit']}")
    print(f"load average (1, 5, 15 min): start {loads['load-start']}; after the speed runs "
          f"{loads['load-after-speed']}; end {loads['load-end']}")
    if speed:
        print()
        print(f"Training speed, batch 10, SGD lr 0.05, random MNIST-shaped data, "
              f"{train_secs} s each (examples/s)")
        h = (f"{'model':<5} {'params (S / PT)':>19} {'threads':>7} {'starling':>9} "
             f"{'pytorch':>9} {'S / PT':>7} {'PT procs':>9} {'S / PTp':>8}")
        print(h)
        print("-" * len(h))
        for r in speed:
            params = f"{r['starling_parameters'] or '-'} / {r['pytorch_parameters'] or '-'}"
            print(f"{r['model']:<5} {params:>19} {r['threads']:>7} "
                  f"{fmt(r['starling_examples_per_sec'], '.0f', 9)} "
                  f"{fmt(r['pytorch_examples_per_sec'], '.0f', 9)} "
                  f"{fmt(r['ratio'], '.2f', 6)}x "
                  f"{fmt(r['pytorch_procs_examples_per_sec'], '.0f', 9)} "
                  f"{fmt(r['ratio_vs_procs'], '.2f', 7)}{'x' if r['ratio_vs_procs'] else ' '}")
        print("starling: T independent trainers, one per thread, total; pytorch: one trainer,")
        print("  torch.set_num_threads(T); PT procs: T PyTorch processes of 1 thread, total.")
    if sim:
        print()
        print(f"Simulated CNN round: MNIST, 10 of 100 devices x 600 images (IID), E = 1, "
              f"B = 10, lr 0.05, {rounds} rounds")
        h = (f"{'framework':<16} {'round 1 s':>9} {'s/round':>8} {'process s':>9} "
             f"{'PSS MiB':>8} {'accuracy':>8} {'speed-up':>8}")
        print(h)
        print("-" * len(h))
        for fw, label in (("flower", "flower+pytorch"), ("starling", "starling")):
            r = sim.get(fw)
            if r is None:
                continue
            if not r["ok"]:
                print(f"{label:<16} FAILED - see {rundir}/sim-{fw}.stderr")
                continue
            up = f"{sim_ratio:.2f}x" if fw == "starling" and sim_ratio else ""
            print(f"{label:<16} {fmt(r['round_secs'][0], '.2f', 9)} "
                  f"{fmt(r['steady_round_secs'], '.3f', 8)} "
                  f"{fmt(r['process_wall_secs'], '.2f', 9)} {fmt(r['peak_pss_mib'], '.0f', 8)} "
                  f"{fmt(r['accuracy'], '.4f', 8)} {up:>8}")
        if sim.get("starling", {}).get("cores_busy") is not None:
            print(f"starling simulate kept {sim['starling']['cores_busy']:.2f} cores busy on "
                  f"average (its own cores_busy: CPU s / wall s of the rounds)")
        print("s/round: mean wall time of rounds 2..R (round 1 carries Ray's actor start-up);")
        print("  process s: the whole process, start-up, data loading and final evaluation")
        print("  included; accuracy: on the 10,000 test images after the last round.")
    print()
    print("Targets (issue 11, item 4):")
    for t in targets:
        verdict = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        got = "-" if t["got"] is None else f"{t['got']:.2f}x"
        print(f"  {t['target']}: {got} (target >= {t['at_least']}x): {verdict}")

    doc = {"machine": m, "versions": v, "loadavg": loads, "train_seconds": float(train_secs),
           "rounds": rounds, "speed": speed, "simulation": sim,
           "simulation_speedup": sim_ratio, "targets": targets}
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {json_out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
