"""Analysis statistics and record reading, on synthetic run records with planted effects."""
import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ffcv_bias.analysis import (AnalysisError, linear_effects, load_runs, make_synthetic_runs,
                                run_analysis)
from ffcv_bias.analysis.records import accuracy_from_logits
from ffcv_bias.record.metrics import predictions_from_logits
from ffcv_bias.analysis.stats import benjamini_hochberg, hedges_g, welch_less
from ffcv_bias.record.runs import run_lock

TAUS = [1.0, 0.5, 0.08]


def _per_run_acc(run_dirs):
    """{setting: [n_runs, C]} straight from the summaries, independently of the analysis."""
    by_setting = {}
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        by_setting.setdefault(config["augment"]["min_scale"], []).append(summary["per_class_acc"])
    return {s: np.array(v) for s, v in by_setting.items()}


# ----------------------------------------------------------------------------------------
# Welch, BH, effect size
# ----------------------------------------------------------------------------------------

def test_welch_equals_scipy_on_random_data():
    rng = np.random.default_rng(1)
    setting = rng.normal(0.7, rng.uniform(0.01, 0.1, 50), size=(7, 50))
    reference = rng.normal(0.72, rng.uniform(0.01, 0.1, 50), size=(11, 50))
    ours = welch_less(setting, reference)
    expected = scipy_stats.ttest_ind(setting, reference, equal_var=False, alternative="less")
    np.testing.assert_allclose(ours["t"], expected.statistic, rtol=1e-9)
    np.testing.assert_allclose(ours["p_less"], expected.pvalue, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ours["df"], expected.df, rtol=1e-9)


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy, on the constant column
def test_welch_degenerate_classes():
    # class 0: both arms constant and equal; 1: constant, lower; 2: constant, higher;
    # 3: only the reference varies.
    setting = np.array([[1.0, 0.5, 0.9, 0.7], [1.0, 0.5, 0.9, 0.7], [1.0, 0.5, 0.9, 0.7]])
    reference = np.array([[1.0, 0.6, 0.8, 0.8], [1.0, 0.6, 0.8, 0.6], [1.0, 0.6, 0.8, 0.7]])
    result = welch_less(setting, reference)
    assert result["t"][0] == 0 and result["p_less"][0] == 1.0
    # Tied arms that differ: the exact randomization p, 1 / C(3 + 3, 3), never 0.
    assert result["t"][1] == -np.inf and result["p_less"][1] == pytest.approx(1 / 20)
    assert result["t"][2] == np.inf and result["p_less"][2] == 1.0
    assert list(result["degenerate"][:3]) == ["constant"] * 3
    expected = scipy_stats.ttest_ind(setting[:, 3], reference[:, 3], equal_var=False,
                                     alternative="less")
    assert result["p_less"][3] == pytest.approx(expected.pvalue, rel=1e-9)
    # An arm with one run has no variance: no test, NaN, flagged.
    single = welch_less(setting[:1], reference)
    assert np.isnan(single["p_less"]).all() and single["degenerate"][0] == "too few runs"


