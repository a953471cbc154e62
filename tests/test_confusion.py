"""Confusion flows: a planted "A -> B" shift must name B; gross flows both ways add up to
the net loss (a confusion rising 20 points while another falls 15 shows both); the hurt
classes are chosen by BH q_less; the confusion matrices are the seed means of the
row-normalised per-run matrices; the report and the CSVs carry them."""
import json

import numpy as np
import pandas as pd
import pytest

from ffcv_bias.record import runs
from ffcv_bias.analysis import confusion, report, run_analysis
from ffcv_bias.analysis import synthetic
from ffcv_bias.analysis.synthetic import make_prediction_runs, make_synthetic_runs

SETTINGS = [1.0, 0.5, 0.08]
LOSER, ABSORBER = 2, 7


def planted(tmp_path, num_classes=10, **kwargs):
    """Class LOSER loses 0 / 15 / 30 points (at tau 1.0 / 0.5 / 0.08) and every image it
    loses is predicted as ABSORBER; the others are null."""
    effects = {LOSER: {1.0: 0.0, 0.5: -0.15, 0.08: -0.3}}
    return make_prediction_runs(tmp_path / "runs", SETTINGS, range(5),
                                num_classes=num_classes, n_per_class=200, effects=effects,
                                absorbed_by={LOSER: ABSORBER}, noise_std=0.01, seed=3,
                                **kwargs)


def test_planted_shift_names_the_absorbing_class(tmp_path):
    planted(tmp_path)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale", out_dir=tmp_path / "out")
    flows = frames["confusion_flows"]
    for setting, loss in ((0.5, 0.15), (0.08, 0.3)):
        rows = flows[(flows["setting"] == setting) & (flows["class"] == LOSER)]
        top = rows.iloc[0]
        assert top["direction"] == "to"
        assert top["other_class"] == ABSORBER and top["other_name"] == "syn_007"
        assert top["share"] > 0.9 and top["lost"] == pytest.approx(loss, abs=0.03)
        assert top["selected_by"] == "q_less < 0.05" and top["q_less"] < 0.05
        assert top["p_less"] <= top["q_less"]
        assert top["rate"] - top["rate_ref"] == pytest.approx(top["change"])
        assert top["change"] == pytest.approx(top["share"] * top["gross_out"])
        assert top["gross_out"] - top["gross_back"] == pytest.approx(top["lost"], abs=1e-12)
        assert (top["n_ref"], top["n"]) == (5, 5)
    # Only the planted loser is significantly hurt by more than noise at 0.08.
    assert set(flows[flows["setting"] == 0.08]["class"]) <= {LOSER} | set(
        frames["welch"].query("setting == 0.08 and q_less < 0.05")["class"])
    written = pd.read_csv(tmp_path / "out" / "confusion_flows.csv")
    assert len(written) == len(flows)
    assert (tmp_path / "out" / "confusion_flows.png").is_file()
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Where the hurt classes' predictions went" in page and "How to read" in page


def test_confusion_rates_are_seed_means_of_row_normalised_matrices(tmp_path):
    records = planted(tmp_path)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale")
    matrix = frames["confusion"]
    assert len(matrix) == len(SETTINGS) * 10 * 10          # dense at 10 classes
    labels = records["labels"]
    reference_dirs = [d for d in records["run_dirs"]
                      if json.loads((d / runs.CONFIG_FILE).read_text())["augment"]["min_scale"] == 1.0]
    per_run = []
    for run_dir in reference_dirs:
        predictions = np.load(run_dir / runs.VAL_PREDS_FILE)
        counts = np.zeros((10, 10))
        np.add.at(counts, (labels, predictions), 1)
        per_run.append(counts / counts.sum(axis=1, keepdims=True))
    expected = np.mean(per_run, axis=0)
    reference = matrix[matrix["setting"] == 1.0]
    got = np.zeros((10, 10))
    got[reference["true_class"], reference["predicted_class"]] = reference["rate"]
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    # The diagonal is each class's mean accuracy, as in per_class.csv.
    per_class = frames["per_class"].query("setting == 1.0")["mean_acc"].to_numpy()
    np.testing.assert_allclose(np.diag(got), per_class)


