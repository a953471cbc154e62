"""Statistics under ImageNet's conditions (issue 29): 50 val images per class (accuracy in
steps of 2 points) and pilots of 2-5 seeds. Each test drives `python -m ffcv_bias.analysis`
(its main, in-process) on records written in the record format, and failed on the code
before the issue: tied arms got p = 0, a moved data folder counted a run twice, unequal
seeds switched the cross-fit off, an empty class scored 0, the oracle's "how much is
real" missed a planted gain, Table 1 claimed a nominal null rate, and the null
calibration did not exist. The simulation-scale checks (thousands of sweeps) are in
bench/stats_null.py; their figures in docs/statistics.md.
"""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ffcv_bias.analysis import calibration, make_synthetic_runs, paired, stats
from ffcv_bias.analysis.__main__ import main
from ffcv_bias.analysis.synthetic import linear_effects, setting_data, simulate_accuracy

VARY = "augment.min_scale"


def analyse(capsys, runs, out, *extra):
    code = main([str(runs), "--vary", VARY, "--out", str(out), "--no-figures", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def _set_class_accuracy(run_dir, class_index, value):
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["per_class_acc"][class_index] = value
    path.write_text(json.dumps(summary))


def _setting_of(run_dir):
    return json.loads((run_dir / "config.json").read_text())["augment"]["min_scale"]


# ----------------------------------------------------------------------------------------
# 1. Tied arms
# ----------------------------------------------------------------------------------------

def test_tied_arms_get_the_exact_randomization_p_not_zero(tmp_path, capsys):
    """Reference 50/50 in both seeds, setting 49/50 in both: the old code gave p = 0 and
    q = 0 (Welch and paired); the exact randomization p is 1/6 (Welch, C(4, 2)
    assignments) and 1/4 (paired, 2^2 sign patterns)."""
    records = make_synthetic_runs(tmp_path / "runs", [1.0, 0.3], range(2), num_classes=6,
                                  n_per_class=50, seed=4)
    for run_dir in records["run_dirs"]:
        _set_class_accuracy(run_dir, 0, 1.0 if _setting_of(run_dir) == 1.0 else 0.98)
    out, _ = analyse(capsys, tmp_path / "runs", tmp_path / "out")
    welch = pd.read_csv(tmp_path / "out" / "welch.csv")
    pairs = pd.read_csv(tmp_path / "out" / "paired.csv")
    assert welch.loc[welch["class"] == 0, "p_less"].item() == pytest.approx(1 / 6)
    assert pairs.loc[pairs["class"] == 0, "p_less"].item() == pytest.approx(1 / 4)
    for table in (welch, pairs):
        assert (table["p_less"] > 0).all() and (table["q_less"] > 0).all()
        assert table.loc[table["class"] == 0, "degenerate"].item() == "constant"
    assert "q=0 " not in out


def test_equal_seed_differences_in_floating_point_are_ties():
    """0.98 - 1.00 and 0.50 - 0.52 differ in their last bits: not a variance of 1e-34."""
    setting = np.array([[0.98, 0.50], [0.50, 0.30]]).T       # [2 seeds, 2 classes]
    reference = np.array([[1.00, 0.52], [0.52, 0.32]]).T
    result = paired.paired_less(setting, reference)
    assert list(result["degenerate"]) == ["constant", "constant"]
    assert result["p_less"] == pytest.approx([0.25, 0.25])
    # 1,000 tied seeds per arm: 1 / C(2000, 1000) underflows; the p stays above 0.
    many = np.full((1000, 1), 0.98)
    assert 0 < stats.welch_less(many, many + 0.02)["p_less"][0] < 1e-300
    assert 0 < paired.paired_less(many, many + 0.02)["p_less"][0] < 1e-300


# ----------------------------------------------------------------------------------------
# 2. One run_id in two folders, one of them with a stale beton path
# ----------------------------------------------------------------------------------------

def test_a_moved_data_folder_does_not_count_a_run_twice(tmp_path, capsys):
    records = make_synthetic_runs(tmp_path / "a", [1.0, 0.3], range(3), num_classes=5,
                                  n_per_class=20, seed=1)
    copy = tmp_path / "b" / records["run_dirs"][0].name
    shutil.copytree(records["run_dirs"][0], copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["val_dataset"] = "/moved/away/val.beton"      # no sidecar there
    (copy / "config.json").write_text(json.dumps(config))
    out, _ = analyse(capsys, tmp_path, tmp_path / "out")
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs) == 6 and runs["run_id"].is_unique
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["state"].tolist() == ["duplicate"]
    table = pd.read_csv(tmp_path / "out" / "table1_paired.csv")
    assert set(table["test"]) == {paired.PAIRED}        # seeds still match: no fallback


# ----------------------------------------------------------------------------------------
# 3-5. The cross-fit with unequal or disjoint seeds, empty classes, the interval
# ----------------------------------------------------------------------------------------

def _planted_gain_records(out, reference_seeds, other_seeds, seed=5):
    """Three settings; classes 0-4 gain 12 points at 0.5, classes 5-9 at 0.3: a real
    per-class oracle gain of about 6 points over any single setting."""
    effects = {c: {0.5: 0.12} for c in range(5)}
    effects.update({c: {0.3: 0.12} for c in range(5, 10)})
    make_synthetic_runs(out, [1.0], reference_seeds, num_classes=10, n_per_class=200,
                        effects=effects, seed=seed, noise_std=0.01)
    make_synthetic_runs(out, [0.5, 0.3], other_seeds, num_classes=10, n_per_class=200,
                        effects=effects, seed=seed + 1, noise_std=0.01)


@pytest.mark.parametrize("reference_seeds, other_seeds", [
    (range(10), range(4)),          # unequal: folds of the union (0-4 / 5-9) lost the others
    (range(5), range(5, 10)),       # disjoint: "needs at least 2 seeds per setting"
])
def test_crossfit_uses_every_setting_with_enough_seeds(tmp_path, capsys, reference_seeds,
                                                        other_seeds):
    _planted_gain_records(tmp_path / "runs", reference_seeds, other_seeds)
    _, err = analyse(capsys, tmp_path / "runs", tmp_path / "out")
    oracle = pd.read_csv(tmp_path / "out" / "oracle.csv").iloc[0]
    assert oracle["crossfit_folds"] == 2
    assert oracle["oracle_gain_crossfit"] > 0.03
    assert pd.isna(oracle["crossfit_settings_left_out"]) or not oracle["crossfit_settings_left_out"]
    selection = pd.read_csv(tmp_path / "out" / "selection.csv")
    assert selection["cost_top1_crossfit"].notna().all()
    assert "left out of the cross-fit" not in err


def test_a_setting_with_one_seed_is_named_as_left_out(tmp_path, capsys):
    _planted_gain_records(tmp_path / "runs", range(4), [0])
    _, err = analyse(capsys, tmp_path / "runs", tmp_path / "out")
    oracle = pd.read_csv(tmp_path / "out" / "oracle.csv").iloc[0]
    assert "left out of the cross-fit" in oracle["crossfit_settings_left_out"]
    assert "left out of the cross-fit" in oracle["how_much_is_real"]
    assert "left out of the cross-fit" in err and "0.5" in err


def test_an_empty_class_is_not_scored_zero_by_the_crossfit(tmp_path, capsys):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.3], range(4), num_classes=4,
                        n_per_class=[20, 20, 0, 20], seed=2)
    with np.errstate(invalid="ignore"):
        analyse(capsys, tmp_path / "runs", tmp_path / "out")
    selection = pd.read_csv(tmp_path / "out" / "selection.csv")
    assert (selection["worst_class_acc_crossfit"] > 0.3).all()
    assert "syn_002" in pd.read_csv(tmp_path / "out" / "oracle.csv")["excluded_classes"][0]


