"""Per-class statistics: the paper's one-sided Welch test, Table 1, the oracle, selection.

The Welch test (Balestriero, Bottou, LeCun 2022, Sec. 2.1 and Table 1)
------------------------------------------------------------------------
For one class, a setting s (e.g. tau = 8%) and the reference r (e.g. tau = 100%, no crop),
with the class's accuracy in each of the n_s and n_r seeds:

    H0: mean_s >= mean_r    (the regularizer does not lower this class's accuracy)
    H1: mean_s <  mean_r    (it lowers it)

    t  = (mean_s - mean_r) / sqrt(var_s / n_s + var_r / n_r)        (var with ddof=1)
    df = Welch-Satterthwaite;  p_less = P(T_df <= t)

This is `scipy.stats.ttest_ind(a_s, a_r, equal_var=False, alternative='less')`, computed
for all classes at once. A small p_less is evidence that the class LOSES accuracy.

Tied arms. Where both arms have zero sample variance (every run of each arm scores the
same, common with 50 val images per class, where accuracy moves in steps of 2 points, and
2-5 seeds), the t statistic is undefined (+-inf, or 0/0), and scipy returns p = 0 or
NaN. A zero sample variance is not evidence of a zero population variance, so such a
class gets the p-value of the exact randomization test of its mean difference instead:
under H0 the n_s + n_r runs are exchangeable between the arms, every one of the
C(n_s + n_r, n_s) assignments is equally likely, and when the arms are constant and
differ, the observed assignment is the single most extreme one:
  * equal constants: t = 0, p_less = 1;
  * setting lower:   t = -inf, p_less = 1 / C(n_s + n_r, n_s)  (1/6 at 2 + 2 seeds,
                     1/20 at 3 + 3, 1/252 at 5 + 5: never 0);
  * setting higher:  t = +inf, p_less = 1;
all flagged 'constant'. The rule is documented with its measured null behaviour in
docs/statistics.md (bench/stats_null.py). An arm with fewer than 2 runs has no variance
estimate: t and p_less are NaN, flagged 'too few runs', and the class is left out of
Table 1's denominator.

Effect sizes: `diff` = mean_s - mean_r (accuracy, a fraction) and Hedges' g = Cohen's d
with the pooled standard deviation (ddof=1) times the small-sample correction
1 - 3 / (4 (n_s + n_r) - 9).

Multiple testing: with 1,000 classes, about alpha x 1,000 null classes reject by chance.
`q_less` is the Benjamini-Hochberg adjusted p_less within one setting over its classes;
Table 1 reports the raw rate (as the paper) and the BH rate beside it.
"""
import math

import numpy as np
import pandas as pd
from scipy.special import stdtr  # Student t CDF; scipy.stats costs seconds to import

CONFIDENCES = (90, 95, 99)


# ----------------------------------------------------------------------------------------
# Welch, BH, effect size: vectorized over classes
# ----------------------------------------------------------------------------------------

# Values closer than this (accuracy as a fraction) are one value: seed differences of
# equal counts, e.g. 0.98 - 1.00 and 0.50 - 0.52, differ in their last bits, and that
# rounding residue must not pass for a tiny variance (t of 1e15, p of 1e-30).
TIE_TOLERANCE = 1e-9
# The smallest p-value reported (the smallest normal float): a t far in the tail (a 20-point
# drop over 1,000 seeds) underflows to 0 in double precision, and "p = 0" claims certainty
# that no finite sample gives.
SMALLEST_P = float(np.finfo(np.float64).tiny)


def _variance(samples):
    """Per-column variance (ddof=1), exactly 0 for columns constant to TIE_TOLERANCE."""
    variance = samples.var(axis=0, ddof=1)
    constant = samples.max(axis=0) - samples.min(axis=0) <= TIE_TOLERANCE
    variance[constant] = 0.0
    return variance


def welch_less(setting_acc, reference_acc):
    """One-sided Welch test per column: is the setting's mean lower than the reference's?

    setting_acc: [n_s, C], reference_acc: [n_r, C]. Returns a dict of [C] arrays:
    t, df, p_less, and 'degenerate' (object: '', 'constant', 'too few runs').
    """
    n_s, n_r = len(setting_acc), len(reference_acc)
    num_classes = setting_acc.shape[1]
    if n_s < 2 or n_r < 2:
        nan = np.full(num_classes, np.nan)
        return {"t": nan, "df": nan.copy(), "p_less": nan.copy(),
                "degenerate": np.full(num_classes, "too few runs", dtype=object)}
    t, df, p_less, constant = welch_from_moments(
        setting_acc.mean(axis=0), _variance(setting_acc), n_s,
        reference_acc.mean(axis=0), _variance(reference_acc), n_r)
    degenerate = np.where(constant, "constant", "").astype(object)
    return {"t": t, "df": df, "p_less": p_less, "degenerate": degenerate}