def test_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    q = benjamini_hochberg(p)
    np.testing.assert_allclose(q[:4], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert np.isnan(q[4])


def test_hedges_g_by_hand():
    setting = np.array([[1.0], [3.0]])      # mean 2, var 2
    reference = np.array([[4.0], [6.0]])    # mean 5, var 2 -> pooled SD sqrt(2)
    cohen_d = -3 / math.sqrt(2)
    assert hedges_g(setting, reference)[0] == pytest.approx(cohen_d * (1 - 3 / (4 * 4 - 9)))


# ----------------------------------------------------------------------------------------
# Planted effects and false positives
# ----------------------------------------------------------------------------------------

def test_planted_losers_are_flagged_and_match_scipy(tmp_path):
    losers, gainers = [3, 7, 11], [0, 1, 2, 4, 5, 6, 8, 9]
    effects = linear_effects(TAUS, 1.0, losers, gainers, max_loss=0.15, max_gain=0.08)
    records = make_synthetic_runs(tmp_path / "runs", TAUS, range(8), num_classes=40,
                                  n_per_class=200, effects=effects, noise_std=0.01, seed=3)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale", make_plots=False)

    welch = frames["welch"]
    strongest = welch[welch["setting"] == 0.08].set_index("class")
    assert set(strongest["p_less"].nsmallest(3).index) == set(losers)
    assert (strongest.loc[losers, "q_less"] < 0.01).all()
    assert (strongest.loc[losers, "diff"] < -0.1).all()
    # Equal to scipy on every class, from the raw summaries.
    acc = _per_run_acc(records["run_dirs"])
    expected = scipy_stats.ttest_ind(acc[0.08], acc[1.0], equal_var=False, alternative="less")
    np.testing.assert_allclose(strongest.sort_index()["p_less"], expected.pvalue, rtol=1e-9)
    np.testing.assert_allclose(strongest.sort_index()["t"], expected.statistic, rtol=1e-9)
    # The mean rises while the losers lose: the paper's trade-off.
    settings = frames["settings"].set_index("setting")
    assert settings.loc[0.08, "top1_mean"] > settings.loc[1.0, "top1_mean"]
    table1 = frames["table1"].set_index(["setting", "confidence"])
    assert table1.loc[(0.08, 99), "n_classes_lower"] >= 3
    assert table1.loc[(0.08, 99), "percent_classes_bh"] == pytest.approx(100 * 3 / 40)
    assert frames["oracle"].iloc[0]["best_setting"] == 0.08


def test_false_positive_rate_near_nominal_on_null_classes(tmp_path):
    num_classes = 1000
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.08], range(10), num_classes=num_classes,
                        n_per_class=200, noise_std=0.02, seed=11)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale", make_plots=False)
    table1 = frames["table1"].set_index("confidence")
    for confidence in (90, 95, 99):
        alpha = (100 - confidence) / 100
        rejected = table1.loc[confidence, "n_classes_lower"]
        tolerance = 4 * math.sqrt(num_classes * alpha * (1 - alpha))
        assert abs(rejected - num_classes * alpha) < tolerance, (confidence, rejected)
    # Under a complete null, BH rejects anything with probability <= alpha.
    assert table1.loc[95, "percent_classes_bh"] <= 0.5


# ----------------------------------------------------------------------------------------
# Oracle and selection, by hand
# ----------------------------------------------------------------------------------------

HAND_ACC = {1.0: [0.9, 0.5, 0.7], 0.5: [0.8, 0.7, 0.75], 0.08: [0.95, 0.4, 0.95]}


def _write_hand_runs(root, class_counts=None):
    """Two seeds per setting at acc +- 0.01 (so seed means are HAND_ACC exactly)."""
    weights = (np.ones(3) / 3 if class_counts is None
               else np.asarray(class_counts) / np.sum(class_counts))
    for setting, acc in HAND_ACC.items():
        for seed, shift in ((0, 0.01), (1, -0.01)):
            run_dir = root / f"tau{setting}_s{seed}"
            run_dir.mkdir(parents=True)
            config = {"augment": {"min_scale": setting}, "training": {"seed": seed},
                      "data": {"val_dataset": str(root / "missing.beton")}}
            per_class = [a + shift for a in acc]
            summary = {"run_id": run_dir.name, "top1": float(weights @ per_class), "top5": 1.0,
                       "per_class_acc": per_class, "n_val": 3 if class_counts is None
                       else int(np.sum(class_counts))}
            (run_dir / "config.json").write_text(json.dumps(config))
            (run_dir / "summary.json").write_text(json.dumps(summary))
            if class_counts is not None:
                np.save(run_dir / "val_labels.npy", np.repeat(np.arange(3), class_counts))


def test_oracle_and_selection_by_hand(tmp_path):
    _write_hand_runs(tmp_path)
    frames = run_analysis(tmp_path, "augment.min_scale", make_plots=False)
    oracle = frames["oracle"].iloc[0]
    assert oracle["best_setting"] == 0.08
    assert oracle["best_top1"] == pytest.approx(np.mean(HAND_ACC[0.08]))
    assert oracle["oracle_top1"] == pytest.approx(np.mean([0.95, 0.7, 0.95]))
    assert oracle["class_weighting"].startswith("uniform")
    per_class = frames["oracle_per_class"]
    assert per_class["oracle_setting"].tolist() == [0.08, 0.5, 0.08]
    assert per_class["class_name"].tolist() == ["class_0", "class_1", "class_2"]

    picks = frames["selection"].set_index("criterion")
    assert picks.loc["mean_accuracy", "setting"] == 0.08
    assert picks.loc["worst_class", "setting"] == 0.5
    assert picks.loc["worst_class", "score"] == pytest.approx(0.7)
    assert picks.loc["worst_10pct_mean", "setting"] == 0.5
    assert picks.loc["mean_minus_std", "setting"] == 0.5
    assert picks.loc["mean_minus_std", "score"] == pytest.approx(0.75 - np.std([0.8, 0.7, 0.75]))
    assert picks.loc["worst_class", "cost_top1"] == pytest.approx(0.75 - np.mean(HAND_ACC[0.08]))
    assert picks.loc["mean_accuracy", "cost_top1"] == 0


