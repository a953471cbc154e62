"""Numbers a paper can trust (issue 19): replicate identity, selection ties and NaN classes,
the cross-fitted oracle and selection, the seed-paired test, seed planning.

The error-rate checks simulate many classes with synthetic.simulate_accuracy (numpy only,
no files): each class is an independent experiment, so C classes give C Bernoulli draws of
"rejects", and the tolerances below are stated in binomial standard deviations.
"""
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from ffcv_bias.analysis import make_synthetic_runs, run_analysis
from ffcv_bias.analysis import crossfit, paired, power, stats, tables
from ffcv_bias.analysis.records import DETERMINISM_FAILURE
from ffcv_bias.analysis.report import summary_text
from ffcv_bias.analysis.synthetic import setting_data, simulate_accuracy

VARY = "augment.min_scale"


def _binomial_tolerance(alpha, trials, sds=4):
    return sds * math.sqrt(alpha * (1 - alpha) / trials)


# ----------------------------------------------------------------------------------------
# Replicate identity
# ----------------------------------------------------------------------------------------

def _copy_run(run_dir, root, edit_summary=None):
    copy = root / run_dir.name
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["train_seconds"] = 999.0          # a rerun always differs here
    if edit_summary:
        edit_summary(summary)
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def test_duplicate_run_ids_are_analysed_once(tmp_path):
    records = make_synthetic_runs(tmp_path / "a", [1.0, 0.08], range(3), num_classes=5,
                                  n_per_class=20, seed=1)
    rerun = _copy_run(records["run_dirs"][0], tmp_path / "b")
    frames = run_analysis([tmp_path / "a", tmp_path / "b"], VARY, make_plots=False)
    assert len(frames["runs"]) == 6
    assert frames["settings"]["n_runs"].tolist() == [3, 3]
    skipped = frames["skipped"]
    assert skipped["state"].tolist() == ["duplicate"]
    assert skipped["run_dir"].tolist() == [str(rerun.resolve())]
    assert str(records["run_dirs"][0].resolve()) in skipped["reason"].iloc[0]
    assert DETERMINISM_FAILURE not in skipped["reason"].iloc[0]
    # The kept record is the first by sorted path: a/ before b/.
    assert str(records["run_dirs"][0].resolve()) in frames["runs"]["run_dir"].tolist()


def test_duplicate_with_other_logits_warns_loudly(tmp_path, capsys):
    records = make_synthetic_runs(tmp_path / "a", [1.0, 0.08], range(3), num_classes=5,
                                  n_per_class=20, with_logits=True, seed=1)
    rerun = _copy_run(records["run_dirs"][1], tmp_path / "b")
    logits = np.load(rerun / "val_logits.npy")
    logits[0, 0] += np.float16(0.5)            # same run_id, other logits
    np.save(rerun / "val_logits.npy", logits)
    out = tmp_path / "report"
    frames = run_analysis([tmp_path / "a", tmp_path / "b"], VARY, out_dir=out,
                          make_plots=False)
    stderr = capsys.readouterr().err
    assert DETERMINISM_FAILURE in stderr and "val_logits.npy" in stderr
    assert str(rerun.resolve()) in stderr and str(records["run_dirs"][1].resolve()) in stderr
    assert len(frames["runs"]) == 6                       # still analysed once
    reason = frames["skipped"]["reason"].iloc[0]
    assert reason.startswith(DETERMINISM_FAILURE)
    assert DETERMINISM_FAILURE in (out / "index.html").read_text()
    assert f"WARNING {rerun.resolve()}" in summary_text(frames, [VARY])


# ----------------------------------------------------------------------------------------
# Selection ties and NaN classes
# ----------------------------------------------------------------------------------------

def _hand_data(class_means, reference_index, class_counts=None):
    """SettingData with two seeds per setting at mean +- 0.01 (seed means exact)."""
    means = np.asarray(class_means, dtype=np.float64)
    accuracy = np.stack([means + 0.01, means - 0.01], axis=1)     # [S, 2, C]
    settings = [0.1 * (i + 1) for i in range(len(means))]
    return setting_data(accuracy, settings, settings[reference_index], class_counts)