def test_sparse_top_k_above_the_dense_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(confusion, "DENSE_MAX_CLASSES", 8)
    planted(tmp_path, num_classes=12)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale")
    matrix = frames["confusion"]
    per_true = matrix.groupby(["setting", "true_class"]).size()
    assert per_true.max() <= 1 + confusion.TOP_K_SPARSE
    loser_rows = matrix[(matrix["setting"] == 0.08) & (matrix["true_class"] == LOSER)]
    assert ABSORBER in set(loser_rows["predicted_class"])
    assert frames["confusion_flows"].query("setting == 0.08").iloc[0]["other_class"] == ABSORBER


def test_no_significant_loss_falls_back_to_the_largest_drops():
    welch = pd.DataFrame({"setting": 0.5, "class": range(6),
                          "p_less": [0.2, 0.5, 0.07, 0.9, 0.3, 0.06],
                          "q_less": [0.5, 0.9, 0.2, 0.9, 0.5, 0.2],
                          "diff": [-0.01, 0.02, -0.05, 0.03, -0.02, -0.04]})
    classes, selected_by = confusion.hurt_classes(welch)
    assert classes.tolist() == [2, 5, 4][:confusion.WORST_WHEN_NONE]
    assert selected_by == "largest drop (none with q_less < 0.05)"
    welch.loc[1, ["p_less", "q_less", "diff"]] = 0.01, 0.03, -0.01
    welch.loc[0, ["p_less", "q_less"]] = 0.001, 0.006
    classes, selected_by = confusion.hurt_classes(welch)
    assert classes.tolist() == [0, 1] and selected_by == "q_less < 0.05"


def test_raw_p_below_alpha_is_not_enough_to_be_hurt():
    """A null class with p_less 0.01 but BH q_less 0.2 (many classes tested) is not a hurt
    class; the one that survives the correction is, alone."""
    welch = pd.DataFrame({"setting": 0.5, "class": range(4),
                          "p_less": [0.01, 0.0001, 0.6, 0.9],
                          "q_less": [0.2, 0.004, 0.8, 0.9],
                          "diff": [-0.04, -0.02, -0.01, 0.01]})
    classes, selected_by = confusion.hurt_classes(welch)
    assert classes.tolist() == [1] and selected_by == "q_less < 0.05"
    reference = np.eye(4)
    setting = np.eye(4)
    setting[0] = [0.96, 0.04, 0, 0]
    setting[1] = [0.02, 0.98, 0, 0]
    rows = confusion.flow_rows(0.5, setting, reference, welch, 4, 4, list("abcd"))
    assert {row["class"] for row in rows} == {1}
    # With nothing significant, class 0 comes back only as a flagged largest drop.
    welch.loc[1, "q_less"] = 0.2
    rows = confusion.flow_rows(0.5, setting, reference, welch, 4, 4, list("abcd"))
    assert [row["class"] for row in rows] == [0, 1]
    assert rows[0]["selected_by"] == "largest drop (none with q_less < 0.05)"


