"""Confusion flows: a planted "A -> B" shift must name B; the confusion matrices are the
seed means of the row-normalised per-run matrices; the report and the CSVs carry them."""
import json

import numpy as np
import pandas as pd
import pytest

from ffcv_bias.record import runs
from ffcv_bias.analysis import confusion, run_analysis
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
        assert top["absorbing_class"] == ABSORBER and top["absorbing_name"] == "syn_007"
        assert top["share"] > 0.9 and top["lost"] == pytest.approx(loss, abs=0.03)
        assert top["selected_by"] == "p_less < 0.05" and top["p_less"] < 0.05
        assert top["rate"] - top["rate_ref"] == pytest.approx(top["share"] * top["lost"])
        assert (top["n_ref"], top["n"]) == (5, 5)
    # Only the planted loser is significantly hurt by more than noise at 0.08.
    assert set(flows[flows["setting"] == 0.08]["class"]) <= {LOSER} | set(
        frames["welch"].query("setting == 0.08 and p_less < 0.05")["class"])
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
    assert frames["confusion_flows"].query("setting == 0.08").iloc[0]["absorbing_class"] == ABSORBER


def test_no_significant_loss_falls_back_to_the_largest_drops():
    welch = pd.DataFrame({"setting": 0.5, "class": range(6),
                          "p_less": [0.2, 0.5, 0.07, 0.9, 0.3, 0.06],
                          "diff": [-0.01, 0.02, -0.05, 0.03, -0.02, -0.04]})
    classes, selected_by = confusion.hurt_classes(welch)
    assert classes.tolist() == [2, 5, 4][:confusion.WORST_WHEN_NONE]
    assert selected_by.startswith("largest drop")
    welch.loc[1, ["p_less", "diff"]] = 0.01, -0.01
    welch.loc[0, "p_less"] = 0.001
    classes, selected_by = confusion.hurt_classes(welch)
    assert classes.tolist() == [0, 1] and selected_by == "p_less < 0.05"


def test_flow_shares_sum_to_the_loss():
    reference = np.array([[0.8, 0.1, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    setting = np.array([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    welch = pd.DataFrame({"setting": 0.5, "class": range(3), "p_less": [0.01, 1, 1],
                          "diff": [-0.3, 0, 0]})
    rows = confusion.flow_rows(0.5, setting, reference, welch, 4, 3, ["a", "b", "c"])
    assert [row["absorbing_name"] for row in rows] == ["b", "c"]
    assert [row["share"] for row in rows] == pytest.approx([2 / 3, 1 / 3])
    assert rows[0]["lost"] == pytest.approx(0.3) and rows[0]["n_ref"] == 4


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
