"""Benchmark: the whole analysis at ImageNet-sweep scale, on real run records.

1. Records: RUNS complete run records (default 10,000 = 10 taus x 1,000 seeds) of 1,000
   classes x 50 val images (50,000 predictions each), written as the trainer writes them
   minus the weights and logits (1 TB at this scale): config.json, summary.json (top1,
   per_class_acc from the predictions), val_preds.npy (int16) and val_labels.npy (one
   labels file hard-linked into every run). Planted effects: 25 classes lose up to 20
   points, their lost images going to one other class; a third of the classes gain a
   little. Written once into --work (default /tmp/bench_analysis_<runs>x<classes>) and
   reused by later timings with the same parameters (about 1.2 GB at the default size).
2. Timing: `python -m ffcv_bias.analysis` on them in a child process, with every output
   (all CSVs, the confusion tables and flows from each run's predictions read one run at
   a time, figures unless --no-figures, index.html): wall time, CPU time (user + system:
   the figure to read on a shared machine) and peak resident memory (ru_maxrss of the
   child, via os.wait4), plus a cProfile of the same analysis in this process with
   --profile (where the time goes).
3. Optionally (--logit-runs N) N records without per_class_acc in summary.json and with
   float16 logits only (100 MB each), so the analysis streams their val_logits.npy.
Files are read from the page cache here (just written or read); a cold network file
system adds its read time (100 kB of predictions per run).

    .venv/bin/python bench/analysis.py [--runs 10000] [--classes 1000] [--n-per-class 50]
        [--work DIR] [--no-figures] [--profile] [--logit-runs 0]
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ffcv_bias.analysis import linear_effects, make_synthetic_runs
from ffcv_bias.analysis.records import accuracy_from_logits
from ffcv_bias.analysis.synthetic import make_prediction_runs

TAUS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.08]
# Written last into the records folder: the parameters of a finished, reusable set.
DONE_FILE = "bench_records.json"


def run_child(command):
    """(wall seconds, CPU seconds (user + system), peak RSS in MiB, stdout) of one child."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"analysis failed ({process.returncode}): {' '.join(command)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout


def analysis_args(runs_dir, out_dir, no_figures):
    args = [str(runs_dir), "--vary", "augment.min_scale", "--out", str(out_dir)]
    return args + (["--no-figures"] if no_figures else [])


def planted_effects(num_classes):
    losing = range(0, num_classes, 40)
    effects = linear_effects(TAUS, 1.0, losing_classes=losing,
                             gaining_classes=range(1, num_classes, 3), max_loss=0.2,
                             max_gain=0.03)
    absorbed_by = {c: (c + num_classes // 2) % num_classes for c in losing}
    return effects, absorbed_by


def ensure_records(runs_dir, args):
    """Write the records unless a finished set with these parameters is there."""
    wanted = {"runs": args.runs, "classes": args.classes, "n_per_class": args.n_per_class,
              "taus": TAUS, "format": 1}
    done = runs_dir / DONE_FILE
    if done.is_file() and json.loads(done.read_text()) == wanted:
        print(f"[records] reusing {args.runs} records in {runs_dir}")
        return
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # a partial or different set
    effects, absorbed_by = planted_effects(args.classes)
    start = time.perf_counter()
    make_prediction_runs(runs_dir, TAUS, range(args.runs // len(TAUS)),
                         num_classes=args.classes, n_per_class=args.n_per_class,
                         effects=effects, absorbed_by=absorbed_by, seed=0)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps(wanted))
    print(f"[records] wrote {args.runs} records ({args.classes} classes x "
          f"{args.classes * args.n_per_class} predictions each, {disk_gib(runs_dir):.2f} GiB "
          f"on disk, the hard-linked labels counted once) in {seconds:.1f} s")


def disk_gib(folder):
    inodes = {}
    for path in folder.rglob("*"):
        stat = path.stat()
        if path.is_file():
            inodes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(inodes.values()) / 2 ** 30


def bench_records(work, args):
    runs_dir = work / "runs"
    ensure_records(runs_dir, args)
    command = [sys.executable, "-m", "ffcv_bias.analysis",
               *analysis_args(runs_dir, work / "report", args.no_figures)]
    for attempt in range(1, args.repeat + 1):
        shutil.rmtree(work / "report", ignore_errors=True)  # list only this run's outputs
        wall, cpu, peak, stdout = run_child(command)
        print(f"[analysis] run {attempt}: {args.runs} runs x {args.classes} classes x "
              f"{args.classes * args.n_per_class} val images: {wall:.1f} s wall, {cpu:.1f} s "
              f"CPU, peak RSS {peak:.0f} MiB "
              f"({'no figures' if args.no_figures else 'with figures'}; load average "
              f"{os.getloadavg()[0]:.1f})")
    outputs = sorted(p.name for p in (work / "report").iterdir())
    print(f"[analysis] outputs: {', '.join(outputs)}")
    flows = [line for line in stdout.splitlines() if "went to" in line][:2]
    print("[analysis] first flows printed:\n" + "\n".join(flows))
    if args.profile:
        profile_analysis(runs_dir, work / "report_profiled", args.no_figures)


def profile_analysis(runs_dir, out_dir, no_figures):
    from ffcv_bias.analysis.__main__ import main as analysis_main
    profiler = cProfile.Profile()
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            profiler.runcall(analysis_main, analysis_args(runs_dir, out_dir, no_figures))
        finally:
            sys.stdout = stdout
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    print("[profile] cumulative time, top 25:\n" + text.getvalue())


def bench_logits(work, args):
    seeds = range(args.logit_runs // 2)
    start = time.perf_counter()
    records = make_synthetic_runs(work / "logit_runs", [1.0, 0.08], seeds,
                                  num_classes=args.classes, n_per_class=args.n_per_class,
                                  with_logits=True, per_class_in_summary=False, seed=1)
    written = time.perf_counter() - start
    wall, _, peak, _ = run_child([sys.executable, "-m", "ffcv_bias.analysis", *analysis_args(
        work / "logit_runs", work / "logit_report", args.no_figures)])
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
    print(f"[logits] analysis of {n} logits-only runs: {wall:.1f} s wall, peak RSS {peak:.0f} "
          f"MiB; accuracy from one run's logits: {per_run_s:.2f} s (median)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the records are kept for reuse (default "
                             "/tmp/bench_analysis_<runs>x<classes>)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the analysis in this process (cProfile)")
    parser.add_argument("--logit-runs", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="time the analysis this many times (later ones: warm cache)")
    args = parser.parse_args()
    if args.runs < len(TAUS) or args.classes < 2:
        parser.error(f"--runs must be >= {len(TAUS)} and --classes >= 2")
    work = args.work or Path(tempfile.gettempdir()) / f"bench_analysis_{args.runs}x{args.classes}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    bench_records(work, args)
    if args.logit_runs:
        bench_logits(work, args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