def test_selection_ties_go_to_the_setting_nearest_a_mid_range_reference():
    # Settings 0 and 3 tie on every criterion; the reference is setting 2: 3 is nearer.
    means = [[0.9, 0.8], [0.5, 0.5], [0.6, 0.6], [0.9, 0.8], [0.4, 0.4]]
    data = _hand_data(means, reference_index=2)
    picks = stats.selection(data, tables.class_means(data)[0]).set_index("criterion")
    assert (picks["setting"] == data.settings[3]).all()
    assert stats.oracle(data, tables.class_means(data)[0])[0].iloc[0]["best_setting"] \
        == data.settings[3]
    # Equally near on both sides (1 and 3 around 2): the lower index.
    assert stats.argmax_nearest(np.array([0.1, 0.7, 0.2, 0.7, 0.0]), 2) == 1
    assert stats.argmax_nearest(np.array([np.nan, np.nan]), 0) == -1
    # Sums that are equal up to rounding count as a tie.
    assert stats.argmax_nearest(np.array([0.1 + 0.2, 0.3]), 1) == 1


def test_a_class_without_val_images_is_left_out_and_named():
    means = [[0.9, 0.7, 0.8], [0.8, 0.75, 0.6], [0.95, 0.6, 0.9]]
    data = _hand_data(means, reference_index=0, class_counts=[10, 10, 10])
    for accuracy in data.acc:
        accuracy[:, 1] = np.nan                                  # class 1: no val images
    data.class_counts[1] = 0
    class_means = tables.class_means(data)[0]
    picks = stats.selection(data, class_means).set_index("criterion")
    assert np.isfinite(picks["score"]).all() and (picks["n_classes_scored"] == 2).all()
    assert picks.loc["worst_class", "setting"] == data.settings[2]   # min(0.95, 0.9) is best
    assert picks.loc["worst_class", "score"] == pytest.approx(0.9)
    summary, per_class = stats.oracle(data, class_means)
    assert summary.iloc[0]["oracle_top1"] == pytest.approx((0.95 + 0.9) / 2)
    assert np.isnan(per_class["oracle_acc"][1]) and pd.isna(per_class["oracle_setting"][1])
    assert "syn_001" in stats.excluded_class_note(data, stats.scored_classes(class_means))
    columns, class_acc = crossfit.crossfit_oracle(data, class_means)
    assert np.isfinite(columns["oracle_top1_crossfit"]) and np.isnan(class_acc[1])


def test_a_class_without_val_images_through_the_records(tmp_path):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.08], range(3), num_classes=4,
                        n_per_class=[20, 20, 0, 20], seed=2, with_logits=True)
    with np.errstate(invalid="ignore"):
        frames = run_analysis(tmp_path / "runs", VARY, make_plots=False)
    assert np.isfinite(frames["selection"]["score"]).all()
    oracle = frames["oracle"].iloc[0]
    assert np.isfinite(oracle["oracle_top1"]) and "syn_002" in oracle["excluded_classes"]
    assert "syn_002" in summary_text(frames, [VARY])


# ----------------------------------------------------------------------------------------
# Paired test
# ----------------------------------------------------------------------------------------

def test_paired_test_equals_scipy_ttest_rel():
    rng = np.random.default_rng(4)
    shared = rng.normal(0, 0.05, (9, 30))
    setting = 0.7 + shared + rng.normal(0, 0.01, (9, 30))
    reference = 0.71 + shared + rng.normal(0, 0.01, (9, 30))
    ours = paired.paired_less(setting, reference)
    expected = scipy_stats.ttest_rel(setting, reference, alternative="less")
    np.testing.assert_allclose(ours["t"], expected.statistic, rtol=1e-9)
    np.testing.assert_allclose(ours["p_less"], expected.pvalue, rtol=1e-9, atol=1e-15)
    constant = paired.paired_less(np.array([[0.5, 0.4], [0.6, 0.5]]),
                                  np.array([[0.5, 0.5], [0.6, 0.6]]))
    assert list(constant["p_less"]) == [1.0, 0.25]      # 2 equal negative differences: 2^-2
    assert list(constant["degenerate"]) == ["constant", "constant"]


@pytest.mark.parametrize("seed_shared_std", [0.0, 0.03])
def test_no_effect_rejection_rates_are_nominal(seed_shared_std):
    """4,000 null classes, 10 seeds per arm: the paired test rejects at its nominal rate
    (within 4 binomial sds) with or without seed-shared noise; Welch does with independent
    runs and is conservative (below nominal) when the seeds share noise, as it ignores the
    positive correlation between the arms."""
    num_classes = 4000
    rng = np.random.default_rng(7)
    true = np.tile(rng.uniform(0.6, 0.9, num_classes), (2, 1))
    accuracy = simulate_accuracy(true, 10, 200, 0.01, seed_shared_std, rng)
    p_welch = stats.welch_less(accuracy[1], accuracy[0])["p_less"]
    p_paired = paired.paired_less(accuracy[1], accuracy[0])["p_less"]
    for alpha in (0.05, 0.01):
        tolerance = _binomial_tolerance(alpha, num_classes)
        assert abs(np.mean(p_paired < alpha) - alpha) < tolerance, alpha
        if seed_shared_std == 0:
            assert abs(np.mean(p_welch < alpha) - alpha) < tolerance, alpha
        else:
            assert np.mean(p_welch < alpha) < alpha - tolerance / 2, alpha