def test_the_oracle_gain_interval_holds_a_planted_gain(tmp_path, capsys):
    """The old sentence reported the cross-fit alone (biased low); the interval runs from
    it to the in-sample gain and must hold the planted truth."""
    _planted_gain_records(tmp_path / "runs", range(6), range(6))
    analyse(capsys, tmp_path / "runs", tmp_path / "out")
    oracle = pd.read_csv(tmp_path / "out" / "oracle.csv").iloc[0]
    truth = 0.12 * 10 / 10 - 0.12 * 5 / 10          # every class +12 vs the best single +6
    assert oracle["oracle_gain_low"] <= truth <= oracle["oracle_gain_high"]
    assert oracle["oracle_gain_low"] <= oracle["oracle_gain_crossfit"]
    assert oracle["oracle_gain_in_sample"] <= oracle["oracle_gain_high"]
    assert "interval [" in oracle["how_much_is_real"]


# ----------------------------------------------------------------------------------------
# 7 and beyond: Table 1's null measured on the records
# ----------------------------------------------------------------------------------------

def test_table1_prints_the_measured_null_not_a_nominal_claim(tmp_path, capsys):
    effects = linear_effects([1.0, 0.5, 0.08], 1.0, losing_classes=[1, 2], max_loss=0.3)
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.5, 0.08], range(6), num_classes=12,
                        n_per_class=50, effects=effects, seed=6, seed_shared_std=0.03)
    out, _ = analyse(capsys, tmp_path / "runs", tmp_path / "out")
    assert "no effect would give ~10 / 5 / 1" not in out
    assert "no effect:" in out and "calibration p =" in out
    table1 = pd.read_csv(tmp_path / "out" / "table1.csv")
    for column in calibration.COLUMNS:
        assert column in table1, column
    assert (table1["n_arrangements"] == 2 ** 6).all() and table1["exhaustive"].all()
    # The planted losers at 0.08 are more than any label swap gives; 0.5 loses less.
    at_95 = table1[(table1["setting"] == 0.08) & (table1["confidence"] == 95)].iloc[0]
    assert at_95["calibration_p"] < 0.05
    assert "more than noise" in out
    paired_table = pd.read_csv(tmp_path / "out" / "table1_paired.csv")
    assert paired_table["null_percent_classes"].notna().all()
    page = (tmp_path / "out" / "index.html").read_text()
    assert "no effect (measured)" in page
    # The report opens with the answer: per setting, the mean's change, the classes that
    # fall at BH q < 0.05 and the calibration's verdict, before any table of details.
    assert page.index("The answer") < page.index("<h2>Settings</h2>")
    answer = page[page.index("The answer"):page.index("<h2>Settings</h2>")]
    assert "syn_001" in answer and "more than noise" in answer