def test_oracle_weights_classes_by_val_counts(tmp_path):
    _write_hand_runs(tmp_path, class_counts=[1, 1, 2])
    oracle = run_analysis(tmp_path, "augment.min_scale", make_plots=False)["oracle"].iloc[0]
    assert oracle["class_weighting"] == "val counts"
    assert oracle["oracle_top1"] == pytest.approx(0.25 * 0.95 + 0.25 * 0.7 + 0.5 * 0.95)
    assert oracle["best_top1_class_weighted"] == pytest.approx(oracle["best_top1"])


# ----------------------------------------------------------------------------------------
# Records: incomplete runs, duplicates, logits, errors
# ----------------------------------------------------------------------------------------

def _make(tmp_path, name="runs", settings=(1.0, 0.08), seeds=range(4), **kwargs):
    kwargs.setdefault("num_classes", 6)
    kwargs.setdefault("n_per_class", 20)
    return make_synthetic_runs(tmp_path / name, list(settings), seeds, **kwargs)


def test_incomplete_and_duplicate_runs_are_counted_not_dropped(tmp_path):
    records = _make(tmp_path)
    failed, started = records["run_dirs"][-1], records["run_dirs"][-2]   # tau 0.08, seeds 3, 2
    (failed / "summary.json").unlink()
    (failed / "error.txt").write_text("CUDA out of memory\ntraceback...")
    (started / "summary.json").unlink()
    running = records["run_dirs"][0]                                     # tau 1.0, seed 0
    (running / "summary.json").unlink()
    copy = tmp_path / "copies" / records["run_dirs"][1].name
    shutil.copytree(records["run_dirs"][1], copy)

    with run_lock(running):
        frames = run_analysis([tmp_path / "runs", tmp_path / "copies"], "augment.min_scale",
                              make_plots=False)
    skipped = frames["skipped"].set_index("state")
    assert sorted(skipped.index) == ["duplicate", "failed", "running", "started"]
    assert "CUDA out of memory" in skipped.loc["failed", "reason"]
    assert skipped.loc["failed", "augment.min_scale"] == 0.08 and skipped.loc["failed", "seed"] == 3
    settings = frames["settings"].set_index("setting")
    assert settings.loc[0.08, "n_runs"] == 2 and settings.loc[1.0, "n_runs"] == 3
    assert settings.loc[0.08, "missing_seeds"] == "2 3"
    assert settings.loc[1.0, "missing_seeds"] == "0"
    assert len(frames["runs"]) == 5


def test_logits_only_records_match_summaries(tmp_path):
    records = _make(tmp_path, num_classes=7, n_per_class=[30, 10, 25, 40, 12, 33, 18],
                    with_logits=True, seed=5)
    from_summaries = load_runs([tmp_path / "runs"])
    for run_dir in records["run_dirs"]:
        summary = json.loads((run_dir / "summary.json").read_text())
        del summary["per_class_acc"], summary["top5"]
        (run_dir / "summary.json").write_text(json.dumps(summary))
    from_logits = load_runs([tmp_path / "runs"])
    np.testing.assert_array_equal(from_logits.per_class_acc, from_summaries.per_class_acc)
    np.testing.assert_allclose(from_logits.top5, from_summaries.top5)
    np.testing.assert_array_equal(from_logits.class_counts, [30, 10, 25, 40, 12, 33, 18])
    # Tiny chunks (3 rows at a time) give the same answer as one chunk.
    first = from_summaries.runs[0]
    chunked, top1, top5, _ = accuracy_from_logits(first.run_dir, need_top5=True,
                                                  max_chunk_elements=21)
    np.testing.assert_array_equal(chunked, from_summaries.per_class_acc[0])
    assert (top1, top5) == pytest.approx((first.summary["top1"], first.summary["top5"]))


