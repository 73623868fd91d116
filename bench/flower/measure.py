#!/usr/bin/env python3
"""Run one command and measure its wall time and the peak memory of its whole process tree.

Usage: python measure.py [--interval 0.2] [--stdout FILE] [--stderr FILE] -- CMD ARGS...

Prints one JSON object on its own stdout:
  wall_secs         wall time from spawn to the exit of CMD
  tail_secs         time after that until the last descendant exited (e.g. Ray daemons
                    shutting down; sampled too; any still alive after 15 s are killed)
  peak_rss_mib      max over samples of the SUM of RSS over CMD and all its descendants
                    (psutil, every --interval seconds after a faster first second). Shared pages (Ray's plasma store
                    in /dev/shm, shared libraries) are counted once per process that maps
                    them, so this over-counts a multi-process tree.
  peak_pss_mib      the same with PSS (proportional set size: shared pages divided among
                    the processes that share them) - the fairer sum for a process tree.
  max_rss_single_mib  ru_maxrss of the children that were waited for (getrusage
                    RUSAGE_CHILDREN): the exact peak of the largest single process, so
                    a short single-process run that ends between two samples is still
                    measured exactly.
  max_processes     the largest number of processes seen in the tree at once.
  exit_code         CMD's exit code.
The reported peak memory used by compare.sh is max(peak_rss_mib, max_rss_single_mib).

Descendants that re-parent to init (double fork) are still followed: every process seen
once in the tree is sampled until it exits.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import psutil

MIB = 1024.0 * 1024.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--stdout", default=None)
    p.add_argument("--stderr", default=None)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        sys.exit("measure.py: no command")

    out = open(a.stdout, "wb") if a.stdout else None
    err = open(a.stderr, "wb") if a.stderr else None
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=out, stderr=err)
    root = psutil.Process(child.pid)
    seen: dict[int, psutil.Process] = {child.pid: root}
    peak_rss = peak_pss = 0
    max_procs = 0

    def sample() -> None:
        nonlocal peak_rss, peak_pss, max_procs
        try:
            for c in root.children(recursive=True):
                seen.setdefault(c.pid, c)
        except psutil.Error:
            pass
        rss = pss = 0
        alive = 0
        for pid, proc in list(seen.items()):
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                try:
                    fi = proc.memory_full_info()
                    rss += fi.rss
                    pss += getattr(fi, "pss", fi.rss)
                except psutil.AccessDenied:
                    m = proc.memory_info()
                    rss += m.rss
                    pss += m.rss
                alive += 1
            except psutil.Error:
                seen.pop(pid, None)
        peak_rss = max(peak_rss, rss)
        peak_pss = max(peak_pss, pss)
        max_procs = max(max_procs, alive)

    # Sample at once, then every 10 ms doubling up to --interval (so a run of a few tens of
    # milliseconds is still sampled), and wake up as soon as CMD exits (so the wall time is
    # not rounded up to the interval).
    wait = min(0.01, a.interval)
    while True:
        sample()
        try:
            child.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            wait = min(wait * 2, a.interval)
    code = child.returncode
    t_exit = time.perf_counter()
    # Descendants still alive (e.g. Ray daemons finishing their shut-down) are part of the
    # run: wait for them a little, sampling, then end the ones that remain.
    deadline = time.perf_counter() + 15.0
    while time.perf_counter() < deadline:
        live = [pr for pid, pr in seen.items() if pid != child.pid and pr.is_running()
                and pr.status() != psutil.STATUS_ZOMBIE]
        if not live:
            break
        sample()
        time.sleep(a.interval)
    t1 = time.perf_counter()
    leftover = 0
    for pid, pr in seen.items():
        if pid == child.pid:
            continue
        try:
            if pr.is_running() and pr.status() != psutil.STATUS_ZOMBIE:
                leftover += 1
                pr.kill()
        except psutil.Error:
            pass
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall_secs": round(t_exit - t0, 4),
        "tail_secs": round(t1 - t_exit, 4),
        "peak_rss_mib": round(peak_rss / MIB, 1),
        "peak_pss_mib": round(peak_pss / MIB, 1),
        "max_rss_single_mib": round(ru.ru_maxrss / 1024.0, 1),  # ru_maxrss is in KiB
        "max_processes": max_procs,
        "leftover_killed": leftover,
        "exit_code": code,
        "cpu_user_secs": round(ru.ru_utime, 2),
        "cpu_sys_secs": round(ru.ru_stime, 2),
        "interval_secs": a.interval,
    }))


if __name__ == "__main__":
    main()