def welch_from_moments(mean_s, var_s, n_s, mean_r, var_r, n_r):
    """(t, df, p_less, constant) of the one-sided Welch test from each arm's means and
    variances (ddof=1; any shape, n_s and n_r >= 2), tied arms by the exact randomization
    rule of the module docstring. The null calibration (analysis/calibration.py) calls it
    on the moments of label-swapped records, so both apply one rule."""
    diff = mean_s - mean_r
    var_term_s, var_term_r = var_s / n_s, var_r / n_r
    standard_error_sq = var_term_s + var_term_r
    constant = standard_error_sq == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = diff / np.sqrt(standard_error_sq)
        df = standard_error_sq ** 2 / (var_term_s ** 2 / (n_s - 1) + var_term_r ** 2 / (n_r - 1))
    p_less = np.maximum(stdtr(df, t), SMALLEST_P)   # an underflow is not a p of 0
    tied = diff[constant]
    t[constant] = np.where(np.abs(tied) <= TIE_TOLERANCE, 0.0, np.copysign(np.inf, tied))
    exact_p = smallest_exact_p(math.comb(n_s + n_r, n_s))
    p_less[constant] = np.where(tied < -TIE_TOLERANCE, exact_p, 1.0)
    return t, df, p_less, constant


def smallest_exact_p(arrangements):
    """1 / arrangements, floored at SMALLEST_P: C(2000, 1000) arrangements (1,000 seeds
    per arm) would underflow to a p of 0, which no finite test can give."""
    return max(1.0 / arrangements if arrangements < 10 ** 300 else 0.0, SMALLEST_P)


def benjamini_hochberg(p_values):
    """BH adjusted p-values (q-values); NaNs stay NaN and do not count as tests."""
    p_values = np.asarray(p_values, dtype=np.float64)
    q_values = np.full_like(p_values, np.nan)
    tested = np.flatnonzero(~np.isnan(p_values))
    if len(tested) == 0:
        return q_values
    order = tested[np.argsort(p_values[tested], kind="stable")]
    ranks = np.arange(1, len(order) + 1)
    scaled = p_values[order] * len(order) / ranks
    # q_(i) = min over j >= i of p_(j) m / j: a running minimum from the largest p down.
    q_values[order] = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    return q_values