def test_float16_argmax_key_agrees_with_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4000, 50)) * 8).astype(np.float16)
    logits[:1000] = -np.abs(logits[:1000])                      # all-negative rows
    logits[1000:1100, [3, 17]] = np.float16(60.0)                # ties: first column wins
    logits[1100, :] = -np.inf
    logits[1101, 40] = np.inf
    logits[1102, :] = np.float16(-3.0)
    logits[1103, [5, 9]] = np.float16(-0.0), np.float16(0.0)     # -0 == +0: column 5 wins
    logits[1103, :5] = logits[1103, 6:9] = logits[1103, 10:] = np.float16(-1.0)
    np.testing.assert_array_equal(predictions_from_logits(logits), logits.argmax(axis=1))
    assert predictions_from_logits(logits)[1103] == 5


# Mixed datasets and folders without a complete run: tests/test_bad_input.py.


def test_runs_differing_in_another_key_are_not_pooled(tmp_path):
    _make(tmp_path, name="wd0", extra_config={"training.weight_decay": 0.0})
    _make(tmp_path, name="wd5", extra_config={"training.weight_decay": 5e-4})
    roots = [tmp_path / "wd0", tmp_path / "wd5"]
    with pytest.raises(AnalysisError, match="differ in training.weight_decay"):
        run_analysis(roots, "augment.min_scale", make_plots=False)
    # Named as a second varied key, it splits the analysis instead.
    frames = run_analysis(roots, ["augment.min_scale", "training.weight_decay"], make_plots=False)
    assert sorted(frames["table1"]["training.weight_decay"].unique()) == [0.0, 5e-4]
    # Or the user declares it irrelevant.
    frames = run_analysis(roots, "augment.min_scale", ignore_keys=["training.weight_decay"],
                          make_plots=False)
    assert frames["settings"]["n_runs"].tolist() == [8, 8]


def test_data_diet_sparsity_may_change_keep_indices_but_not_score(tmp_path):
    for sparsity in (0.0, 0.3):
        make_synthetic_runs(tmp_path / "diet", [sparsity], range(2), num_classes=4,
                            n_per_class=10, vary_key="data.sparsity",
                            extra_config={"data.keep_indices": f"keep_{sparsity}.npy",
                                          "data.score": "el2n"}, seed=int(sparsity * 10))
    frames = run_analysis(tmp_path / "diet", "data.sparsity", make_plots=False)
    assert frames["oracle"].iloc[0]["reference_setting"] == 0.0
    make_synthetic_runs(tmp_path / "diet", [0.3], [5], num_classes=4, n_per_class=10,
                        vary_key="data.sparsity",
                        extra_config={"data.keep_indices": "keep_g.npy", "data.score": "grand"})
    with pytest.raises(AnalysisError, match="differ in data.score"):
        run_analysis(tmp_path / "diet", "data.sparsity", make_plots=False)


def test_reference_defaults_and_override(tmp_path):
    _make(tmp_path, name="tau", settings=(0.08, 0.5, 1.0))
    frames = run_analysis(tmp_path / "tau", "augment.min_scale", make_plots=False)
    assert frames["settings"]["setting"].tolist() == [1.0, 0.5, 0.08]   # no crop first
    assert frames["oracle"].iloc[0]["reference_setting"] == 1.0
    frames = run_analysis(tmp_path / "tau", "augment.min_scale", reference="0.5",
                          make_plots=False)
    assert set(frames["welch"]["setting"]) == {1.0, 0.08}
    with pytest.raises(AnalysisError, match="--reference 0.3 is not a value"):
        run_analysis(tmp_path / "tau", "augment.min_scale", reference="0.3", make_plots=False)

    _make(tmp_path, name="wd", settings=(5e-4, 0, 1e-4), vary_key="training.weight_decay")
    frames = run_analysis(tmp_path / "wd", "training.weight_decay", make_plots=False)
    assert frames["settings"]["setting"].tolist() == [0, 1e-4, 5e-4]
    with pytest.raises(AnalysisError, match="augment.minscale is absent"):
        run_analysis(tmp_path / "wd", "augment.minscale", make_plots=False)