def _detection_rate(test, accuracy_setting, accuracy_reference, alpha=0.05):
    return np.mean(test(accuracy_setting, accuracy_reference)["p_less"] < alpha)


def test_planted_drops_need_fewer_seeds_paired_than_welch():
    """A 3-point drop in 2,000 classes, seed-shared noise sd 4 points (the seeded decoder
    gives every setting's run of one seed the same init, order and crops), per-run noise
    sd 1 point: the smallest seed count detecting 80% of the drops is smaller paired."""
    num_classes = 2000
    rng = np.random.default_rng(8)
    base = rng.uniform(0.6, 0.85, num_classes)
    true = np.stack([base, base - 0.03])
    needed = {}
    for name, test in (("welch", stats.welch_less), ("paired", paired.paired_less)):
        for seeds in range(2, 41):
            accuracy = simulate_accuracy(true, seeds, 5000, 0.01, 0.04, rng)
            if _detection_rate(test, accuracy[1], accuracy[0]) >= 0.8:
                needed[name] = seeds
                break
    assert needed["paired"] < needed["welch"], needed
    assert needed["paired"] <= 6 and needed["welch"] >= 2 * needed["paired"], needed


def test_paired_table_and_welch_fallback_through_the_records(tmp_path):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.5, 0.08], range(4), num_classes=6,
                        n_per_class=50, seed=3, seed_shared_std=0.03)
    # Remove one 0.5 run: that setting's seeds no longer match the reference's.
    runs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    at_half = [d for d in runs
               if json.loads((d / "config.json").read_text())["augment"]["min_scale"] == 0.5]
    shutil.rmtree(sorted(at_half)[0])
    frames = run_analysis(tmp_path / "runs", VARY, make_plots=False)
    table = frames["paired"]
    by_setting = table.groupby("setting")["test"].first()
    assert by_setting[0.08] == paired.PAIRED and by_setting[0.5] == paired.WELCH_FALLBACK
    welch = frames["welch"].set_index(["setting", "class"])
    fallback = table[table["setting"] == 0.5].set_index(["setting", "class"])
    np.testing.assert_allclose(fallback["p_less"], welch.loc[fallback.index, "p_less"])
    assert (table.loc[table["setting"] == 0.08, "n_pairs"] == 4).all()
    t1 = frames["table1_paired"]
    assert set(t1["test"]) == {paired.PAIRED, paired.WELCH_FALLBACK}
    assert t1["confidence"].tolist() == [90, 95, 99] * 2


# ----------------------------------------------------------------------------------------
# Cross-fitted oracle and selection
# ----------------------------------------------------------------------------------------

def test_crossfit_oracle_gain_is_centred_on_zero_with_no_effect():
    """11 identical settings x 20 seeds, per-class seed sd 3-5 points (the issue's
    simulation): the in-sample gain is clearly positive, the permuted (noise-only) gain
    matches it, and the cross-fitted gain is centred on zero: over 8 simulations of 500
    classes its mean is within 3 standard errors of 0."""
    rng = np.random.default_rng(9)
    num_classes = 500
    weights = np.full(num_classes, 1.0 / num_classes)
    present = np.ones((11, 20), dtype=bool)
    in_sample, cross_fitted, noise, standard_errors = [], [], [], []
    for _ in range(8):
        true = np.tile(rng.uniform(0.6, 0.9, num_classes), (11, 1))
        sd = rng.uniform(0.03, 0.05, num_classes)
        accuracy = simulate_accuracy(true, 20, 1000, sd, 0.0, rng)
        result = crossfit.oracle_with_noise_reference(accuracy, present, weights, 0,
                                                      num_permutations=20)
        in_sample.append(float(result["gain_in"]))
        cross_fitted.append(float(result["gain_crossfit"]))
        noise.append(float(result["noise_gain_in"].mean()))
        standard_errors.append(float(result["gain_crossfit_se"]))
    assert min(in_sample) > 0.008                        # ~+1.4 points from noise alone
    assert np.mean(noise) == pytest.approx(np.mean(in_sample), rel=0.1)
    standard_error = np.std(cross_fitted, ddof=1) / math.sqrt(len(cross_fitted))
    assert abs(np.mean(cross_fitted)) < 3 * standard_error + 1e-4
    assert abs(np.mean(cross_fitted)) < 0.1 * np.mean(in_sample)
    # The reported standard error matches the spread over simulations (factor 2: 8 draws).
    assert 0.5 < np.std(cross_fitted, ddof=1) / np.mean(standard_errors) < 2


