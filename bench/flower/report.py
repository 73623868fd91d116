#!/usr/bin/env python3
"""Collect the runs of compare.sh into one side-by-side table and a JSON file.

Usage: python report.py RUNDIR JSON_OUT ROUNDS START CONFIG...   (CONFIG is N:FRACTION)

START is the Unix time at which compare.sh started: a row whose files are older comes
from an earlier run (e.g. Flower's results reused by --starling-only) and is marked so.

For every configuration and framework compare.sh leaves in RUNDIR:
  <fw>-<N>-<F>.measure.json  the output of measure.py (wall time, memory of the tree)
  <fw>-<N>-<F>.stdout        the program's stdout; its last line that parses as a JSON
                             object is the program's own result
  <fw>-<N>-<F>.stderr        its stderr (logs)
A missing or failed run is shown as such. Exits 1 if any requested run failed.
"""

import json
import os
import platform
import subprocess
import sys


def last_json(path: str) -> dict | None:
    """The last line of a file that parses as a JSON object (tolerant of log lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_mib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_mib = round(int(line.split()[1]) / 1024)
                    break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mib": mem_mib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_report": load,
    }


def versions() -> dict:
    out = {}
    for mod in ("flwr", "ray", "numpy", "sklearn", "psutil"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None)
        except Exception:  # pragma: no cover - report only
            out[mod] = None
    try:
        out["starling_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            check=False).stdout.strip() or None
    except OSError:
        out["starling_commit"] = None
    return out


def num(v, fmt: str) -> str:
    width = int(fmt.split(".")[0] or 0)
    return f"{'-':>{width}}" if v is None else format(v, fmt)


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    rundir, json_out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = float(sys.argv[4])
    configs = sys.argv[5:]
    rows = []
    failed = False
    for cfg in configs:
        n_s, f_s = cfg.split(":")
        n, frac = int(n_s), float(f_s)
        by_fw = {}
        for fw in ("flower", "starling"):
            stem = os.path.join(rundir, f"{fw}-{n}-{f_s}")
            meas = read_json(stem + ".measure.json")
            if meas is None and not os.path.exists(stem + ".stdout"):
                continue  # framework not run (e.g. --flower-only)
            res = last_json(stem + ".stdout") or {}
            row = {"devices": n, "fraction": frac, "framework": fw, "rounds": rounds}
            ok = bool(meas) and meas.get("exit_code") == 0 and bool(res) and "error" not in res
            notes = []
            if meas is not None and os.path.getmtime(stem + ".measure.json") < start:
                notes.append("from an earlier run")
                row["earlier_run"] = True
            if res.get("rounds") not in (None, rounds):
                notes.append(f"ran {res.get('rounds')} rounds, not {rounds}")
                ok = False
            if fw == "flower":
                acc, loss = res.get("accuracy"), res.get("loss")
                loop_rps = res.get("steady_rounds_per_sec")
                self_rss = None
            else:
                acc = res.get("final_accuracy", res.get("accuracy"))
                loss = res.get("final_loss", res.get("loss"))
                loop_rps = res.get("rounds_per_sec")
                self_rss = res.get("peak_rss_mib")
            if notes:
                row["note"] = "; ".join(notes)
            ok = ok and acc is not None
            wall = meas.get("wall_secs") if meas else None
            peak = None
            if meas:
                peak = max(meas.get("peak_rss_mib") or 0, meas.get("max_rss_single_mib") or 0)
            row.update({
                "ok": ok,
                "wall_secs": wall,
                "rounds_per_sec": round(rounds / wall, 4) if wall else None,
                "loop_rounds_per_sec": loop_rps,
                "peak_mib": peak,
                # A PSS sum whose samples missed the exact single-process peak is no peak.
                "peak_pss_mib": (meas.get("peak_pss_mib") if meas and (meas.get("peak_rss_mib")
                                 or 0) >= (meas.get("max_rss_single_mib") or 0) else None),
                "self_reported_peak_rss_mib": self_rss,
                "accuracy": acc,
                "loss": loss,
                "program_result": res or None,
                "measure": meas,
                "logs": stem + ".stderr",
            })
            if not ok:
                failed = True
            by_fw[fw] = row
        fl, st = by_fw.get("flower"), by_fw.get("starling")
        if fl and st and fl["ok"] and st["ok"]:
            if fl["rounds_per_sec"] and st["rounds_per_sec"]:
                st["speedup"] = round(st["rounds_per_sec"] / fl["rounds_per_sec"], 1)
            if fl["loop_rounds_per_sec"] and st["loop_rounds_per_sec"]:
                st["loop_speedup"] = round(st["loop_rounds_per_sec"] / fl["loop_rounds_per_sec"], 1)
            st["accuracy_delta"] = round(st["accuracy"] - fl["accuracy"], 4)
        rows.extend(by_fw.values())

    m = machine()
    v = versions()
    header = (f"{'N':>5} {'frac':>5} {'framework':<9} {'wall s':>8} {'rounds/s':>9} "
              f"{'loop r/s':>9} {'peak MiB':>9} {'PSS MiB':>8} {'accuracy':>8} "
              f"{'speed-up':>8} {'loop x':>7}")
    print()
    print(f"Starling vs Flower: softmax regression on digits, {rounds} rounds, 1 epoch, "
          f"batch 10, lr 0.1")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; "
          f"load avg {', '.join(f'{x:.2f}' for x in m['loadavg_at_report'] or [])}")
    print(f"versions: flwr {v['flwr']}, ray {v['ray']}, numpy {v['numpy']}, "
          f"scikit-learn {v['sklearn']}, starling {v['starling_commit']}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r["ok"]:
            print(f"{r['devices']:>5} {r['fraction']:>5.2f} {r['framework']:<9} "
                  f"FAILED - see {r['logs']}" + (f" ({r['note']})" if r.get("note") else ""))
            continue
        print(f"{r['devices']:>5} {r['fraction']:>5.2f} {r['framework']:<9} "
              f"{num(r['wall_secs'], '8.2f')} {num(r['rounds_per_sec'], '9.3f')} "
              f"{num(r['loop_rounds_per_sec'], '9.2f')} {num(r['peak_mib'], '9.1f')} "
              f"{num(r['peak_pss_mib'], '8.1f')} {num(r['accuracy'], '8.4f')} "
              f"{num(r.get('speedup'), '7.1f') + ('x' if r.get('speedup') else ' '):>8} "
              f"{num(r.get('loop_speedup'), '6.1f') + ('x' if r.get('loop_speedup') else ' '):>7}"
              + (f"  ({r['note']})" if r.get("note") else ""))
    print()
    print("wall s: whole process (interpreter/binary start to exit; Ray start-up and shut-down")
    print("  included for Flower). rounds/s = rounds / wall s. loop r/s: Flower = 1 / mean time")
    print("  per round after round 1 (excludes Ray start-up and actor creation); Starling = its")
    print("  own rounds_per_sec. peak MiB: max sampled sum of RSS over the process tree (every")
    print("  0.2 s) or the exact single-process peak, whichever is larger; PSS MiB: the same sum")
    print("  with shared pages divided among processes ('-' when the samples missed the peak).")
    print("  speed-up = Starling rounds/s / Flower rounds/s; loop x = the same with loop r/s.")

    doc = {
        "workload": {"dataset": "sklearn digits (train.csv/test.csv from prepare_digits.py)",
                     "model": "softmax regression 64x10", "rounds": rounds, "epochs": 1,
                     "batch_size": 10, "lr": 0.1, "partition": "iid", "seed": 1},
        "machine": m,
        "versions": v,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {json_out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
