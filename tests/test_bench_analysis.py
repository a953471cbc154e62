"""Smoke test of bench/analysis.py in a tiny mode: it writes real run records with
predictions, analyses them with every output (confusion flows included), reuses the
records on a second call, and prints its figures. Nothing about speed is asserted."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from ffcv_bias.record import runs

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "analysis.py"
TIMING = re.compile(r"^\[analysis\] run 1: 20 runs x 40 classes x 200 val images: "
                    r"[0-9.]+ s wall, [0-9.]+ s CPU, peak RSS [0-9]+ MiB", re.M)


def run_bench(work, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--runs", "20", "--classes", "40",
                           "--n-per-class", "5", "--no-figures", "--work", str(work), *extra],
                          capture_output=True, text=True, timeout=600)


def test_tiny_bench_writes_records_then_reuses_them(tmp_path):
    first = run_bench(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[records] wrote 20 records (40 classes x 200 predictions each" in first.stdout
    assert TIMING.search(first.stdout), first.stdout
    outputs = re.search(r"^\[analysis\] outputs: (.*)$", first.stdout, re.M).group(1)
    assert {"confusion.csv", "confusion_flows.csv", "welch.csv", "index.html"} <= set(
        outputs.split(", "))
    assert "went to" in first.stdout   # the planted losers' flows are printed
    run_dirs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    assert len(run_dirs) == 20
    predictions = np.load(run_dirs[0] / runs.VAL_PREDS_FILE)
    assert predictions.dtype == np.int16 and predictions.shape == (200,)
    assert not (run_dirs[0] / runs.VAL_LOGITS_FILE).exists()
    # One labels file, hard-linked into every run.
    inodes = {(d / runs.VAL_LABELS_FILE).stat().st_ino for d in run_dirs}
    assert len(inodes) == 1

    second = run_bench(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[records] reusing 20 records" in second.stdout
    assert TIMING.search(second.stdout)