def test_crossfit_oracle_keeps_a_planted_per_class_gain():
    """Half the classes gain 5 points at setting 1, the other half at setting 2: the
    oracle's real gain is 2.5 points; cross-fitting keeps it, the noise reference does not."""
    rng = np.random.default_rng(10)
    num_classes = 400
    base = rng.uniform(0.6, 0.85, num_classes)
    true = np.tile(base, (3, 1))
    true[1, : num_classes // 2] += 0.05
    true[2, num_classes // 2:] += 0.05
    accuracy = simulate_accuracy(true, 10, 2000, 0.01, 0.0, rng)
    data = setting_data(accuracy, [1.0, 0.5, 0.08], 1.0, 2000)
    columns, class_acc = crossfit.crossfit_oracle(data, tables.class_means(data)[0])
    assert columns["oracle_gain_crossfit"] == pytest.approx(0.025, abs=0.004)
    assert columns["noise_gain_in_sample_mean"] < 0.01
    assert columns["permutation_p_gain"] == pytest.approx(1 / (1 + columns["n_permutations"]))
    assert "Per-class choices gain between" in columns["how_much_is_real"]
    assert columns["oracle_gain_low"] <= 0.025 <= columns["oracle_gain_high"]
    assert np.isfinite(class_acc).all()


def test_permutations_only_shuffle_settings_within_a_seed():
    present = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=bool)   # [S, J]
    source = crossfit.within_seed_permutations(present, 50, np.random.default_rng(0))
    for permutation in source:
        for seed, mapping in enumerate(permutation):
            assert sorted(mapping) == [0, 1, 2]
            ran = np.flatnonzero(present[:, seed])
            assert set(mapping[ran]) == set(ran)          # runs stay among present settings
    values = np.random.default_rng(1).random((3, 4, 5))
    folds = crossfit.seed_folds(present, 2)
    sums = crossfit.permuted_fold_sums(values, present, folds, 2, source[:3])
    for p in range(3):
        for k in range(2):
            for s in range(3):
                expected = sum(values[source[p, j, s], j] for j in range(4)
                               if folds[j] == k and present[source[p, j, s], j])
                np.testing.assert_allclose(sums[p, k, s], expected)
    # Every setting on the same seeds: an alternation, the same split at every setting.
    assert crossfit.seed_folds(np.ones((3, 6), bool), 2).tolist() == [0, 1, 0, 1, 0, 1]


def test_crossfit_selection_is_honest_about_a_noisy_pick():
    """Identical settings: the in-sample worst-class score of the pick is optimistic (a max
    over settings of noisy minima); the cross-fitted score is not above the true worst class
    on average, and K folds work."""
    rng = np.random.default_rng(12)
    num_classes = 50
    base = rng.uniform(0.7, 0.9, num_classes)
    accuracy = simulate_accuracy(np.tile(base, (6, 1)), 12, 300, 0.03, 0.0, rng)
    data = setting_data(accuracy, [1.0, 0.8, 0.6, 0.4, 0.2, 0.08], 1.0, 300)
    class_means = tables.class_means(data)[0]
    in_sample = stats.selection(data, class_means).set_index("criterion")
    for folds in (2, 3):
        honest = crossfit.crossfit_selection(data, class_means, folds).set_index("criterion")
        assert honest.loc["worst_class", "score_crossfit"] < in_sample.loc["worst_class",
                                                                            "score"]
        assert (honest["crossfit_folds"] == folds).all()
        assert honest.loc["mean_accuracy", "cost_top1_crossfit"] == 0


# ----------------------------------------------------------------------------------------
# Seed planning
# ----------------------------------------------------------------------------------------

def _simulated_power(test, seeds, drop, own_sd, shared_sd, trials, rng):
    """Share of `trials` simulated experiments (normal noise) in which `test` rejects."""
    shared = rng.normal(0, shared_sd, (1, seeds, trials))
    own = rng.normal(0, own_sd, (2, seeds, trials))
    accuracy = 0.75 + shared + own
    accuracy[1] -= drop
    return np.mean(test(accuracy[1], accuracy[0])["p_less"] < 0.05)


def test_power_csv_agrees_with_a_simulation_of_its_design():
    """power.csv's seeds per arm (from pilot runs) give power 0.8 in a simulation of the
    stated design, and one seed fewer gives less; for Welch and for the paired test."""
    rng = np.random.default_rng(13)
    own_sd, shared_sd, num_classes = 0.02, 0.03, 20
    accuracy = 0.75 + rng.normal(0, shared_sd, (1, 30, num_classes)) \
        + rng.normal(0, own_sd, (3, 30, num_classes))
    data = setting_data(accuracy, [1.0, 0.5, 0.08], 1.0)
    table = power.power_table(data)
    row = table[table["drop_points"] == 5].iloc[0]
    # The pilot recovers the noise: total sd for Welch, sd of differences for paired.
    assert row["seed_sd"] == pytest.approx(math.hypot(own_sd, shared_sd), rel=0.2)
    assert row["diff_sd"] == pytest.approx(math.sqrt(2) * own_sd, rel=0.2)
    trials = 20000
    tolerance = _binomial_tolerance(0.8, trials)
    for test, sd_column, seeds_column in ((stats.welch_less, "seed_sd", "seeds_per_arm_welch"),
                                          (paired.paired_less, "diff_sd",
                                           "seeds_per_arm_paired")):
        seeds = int(row[seeds_column])
        # Simulate the design with the pilot's noise (split as the pilot's model says).
        if sd_column == "seed_sd":
            own, shared = row["seed_sd"], 0.0
        else:
            own, shared = row["diff_sd"] / math.sqrt(2), 0.03
        at_n = _simulated_power(test, seeds, 0.05, own, shared, trials, rng)
        below = _simulated_power(test, seeds - 1, 0.05, own, shared, trials, rng)
        assert at_n > 0.8 - tolerance - 0.01, (sd_column, seeds, at_n)
        assert below < 0.8 + tolerance, (sd_column, seeds, below)
        assert at_n == pytest.approx(power.power_one_sided(seeds, 0.05, row[sd_column],
                                                           paired=test is paired.paired_less),
                                     abs=tolerance + 0.01)
    assert row["seeds_per_arm_paired"] < row["seeds_per_arm_welch"]


def test_seeds_needed_is_the_smallest_sufficient_count():
    rng = np.random.default_rng(14)
    sd = rng.uniform(0.0001, 0.2, 500)
    drops = np.array([0.01, 0.02, 0.05, 0.1])[:, None]
    for is_paired in (False, True):
        needed = power.seeds_needed(drops, sd, paired=is_paired)
        assert np.isfinite(needed).all()
        enough = power.power_one_sided(needed, drops, sd, is_paired)
        fewer = power.power_one_sided(np.maximum(needed - 1, 2), drops, sd, is_paired)
        assert (enough >= 0.8).all()
        assert (fewer[needed > 2] < 0.8).all()
    # The noncentral t needs more seeds than the normal approximation at small n.
    z = scipy_stats.norm.ppf(0.95) + scipy_stats.norm.ppf(0.8)
    assert power.seeds_needed(0.05, 0.03, paired=False) > 2 * (z * 0.03 / 0.05) ** 2
    assert np.isnan(power.seeds_needed(0.01, np.nan, paired=True))


def test_power_csv_and_new_tables_are_written(tmp_path):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.08], range(4), num_classes=8,
                        n_per_class=40, seed=5, seed_shared_std=0.02)
    out = tmp_path / "report"
    frames = run_analysis(tmp_path / "runs", VARY, out_dir=out, make_plots=False,
                          crossfit_folds=2)
    written = pd.read_csv(out / "power.csv")
    assert written["drop_points"].unique().tolist() == [1, 2, 5, 10]
    assert len(written) == 4 * 8
    oracle = pd.read_csv(out / "oracle.csv")
    for column in ("oracle_top1", "oracle_gain", "oracle_top1_crossfit",
                   "oracle_gain_crossfit", "noise_gain_in_sample_mean", "how_much_is_real"):
        assert column in oracle.columns, column
    selection = pd.read_csv(out / "selection.csv")
    assert {"score", "score_crossfit", "top1_crossfit", "cost_top1_crossfit"} <= set(
        selection.columns)
    for name in ("paired", "table1_paired"):
        assert (out / f"{name}.csv").is_file()
    text = summary_text(frames, [VARY])
    assert "cross-fitted" in text and "seeds per arm for power 0.8" in text
    assert "Table 1 (seed-paired" in text
    page = (out / "index.html").read_text()
    for phrase in ("Seed planning", "seed-paired", "Per-class choices gain between", "pick_agreement"):
        assert phrase in page, phrase
    with pytest.raises(Exception, match="crossfit-folds"):
        run_analysis(tmp_path / "runs", VARY, crossfit_folds=1)
