"""Null calibration of Table 1, measured on the records themselves.

Table 1 counts the classes a test flags as significantly lower at a setting. What count
would no effect at all give? The nominal answer (10 / 5 / 1% at 90 / 95 / 99%) holds for
independent runs and a test that is exact for the data; neither holds here. Runs of one
seed share initialization, data order and crops at every setting (the unpaired Welch
test then rejects far below its nominal rate), accuracy moves in steps of 1 / (val images
of the class), and classes are correlated within a run. So the null is measured:

For a setting s and the reference r, every seed j that both ran holds a pair of runs.
Under "s and r do not differ" the two runs of a pair are exchangeable, so swapping the
labels within any subset of the pairs gives records as likely as the observed ones. On
each swap pattern the same per-class tests as Table 1 run on every class
(analysis/stats.welch_from_moments, analysis/paired.paired_from_moments: tied arms by the
same exact rule), and the flagged classes are counted, at every confidence, raw and after
Benjamini-Hochberg. A pattern swaps whole runs, so the correlation between classes within
a run is kept: the null distribution is the real one, not that of independent classes.

Per setting, test and confidence this gives
  null_percent_classes      mean % of classes flagged over the BALANCED patterns (half
                            the pairs swapped; all of them, or MAX_ARRANGEMENTS random
                            ones): the rate no effect gives. Under no effect every
                            pattern is as likely as the records; under a real effect a
                            balanced swap cancels an effect every seed shows, while a
                            pattern swapping one pair in six keeps two thirds of it, so
                            the whole group's mean would count real effects as noise
  null_percent_classes_bh   the same at BH q < alpha
  null_any_bh               share of balanced patterns with any class at q < alpha
  calibration_p             the exact permutation p-value of the records' evidence of
                            lower classes, over the whole swap group (all 2^J patterns
                            when at most MAX_ARRANGEMENTS, else the records and random
                            patterns): the share of patterns whose evidence, the sum over
                            the flagged classes of log10(alpha / p_less), reaches the
                            records' own. It cannot be below 1 / n_arrangements: with 4
                            shared seeds, 1/16, so a pilot that small can never show its
                            findings to be more than noise, and the report says so
  n_arrangements, exhaustive (of the swap group)

Fast: a swap changes the sums of the two arms by the pair's difference, so all
arrangements' moments are two matrix products ([P, J] x [J, C]) per setting; the tests are
vectorized over arrangements and classes. Work is bounded by MAX_WORK multiply-adds per
setting (fewer arrangements, never under MIN_ARRANGEMENTS, on very large records).
"""
import numpy as np
import pandas as pd

from ffcv_bias.analysis.paired import (PAIRED, WELCH_FALLBACK, matched_rows,
                                      paired_from_moments)
from ffcv_bias.analysis.stats import CONFIDENCES, TIE_TOLERANCE, welch_from_moments

MAX_ARRANGEMENTS = 256
MIN_ARRANGEMENTS = 20
MAX_WORK = 10 ** 8           # 100 patterns at 1,000 seeds x 1,000 classes
CALIBRATION_SEED = 0          # fixed: the same records give the same calibration
# Moments from sums carry rounding residue; a variance below this (accuracy as a
# fraction: sd 1e-6, far below one image of 10^5) is a tie, as TIE_TOLERANCE is for values.
VARIANCE_TIE = TIE_TOLERANCE ** 2 * 1e6

COLUMNS = ["null_percent_classes", "null_percent_classes_bh", "null_any_bh",
           "calibration_p", "n_arrangements", "exhaustive"]


