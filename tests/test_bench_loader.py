"""Smoke test of bench/loader.py in a tiny mode: it runs end to end and reports all four
pipelines. It asserts nothing about speed (that is what the benchmark is for)."""
import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "loader.py"
# "(a) label   median img/s   best img/s   vs (d)   img/CPU-s   warm-up s"
ROW = re.compile(r"^\(([abcd])\) .*?\s([0-9]+\.[0-9]) +[0-9]+\.[0-9] +[0-9]+\.[0-9]{2} +"
                 r"[0-9]+\.[0-9] +[0-9]+\.[0-9]$")


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_run_prints_all_four_figures(tmp_path):
    json_path = tmp_path / "figures.json"
    result = run_bench("--images", "40", "--classes", "4", "--batch-size", "16",
                       "--resolution", "32", "--epochs", "1", "--workers", "2",
                       "--workdir", str(tmp_path / "data"), "--json", str(json_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {match.group(1): match.group(2)
            for match in map(ROW.match, result.stdout.splitlines()) if match}
    assert sorted(rows) == ["a", "b", "c", "d"], result.stdout
    assert all(float(rate) > 0 for rate in rows.values())
    assert re.search(r"^\(a\)/\(c\) .* = [0-9.]+ +\(goal >= 3", result.stdout, re.M)
    assert re.search(r"^\(a\)/\(b\) .* = [0-9.]+ +\(goal >= 0.9", result.stdout, re.M)
    assert "machine: " in result.stdout and "command: python bench/loader.py" in result.stdout
    figures = json.loads(json_path.read_text())
    assert figures["settings"]["images"] == 40
    # The medians in the JSON are the ones printed in the table.
    assert {name: f"{rate:.1f}" for name, rate in
            figures["images_per_second_median"].items()} == rows
    # The train pipelines drop the last partial batch (2 x 16 of 40); (d) decodes all 40.
    assert figures["images_per_epoch"] == {"a": 32, "b": 32, "c": 32, "d": 40}
    # The data was really written: 40 JPEG files in 4 class folders, and a beton.
    assert len(list((tmp_path / "data" / "imagefolder").glob("class_*/*.jpg"))) == 40
    assert (tmp_path / "data" / "bench.beton").is_file()


def test_bad_arguments_fail_with_one_line():
    result = run_bench("--images", "8", "--batch-size", "16", timeout=120)
    assert result.returncode != 0
    assert "--images (8) must be >= --batch-size (16)" in result.stderr
    assert "Traceback" not in result.stderr
