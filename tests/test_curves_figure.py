"""The curves figure must not hide the loser: a class that gains at the setting mean
accuracy picks but collapses at another one is drawn among the losers, labelled with both."""
from ffcv_bias.analysis import figures, stats, tables
from ffcv_bias.analysis.records import load_runs
from ffcv_bias.analysis.synthetic import make_synthetic_runs

SHIRT = 6


def test_a_class_that_falls_at_another_setting_is_drawn_as_a_loser(tmp_path):
    # 0.65 raises every class 3 points (cross-validation picks it); at 0.3 Shirt falls 10.
    effects = {c: {0.65: 0.03} for c in range(10)}
    effects[SHIRT] = {0.65: 0.03, 0.3: -0.10}
    make_synthetic_runs(tmp_path, [1.0, 0.65, 0.3], range(6), effects=effects,
                        n_per_class=500, noise_std=0.01)
    run_set = load_runs([tmp_path])
    data = tables.split_by_setting(run_set, list(range(len(run_set.runs))),
                                   "augment.min_scale")
    means, stds, _ = tables.class_means(data)
    welch = stats.welch_table(data)
    assert data.settings[figures.compared_index(data)] == 0.65
    change_at_compared = means[figures.compared_index(data)] - means[data.reference_index]
    assert change_at_compared[SHIRT] > 0       # the old ranking drew it as a gainer

    losers, gainers = figures.classes_to_draw(data, means, welch, k=3)
    assert losers[0] == SHIRT and SHIRT not in gainers
    worst, where, p_values = figures.largest_losses(data, means, welch)
    assert where[SHIRT] == 0.3 and p_values[SHIRT] < 0.01
    label = figures.curve_label(data, SHIRT, 100 * change_at_compared[SHIRT], "0.65",
                                worst, where, p_values)
    assert label.startswith("syn_006: at 0.65 +") and "worst -" in label and "at 0.3" in label
    figures.accuracy_curves(data, means, stds, tmp_path / "curves.png", k=3, welch=welch)
    assert (tmp_path / "curves.png").stat().st_size > 0