def test_flow_shares_sum_to_the_loss():
    reference = np.array([[0.8, 0.1, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    setting = np.array([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    welch = pd.DataFrame({"setting": 0.5, "class": range(3), "p_less": [0.01, 1, 1],
                          "q_less": [0.03, 1, 1], "diff": [-0.3, 0, 0]})
    rows = confusion.flow_rows(0.5, setting, reference, welch, 4, 3, ["a", "b", "c"])
    assert [row["other_name"] for row in rows] == ["b", "c"]
    assert [row["direction"] for row in rows] == ["to", "to"]
    assert [row["share"] for row in rows] == pytest.approx([2 / 3, 1 / 3])
    assert [row["change"] for row in rows] == pytest.approx([0.2, 0.1])
    assert rows[0]["lost"] == pytest.approx(0.3) and rows[0]["n_ref"] == 4
    assert rows[0]["gross_out"] == pytest.approx(0.3) and rows[0]["gross_back"] == 0


# Class 0 ("Shirt") loses 5 points net: its confusion with class 1 rises 20 points
# (5% -> 25%) while that with class 2 falls 15 (30% -> 15%). Class 3 stays at 5%.
CROSS_REFERENCE = [0.60, 0.05, 0.30, 0.05]
CROSS_SETTING = [0.55, 0.25, 0.15, 0.05]
CROSS_NAMES = ["Shirt", "class_1", "class_2", "class_3"]


def _cross_rates(first_row):
    rates = np.eye(4)
    rates[0] = first_row
    return rates


def _cross_welch():
    return pd.DataFrame({"setting": 0.5, "class": range(4), "p_less": [1e-4, 1, 1, 1],
                         "q_less": [4e-4, 1, 1, 1], "diff": [-0.05, 0, 0, 0]})


def test_a_rise_of_20_and_a_fall_of_15_show_both_ways_and_add_up():
    rows = confusion.flow_rows(0.5, _cross_rates(CROSS_SETTING), _cross_rates(CROSS_REFERENCE),
                               _cross_welch(), 4, 4, CROSS_NAMES)
    flows = pd.DataFrame(rows, columns=confusion.FLOW_COLUMNS)
    assert flows[["direction", "other_name"]].values.tolist() == [
        ["to", "class_1"], ["back from", "class_2"]]          # class_3 did not move
    assert flows["change"].tolist() == pytest.approx([0.20, -0.15])
    first = flows.iloc[0]
    assert first["lost"] == pytest.approx(0.05)
    assert (first["gross_out"], first["gross_back"]) == pytest.approx((0.20, 0.15))
    assert first["gross_out"] - first["gross_back"] == pytest.approx(first["lost"], abs=1e-12)
    assert flows["change"].sum() == pytest.approx(first["lost"])   # all flows listed
    for direction, block in flows.groupby("direction"):
        assert (block["share"] <= 1 + 1e-12).all()
        assert block["share"].sum() == pytest.approx(1.0)          # all of them listed
    line, = report.flow_lines({"confusion_flows": flows}, 0.5)
    assert "Shirt" in line and "-5.0 pts net" in line
    assert "+20.0 went to class_1" in line and "-15.0 came back from class_2" in line
    assert "others" not in line and "%" not in line


def test_more_flows_than_listed_are_summed_as_others_and_shares_stay_below_one(
        monkeypatch):
    monkeypatch.setattr(confusion, "ABSORBERS", 1)
    reference = np.eye(5)
    setting = np.eye(5)
    reference[0] = [0.60, 0.05, 0.20, 0.10, 0.05]
    setting[0] = [0.50, 0.25, 0.10, 0.05, 0.10]   # out +20, +5; back -10, -5: net 10
    welch = pd.DataFrame({"setting": 0.5, "class": range(5), "p_less": [1e-4, 1, 1, 1, 1],
                          "q_less": [5e-4, 1, 1, 1, 1], "diff": [-0.1, 0, 0, 0, 0]})
    rows = confusion.flow_rows(0.5, setting, reference, welch, 4, 4, list("abcde"))
    flows = pd.DataFrame(rows, columns=confusion.FLOW_COLUMNS)
    assert flows[["direction", "other_name", "share"]].values.tolist() == [
        ["to", "b", pytest.approx(0.8)], ["back from", "c", pytest.approx(2 / 3)]]
    assert flows.iloc[0]["gross_out"] - flows.iloc[0]["gross_back"] == pytest.approx(0.1)
    line, = report.flow_lines({"confusion_flows": flows}, 0.5)
    assert line.endswith("-10.0 pts net (n = 4 / 4 seeds): +20.0 went to b and +5.0 to "
                         "others; -10.0 came back from c and -5.0 from others")


def test_gross_flows_through_run_analysis_and_the_printed_summary(tmp_path):
    """The 20 / 15 case written as prediction records (4 seeds, 100 images per class,
    the seeds' accuracies 1 point apart): the tables, the figure, the page and the
    printed summary carry both flows."""
    out, settings = tmp_path / "runs", [1.0, 0.5]
    val_dataset, _, labels = synthetic._write_val_sidecar(out, 4, 100, CROSS_NAMES)
    shared_labels = out / runs.VAL_LABELS_FILE
    np.save(shared_labels, labels)
    for setting, first_row in zip(settings, (CROSS_REFERENCE, CROSS_SETTING)):
        for seed, jitter in enumerate([-1, 0, 1, 0]):
            counts = (np.asarray(first_row) * 100).round().astype(int)
            counts[0] += jitter
            counts[2] -= jitter   # the seeds differ, the mean does not
            predictions = labels.copy()
            predictions[:100] = np.repeat(np.arange(4), counts)
            synthetic._write_prediction_run(out, setting, seed, labels, predictions,
                                            shared_labels, val_dataset,
                                            "augment.min_scale", 4)
    frames = run_analysis(out, "augment.min_scale", out_dir=tmp_path / "out")
    flows = frames["confusion_flows"].query("setting == 0.5")
    assert flows[["class_name", "direction", "other_name"]].values.tolist() == [
        ["Shirt", "to", "class_1"], ["Shirt", "back from", "class_2"]]
    assert flows["selected_by"].tolist() == ["q_less < 0.05"] * 2
    assert flows["change"].tolist() == pytest.approx([0.20, -0.15])
    assert flows["lost"].tolist() == pytest.approx([0.05, 0.05])
    assert flows["share"].tolist() == pytest.approx([1.0, 1.0])
    written = pd.read_csv(tmp_path / "out" / "confusion_flows.csv")
    assert list(written.columns) == confusion.FLOW_COLUMNS
    assert (tmp_path / "out" / "confusion_flows.png").is_file()
    page = (tmp_path / "out" / "index.html").read_text()
    assert "gross_out" in page and "back from" in page and "sum to 100%" in page
    assert "shares of all classes sum to 100%" not in page
    text = report.summary_text(frames, ["augment.min_scale"])
    assert ("Shirt                          -5.0 pts net (n = 4 / 4 seeds): +20.0 went to "
            "class_1; -15.0 came back from class_2") in text


def test_records_without_predictions_give_empty_tables_and_say_so(tmp_path):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.5], range(2), num_classes=5)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale", out_dir=tmp_path / "out")
    assert frames["confusion"].empty and frames["confusion_flows"].empty
    assert "No confusion flows" in (tmp_path / "out" / "index.html").read_text()


def test_old_records_with_logits_only_are_read(tmp_path):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.5], range(2), num_classes=5,
                        with_logits=True, seed=2)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale")
    reference = frames["confusion"].query("setting == 1.0")
    diagonal = reference[reference["true_class"] == reference["predicted_class"]]["rate"]
    per_class = frames["per_class"].query("setting == 1.0")["mean_acc"]
    np.testing.assert_allclose(diagonal.to_numpy(), per_class.to_numpy())


def test_runs_on_different_val_labels_are_refused(tmp_path):
    records = planted(tmp_path)
    odd = records["run_dirs"][-1] / runs.VAL_LABELS_FILE
    odd.unlink()
    np.save(odd, records["labels"][::-1].copy())
    from ffcv_bias.analysis import AnalysisError
    with pytest.raises(AnalysisError, match="not evaluated on one val set"):
        run_analysis(tmp_path / "runs", "augment.min_scale")