def hedges_g(setting_acc, reference_acc):
    """Hedges' g per column (Cohen's d with pooled ddof=1 SD, small-sample corrected)."""
    n_s, n_r = len(setting_acc), len(reference_acc)
    diff = setting_acc.mean(axis=0) - reference_acc.mean(axis=0)
    if n_s + n_r < 3:
        return np.full_like(diff, np.nan)
    pooled_var = (((n_s - 1) * _variance(setting_acc) if n_s > 1 else 0.0)
                  + ((n_r - 1) * _variance(reference_acc) if n_r > 1 else 0.0)) / (n_s + n_r - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        cohen_d = np.where(diff == 0, 0.0, diff / np.sqrt(pooled_var))
    correction = 1.0 - 3.0 / (4.0 * (n_s + n_r) - 9.0)
    return cohen_d * correction


def welch_table(data):
    """The Welch test of every non-reference setting against the reference, every class."""
    reference_acc = data.acc[data.reference_index]
    frames = []
    for index, setting in enumerate(data.settings):
        if setting == data.reference:
            continue
        setting_acc = data.acc[index]
        result = welch_less(setting_acc, reference_acc)
        frames.append(pd.DataFrame({
            "setting": [setting] * data.num_classes,
            "class": np.arange(data.num_classes),
            "class_name": data.class_names,
            "n_ref": len(reference_acc), "n": len(setting_acc),
            "mean_ref": reference_acc.mean(axis=0), "mean": setting_acc.mean(axis=0),
            "diff": setting_acc.mean(axis=0) - reference_acc.mean(axis=0),
            "hedges_g": hedges_g(setting_acc, reference_acc),
            "t": result["t"], "df": result["df"], "p_less": result["p_less"],
            "q_less": benjamini_hochberg(result["p_less"]),
            "degenerate": result["degenerate"],
        }))
    columns = ["setting", "class", "class_name", "n_ref", "n", "mean_ref", "mean", "diff",
               "hedges_g", "t", "df", "p_less", "q_less", "degenerate",
               "q_less_all_settings"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return with_q_across_settings(pd.concat(frames, ignore_index=True))


def with_q_across_settings(table):
    """`q_less_all_settings`: BH over every (setting, class) test of the table at once.
    q_less corrects within one setting only (the paper's Table 1 is per setting); a reader
    who scans all settings for a hurt class makes S x C tests, and this column is the
    false-discovery control for that reading."""
    table["q_less_all_settings"] = benjamini_hochberg(table["p_less"].to_numpy(float))
    return table


def setting_blocks(frame):
    """(setting, sub-frame) for each run of equal consecutive `setting` values, in order.

    Unlike DataFrame.groupby, keeps None and tuple settings and the table's own order.
    """
    values = frame["setting"].tolist()
    start = 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            yield values[start], frame.iloc[start:index]
            start = index


def table1(welch):
    """The paper's Table 1: % of classes whose accuracy is significantly LOWER at a setting.

    For each setting and confidence c (90, 95, 99): the percentage of classes for which
    the one-sided Welch test rejects H0 "accuracy at the setting >= accuracy at the
    reference" at level alpha = 1 - c/100, i.e. p_less < alpha. These are the classes the
    regularizer demonstrably hurts. (The paper's caption words it as "not greater"; its
    numbers, 5.9 / 4.5 / 2.6% for ResNet-50 random crop, fall as the confidence rises,
    which only the rejection rate does.) Classes without a test (fewer than 2 runs in an
    arm) are left out of the denominator (`n_classes_tested`).

    `percent_classes_bh` counts BH q_less < alpha instead (false discovery rate alpha);
    `expected_if_null` is the raw rate that no effect at all would give on average.
    """
    rows = []
    for setting, group in setting_blocks(welch):
        p_less = group["p_less"].to_numpy(dtype=np.float64)
        q_less = group["q_less"].to_numpy(dtype=np.float64)
        tested = ~np.isnan(p_less)
        n_tested = int(tested.sum())
        for confidence in CONFIDENCES:
            alpha = (100 - confidence) / 100
            lower = int((p_less[tested] < alpha).sum())
            lower_bh = int((q_less[tested] < alpha).sum())
            rows.append({
                "setting": setting, "confidence": confidence,
                "percent_classes": 100.0 * lower / n_tested if n_tested else np.nan,
                "n_classes_lower": lower, "n_classes_tested": n_tested,
                "percent_classes_bh": 100.0 * lower_bh / n_tested if n_tested else np.nan,
                "expected_if_null": 100.0 * alpha})
    return pd.DataFrame(rows, columns=["setting", "confidence", "percent_classes",
                                       "n_classes_lower", "n_classes_tested",
                                       "percent_classes_bh", "expected_if_null"])


# ----------------------------------------------------------------------------------------
# Oracle and model selection
# ----------------------------------------------------------------------------------------

def scored_classes(class_means):
    """Mask [C] of the classes with a mean at every setting. A class with no val images
    has accuracy 0/0 = NaN; it is left out of the oracle and the worst-class scores (not
    allowed to turn them all into NaN) and the tables say so."""
    return ~np.isnan(class_means).any(axis=0)


def excluded_class_note(data, scored):
    """'' or one line naming the classes left out of the oracle and selection."""
    names = [data.class_names[i] for i in np.flatnonzero(~scored)]
    if not names:
        return ""
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (f"{len(names)} class(es) without a per-class accuracy (no val images?) left out "
            f"of the oracle and selection: {shown}")


def argmax_nearest(scores, reference_index, axis=0, tolerance=1e-12):
    """Index of the largest score along `axis`, ties (within `tolerance`, to absorb
    rounding in sums) going to the index nearest `reference_index` (the lower of two
    equally near); NaN scores never win; -1 where a slice is all NaN."""
    scores = np.moveaxis(np.asarray(scores, dtype=np.float64), axis, 0)
    with np.errstate(invalid="ignore"):
        best = np.nanmax(np.where(np.isnan(scores), -np.inf, scores), axis=0)
        is_best = scores >= best - tolerance
    positions = np.arange(scores.shape[0]).reshape((-1,) + (1,) * (scores.ndim - 1))
    # Distance first, then the index itself, so equal distances go to the lower index.
    rank = np.abs(positions - reference_index) * scores.shape[0] + positions
    rank = np.where(is_best & ~np.isnan(scores), rank, np.iinfo(np.int64).max)
    pick = rank.argmin(axis=0)
    return np.where(np.isnan(scores).all(axis=0), -1, pick)


def oracle(data, class_means):
    """Best single setting vs. every class taking its own best setting (paper Sec. 3.4).

    class_means: [S, C] per-class accuracy averaged over seeds. The oracle gives each
    class its best setting's mean accuracy; its top-1 is the mean over classes weighted by
    the val images per class (plain mean when the counts are unknown). Classes without an
    accuracy (no val images: NaN) are left out and the weights renormalized over the rest.

    Caveat, optimistic bias: the oracle picks each class's setting on the same val set it
    is scored on, so part of its gain is selection on noise (with many settings and few
    images per class, even identical settings show an "oracle gain"). It bounds what
    class-dependent regularization could reach; it is not an achievable accuracy. The
    cross-fitted oracle (analysis/crossfit.py, biased low when gains are real) is the
    other end of the interval reported beside it.

    Returns (one-row summary DataFrame, per-class DataFrame).
    """
    scored = scored_classes(class_means)
    weights = np.where(scored, data.class_weights(), 0.0)
    weights = weights / weights.sum() if weights.sum() > 0 else weights
    means = np.where(scored, class_means, 0.0)
    mean_top1 = np.array([t.mean() for t in data.top1])
    best = int(argmax_nearest(mean_top1, data.reference_index))
    per_class_best = np.where(scored, argmax_nearest(class_means, data.reference_index), -1)
    oracle_acc = np.where(scored, means.max(axis=0), np.nan)
    oracle_top1 = float(weights @ means.max(axis=0))
    best_from_classes = float(weights @ means[best])
    summary = pd.DataFrame([{
        "best_setting": data.settings[best], "best_top1": float(mean_top1[best]),
        "reference_setting": data.reference,
        "reference_top1": float(mean_top1[data.reference_index]),
        "oracle_top1": oracle_top1,
        "oracle_gain": oracle_top1 - best_from_classes,
        "best_top1_class_weighted": best_from_classes,
        "class_weighting": "val counts" if data.class_counts is not None
                           else "uniform (no val_labels.npy found)",
        "n_settings": len(data.settings),
        "n_classes_scored": int(scored.sum())}])
    per_class = pd.DataFrame({
        "class": np.arange(data.num_classes), "class_name": data.class_names,
        "oracle_setting": [data.settings[i] if i >= 0 else None for i in per_class_best],
        "oracle_acc": oracle_acc, "best_setting_acc": class_means[best],
        "reference_acc": class_means[data.reference_index]})
    return summary, per_class


def selection_scores(class_means, mean_top1, worst_fraction=0.1):
    """{criterion: score [S]} on the scored classes (see `selection`); works on any [S, C]
    means, so the cross-fitted selection re-scores picks with the same definitions."""
    scored = scored_classes(class_means)
    means = class_means[:, scored]
    worst_count = max(1, math.ceil(worst_fraction * means.shape[1]))
    return {
        "mean_accuracy": np.asarray(mean_top1, dtype=np.float64),
        "worst_class": means.min(axis=1),
        "worst_10pct_mean": np.sort(means, axis=1)[:, :worst_count].mean(axis=1),
        "mean_minus_std": means.mean(axis=1) - means.std(axis=1),
    }


def selection(data, class_means, worst_fraction=0.1):
    """Which setting each criterion picks, and what it costs in mean top-1.

    Criteria, all on per-class accuracy averaged over seeds (`class_means` [S, C]):
      mean_accuracy      mean top-1 over seeds (what cross-validation usually maximizes)
      worst_class        accuracy of the worst class
      worst_10pct_mean   mean accuracy of the worst 10% of classes (at least one class)
      mean_minus_std     mean minus standard deviation of per-class accuracy (unweighted)
    `cost_top1` = top-1 of the pick minus top-1 of the mean-accuracy pick (<= 0): the price
    of choosing for fairness. Ties go to the setting nearest the reference. Classes without
    an accuracy (no val images) are left out of every score (`n_classes_scored`).
    """
    mean_top1 = np.array([t.mean() for t in data.top1])
    scored = scored_classes(class_means)
    scores = selection_scores(class_means, mean_top1, worst_fraction)
    mean_pick = int(argmax_nearest(mean_top1, data.reference_index))
    rows = []
    for criterion, score in scores.items():
        pick = int(argmax_nearest(score, data.reference_index))
        rows.append({"criterion": criterion, "setting": data.settings[pick],
                     "score": float(score[pick]), "top1": float(mean_top1[pick]),
                     "worst_class_acc": float(class_means[pick, scored].min()),
                     "cost_top1": float(mean_top1[pick] - mean_top1[mean_pick]),
                     "n_classes_scored": int(scored.sum())})
    return pd.DataFrame(rows)
