"""Benchmark: the analysis command at ImageNet scale (1,000 classes, 50 val images each).

1. 1,000 complete runs with per-class accuracy in summary.json (the normal case):
   write them, then time `python -m ffcv_bias.analysis` on them in a child process.
2. A few runs whose summaries lack per_class_acc, so the analysis streams their
   val_logits.npy (float16 [50000, 1000], 100 MB each) one at a time: time it, measure the
   per-run cost, and extrapolate to 1,000 such runs.
Wall time and peak resident memory (ru_maxrss of the child, via os.wait4) are printed.
Logits are read from the page cache here (just written); a cold network file system adds
its read time (100 MB per run).

    .venv/bin/python bench/analysis.py [--runs 1000] [--classes 1000] [--n-per-class 50]
                                       [--logit-runs 20] [--no-figures]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ffcv_bias.analysis import linear_effects, make_synthetic_runs
from ffcv_bias.analysis.records import accuracy_from_logits


def run_child(command):
    """(wall seconds, peak RSS in MiB, stdout) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"analysis failed ({process.returncode}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024, stdout


def analysis_command(runs_dir, out_dir, no_figures):
    command = [sys.executable, "-m", "ffcv_bias.analysis", str(runs_dir),
               "--vary", "augment.min_scale", "--out", str(out_dir)]
    return command + (["--no-figures"] if no_figures else [])


def bench_summaries(work, args):
    taus = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.08]
    seeds = range(args.runs // len(taus))
    effects = linear_effects(taus, 1.0, losing_classes=range(0, 1000, 40),
                             gaining_classes=range(1, 1000, 3), max_loss=0.2, max_gain=0.03)
    start = time.perf_counter()
    make_synthetic_runs(work / "runs", taus, seeds, num_classes=args.classes,
                        n_per_class=args.n_per_class, effects=effects, seed=0)
    written = time.perf_counter() - start
    wall, peak, _ = run_child(analysis_command(work / "runs", work / "report", args.no_figures))
    print(f"[summaries] wrote {len(taus) * len(seeds)} run records in {written:.1f} s")
    print(f"[summaries] analysis of {len(taus) * len(seeds)} runs x {args.classes} classes: "
          f"{wall:.1f} s wall, peak RSS {peak:.0f} MiB")


def bench_logits(work, args):
    seeds = range(args.logit_runs // 2)
    start = time.perf_counter()
    records = make_synthetic_runs(work / "logit_runs", [1.0, 0.08], seeds,
                                  num_classes=args.classes, n_per_class=args.n_per_class,
                                  with_logits=True, per_class_in_summary=False, seed=1)
    written = time.perf_counter() - start
    wall, peak, _ = run_child(analysis_command(work / "logit_runs", work / "logit_report",
                                               args.no_figures))
    per_run = []
    for run_dir in records["run_dirs"]:
        start = time.perf_counter()
        accuracy_from_logits(run_dir)
        per_run.append(time.perf_counter() - start)
    per_run_s = float(np.median(per_run))
    n = len(records["run_dirs"])
    size_mb = (records["run_dirs"][0] / "val_logits.npy").stat().st_size / 2 ** 20
    print(f"[logits] wrote {n} logits-only records ({size_mb:.0f} MB of logits each) in "
          f"{written:.1f} s")
    print(f"[logits] analysis of {n} logits-only runs: {wall:.1f} s wall, peak RSS {peak:.0f} MiB;"
          f" streaming one run: {per_run_s:.2f} s (median)")
    print(f"[logits] extrapolated to 1000 logits-only runs: ~{wall + (1000 - n) * per_run_s:.0f} s"
          f" wall (page cache warm), memory unchanged (one run in memory at a time)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--logit-runs", type=int, default=20)
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        bench_summaries(Path(tmp), args)
        if args.logit_runs:
            bench_logits(Path(tmp), args)


if __name__ == "__main__":
    main()
