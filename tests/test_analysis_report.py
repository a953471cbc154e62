"""The analysis command end to end: CLI, CSV files, figures, index.html, two varied keys."""
import re
import subprocess
import sys

import pandas as pd
import pytest

from ffcv_bias.analysis import linear_effects, make_synthetic_runs, run_analysis
from ffcv_bias.analysis.__main__ import main

TAUS = [1.0, 0.5, 0.25, 0.08]
CSV_FILES = ["runs", "settings", "per_class", "welch", "table1", "oracle", "oracle_per_class",
             "selection", "paired", "table1_paired", "power", "skipped"]
FIGURES = ["accuracy_curves.png", "class_spread.png", "change_histogram.png"]


@pytest.fixture(scope="module")
def crop_runs(tmp_path_factory):
    """4 taus x 5 seeds, 12 named classes; two lose at strong crops; one run failed."""
    root = tmp_path_factory.mktemp("crop_runs")
    names = ["tench", "goldfish", "academic gown", "barbershop", "jigsaw puzzle", "ladle",
             "balloon", "pot", "mosque", "lifeboat", "tabby cat", "zebra"]
    effects = linear_effects(TAUS, 1.0, losing_classes=[2, 9], gaining_classes=range(3, 9),
                             max_loss=0.2, max_gain=0.06)
    records = make_synthetic_runs(root, TAUS, range(5), num_classes=12, n_per_class=100,
                                  effects=effects, class_names=names, with_logits=True, seed=2)
    failed = records["run_dirs"][-1]
    (failed / "summary.json").unlink()
    (failed / "error.txt").write_text("RuntimeError: NaN loss\n")
    return root


def test_cli_writes_every_table_figure_and_the_report(crop_runs, tmp_path):
    out = tmp_path / "report"
    # -X importtime lists every module the command imports (on stderr).
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ffcv_bias.analysis",
                             str(crop_runs), "--vary", "augment.min_scale", "--out", str(out)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, flags=re.M)
    assert "matplotlib" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "ffcv")]
    assert "19 complete run(s)" in result.stdout and "1 skipped (1 failed)" in result.stdout
    assert "academic gown" in result.stdout and "lifeboat" in result.stdout
    assert "Table 1" in result.stdout and f"report: {out / 'index.html'}" in result.stdout
    assert "lacks seed(s) 4" in result.stdout
    assert "cross-fitted" in result.stdout and "Table 1 (seed-paired" in result.stdout
    # tau 0.08 lost its seed-4 run: its seeds no longer match the reference's.
    assert ", welch (seeds unmatched))" in result.stdout

    for name in CSV_FILES:
        assert (out / f"{name}.csv").is_file(), name
    for name in FIGURES:
        assert (out / name).stat().st_size > 20_000, name
    per_class = pd.read_csv(out / "per_class.csv")
    assert list(per_class.columns) == ["setting", "class", "class_name", "n_runs", "mean_acc",
                                       "std_acc"]
    assert len(per_class) == 4 * 12 and "academic gown" in set(per_class["class_name"])
    welch = pd.read_csv(out / "welch.csv")
    assert {"setting", "class", "class_name", "n_ref", "n", "mean_ref", "mean", "t", "p_less",
            "q_less", "diff", "hedges_g"} <= set(welch.columns)
    strongest = welch[welch["setting"] == 0.08].nsmallest(2, "p_less")
    assert set(strongest["class_name"]) == {"academic gown", "lifeboat"}
    table1 = pd.read_csv(out / "table1.csv")
    assert list(table1.columns[:3]) == ["setting", "confidence", "percent_classes"]
    assert table1["confidence"].tolist() == [90, 95, 99] * 3
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 19 and {"run_id", "setting", "seed", "top1", "top5"} <= set(runs.columns)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["state"].tolist() == ["failed"]

    page = (out / "index.html").read_text()
    for name in FIGURES + ["Table 1", "Oracle", "optimistically biased", "price of fairness",
                           "Per-class choices gain between", "Table 1, seed-paired", "Seed planning",
                           "academic gown", "Skipped runs", "NaN loss", "<b>1</b> skipped"]:
        assert name in page, name


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--vary", "augment.min_scale",
                 "--out", str(tmp_path / "o")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: no run records") and stderr.count("\n") == 1

    make_synthetic_runs(tmp_path / "a", [1.0, 0.08], range(2), num_classes=4, n_per_class=10)
    make_synthetic_runs(tmp_path / "b", [1.0, 0.08], range(2), num_classes=5, n_per_class=10)
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--vary", "augment.min_scale",
                 "--out", str(tmp_path / "o")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: mixed datasets") and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_two_varied_keys_give_one_report_per_value(tmp_path):
    for weight_decay in (0.0, 5e-4):
        make_synthetic_runs(tmp_path / f"wd{weight_decay}", [1.0, 0.08], range(3), num_classes=5,
                            n_per_class=20, extra_config={"training.weight_decay": weight_decay},
                            seed=int(weight_decay * 1e4))
    out = tmp_path / "report"
    frames = run_analysis(tmp_path, ["augment.min_scale", "training.weight_decay"],
                          out_dir=out, make_plots=True)
    assert frames["table1"]["training.weight_decay"].tolist() == [0.0] * 3 + [5e-4] * 3
    for folder in ("training.weight_decay=0", "training.weight_decay=0.0005"):
        assert (out / folder / "index.html").is_file()
        assert (out / folder / "accuracy_curves.png").stat().st_size > 20_000
        assert len(pd.read_csv(out / folder / "runs.csv")) == 6
    combined = pd.read_csv(out / "table1.csv")
    assert combined.columns[0] == "training.weight_decay"
    top_page = (out / "index.html").read_text()
    assert "training.weight_decay=0.0005/index.html" in top_page
