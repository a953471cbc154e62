"""The seed-paired one-sided t-test per class, beside the paper's unpaired Welch test.

Runs of one seed share the initialization, the data order and the crop draws at every
setting (augmentation is seeded per (seed, epoch, sample)), so a class's accuracy at a
setting and at the reference are correlated through the seed: the design is paired. On
the seed-matched differences d_j = acc_setting(seed j) - acc_reference(seed j):

    H0: mean(d) >= 0   (the setting does not lower this class)      H1: mean(d) < 0
    t = mean(d) / (sd(d) / sqrt(n)),  df = n - 1,  p_less = P(T_df <= t)

which is scipy.stats.ttest_rel(setting, reference, alternative='less'), for all classes at
once. Where the seed noise is shared between settings, sd(d) is smaller than the Welch
standard error and the paired test finds the same drop with fewer seeds. The Welch test
stays the default and the paper's number (Table 1); this one is reported beside it.

A setting whose seeds are not exactly the reference's (a missing, extra or repeated seed)
falls back to Welch on all its runs, and its `test` column says so. Degenerate classes
follow the rule of stats.welch_less: when all n differences are equal (sd(d) = 0, common
at 50 val images and few seeds) t is undefined, and the class gets the exact
randomization (sign-flip) p-value instead: under H0 each seed's two runs are exchangeable,
the 2^n sign patterns are equally likely, and n equal negative differences are the single
most extreme one, so p_less = 2^-n (1/4 at 2 seeds, 1/8 at 3: never 0); equal zero or
positive differences give p_less = 1 (t = 0 / -inf / +inf, flagged 'constant'). Fewer
than 2 pairs -> NaN ('too few runs').
"""
import numpy as np
import pandas as pd
from scipy.special import stdtr

from ffcv_bias.analysis.crossfit import seed_keys
from ffcv_bias.analysis.stats import (SMALLEST_P, TIE_TOLERANCE, _variance, benjamini_hochberg,
                                      smallest_exact_p, table1, welch_less,
                                      with_q_across_settings)

PAIRED = "paired"
WELCH_FALLBACK = "welch (seeds unmatched)"


def paired_less(setting_acc, reference_acc):
    """One-sided paired t-test per column; rows of the two [n, C] arrays are matched seeds.

    Returns a dict of [C] arrays: t, df, p_less, diff (mean difference), sd_diff and
    'degenerate' (object: '', 'constant', 'too few runs').
    """
    differences = np.asarray(setting_acc, float) - np.asarray(reference_acc, float)
    n, num_classes = differences.shape
    if n < 2:
        nan = np.full(num_classes, np.nan)
        return {"t": nan, "df": nan.copy(), "p_less": nan.copy(),
                "diff": differences.mean(axis=0) if n else nan.copy(), "sd_diff": nan.copy(),
                "degenerate": np.full(num_classes, "too few runs", dtype=object)}
    mean = differences.mean(axis=0)
    variance = _variance(differences)
    t, df, p_less, constant = paired_from_moments(mean, variance, n)
    return {"t": t, "df": df, "p_less": p_less, "diff": mean, "sd_diff": np.sqrt(variance),
            "degenerate": np.where(constant, "constant", "").astype(object)}


def paired_from_moments(mean, variance, n):
    """(t, df, p_less, constant) of the one-sided paired t-test from the mean and variance
    (ddof=1) of n >= 2 seed differences (any shape); equal differences by the exact
    sign-flip rule of the module docstring (also used by analysis/calibration.py)."""
    constant = variance == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / np.sqrt(variance / n)
    df = np.full(np.shape(mean), n - 1.0)
    p_less = np.maximum(stdtr(df, t), SMALLEST_P)
    tied = mean[constant]
    t[constant] = np.where(np.abs(tied) <= TIE_TOLERANCE, 0.0, np.copysign(np.inf, tied))
    p_less[constant] = np.where(tied < -TIE_TOLERANCE, smallest_exact_p(2 ** n), 1.0)
    return t, df, p_less, constant


def matched_rows(setting_seeds, reference_seeds):
    """(setting rows, reference rows) in one seed order when both arms ran exactly the same
    seeds (each once, none unknown); None otherwise (the Welch fallback)."""
    if None in setting_seeds or None in reference_seeds:
        return None
    setting_keys, reference_keys = seed_keys(setting_seeds), seed_keys(reference_seeds)
    if (len(set(setting_seeds)) != len(setting_seeds)
            or set(setting_keys) != set(reference_keys)):
        return None
    reference_row = {key: row for row, key in enumerate(reference_keys)}
    setting_rows = list(range(len(setting_keys)))
    return setting_rows, [reference_row[key] for key in setting_keys]


def _welch_as_paired(setting_acc, reference_acc):
    result = welch_less(setting_acc, reference_acc)
    return dict(result, diff=setting_acc.mean(axis=0) - reference_acc.mean(axis=0),
                sd_diff=np.full(setting_acc.shape[1], np.nan))


def paired_table(data):
    """paired.csv: per non-reference setting and class, the paired test (or the Welch
    fallback, named in `test`), with BH q-values within the setting."""
    reference_acc = data.acc[data.reference_index]
    reference_seeds = data.seeds[data.reference_index]
    frames = []
    for index, setting in enumerate(data.settings):
        if index == data.reference_index:
            continue
        setting_acc = data.acc[index]
        rows = matched_rows(data.seeds[index], reference_seeds)
        if rows is None:
            test, n_pairs = WELCH_FALLBACK, 0
            result = _welch_as_paired(setting_acc, reference_acc)
        else:
            test, n_pairs = PAIRED, len(rows[0])
            result = paired_less(setting_acc[rows[0]], reference_acc[rows[1]])
        frames.append(pd.DataFrame({
            "setting": [setting] * data.num_classes, "class": np.arange(data.num_classes),
            "class_name": data.class_names, "test": test,
            "n_ref": len(reference_acc), "n": len(setting_acc), "n_pairs": n_pairs,
            "diff": result["diff"], "sd_diff": result["sd_diff"], "t": result["t"],
            "df": result["df"], "p_less": result["p_less"],
            "q_less": benjamini_hochberg(result["p_less"]),
            "degenerate": result["degenerate"]}))
    columns = ["setting", "class", "class_name", "test", "n_ref", "n", "n_pairs", "diff",
               "sd_diff", "t", "df", "p_less", "q_less", "degenerate", "q_less_all_settings"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return with_q_across_settings(pd.concat(frames, ignore_index=True))


def table1_paired(paired):
    """Table 1 from the paired tests (stats.table1's columns plus `test` per setting)."""
    table = table1(paired)
    test_of = {}
    for setting, test in zip(paired["setting"], paired["test"]):
        test_of.setdefault(setting if not isinstance(setting, list) else tuple(setting), test)
    table.insert(1, "test", [test_of.get(s) for s in table["setting"]])
    return table