def _budget(num_pairs, num_classes):
    return max(MIN_ARRANGEMENTS, min(MAX_ARRANGEMENTS, MAX_WORK // max(1, num_pairs * num_classes)))


def _all_patterns(num_pairs):
    codes = np.arange(2 ** num_pairs)[:, None]
    return (codes >> np.arange(num_pairs)) & 1 == 1


def swap_patterns(num_pairs, num_classes, rng):
    """(patterns [P, J] bool, exhaustive): the swap group for calibration_p: every 2^J
    pattern when few enough, else the observed one (no swap) first and random others."""
    budget = _budget(num_pairs, num_classes)
    if num_pairs < 63 and 2 ** num_pairs <= budget:
        return _all_patterns(num_pairs), True
    random = rng.random((budget - 1, num_pairs)) < 0.5
    return np.vstack([np.zeros((1, num_pairs), dtype=bool), random]), False


def balanced_patterns(num_pairs, num_classes, rng):
    """[P, J] bool: patterns swapping half of the pairs (J // 2 or (J + 1) // 2), all of
    them when few enough, else random ones. For the null rates: under no effect every
    pattern is as likely as the records, so their mean rate is the no-effect rate; under a
    real effect a balanced swap cancels an effect that every seed shows, where a pattern
    swapping one pair of six keeps two thirds of it (the whole group's mean would count
    real effects as noise)."""
    budget = _budget(num_pairs, num_classes)
    sizes = {num_pairs // 2, (num_pairs + 1) // 2}
    if num_pairs <= 16:
        every = _all_patterns(num_pairs)
        every = every[np.isin(every.sum(axis=1), list(sizes))]
        if len(every) <= budget:
            return every
    order = np.argsort(rng.random((budget, num_pairs)), axis=1)
    swapped = rng.integers(min(sizes), max(sizes) + 1, size=(budget, 1))
    patterns = np.zeros((budget, num_pairs), dtype=bool)
    np.put_along_axis(patterns, order, np.arange(num_pairs) < swapped, axis=1)
    return patterns


def _pair_rows(setting_seeds, reference_seeds):
    """(setting rows, reference rows) of the seeds both arms ran (each seed's first run)."""
    reference_row = {}
    for row, seed in enumerate(reference_seeds):
        if seed is not None:
            reference_row.setdefault(seed, row)
    pairs, used = ([], []), set()
    for row, seed in enumerate(setting_seeds):
        if seed is not None and seed in reference_row and seed not in used:
            used.add(seed)
            pairs[0].append(row)
            pairs[1].append(reference_row[seed])
    return np.array(pairs[0], dtype=int), np.array(pairs[1], dtype=int)


def _variance_from_sums(total, total_sq, n):
    variance = (total_sq - total ** 2 / n) / (n - 1)
    return np.where(variance <= VARIANCE_TIE, 0.0, variance)


def welch_null_p(setting_acc, reference_acc, pairs, patterns):
    """p_less [P, C] of the Welch test on each swap pattern of the pairs."""
    centre = np.concatenate([setting_acc, reference_acc]).mean(axis=0)
    s, r = setting_acc - centre, reference_acc - centre
    n_s, n_r = len(s), len(r)
    difference = s[pairs[0]] - r[pairs[1]]                       # [J, C]
    square_difference = s[pairs[0]] ** 2 - r[pairs[1]] ** 2
    swaps = patterns.astype(np.float64)
    moved, moved_sq = swaps @ difference, swaps @ square_difference     # [P, C]
    sum_s, sum_r = s.sum(axis=0) - moved, r.sum(axis=0) + moved
    sq_s, sq_r = (s ** 2).sum(axis=0) - moved_sq, (r ** 2).sum(axis=0) + moved_sq
    _, _, p_less, _ = welch_from_moments(sum_s / n_s, _variance_from_sums(sum_s, sq_s, n_s),
                                         n_s, sum_r / n_r, _variance_from_sums(sum_r, sq_r, n_r),
                                         n_r)
    return p_less


def paired_null_p(differences, patterns):
    """p_less [P, C] of the paired test on each sign-flip pattern of the differences."""
    n = len(differences)
    signs = 1.0 - 2.0 * patterns.astype(np.float64)
    total = signs @ differences                                 # [P, C]
    total_sq = (differences ** 2).sum(axis=0)
    _, _, p_less, _ = paired_from_moments(total / n, _variance_from_sums(total, total_sq, n), n)
    return p_less


def _flag_counts(p_less):
    """{confidence: (raw counts [P], BH counts [P], evidence [P], tested classes)} over
    arrangements; evidence = sum over the flagged classes of log10(alpha / p)."""
    tested = ~np.isnan(p_less[0])
    p_less = p_less[:, tested]
    q_less = benjamini_hochberg_rows(p_less)
    counts = {}
    for confidence in CONFIDENCES:
        alpha = (100 - confidence) / 100
        flagged = p_less < alpha
        evidence = np.where(flagged, np.log10(alpha / np.maximum(p_less, 1e-300)), 0.0)
        counts[confidence] = (flagged.sum(axis=1), (q_less < alpha).sum(axis=1),
                              evidence.sum(axis=1), int(tested.sum()))
    return counts


def benjamini_hochberg_rows(p_values):
    """stats.benjamini_hochberg of every row of [P, C] p-values (no NaN) at once."""
    num_tests = p_values.shape[1]
    if not p_values.size:
        return p_values.copy()
    order = np.argsort(p_values, axis=1, kind="stable")
    scaled = np.take_along_axis(p_values, order, axis=1) * num_tests / np.arange(1, num_tests + 1)
    running_min = np.minimum.accumulate(scaled[:, ::-1], axis=1)[:, ::-1].clip(max=1.0)
    q_values = np.empty_like(p_values)
    np.put_along_axis(q_values, order, running_min, axis=1)
    return q_values


def _rows(setting, test, group, balanced, exhaustive):
    """Table 1's calibration rows of one setting and test: the null rates from the
    balanced swaps, calibration_p from the swap group (pattern 0: the records)."""
    rows = []
    for confidence, (_, _, evidence, tested) in group.items():
        raw, bh, _, _ = balanced[confidence]
        observed = evidence[0]
        if exhaustive:
            p_value = float(np.mean(evidence >= observed - 1e-9))
        else:  # the observed arrangement and P - 1 random ones
            p_value = float((1 + (evidence[1:] >= observed - 1e-9).sum()) / len(evidence))
        rows.append({"setting": setting, "test": test, "confidence": confidence,
                     "null_percent_classes": 100.0 * raw.mean() / tested if tested else np.nan,
                     "null_percent_classes_bh": 100.0 * bh.mean() / tested if tested
                     else np.nan,
                     "null_any_bh": float(np.mean(bh > 0)),
                     "calibration_p": p_value, "n_arrangements": len(evidence),
                     "exhaustive": exhaustive})
    return rows


def _nan_rows(setting, test):
    return [{"setting": setting, "test": test, "confidence": c, "n_arrangements": 0,
             "exhaustive": False} for c in CONFIDENCES]


def _calibrate(null_p, num_pairs, num_classes, rng):
    """(group counts, balanced counts, exhaustive) of one test: `null_p(patterns)` gives
    the p-values [P, C] on each swap pattern."""
    group, exhaustive = swap_patterns(num_pairs, num_classes, rng)
    balanced = balanced_patterns(num_pairs, num_classes, rng)
    return _flag_counts(null_p(group)), _flag_counts(null_p(balanced)), exhaustive


def null_calibration(data, rng_seed=CALIBRATION_SEED):
    """calibration frame: per non-reference setting, test ('welch', and 'paired' or its
    Welch fallback as in paired.paired_table) and confidence, the COLUMNS above."""
    reference_acc = data.acc[data.reference_index]
    reference_seeds = data.seeds[data.reference_index]
    rows = []
    for index, setting in enumerate(data.settings):
        if index == data.reference_index:
            continue
        rng = np.random.default_rng([rng_seed, index])
        setting_acc, seeds = data.acc[index], data.seeds[index]
        pairs = _pair_rows(seeds, reference_seeds)
        matched = matched_rows(seeds, reference_seeds)
        paired_name = PAIRED if matched is not None else WELCH_FALLBACK
        if len(setting_acc) < 2 or len(reference_acc) < 2 or len(pairs[0]) == 0:
            rows += _nan_rows(setting, "welch") + _nan_rows(setting, paired_name)
            continue
        welch = _calibrate(lambda patterns: welch_null_p(setting_acc, reference_acc, pairs,
                                                         patterns),
                           len(pairs[0]), data.num_classes, rng)
        rows += _rows(setting, "welch", *welch)
        if matched is None:       # the paired table falls back to Welch: so does this
            rows += _rows(setting, WELCH_FALLBACK, *welch)
            continue
        differences = setting_acc[matched[0]] - reference_acc[matched[1]]
        rows += _rows(setting, PAIRED, *_calibrate(
            lambda patterns: paired_null_p(differences, patterns), len(differences),
            data.num_classes, rng))
    return pd.DataFrame(rows, columns=["setting", "test", "confidence"] + COLUMNS)


def add_calibration(table, calibration, test):
    """Table 1 (stats.table1 or paired.table1_paired) with the calibration columns of
    `test` ('welch' or 'paired': the paired table's own test per setting) beside it."""
    if test == "welch":
        part = calibration[calibration["test"] == "welch"]
    else:
        part = calibration[calibration["test"] != "welch"]
    part = part.reset_index(drop=True)
    if len(part) != len(table):
        raise AssertionError("calibration rows do not match Table 1's")
    table = table.copy()
    for column in COLUMNS:
        table[column] = part[column].to_numpy()
    return table


VERDICT_CONFIDENCE = 95
VERDICT_ALPHA = 0.05


def verdict(row):
    """One line on a Table 1 row (one setting at one confidence): are its flagged classes
    more than the label swaps give, at this seed count?"""
    arrangements = int(row["n_arrangements"]) if row["n_arrangements"] == row["n_arrangements"] \
        else 0
    if not arrangements:
        return "no null calibration (needs at least 2 runs per arm and seeds both arms ran)"
    observed, null = row["percent_classes"], row["null_percent_classes"]
    p_value = row["calibration_p"]
    counts = (f"{observed:.1f}% flagged vs {null:.1f}% under label swaps within seeds "
              f"(calibration p = {p_value:.2g}, {arrangements} swaps")
    if p_value < VERDICT_ALPHA:
        return f"more than noise: {counts})"
    if 1.0 / arrangements >= VERDICT_ALPHA:
        return (f"indistinguishable from noise at this seed count: {counts}; 1/{arrangements} "
                f"is the smallest p so few seeds allow)")
    return f"indistinguishable from noise at this seed count: {counts})"


def verdict_rows(table):
    """(setting, test, verdict) at VERDICT_CONFIDENCE for each setting of a Table 1."""
    rows = table[table["confidence"] == VERDICT_CONFIDENCE]
    tests = rows["test"] if "test" in rows else ["welch"] * len(rows)
    return [(row["setting"], test, verdict(row))
            for (_, row), test in zip(rows.iterrows(), tests)]