def test_every_accuracy_column_of_the_report_is_in_points():
    """The protocol table showed changes as fractions (-0.12) beside points elsewhere."""
    from ffcv_bias.analysis.report import _display
    frame = pd.DataFrame({"setting": [0.3], "change_main": [-0.125], "mean_40@1.0": [0.5],
                          "protocol_part": [0.01], "n_runs": [4]})
    html = _display(frame)
    assert "change_main (%)" in html and "-12.50" in html and "50.00" in html
    assert "n_runs (%)" not in html


def test_calibration_counts_equal_the_tests_on_swapped_records():
    """The sums algebra of the swaps gives the p-values of the tests run on the swapped
    arrays themselves, and the unswapped pattern reproduces Table 1's count."""
    rng = np.random.default_rng(3)
    true = np.tile(rng.uniform(0.5, 0.98, 40), (2, 1))
    accuracy = simulate_accuracy(true, 5, 50, 0.0, 0.02, rng)
    data = setting_data(accuracy, [1.0, 0.3], 1.0, 50)
    setting_acc, reference_acc = data.acc[1], data.acc[0]
    pairs = (np.arange(5), np.arange(5))
    patterns, exhaustive = calibration.swap_patterns(5, 40, rng)
    assert exhaustive and len(patterns) == 32 and not patterns[0].any()
    welch_p = calibration.welch_null_p(setting_acc, reference_acc, pairs, patterns)
    paired_p = calibration.paired_null_p(setting_acc - reference_acc, patterns)
    for index in (0, 7, 19, 31):
        swap = patterns[index][:, None]
        swapped_s = np.where(swap, reference_acc, setting_acc)
        swapped_r = np.where(swap, setting_acc, reference_acc)
        np.testing.assert_allclose(welch_p[index],
                                   stats.welch_less(swapped_s, swapped_r)["p_less"],
                                   rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(paired_p[index],
                                   paired.paired_less(swapped_s, swapped_r)["p_less"],
                                   rtol=1e-7, atol=1e-12)
    observed = (stats.welch_less(setting_acc, reference_acc)["p_less"] < 0.05).sum()
    assert calibration._flag_counts(welch_p)[95][0][0] == observed


def test_welch_null_rate_is_measured_below_nominal_with_a_shared_seed_effect():
    """No effect, runs of one seed sharing a 3-point offset: Welch flags far fewer than 5%
    of the classes, and the calibration measures it (paired stays near nominal)."""
    rng = np.random.default_rng(8)
    true = np.tile(rng.uniform(0.6, 0.9, 400), (2, 1))
    accuracy = simulate_accuracy(true, 8, 200, 0.005, 0.03, rng)
    data = setting_data(accuracy, [1.0, 0.3], 1.0, 200)
    null = calibration.null_calibration(data).set_index(["test", "confidence"])
    assert null.loc[("welch", 95), "null_percent_classes"] < 2.0
    assert 3.0 < null.loc[("paired", 95), "null_percent_classes"] < 7.0
    assert null.loc[("paired", 95), "n_arrangements"] == 2 ** 8       # exhaustive up to 256


# ----------------------------------------------------------------------------------------
# Minor: hurt classes by q, "losing most" only lists classes that lose
# ----------------------------------------------------------------------------------------

def test_losing_most_lists_only_classes_that_lose(tmp_path, capsys):
    effects = {0: {0.3: -0.2}}
    effects.update({c: {0.3: +0.05} for c in range(1, 6)})
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.3], range(3), num_classes=6,
                        n_per_class=200, effects=effects, seed=9, noise_std=0.005)
    out, _ = analyse(capsys, tmp_path / "runs", tmp_path / "out")
    block = out.split("classes losing most")[1].split("Table 1")[0]
    listed = [line for line in block.splitlines()[1:] if "pts" in line]
    assert len(listed) == 1 and "syn_000" in listed[0]


