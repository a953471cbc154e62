"""Per-protocol analysis on synthetic records: one arm's accuracy depends on the protocol."""
import numpy as np
import pytest

from ffcv_bias.analysis import protocols
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.records import AnalysisError, load_runs
from ffcv_bias.analysis.synthetic import add_synthetic_protocol, make_synthetic_runs

SEEDS = range(8)
ZOOM_LOSS, TRUE_LOSS = 0, 1     # class 0 loses only under the main protocol


@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory):
    """tau 1.0 (reference) and 0.3, 8 seeds each. Under the main protocol the crop costs
    class 0 and class 1 twenty points. Under "40@1.0" the reference is 5 points worse on
    every class, the cropped arm 5 points better and class 0 is not hurt at all: the
    protocol explains class 0's loss, class 1's is real."""
    out = tmp_path_factory.mktemp("protocol_runs")
    effects = {ZOOM_LOSS: {0.3: -0.2}, TRUE_LOSS: {0.3: -0.2}}
    result = make_synthetic_runs(out, [1.0, 0.3], SEEDS, effects=effects, n_per_class=400,
                                 noise_std=0.01, base_acc=0.7)
    zoomed = np.full(10, 0.05)
    zoomed[ZOOM_LOSS] += 0.2
    add_synthetic_protocol(result, "40@1.0", {1.0: -0.05, 0.3: zoomed}, noise_std=0.01)
    return out


def per_class_row(frames, class_index):
    table = frames["protocol_per_class"]
    return table[table["class"] == class_index].iloc[0]


def test_each_arm_picks_its_own_protocol_on_held_out_seeds(protocol_runs):
    frames = run_analysis(protocol_runs, "augment.min_scale", make_plots=False)
    choice = frames["protocol_choice"]
    assert set(choice[choice["setting"] == 1.0]["protocol"]) == {"main"}
    assert set(choice[choice["setting"] == 0.3]["protocol"]) == {"40@1.0"}
    for _, row in choice.iterrows():  # chosen and scored seeds never overlap
        assert not set(row["chosen_on_seeds"].split()) & set(row["scored_on_seeds"].split())
    summary = frames["protocols"]
    best = summary[summary["protocol"] == protocols.CROSS_FITTED]
    assert list(best["n_runs"]) == [8, 8]


def test_the_report_separates_the_protocol_part_from_the_training_part(protocol_runs):
    frames = run_analysis(protocol_runs, "augment.min_scale", make_plots=False)
    zoom, true = per_class_row(frames, ZOOM_LOSS), per_class_row(frames, TRUE_LOSS)
    # Under the main protocol both classes lose ~20 points, significantly.
    assert zoom["change_main"] == pytest.approx(-0.2, abs=0.03) and zoom["p_less_main"] < 1e-4
    assert true["change_main"] == pytest.approx(-0.2, abs=0.03) and true["p_less_main"] < 1e-4
    # Each arm's best protocol: the reference's main one (0.70), the cropped arm's 40@1.0
    # (class 0: 0.70 - 0.20 + 0.25 = 0.75; class 1: 0.70 - 0.20 + 0.05 = 0.55).
    assert zoom["change_best_cross_fitted"] == pytest.approx(0.05, abs=0.03)
    assert zoom["p_less_best_cross_fitted"] > 0.5
    assert zoom["protocol_part"] == pytest.approx(-0.25, abs=0.04)
    assert true["change_best_cross_fitted"] == pytest.approx(-0.15, abs=0.03)
    assert true["p_less_best_cross_fitted"] < 1e-4
    assert true["protocol_part"] == pytest.approx(-0.05, abs=0.04)


def test_protocol_flag_analyses_one_protocol(protocol_runs, tmp_path):
    main = run_analysis(protocol_runs, "augment.min_scale", make_plots=False)
    zoomed = run_analysis(protocol_runs, "augment.min_scale", protocol="40@1",
                          out_dir=tmp_path / "report")
    welch_main = main["welch"].set_index("class")
    welch_zoomed = zoomed["welch"].set_index("class")
    assert welch_main.loc[ZOOM_LOSS, "p_less"] < 1e-4
    assert welch_zoomed.loc[ZOOM_LOSS, "diff"] > 0.05   # under 40@1.0 class 0 gains
    assert welch_zoomed.loc[TRUE_LOSS, "p_less"] < 1e-3
    runs = zoomed["runs"]
    assert runs["top1"].mean() != pytest.approx(main["runs"]["top1"].mean())
    for name in ("protocols.csv", "protocol_per_class.csv", "protocols.png", "index.html"):
        assert (tmp_path / "report" / name).is_file()
    assert "Test protocols" in (tmp_path / "report" / "index.html").read_text()


def test_a_protocol_no_run_has_is_a_one_line_error(protocol_runs):
    with pytest.raises(AnalysisError, match="no run has test protocol 48@1.0"):
        run_analysis(protocol_runs, "augment.min_scale", protocol="48@1.0",
                     make_plots=False)
    with pytest.raises(AnalysisError, match="--protocol: 'x@1' is not"):
        protocols.select_protocol(load_runs([protocol_runs]), "x@1")


def test_runs_without_extra_protocols_get_no_protocol_tables(tmp_path):
    make_synthetic_runs(tmp_path, [1.0, 0.5], range(3))
    frames = run_analysis(tmp_path, "augment.min_scale", make_plots=False)
    assert "protocols" not in frames
