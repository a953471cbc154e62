"""`--where KEY=VALUE`: two sweeps in one folder, sharing their reference arm, each
analysed on its own slice (the demo's crop and weight-decay sweeps)."""
import pandas as pd
import pytest

from ffcv_bias.analysis import AnalysisError, make_synthetic_runs, run_analysis
from ffcv_bias.analysis.__main__ import main as analysis_main
from ffcv_bias.analysis.where import OUTSIDE_STATE, parse_condition

SHARED_WD = 5e-5  # the synthetic records' default weight decay


@pytest.fixture
def two_sweeps(tmp_path):
    """Crop sweep tau {1.0, 0.3} at the default weight decay, plus the weight-decay sweep's
    own arm (tau 1.0, wd 5e-3); the tau 1.0 / default-wd arm is shared by both."""
    folder = tmp_path / "runs"
    crop = make_synthetic_runs(folder, [1.0, 0.3], range(3), num_classes=4,
                               effects={0: {0.3: -0.3}})
    decay = make_synthetic_runs(folder, [5e-3], range(3), num_classes=4,
                                vary_key="training.weight_decay",
                                extra_config={"augment.min_scale": 1.0},
                                effects={1: {5e-3: -0.3}}, seed=1)
    return folder, crop, decay


def test_each_slice_is_analysed_alone_and_the_rest_counted(two_sweeps, tmp_path):
    folder, _, _ = two_sweeps
    crop = run_analysis(folder, "augment.min_scale", where_conditions=[
        ("training.weight_decay", SHARED_WD)], make_plots=False)
    assert sorted(crop["runs"]["setting"]) == [0.3] * 3 + [1.0] * 3
    assert (crop["skipped"]["state"] == OUTSIDE_STATE).sum() == 3

    decay = run_analysis(folder, "training.weight_decay", where_conditions=[
        ("augment.min_scale", 1.0)], make_plots=False)
    assert sorted(decay["runs"]["setting"]) == [SHARED_WD] * 3 + [5e-3] * 3
    assert (decay["skipped"]["state"] == OUTSIDE_STATE).sum() == 3
    # The shared arm is the same three records in both analyses.
    shared = set(crop["runs"].loc[crop["runs"]["setting"] == 1.0, "run_id"])
    assert shared == set(decay["runs"].loc[decay["runs"]["setting"] == SHARED_WD, "run_id"])


def test_without_where_the_mixed_folder_is_refused(two_sweeps):
    folder, _, _ = two_sweeps
    with pytest.raises(AnalysisError, match="weight_decay"):
        run_analysis(folder, "augment.min_scale", make_plots=False)


def test_cli_where_slice_and_bad_conditions(two_sweeps, tmp_path, capsys):
    folder, _, _ = two_sweeps
    out = tmp_path / "report"
    assert analysis_main([str(folder), "--vary", "augment.min_scale", "--where",
                          "training.weight_decay=5e-5", "--out", str(out),
                          "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "6 complete run(s) analysed" in printed and f"3 {OUTSIDE_STATE}" in printed
    assert "skipped " + str(folder) not in printed  # counted, not listed one by one
    assert len(pd.read_csv(out / "runs.csv")) == 6

    assert analysis_main([str(folder), "--vary", "augment.min_scale", "--where",
                          "training.weight_decay=0.1", "--out", str(tmp_path / "r2")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("error: --where training.weight_decay=0.1: none of the 9 complete runs "
                     "matches")
    assert analysis_main([str(folder), "--vary", "augment.min_scale", "--where",
                          "training.weight_decay", "--out", str(tmp_path / "r3")]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_condition_values_read_as_a_sweep_file_would():
    assert parse_condition("training.weight_decay=5e-4") == ("training.weight_decay", 5e-4)
    assert parse_condition("augment.min_scale=1") == ("augment.min_scale", 1)
    assert parse_condition("model.arch=resnet8") == ("model.arch", "resnet8")
    assert parse_condition("data.keep_indices=null") == ("data.keep_indices", None)