# ----------------------------------------------------------------------------------------
# The report folder: whole or not at all, one analysis (issue 31, items 6-8)
# ----------------------------------------------------------------------------------------

def _protocol_free_runs(root, seed=1):
    make_synthetic_runs(root, [1.0, 0.3], range(3), num_classes=5, n_per_class=20, seed=seed)


def test_a_reused_report_folder_holds_only_the_new_analysis(tmp_path, capsys):
    _protocol_free_runs(tmp_path / "runs")
    out = tmp_path / "report"
    analyse(capsys, tmp_path / "runs", out)
    (out / "protocols.csv").write_text("stale\n")          # a file the next one won't write
    analyse(capsys, tmp_path / "runs", out)
    assert not (out / "protocols.csv").exists() and (out / "table1.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]


def test_a_folder_of_other_files_is_refused_before_any_work(tmp_path, capsys):
    _protocol_free_runs(tmp_path / "runs")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    code = main([str(tmp_path / "runs"), "--vary", VARY, "--out", str(notes), "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not an analysis report" in err
    assert (notes / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("fault, code, words", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(28, "No space left on device"), 1, "no space left on device"),
])
def test_an_interrupted_or_full_disk_analysis_leaves_the_earlier_report(
        tmp_path, capsys, monkeypatch, fault, code, words):
    _protocol_free_runs(tmp_path / "runs")
    out = tmp_path / "report"
    analyse(capsys, tmp_path / "runs", out)
    before = sorted(p.name for p in out.iterdir())
    from ffcv_bias.analysis import report

    def fail(*args, **kwargs):
        raise fault
    monkeypatch.setattr(report, "write_group_index", fail)
    assert main([str(tmp_path / "runs"), "--vary", VARY, "--out", str(out),
                 "--no-figures"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]


def test_row_wise_benjamini_hochberg_equals_the_one_setting_version():
    p_values = np.random.default_rng(2).random((7, 50)) ** 3
    expected = np.stack([stats.benjamini_hochberg(row) for row in p_values])
    np.testing.assert_allclose(calibration.benjamini_hochberg_rows(p_values), expected)
