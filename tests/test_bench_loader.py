"""Smoke test of bench/loader.py in a tiny mode: it runs end to end over a 2x2 grid of cells
and reports every pipeline, ratio and goal. It asserts nothing about speed (that is what the
benchmark is for)."""
import json
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "loader.py"
# "res tau | (a) (a') (b) (c) (d) | a'/a a'/b a'/c a'/d | wall a'/b | MAE same"
ROW = re.compile(r"^ +(\d+) +([0-9.]+) \| +" + r" +".join([r"(\d+)"] * 5) + r" \| +"
                 + r" +".join([r"([0-9]+\.[0-9]{2})"] * 4) + r" \| +([0-9]+\.[0-9]{2}) \| +"
                 r"([0-9]+\.[0-9]{2}) +(\d+)%$")


def run_bench(python, *args, timeout=600):
    """`python bench/loader.py ARGS` (`python`: conftest's warm python, imports paid)."""
    return subprocess.run([*python, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_run_prints_every_cell_ratio_and_goal(tmp_path, warm_python):
    json_path = tmp_path / "figures.json"
    result = run_bench(warm_python, "--images", "32", "--classes", "4", "--batch-size", "16",
                       "--resolutions", "160,24", "--taus", "1.0,0.08", "--max-sides", "96",
                       "--epochs", "1", "--workers", "2", "--workdir", str(tmp_path / "data"),
                       "--json", str(json_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [match.groups() for match in map(ROW.match, result.stdout.splitlines()) if match]
    assert [(res, tau) for res, tau, *_ in rows] == [("160", "1"), ("160", "0.08"),
                                                     ("24", "1"), ("24", "0.08")], result.stdout
    figures = json.loads(json_path.read_text())
    medians = figures["images_per_cpu_second_median"]
    for res, tau, exact, fast, ffcv, torch_rate, decode, *ratios, wall, mae, same in rows:
        key = f"96/{res}/{tau}"
        # The table prints the JSON's medians, and its ratios are their ratios.
        assert int(exact) == round(medians[f"{key}/a"]) and int(fast) == round(medians[f"{key}/af"])
        assert abs(float(ratios[1]) - medians[f"{key}/af"] / medians[f"{key}/b"]) < 0.006
        assert int(decode) == round(medians["96/-/-/d"])
        assert 0 <= int(same) <= 100 and float(mae) >= 0
        if res == "160":  # every crop of a <= 96 px image is under 2x 160 px: scale 1
            assert (float(mae), int(same)) == (0.0, 100)
    # Goal lines at 160 px for both taus, the (d) goal at tau 1 only.
    goals = [line for line in result.stdout.splitlines() if line.startswith("  160 px, tau")]
    assert len(goals) == 2 and all("(a')/(b) = " in line and "(a')/(c) = " in line
                                   for line in goals)
    assert "(a')/(d)" in goals[0] and "(a')/(d)" not in goals[1]
    assert "fast decoder: active, fallbacks none" in result.stdout
    assert "command: python bench/loader.py" in result.stdout and "machine: " in result.stdout
    # Train loaders drop the last partial batch (2 x 16 of 32: none here); (d) decodes all.
    assert figures["images_per_epoch"]["96/24/0.08/a"] == 32
    assert figures["images_per_epoch"]["96/-/-/d"] == 32
    assert len(list((tmp_path / "data" / "side96" / "imagefolder").glob("class_*/*.jpg"))) == 32


def test_bad_arguments_fail_with_one_line(warm_python):
    result = run_bench(warm_python, "--images", "8", "--batch-size", "16", timeout=120)
    assert result.returncode != 0
    assert "--images (8) must be >= --batch-size (16)" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_bench(warm_python, "--taus", "0,1", timeout=120)
    assert result.returncode != 0 and "out of range: '0,1'" in result.stderr
    assert "Traceback" not in result.stderr


def test_decode_mechanism_bench_prints_three_mechanisms_per_crop(warm_python):
    script = SCRIPT.parent / "decode_mechanism.py"
    result = subprocess.run([*warm_python, str(script), "--images", "2", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^ +\d+x\d+ \(([0-9.]+)\) +1/(\d) +([0-9.]+) +([0-9.]+) +([0-9.]+)$",
                      result.stdout, re.M)
    assert [(area, scale) for area, scale, *_ in rows] == [("1", "2"), ("0.35", "1"),
                                                           ("0.08", "1")], result.stdout
    assert all(float(value) > 0 for row in rows for value in row[2:])
